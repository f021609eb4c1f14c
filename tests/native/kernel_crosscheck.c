/* Runs kernel.c on cases written by tests/test_kernel_paths.py and compares every window's score with the
 * float64 formula's. Built as one translation unit with the kernel, for the machine itself or for another
 * architecture (64-bit ARM under qemu-user), so a path can be checked where Python cannot load it.
 *
 * Each case is bfloat16 rows (vfs_score_images) or 4-bit codes (vfs_score_codes), whose expected scores follow
 * the integer contract of KernelQuery.for_codes.
 *
 * Usage: kernel_crosscheck CASES_FILE -> prints "ok <isa> <cases> <max error>" and exits 0, or says what differs.
 */
#include "../../dashboard/scoring/kernel.c"

#include <stdio.h>

static void *read_array(FILE *f, size_t size, size_t count) {
    void *data = malloc(size * (count ? count : 1));
    if (!data || fread(data, size, count, f) != count) {
        fprintf(stderr, "truncated cases file\n");
        exit(2);
    }
    return data;
}

static int64_t read_i64(FILE *f) {
    int64_t value;
    if (fread(&value, sizeof value, 1, f) != 1) {
        fprintf(stderr, "truncated cases file\n");
        exit(2);
    }
    return value;
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s CASES_FILE\n", argv[0]);
        return 2;
    }
    FILE *f = fopen(argv[1], "rb");
    if (!f) {
        perror(argv[1]);
        return 2;
    }
    const int64_t cases = read_i64(f);
    const double tolerance = 1.0 / 16384; /* 2^-14: float32 accumulation of float32-exact products */
    double worst = 0.0;
    int64_t checked = 0;
    for (int64_t k = 0; k < cases; k++) {
        vfs_query q;
        const int64_t n = read_i64(f);
        q.grid_h = (int32_t)read_i64(f);
        q.grid_w = (int32_t)read_i64(f);
        q.channels = (int32_t)read_i64(f);
        q.out_h = (int32_t)read_i64(f);
        q.out_w = (int32_t)read_i64(f);
        q.n_terms = (int32_t)read_i64(f);
        q.n_cells = (int32_t)read_i64(f);
        q.n_runs = (int32_t)read_i64(f);
        const int64_t n_bits = read_i64(f), n_run_values = read_i64(f);
        const int32_t code_chunk = (int32_t)read_i64(f); /* 0: bfloat16 rows; else 4-bit codes laid out for a path
                                                            that reads this many packed bytes at a time */
        float floats[3];
        if (fread(floats, sizeof(float), 3, f) != 3) return 2;
        q.query_norm = floats[0];
        q.numerator_scale = floats[1];
        q.numerator_offset = floats[2];
        q.term_offsets = read_array(f, sizeof(int32_t), q.n_terms);
        q.term_lengths = read_array(f, sizeof(int32_t), q.n_terms);
        q.term_starts = read_array(f, sizeof(int64_t), q.n_terms);
        q.term_bits = read_array(f, sizeof(uint16_t), n_bits);
        q.cell_offsets = read_array(f, sizeof(int32_t), q.n_cells);
        q.cell_weights = read_array(f, sizeof(float), q.n_cells);
        q.cell_vectors = read_array(f, sizeof(float), (size_t)q.n_cells * q.channels);
        q.run_values = read_array(f, sizeof(float), n_run_values);
        q.code_values = code_chunk ? read_array(f, sizeof(int8_t), n_run_values) : NULL;
        const size_t positions = (size_t)q.grid_h * q.grid_w, windows = (size_t)q.out_h * q.out_w;
        void *rows = code_chunk ? read_array(f, 1, n * positions * q.channels / 2)
                                : read_array(f, sizeof(uint16_t), n * positions * q.channels);
        float *sqnorms = read_array(f, sizeof(float), n * positions);
        float *expected = read_array(f, sizeof(float), n * windows);
        if (code_chunk && code_chunk != vfs_code_chunk_bytes()) continue; /* another path's layout */
        checked++;
        float *best = malloc(sizeof(float) * n), *every = malloc(sizeof(float) * n * windows);
        int32_t *at = malloc(sizeof(int32_t) * n);
        const int status = code_chunk ? vfs_score_codes(&q, rows, sqnorms, NULL, 0, n, best, at, every)
                                      : vfs_score_images(&q, rows, sqnorms, NULL, 0, n, best, at, every);
        if (status != 0) {
            fprintf(stderr, "case %lld: the kernel could not allocate\n", (long long)k);
            return 1;
        }
        for (size_t i = 0; i < n * windows; i++) {
            const double error = fabs((double)every[i] - (double)expected[i]);
            worst = error > worst ? error : worst;
            if (error > tolerance) {
                fprintf(stderr, "case %lld (grid %dx%dx%d, %d runs%s): window score %zu is %.7f, expected %.7f\n",
                        (long long)k, q.grid_h, q.grid_w, q.channels, q.n_runs, code_chunk ? ", codes" : "", i,
                        every[i], expected[i]);
                return 1;
            }
        }
        for (int64_t i = 0; i < n; i++)
            if (best[i] != every[i * windows + at[i]]) {
                fprintf(stderr, "case %lld: the best window is not the reported one\n", (long long)k);
                return 1;
            }
    }
    printf("ok isa=%d cases=%lld max_error=%.3g\n", vfs_isa(), (long long)checked, worst);
    return 0;
}

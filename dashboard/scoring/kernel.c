/* Masked sliding-window cosine scores over a bfloat16 feature cache: the search's hot loop.
 *
 * Built and loaded by dashboard/scoring/kernel.py (cc -O3 -march=native, once per machine), which also states
 * the contract; dashboard/search.py keeps a torch implementation of the same scores for machines without a
 * C compiler. One pass over each image's features, straight from the memory map: no gather copies, no
 * temporaries, so a 10% candidate set reads 10% of the bytes.
 *
 * For every window (y, x) of every image:
 *     numerator   = sum over terms t of <T_t, F[y*W + x + offset_t ...]>   (T_t: weight^2 * query, one
 *                   run of consecutive cells of a mask row, which is contiguous in memory, compared at once)
 *     denominator = sum over cells k of weight_k^2 * sqnorm[y*W + x + offset_k]
 *     score       = numerator / (sqrt(denominator) * query_norm), 0 where the denominator is 0, in [-1, 1]
 * An image keeps its best window, the first in row-major order among equals.
 *
 * Three instruction paths, one chosen per build (kernel.py builds each with its own flags and picks at run time
 * from the CPU's flags):
 * - AVX512-BF16 (vdpbf16ps) multiplies the stored bfloat16 values by bfloat16 terms and accumulates in
 *   float32; a soft weight that makes T_t inexact in bfloat16 is carried as two terms (the bfloat16 value and
 *   its remainder), so the numerator is float32-exact either way.
 * - AVX2+FMA widens 16 stored values at a time to float32 in registers (a bfloat16 is the top half of a
 *   float32: a shift for the even values, a mask for the odd ones) and multiplies them by the float32 terms,
 *   same runs, same blocking: no copy of the image is made, so it streams like the AVX-512 path.
 * - NEON (64-bit ARM) does what the AVX2 path does with 4-lane registers: the same even/odd widening, the same
 *   query layout.
 * - The portable path widens the image to float32 once and multiplies it by float32 cells in plain loops.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512F__) && !defined(VFS_GENERIC)
#include <immintrin.h>
#define VFS_ISA 2
#define VFS_STEP_VALUES 64 /* values per inner-loop step, between two prefetch steps */
#elif defined(__AVX2__) && defined(__FMA__) && !defined(VFS_GENERIC)
#include <immintrin.h>
#define VFS_ISA 1
#define VFS_STEP_VALUES 32
#elif defined(__aarch64__) && defined(__ARM_NEON) && !defined(VFS_GENERIC)
#include <arm_neon.h>
#define VFS_ISA 3
#define VFS_STEP_VALUES 32
#else
#define VFS_ISA 0
#define VFS_STEP_VALUES 64
#endif
#define VFS_USE_BF16 (VFS_ISA == 2)
#define VFS_STREAMS (VFS_ISA > 0) /* scores straight from the stored values, no widened copy of the image */
#define VFS_EVEN_ODD (VFS_ISA == 1 || VFS_ISA == 3) /* paths that read the query's even/odd float32 runs */

#define VFS_BLOCK 8 /* windows scored together, sharing each load of the query */

typedef struct {
    int32_t grid_h, grid_w, channels;
    int32_t out_h, out_w;          /* windows per column and per row */
    int32_t n_terms;               /* bfloat16 numerator terms (AVX512-BF16 path): contiguous runs of cells */
    const int32_t *term_offsets;   /* position of each run's first cell relative to the window's top-left */
    const int32_t *term_lengths;   /* values in each run: cells x channels */
    const int64_t *term_starts;    /* where each run's values start in term_bits */
    const uint16_t *term_bits;     /* bfloat16 bit patterns of weight^2 * query, run after run */
    int32_t n_cells;               /* cells of the mask with a non-zero weight */
    const int32_t *cell_offsets;
    const float *cell_weights;     /* weight^2 per cell */
    const float *cell_vectors;     /* n_cells x channels float32: weight^2 * query cell (generic path) */
    float query_norm;              /* ||M * Q|| */
    int32_t n_runs;                /* the first n_runs terms without their remainders (AVX2 path) */
    const float *run_values;       /* float32 weight^2 * query, run after run, laid out like term_bits */
    /* first-stage queries over 4-bit codes (vfs_score_codes): */
    const int8_t *code_values;     /* int8 weight^2 * query * step, run after run (term_starts), in value order */
    float numerator_scale;         /* numerator = integer dot product * numerator_scale + numerator_offset */
    float numerator_offset;        /* 0 for bfloat16 rows; else the levels' centring and the means' share */
} vfs_query;

int vfs_isa(void) { return VFS_ISA; }

/* A plain read of n bytes, 32 at a time, as fast as the memory bus allows: the yardstick the benchmark holds
 * the kernel against. Returns a checksum so the reads cannot be optimised away. */
uint64_t vfs_read_bytes(const uint8_t *data, int64_t n) {
    uint64_t lanes[4] = {0, 0, 0, 0};
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        uint64_t words[4];
        memcpy(words, data + i, 32);
        for (int k = 0; k < 4; k++) lanes[k] ^= words[k];
    }
    for (; i < n; i++) lanes[0] ^= data[i];
    return lanes[0] ^ lanes[1] ^ lanes[2] ^ lanes[3];
}

/* scores of all windows of one image from their numerators. The denominators are summed over every grid position
 * as a window's top-left corner (`wide`, one contiguous stretch per mask cell, so the compiler vectorises it), then
 * the valid windows picked out. Where there are few such positions (a whole-grid mask has one), that loop runs a
 * few scalar steps per mask cell in one dependent chain; there each position sums its cells in four chains instead
 * (in-process A/B on an AVX2-only EPYC, first stage over 1M images: 0.84x the time for whole-grid masks). */
static void image_scores(const vfs_query *q, const float *sq, const float *numerators, float *denominators,
                         float *wide, float *scores) {
    const int32_t windows = q->out_h * q->out_w;
    const int32_t span = (q->out_h - 1) * q->grid_w + q->out_w; /* top-left corners, row-major on the grid */
    if (span < 8) {
        for (int32_t p = 0; p < span; p++) {
            float sums[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            int32_t k = 0;
            for (; k + 4 <= q->n_cells; k += 4)
                for (int u = 0; u < 4; u++) sums[u] += q->cell_weights[k + u] * sq[q->cell_offsets[k + u] + p];
            for (; k < q->n_cells; k++) sums[0] += q->cell_weights[k] * sq[q->cell_offsets[k] + p];
            wide[p] = (sums[0] + sums[1]) + (sums[2] + sums[3]);
        }
    } else {
        for (int32_t p = 0; p < span; p++) wide[p] = 0.0f;
        for (int32_t k = 0; k < q->n_cells; k++) {
            const float weight = q->cell_weights[k];
            const float *s = sq + q->cell_offsets[k];
            for (int32_t p = 0; p < span; p++) wide[p] += weight * s[p];
        }
    }
    for (int32_t y = 0; y < q->out_h; y++)
        for (int32_t x = 0; x < q->out_w; x++) denominators[y * q->out_w + x] = wide[y * q->grid_w + x];
    for (int32_t w = 0; w < windows; w++) {  /* branch-free, so the compiler vectorises it */
        const float d = denominators[w];
        float s = (numerators[w] + q->numerator_offset) / (sqrtf(d > 0.0f ? d : 1.0f) * q->query_norm);
        s = d > 0.0f && s == s ? s : 0.0f;  /* all-zero window: 0 */
        scores[w] = s > 1.0f ? 1.0f : (s < -1.0f ? -1.0f : s);
    }
}

/* Later images lie elsewhere in memory (and, filtered, anywhere): fetching the one VFS_PREFETCH_AHEAD images
 * ahead while this one is scored keeps the memory bus busy and hides the page walks of its pages (the
 * hardware prefetchers stop at 4 KiB pages). A few lines per step of the inner loop, so that the fetches
 * overlap the arithmetic instead of queueing up in bursts. Measured on 100,000 images: 3 ahead beat 1 by up
 * to 1.5x for 3x3 masks. */
/* Into L2 (prefetcht1), not L1: an image is 30-45 kB, more than L1 holds, and L2 keeps more fetches in flight.
 * Measured at 100,000 images, 7x7x320, AVX-512: 108-117 ms per query instead of 148-188 ms into L1. */
#ifndef VFS_PREFETCH_LOCALITY
#define VFS_PREFETCH_LOCALITY 2
#endif
#ifndef VFS_PREFETCH_AHEAD
#define VFS_PREFETCH_AHEAD 3
#endif
typedef struct {
    const char *next, *end;
    int32_t lines_per_step;
} prefetcher;

static inline void prefetch_step(prefetcher *pf) {
    for (int32_t k = 0; k < pf->lines_per_step && pf->next < pf->end; k++, pf->next += 64)
        __builtin_prefetch(pf->next, 0, VFS_PREFETCH_LOCALITY);
}

/* a bfloat16 is the top half of a float32 */
static inline float bf16_to_float(uint16_t bits) {
    const uint32_t wide = (uint32_t)bits << 16;
    float value;
    memcpy(&value, &wide, sizeof value);
    return value;
}

/* where run `offset` of each of `nb` windows starts in the image */
static inline void window_rows(const uint16_t *img, const int32_t *base, int32_t offset, int32_t channels, int nb,
                               const uint16_t **row) {
    for (int j = 0; j < nb; j++) row[j] = img + (size_t)(base[j] + offset) * channels;
}

/* the values [from, length) of a run that the vector loop left over, in scalar code (query values in order) */
static inline void run_tail(const uint16_t *const *row, const float *qv, int32_t from, int32_t length, int nb,
                            float *tail) {
    for (int32_t c = from; c < length; c++)
        for (int j = 0; j < nb; j++) tail[j] += bf16_to_float(row[j][c]) * qv[c];
}

#if VFS_USE_BF16
static inline __mmask32 chunk_mask(int32_t remaining) {
    return remaining >= 32 ? (__mmask32)0xffffffffu : (remaining <= 0 ? 0 : (__mmask32)((1u << remaining) - 1u));
}

/* numerators of `NB` windows at positions base[0..NB): 2 float32 accumulators per window stay in registers
 * (the unrolled loops let the compiler keep them out of memory) while each run's query values are loaded once
 * per 64 values; a run's tail is a masked load. */
#define VFS_DEFINE_BLOCK(NB)                                                                                    \
    static void numerators_##NB(const vfs_query *q, const uint16_t *img, const int32_t *base, float *out,       \
                                prefetcher *pf) {                                                               \
        const int32_t C = q->channels;                                                                          \
        __m512 acc0[NB], acc1[NB];                                                                              \
        _Pragma("GCC unroll 8") for (int j = 0; j < NB; j++) {                                                  \
            acc0[j] = _mm512_setzero_ps();                                                                      \
            acc1[j] = _mm512_setzero_ps();                                                                      \
        }                                                                                                       \
        for (int32_t t = 0; t < q->n_terms; t++) {                                                             \
            const uint16_t *qv = q->term_bits + q->term_starts[t];                                              \
            const int32_t length = q->term_lengths[t];                                                          \
            const uint16_t *row[NB];                                                                            \
            window_rows(img, base, q->term_offsets[t], C, NB, row);                                             \
            for (int32_t c = 0; c < length; c += 64) {                                                          \
                prefetch_step(pf);                                                                              \
                const __mmask32 m0 = chunk_mask(length - c), m1 = chunk_mask(length - c - 32);                  \
                const __m512bh q0 = (__m512bh)_mm512_maskz_loadu_epi16(m0, qv + c);                             \
                const __m512bh q1 = (__m512bh)_mm512_maskz_loadu_epi16(m1, qv + c + 32);                        \
                _Pragma("GCC unroll 8") for (int j = 0; j < NB; j++) {                                          \
                    acc0[j] = _mm512_dpbf16_ps(acc0[j], (__m512bh)_mm512_maskz_loadu_epi16(m0, row[j] + c), q0);\
                    acc1[j] = _mm512_dpbf16_ps(acc1[j],                                                         \
                                               (__m512bh)_mm512_maskz_loadu_epi16(m1, row[j] + c + 32), q1);    \
                }                                                                                               \
            }                                                                                                   \
        }                                                                                                       \
        _Pragma("GCC unroll 8") for (int j = 0; j < NB; j++)                                                    \
            out[j] = _mm512_reduce_add_ps(_mm512_add_ps(acc0[j], acc1[j]));                                     \
    }
#elif VFS_ISA == 1
static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* numerators of `NB` windows. 16 stored values are one 32-byte load read as 8 32-bit lanes: a shift turns
 * the low halves (the even values) into float32, a mask the high halves (the odd ones), and the query's values
 * are stored in that even/odd order (kernel.py), so no shuffle is needed. One float32 accumulator per window
 * stays in a register (8 independent FMA chains); run tails that are not a multiple of 16 values are finished in
 * scalar code (the query's tail values are stored in plain order). */
/* With few windows per block (a whole-grid box has one), one accumulator per window would leave the FMA
 * units waiting on each chain's latency: such blocks use ACCS accumulators per window, over consecutive
 * 16-value chunks. The next image is prefetched one step per VFS_STEP_VALUES values, the pace score_rows spreads
 * its lines over, whatever ACCS is: one step per loop (16 * ACCS values) fetched it in bursts within the first
 * half of the image's work, and in-process A/B runs on an AVX2-only EPYC (100,000 images from RAM) timed that
 * 1.1-1.5x slower for 1-cell and 3x3 masks. */
#define VFS_ACCS(NB) ((NB) <= 2 ? 4 : ((NB) <= 4 ? 2 : 1))
#define VFS_DEFINE_BLOCK(NB)                                                                                    \
    static void numerators_##NB(const vfs_query *q, const uint16_t *img, const int32_t *base, float *out,       \
                                prefetcher *pf) {                                                               \
        enum { ACCS = VFS_ACCS(NB) };                                                                           \
        const int32_t C = q->channels;                                                                          \
        const __m256i high = _mm256_set1_epi32((int)0xffff0000u);                                               \
        __m256 acc[NB][ACCS];                                                                                   \
        float tail[NB];                                                                                         \
        _Pragma("GCC unroll 8") for (int j = 0; j < NB; j++) {                                                  \
            _Pragma("GCC unroll 4") for (int u = 0; u < ACCS; u++) acc[j][u] = _mm256_setzero_ps();             \
            tail[j] = 0.0f;                                                                                     \
        }                                                                                                       \
        for (int32_t t = 0; t < q->n_runs; t++) {                                                              \
            const float *qv = q->run_values + q->term_starts[t];                                                \
            const int32_t length = q->term_lengths[t];                                                          \
            const uint16_t *row[NB];                                                                            \
            window_rows(img, base, q->term_offsets[t], C, NB, row);                                             \
            int32_t c = 0;                                                                                      \
            for (; c + 16 * ACCS <= length; c += 16 * ACCS) {                                                   \
                if (16 * ACCS < VFS_STEP_VALUES) {                                                              \
                    if ((c & (VFS_STEP_VALUES - 1)) == 0) prefetch_step(pf);                                    \
                } else {                                                                                        \
                    _Pragma("GCC unroll 2") for (int s = 0; s < 16 * ACCS / VFS_STEP_VALUES; s++)               \
                        prefetch_step(pf);                                                                      \
                }                                                                                               \
                _Pragma("GCC unroll 4") for (int u = 0; u < ACCS; u++) {                                        \
                    const int32_t at = c + 16 * u;                                                              \
                    const __m256 q_even = _mm256_loadu_ps(qv + at), q_odd = _mm256_loadu_ps(qv + at + 8);       \
                    _Pragma("GCC unroll 8") for (int j = 0; j < NB; j++) {                                      \
                        const __m256i raw = _mm256_loadu_si256((const __m256i *)(row[j] + at));                 \
                        acc[j][u] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(raw, 16)), q_even,    \
                                                    acc[j][u]);                                                 \
                        acc[j][u] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(raw, high)), q_odd,    \
                                                    acc[j][u]);                                                 \
                    }                                                                                           \
                }                                                                                               \
            }                                                                                                   \
            for (; c + 16 <= length; c += 16) {                                                                 \
                const __m256 q_even = _mm256_loadu_ps(qv + c), q_odd = _mm256_loadu_ps(qv + c + 8);             \
                _Pragma("GCC unroll 8") for (int j = 0; j < NB; j++) {                                          \
                    const __m256i raw = _mm256_loadu_si256((const __m256i *)(row[j] + c));                      \
                    acc[j][0] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(raw, 16)), q_even,        \
                                                acc[j][0]);                                                     \
                    acc[j][0] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(raw, high)), q_odd,        \
                                                acc[j][0]);                                                     \
                }                                                                                               \
            }                                                                                                   \
            run_tail(row, qv, c, length, NB, tail);                                                             \
        }                                                                                                       \
        _Pragma("GCC unroll 8") for (int j = 0; j < NB; j++) {                                                  \
            __m256 sum = acc[j][0];                                                                             \
            _Pragma("GCC unroll 4") for (int u = 1; u < ACCS; u++) sum = _mm256_add_ps(sum, acc[j][u]);         \
            out[j] = hsum256(sum) + tail[j];                                                                    \
        }                                                                                                       \
    }
#elif VFS_ISA == 3
/* numerators of `NB` windows, as on AVX2 with 4-lane registers: 16 stored values are two 16-byte loads read as
 * 32-bit lanes; a shift gives the even values as float32, a mask the odd ones, matching the query's even/odd
 * layout. Two accumulators per window (even and odd products) keep two FMA chains per window in flight. */
#define VFS_DEFINE_BLOCK(NB)                                                                                    \
    static void numerators_##NB(const vfs_query *q, const uint16_t *img, const int32_t *base, float *out,       \
                                prefetcher *pf) {                                                               \
        const int32_t C = q->channels;                                                                          \
        const uint32x4_t high = vdupq_n_u32(0xffff0000u);                                                       \
        float32x4_t acc_even[NB], acc_odd[NB];                                                                  \
        float tail[NB];                                                                                         \
        for (int j = 0; j < NB; j++) {                                                                          \
            acc_even[j] = vdupq_n_f32(0.0f);                                                                    \
            acc_odd[j] = vdupq_n_f32(0.0f);                                                                     \
            tail[j] = 0.0f;                                                                                     \
        }                                                                                                       \
        for (int32_t t = 0; t < q->n_runs; t++) {                                                              \
            const float *qv = q->run_values + q->term_starts[t];                                                \
            const int32_t length = q->term_lengths[t];                                                          \
            const uint16_t *row[NB];                                                                            \
            window_rows(img, base, q->term_offsets[t], C, NB, row);                                             \
            int32_t c = 0;                                                                                      \
            for (; c + 16 <= length; c += 16) {                                                                 \
                if ((c & (VFS_STEP_VALUES - 1)) == 0) prefetch_step(pf);                                        \
                const float32x4_t e0 = vld1q_f32(qv + c), e1 = vld1q_f32(qv + c + 4);                           \
                const float32x4_t o0 = vld1q_f32(qv + c + 8), o1 = vld1q_f32(qv + c + 12);                      \
                for (int j = 0; j < NB; j++) {                                                                  \
                    const uint32x4_t a = vreinterpretq_u32_u16(vld1q_u16(row[j] + c));                          \
                    const uint32x4_t b = vreinterpretq_u32_u16(vld1q_u16(row[j] + c + 8));                      \
                    acc_even[j] = vfmaq_f32(acc_even[j], vreinterpretq_f32_u32(vshlq_n_u32(a, 16)), e0);        \
                    acc_even[j] = vfmaq_f32(acc_even[j], vreinterpretq_f32_u32(vshlq_n_u32(b, 16)), e1);        \
                    acc_odd[j] = vfmaq_f32(acc_odd[j], vreinterpretq_f32_u32(vandq_u32(a, high)), o0);          \
                    acc_odd[j] = vfmaq_f32(acc_odd[j], vreinterpretq_f32_u32(vandq_u32(b, high)), o1);          \
                }                                                                                               \
            }                                                                                                   \
            run_tail(row, qv, c, length, NB, tail);                                                             \
        }                                                                                                       \
        for (int j = 0; j < NB; j++) out[j] = vaddvq_f32(vaddq_f32(acc_even[j], acc_odd[j])) + tail[j];         \
    }
#endif

#if VFS_STREAMS
VFS_DEFINE_BLOCK(1)
VFS_DEFINE_BLOCK(2)
VFS_DEFINE_BLOCK(3)
VFS_DEFINE_BLOCK(4)
VFS_DEFINE_BLOCK(5)
VFS_DEFINE_BLOCK(6)
VFS_DEFINE_BLOCK(7)
VFS_DEFINE_BLOCK(8)
typedef void (*block_fn)(const vfs_query *, const uint16_t *, const int32_t *, float *, prefetcher *);
static const block_fn BLOCKS[VFS_BLOCK + 1] = {0, numerators_1, numerators_2, numerators_3, numerators_4,
                                               numerators_5, numerators_6, numerators_7, numerators_8};

static void image_numerators(const vfs_query *q, const uint16_t *img, const int32_t *bases, int32_t windows,
                             float *scratch, float *out, prefetcher *pf) {
    (void)scratch;
    for (int32_t w0 = 0; w0 < windows; w0 += VFS_BLOCK) {
        const int32_t nb = windows - w0 < VFS_BLOCK ? windows - w0 : VFS_BLOCK;
        BLOCKS[nb](q, img, bases + w0, out + w0, pf);
    }
    while (pf->next < pf->end) prefetch_step(pf); /* whatever the steps did not reach */
}
#else
/* Portable path: widen the image to float32 once (bfloat16 is the top half of a float32), then plain dot
 * products the compiler vectorises. */
static void image_numerators(const vfs_query *q, const uint16_t *img, const int32_t *bases, int32_t windows,
                             float *scratch, float *out, prefetcher *pf) {
    const int32_t C = q->channels;
    while (pf->next < pf->end) prefetch_step(pf);
    const size_t values = (size_t)q->grid_h * q->grid_w * C;
    for (size_t i = 0; i < values; i++) {
        const uint32_t bits = (uint32_t)img[i] << 16;
        memcpy(scratch + i, &bits, sizeof(float));
    }
    for (int32_t w = 0; w < windows; w++) {
        float total = 0.0f;
        for (int32_t k = 0; k < q->n_cells; k++) {
            const float *f = scratch + (size_t)(bases[w] + q->cell_offsets[k]) * C;
            const float *v = q->cell_vectors + (size_t)k * C;
            float s = 0.0f;
#pragma omp simd reduction(+ : s)
            for (int32_t c = 0; c < C; c++) s += f[c] * v[c];
            total += s;
        }
        out[w] = total;
    }
}
#endif

/* 4-bit first-stage codes (cache_builder/index.py): each cell stores its C projected values as C / 2 bytes, in
 * groups of 32 values packed into 16 bytes (byte i: value i in the low nibble, value 16 + i in the high one), the
 * nibble v standing for the level v - 7.5. A window's numerator is an integer dot product of the nibbles with the
 * query's int8 values (code_values: weight^2 * query * step, quantised by kernel.py), exact on every path;
 * numerator_scale and numerator_offset then make it the numerator of the formula on the codes' values (the levels'
 * centring and the quantiser's means folded in).
 *
 * The x86 paths read a run's bytes VFS_CODE_CHUNK at a time straight from the codes and split each load into its
 * low and high nibbles with a mask and a shift, in registers: no decoded copy is written (measured at 200,000
 * images, 128 values a cell, AVX-512: 1.3-1.7x faster than unpacking each image once into a byte per value, even
 * for 3x3 boxes, which read most cells 9 times). code_values holds each chunk's query values in the order the
 * path reads them: the low nibbles' values of the chunk's groups first, then the high ones' (kernel.py lays them
 * out by `vfs_code_chunk_bytes`). The other paths unpack an image's nibbles once into bytes, in value order, and
 * use plain loops. */
#define VFS_CODE_GROUP 32 /* values per 16-byte group */
#if VFS_ISA == 2
#define VFS_CODE_CHUNK 64
#elif VFS_ISA == 1
#define VFS_CODE_CHUNK 32
#else
#define VFS_CODE_CHUNK 16 /* one group: its low then high nibbles are its values in order */
#endif

int vfs_code_chunk_bytes(void) { return VFS_CODE_CHUNK; }

static inline void code_rows(const uint8_t *img, const int32_t *base, int32_t offset, int32_t cell_bytes, int nb,
                             const uint8_t **row) {
    for (int j = 0; j < nb; j++) row[j] = img + (size_t)(base[j] + offset) * cell_bytes;
}

#if VFS_ISA == 1 || VFS_ISA == 2
/* the sums of 8 vectors of 8 int32 lanes, as floats in out[0..8): a tree of horizontal adds, not 8 reductions */
static inline void store_sums8(const __m256i *s, float *out) {
    const __m256i t0 = _mm256_hadd_epi32(s[0], s[1]), t1 = _mm256_hadd_epi32(s[2], s[3]);
    const __m256i t2 = _mm256_hadd_epi32(s[4], s[5]), t3 = _mm256_hadd_epi32(s[6], s[7]);
    const __m256i u0 = _mm256_hadd_epi32(t0, t1), u1 = _mm256_hadd_epi32(t2, t3); /* per 128-bit half */
    const __m256i sums = _mm256_add_epi32(_mm256_permute2x128_si256(u0, u1, 0x20),
                                          _mm256_permute2x128_si256(u0, u1, 0x31));
    _mm256_storeu_ps(out, _mm256_cvtepi32_ps(sums));
}

static inline void store_sums(const __m256i *s, int nb, float *out) {
    if (nb == 8) {
        store_sums8(s, out);
        return;
    }
    for (int j = 0; j < nb; j++) {
        __m128i v = _mm_add_epi32(_mm256_castsi256_si128(s[j]), _mm256_extracti128_si256(s[j], 1));
        v = _mm_add_epi32(v, _mm_shuffle_epi32(v, 0x4e));
        v = _mm_add_epi32(v, _mm_shuffle_epi32(v, 0xb1));
        out[j] = (float)_mm_cvtsi128_si32(v);
    }
}
#endif

#if VFS_ISA == 2
/* AVX512-VNNI: 64 packed bytes = 128 values per load; each nibble half times its 64 query bytes, summed into 16
 * int32 lanes by one vpdpbusd (two accumulators per window: the halves' chains overlap). A run's last chunk (runs
 * are whole cells) is a masked load. A chunk of at most 32 bytes (a run of one 64-dimension cell, the tail of
 * a longer one) would fill half a register: two windows' chunks share one instead, the query's bytes in both
 * halves, into accumulators of window pairs (`benchmarks/kernel_ab.py`, 500k images of 14x14 cells of 64 dims
 * in RAM: 3x3 boxes 0.94x the time, single cells 1.02x: there the time goes to each window's scoring). */
#define VFS_CODE_STEP 128 /* values per step */
#define VFS_DEFINE_CODE_BLOCK(NB)                                                                               \
    static void code_numerators_##NB(const vfs_query *q, const uint8_t *img, const int32_t *base, float *out,   \
                                     prefetcher *pf) {                                                          \
        const __m512i nibble = _mm512_set1_epi8(0x0f);                                                          \
        __m512i acc_low[NB], acc_high[NB], pair_low[(NB + 1) / 2], pair_high[(NB + 1) / 2];                     \
        _Pragma("GCC unroll 8") for (int j = 0; j < NB; j++) {                                                  \
            acc_low[j] = _mm512_setzero_si512();                                                                \
            acc_high[j] = _mm512_setzero_si512();                                                               \
        }                                                                                                       \
        _Pragma("GCC unroll 4") for (int j = 0; j < (NB + 1) / 2; j++) {                                        \
            pair_low[j] = _mm512_setzero_si512();                                                               \
            pair_high[j] = _mm512_setzero_si512();                                                              \
        }                                                                                                       \
        int paired = 0;                                                                                         \
        for (int32_t t = 0; t < q->n_runs; t++) {                                                              \
            const int8_t *qv = q->code_values + q->term_starts[t];                                              \
            const int32_t bytes = q->term_lengths[t] / 2;                                                       \
            const uint8_t *row[NB];                                                                             \
            code_rows(img, base, q->term_offsets[t], q->channels / 2, NB, row);                                 \
            for (int32_t b = 0; b < bytes; b += 64) {                                                           \
                prefetch_step(pf);                                                                              \
                const int32_t chunk = bytes - b < 64 ? bytes - b : 64;                                          \
                if (chunk <= 32) {                                                                              \
                    paired = 1;                                                                                 \
                    const __mmask32 m = chunk_mask(chunk);                                                      \
                    const __m512i q_low = _mm512_broadcast_i64x4(_mm256_maskz_loadu_epi8(m, qv + 2 * b));       \
                    const __m512i q_high = _mm512_broadcast_i64x4(_mm256_maskz_loadu_epi8(m, qv + 2 * b + chunk)); \
                    _Pragma("GCC unroll 4") for (int j = 0; j < NB; j += 2) {                                   \
                        const __m256i first = _mm256_maskz_loadu_epi8(m, row[j] + b);                           \
                        const __m512i packed = j + 1 < NB                                                       \
                            ? _mm512_inserti64x4(_mm512_castsi256_si512(first),                                 \
                                                 _mm256_maskz_loadu_epi8(m, row[j + 1] + b), 1)                 \
                            : _mm512_zextsi256_si512(first);                                                    \
                        pair_low[j / 2] = _mm512_dpbusd_epi32(pair_low[j / 2], _mm512_and_si512(packed, nibble), \
                                                              q_low);                                           \
                        pair_high[j / 2] = _mm512_dpbusd_epi32(                                                 \
                            pair_high[j / 2], _mm512_and_si512(_mm512_srli_epi16(packed, 4), nibble), q_high);  \
                    }                                                                                           \
                    continue;                                                                                   \
                }                                                                                               \
                const __mmask64 m = chunk == 64 ? ~(__mmask64)0 : (((__mmask64)1 << chunk) - 1);               \
                const __m512i q_low = _mm512_maskz_loadu_epi8(m, qv + 2 * b);                                   \
                const __m512i q_high = _mm512_maskz_loadu_epi8(m, qv + 2 * b + chunk);                          \
                _Pragma("GCC unroll 8") for (int j = 0; j < NB; j++) {                                          \
                    const __m512i packed = _mm512_maskz_loadu_epi8(m, row[j] + b);                              \
                    acc_low[j] = _mm512_dpbusd_epi32(acc_low[j], _mm512_and_si512(packed, nibble), q_low);      \
                    acc_high[j] = _mm512_dpbusd_epi32(                                                          \
                        acc_high[j], _mm512_and_si512(_mm512_srli_epi16(packed, 4), nibble), q_high);           \
                }                                                                                               \
            }                                                                                                   \
        }                                                                                                       \
        __m256i sums[NB];                                                                                       \
        _Pragma("GCC unroll 8") for (int j = 0; j < NB; j++) {                                                  \
            const __m512i both = _mm512_add_epi32(acc_low[j], acc_high[j]);                                     \
            sums[j] = _mm256_add_epi32(_mm512_castsi512_si256(both), _mm512_extracti64x4_epi64(both, 1));       \
        }                                                                                                       \
        if (paired) {                                                                                           \
            _Pragma("GCC unroll 4") for (int j = 0; j < NB; j += 2) {                                           \
                const __m512i both = _mm512_add_epi32(pair_low[j / 2], pair_high[j / 2]);                       \
                sums[j] = _mm256_add_epi32(sums[j], _mm512_castsi512_si256(both));                              \
                if (j + 1 < NB) sums[j + 1] = _mm256_add_epi32(sums[j + 1], _mm512_extracti64x4_epi64(both, 1)); \
            }                                                                                                   \
        }                                                                                                       \
        store_sums(sums, NB, out);                                                                              \
    }
#elif VFS_ISA == 1
/* a run's last 16-byte group (an odd number of groups) against its query, low values then high ones: 4 int32 sums
 * in the low lane */
static inline __m256i group_sums(const uint8_t *group, const int8_t *qv) {
    const __m128i nib = _mm_set1_epi8(0x0f), packed = _mm_loadu_si128((const __m128i *)group);
    const __m128i pairs = _mm_add_epi16(
        _mm_maddubs_epi16(_mm_and_si128(packed, nib), _mm_loadu_si128((const __m128i *)qv)),
        _mm_maddubs_epi16(_mm_and_si128(_mm_srli_epi16(packed, 4), nib), _mm_loadu_si128((const __m128i *)(qv + 16))));
    return _mm256_zextsi128_si256(_mm_madd_epi16(pairs, _mm_set1_epi16(1)));
}

/* AVX2: 32 packed bytes = 64 values per load; each nibble half times its 32 query bytes as 16 int16 pair sums (at
 * most 2 * 15 * 127: no saturation), the two halves added (at most 4 * 15 * 127), widened to 8 int32 lanes by a
 * multiply-add with ones. A run of an odd number of groups ends with one 16-byte group in the low lane. */
#define VFS_CODE_STEP 64
#define VFS_DEFINE_CODE_BLOCK(NB)                                                                               \
    static void code_numerators_##NB(const vfs_query *q, const uint8_t *img, const int32_t *base, float *out,   \
                                     prefetcher *pf) {                                                          \
        const __m256i nibble = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);                             \
        __m256i acc[NB];                                                                                        \
        _Pragma("GCC unroll 8") for (int j = 0; j < NB; j++) acc[j] = _mm256_setzero_si256();                   \
        for (int32_t t = 0; t < q->n_runs; t++) {                                                              \
            const int8_t *qv = q->code_values + q->term_starts[t];                                              \
            const int32_t bytes = q->term_lengths[t] / 2;                                                       \
            const uint8_t *row[NB];                                                                             \
            code_rows(img, base, q->term_offsets[t], q->channels / 2, NB, row);                                 \
            int32_t b = 0;                                                                                      \
            for (; b + 32 <= bytes; b += 32) {                                                                  \
                prefetch_step(pf);                                                                              \
                const __m256i q_low = _mm256_loadu_si256((const __m256i *)(qv + 2 * b));                        \
                const __m256i q_high = _mm256_loadu_si256((const __m256i *)(qv + 2 * b + 32));                  \
                _Pragma("GCC unroll 8") for (int j = 0; j < NB; j++) {                                          \
                    const __m256i packed = _mm256_loadu_si256((const __m256i *)(row[j] + b));                   \
                    const __m256i pairs = _mm256_add_epi16(                                                     \
                        _mm256_maddubs_epi16(_mm256_and_si256(packed, nibble), q_low),                          \
                        _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(packed, 4), nibble), q_high));  \
                    acc[j] = _mm256_add_epi32(acc[j], _mm256_madd_epi16(pairs, ones));                          \
                }                                                                                               \
            }                                                                                                   \
            if (b < bytes) /* one 16-byte group: its query is its low values then its high values */           \
                _Pragma("GCC unroll 8") for (int j = 0; j < NB; j++)                                            \
                    acc[j] = _mm256_add_epi32(acc[j], group_sums(row[j] + b, qv + 2 * b));                      \
        }                                                                                                       \
        store_sums(acc, NB, out);                                                                               \
    }
#else
/* NEON and portable: an image's nibbles unpacked once into bytes (values in order), then plain integer loops the
 * compiler vectorises: the same exact integers as the x86 paths. */
#define VFS_CODE_STEP 64
#define VFS_UNPACKS 1
static void unpack_levels(const uint8_t *src, int32_t groups, uint8_t *dst) {
    for (int32_t g = 0; g < groups; g++, src += 16, dst += VFS_CODE_GROUP)
        for (int i = 0; i < 16; i++) {
            dst[i] = src[i] & 0x0f;
            dst[16 + i] = src[i] >> 4;
        }
}
#define VFS_DEFINE_CODE_BLOCK(NB)                                                                               \
    static void code_numerators_##NB(const vfs_query *q, const uint8_t *levels, const int32_t *base,            \
                                     float *out, prefetcher *pf) {                                              \
        int32_t acc[NB] = {0};                                                                                  \
        for (int32_t t = 0; t < q->n_runs; t++) {                                                              \
            const int8_t *qv = q->code_values + q->term_starts[t];                                              \
            const int32_t length = q->term_lengths[t];                                                          \
            const uint8_t *row[NB];                                                                             \
            code_rows(levels, base, q->term_offsets[t], q->channels, NB, row);                                  \
            prefetch_step(pf);                                                                                  \
            for (int j = 0; j < NB; j++) {                                                                      \
                int32_t sum = 0;                                                                                \
                const uint8_t *r = row[j];                                                                      \
                for (int32_t c = 0; c < length; c++) sum += (int32_t)r[c] * (int32_t)qv[c];                     \
                acc[j] += sum;                                                                                  \
            }                                                                                                   \
        }                                                                                                       \
        for (int j = 0; j < NB; j++) out[j] = (float)acc[j];                                                    \
    }
#endif
#ifndef VFS_UNPACKS
#define VFS_UNPACKS 0
#endif

VFS_DEFINE_CODE_BLOCK(1)
VFS_DEFINE_CODE_BLOCK(2)
VFS_DEFINE_CODE_BLOCK(3)
VFS_DEFINE_CODE_BLOCK(4)
VFS_DEFINE_CODE_BLOCK(5)
VFS_DEFINE_CODE_BLOCK(6)
VFS_DEFINE_CODE_BLOCK(7)
VFS_DEFINE_CODE_BLOCK(8)
typedef void (*code_block_fn)(const vfs_query *, const uint8_t *, const int32_t *, float *, prefetcher *);
static const code_block_fn CODE_BLOCKS[VFS_BLOCK + 1] = {
    0, code_numerators_1, code_numerators_2, code_numerators_3, code_numerators_4,
    code_numerators_5, code_numerators_6, code_numerators_7, code_numerators_8};

#if VFS_ISA == 1
/* A single-cell mask on AVX2: its windows are the grid's cells in order, so its numerators are one pass over the
 * image's cells (no window pointers), each cell's 32-byte chunks summed in 16-bit lanes, at most 4 of them (each
 * lane at most 4 * 2 * 2 * 15 * 128 = 30,720), before one widening; and its scores are image_scores' operations
 * for one cell, in the same order (so the same bits), 8 windows at a time. By callgrind the generic blocks spent
 * ~4,000 instructions an image of 7x7 cells of 128 dimensions on it, 37% of them in image_scores. */
#define VFS_SINGLE_CELL 1
static int single_cell(const vfs_query *q) {
    return q->n_runs == 1 && q->n_cells == 1 && q->term_offsets[0] == 0 && q->term_lengths[0] == q->channels &&
           q->cell_offsets[0] == 0 && q->out_h == q->grid_h && q->out_w == q->grid_w;
}

static inline void single_cell_block(const vfs_query *q, const uint8_t *cells, int nb, float *out, prefetcher *pf) {
    const int32_t bytes = q->channels / 2, whole = bytes / 32 * 32;
    const int8_t *qv = q->code_values + q->term_starts[0];
    const __m256i nibble = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
    __m256i acc[VFS_BLOCK];
    for (int j = 0; j < nb; j++) acc[j] = _mm256_setzero_si256();
    for (int32_t b0 = 0; b0 < whole; b0 += 128) {
        const int32_t b1 = whole - b0 < 128 ? whole : b0 + 128;
        for (int32_t b = b0; b < b1; b += 32) prefetch_step(pf); /* as many steps as the generic blocks take */
        for (int j = 0; j < nb; j++) {
            const uint8_t *row = cells + (size_t)j * bytes;
            __m256i pairs = _mm256_setzero_si256();
            for (int32_t b = b0; b < b1; b += 32) {
                const __m256i packed = _mm256_loadu_si256((const __m256i *)(row + b));
                const __m256i q_low = _mm256_loadu_si256((const __m256i *)(qv + 2 * b));
                const __m256i q_high = _mm256_loadu_si256((const __m256i *)(qv + 2 * b + 32));
                pairs = _mm256_add_epi16(pairs, _mm256_add_epi16(
                    _mm256_maddubs_epi16(_mm256_and_si256(packed, nibble), q_low),
                    _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(packed, 4), nibble), q_high)));
            }
            acc[j] = _mm256_add_epi32(acc[j], _mm256_madd_epi16(pairs, ones));
        }
    }
    if (whole < bytes) { /* one 16-byte group, laid out as in the generic blocks */
        prefetch_step(pf);
        for (int j = 0; j < nb; j++)
            acc[j] = _mm256_add_epi32(acc[j], group_sums(cells + (size_t)j * bytes + whole, qv + 2 * whole));
    }
    store_sums(acc, nb, out);
}

static void single_cell_numerators(const vfs_query *q, const uint8_t *img, float *out, prefetcher *pf) {
    const int32_t cells = q->grid_h * q->grid_w;
    const size_t bytes = (size_t)q->channels / 2;
    int32_t c = 0;
    for (; c + VFS_BLOCK <= cells; c += VFS_BLOCK) single_cell_block(q, img + c * bytes, VFS_BLOCK, out + c, pf);
    if (c < cells) single_cell_block(q, img + c * bytes, cells - c, out + c, pf);
    while (pf->next < pf->end) prefetch_step(pf);
}

/* no multiply-add fused: the generic path scales the numerators before it offsets them, two roundings */
__attribute__((optimize("fp-contract=off"))) static inline float single_cell_score(const vfs_query *q,
                                                                                   float numerator, float sq) {
    const float d = q->cell_weights[0] * sq;
    float s = (numerator * q->numerator_scale + q->numerator_offset) / (sqrtf(d > 0.0f ? d : 1.0f) * q->query_norm);
    s = d > 0.0f && s == s ? s : 0.0f;
    return s > 1.0f ? 1.0f : (s < -1.0f ? -1.0f : s);
}

__attribute__((optimize("fp-contract=off"))) static void single_cell_scores(const vfs_query *q, const float *sq,
                                                                           const float *numerators, int32_t windows,
                                                                           float *scores) {
    const __m256 weight = _mm256_set1_ps(q->cell_weights[0]), scale = _mm256_set1_ps(q->numerator_scale);
    const __m256 offset = _mm256_set1_ps(q->numerator_offset), norm = _mm256_set1_ps(q->query_norm);
    const __m256 zero = _mm256_setzero_ps(), one = _mm256_set1_ps(1.0f), minus_one = _mm256_set1_ps(-1.0f);
    int32_t w = 0;
    for (; w + 8 <= windows; w += 8) {
        const __m256 d = _mm256_mul_ps(weight, _mm256_loadu_ps(sq + w));
        const __m256 positive = _mm256_cmp_ps(d, zero, _CMP_GT_OQ);
        const __m256 root = _mm256_sqrt_ps(_mm256_blendv_ps(one, d, positive));
        const __m256 numerator = _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(numerators + w), scale), offset);
        __m256 s = _mm256_div_ps(numerator, _mm256_mul_ps(root, norm));
        s = _mm256_and_ps(s, _mm256_and_ps(positive, _mm256_cmp_ps(s, s, _CMP_ORD_Q)));
        _mm256_storeu_ps(scores + w, _mm256_min_ps(_mm256_max_ps(s, minus_one), one));
    }
    for (; w < windows; w++) scores[w] = single_cell_score(q, numerators[w], sq[w]);
}
#else
#define VFS_SINGLE_CELL 0
#endif

/* numerators of every window of one image from its codes (`levels`: scratch for the paths that unpack) */
static void code_image_numerators(const vfs_query *q, const uint8_t *img, const int32_t *bases, int32_t windows,
                                  uint8_t *levels, float *out, prefetcher *pf) {
#if VFS_UNPACKS
    unpack_levels(img, q->grid_h * q->grid_w * (q->channels / VFS_CODE_GROUP), levels);
    img = levels;
#else
    (void)levels;
#endif
    for (int32_t w0 = 0; w0 < windows; w0 += VFS_BLOCK) {
        const int32_t nb = windows - w0 < VFS_BLOCK ? windows - w0 : VFS_BLOCK;
        CODE_BLOCKS[nb](q, img, bases + w0, out + w0, pf);
    }
    while (pf->next < pf->end) prefetch_step(pf);
    for (int32_t w = 0; w < windows; w++) out[w] *= q->numerator_scale;
}

/* The first window with the best score, and that score (scores are never NaN: image_scores makes them 0). */
static inline int32_t best_of_scalar(const float *out, int32_t windows, float *best_score) {
    float best = out[0];
    for (int32_t w = 1; w < windows; w++) best = out[w] > best ? out[w] : best;
    int32_t w = 0;
    while (out[w] != best) w++;
    *best_score = best;
    return w;
}

/* The same. GCC keeps the plain loop scalar (a chain of maxss, 3-4 cycles a window: by perf ~12% of the AVX-512
 * first stage for 1-cell masks on 14x14 grids); AVX-512 takes 16 windows a step, in the search for the first best
 * too. (On AVX2 the same with 8 windows a step measured no gain beyond the noise, on 7x7 grids.) */
static inline int32_t best_of(const float *out, int32_t windows, float *best_score) {
    if (windows < 8) return best_of_scalar(out, windows, best_score); /* a whole grid: one window */
#if VFS_ISA == 2
    __m512 top = _mm512_set1_ps(-INFINITY);
    for (int32_t w = 0; w < windows; w += 16) {
        const __mmask16 m = (__mmask16)chunk_mask(windows - w);
        top = _mm512_mask_max_ps(top, m, top, _mm512_maskz_loadu_ps(m, out + w));
    }
    const float best = _mm512_reduce_max_ps(top);
    const __m512 wanted = _mm512_set1_ps(best);
    int32_t w = 0;
    for (;; w += 16) {
        const __mmask16 m = (__mmask16)chunk_mask(windows - w);
        const __mmask16 hit = _mm512_mask_cmp_ps_mask(m, _mm512_maskz_loadu_ps(m, out + w), wanted, _CMP_EQ_OQ);
        if (hit) {
            w += __builtin_ctz(hit);
            break;
        }
    }
    *best_score = best;
    return w;
#else
    return best_of_scalar(out, windows, best_score);
#endif
}

/* One loop for both entry points: bfloat16 rows from `features`, or 4-bit rows from `codes`. */
static int score_rows(const vfs_query *q, const uint16_t *features, const uint8_t *codes, const float *sqnorms,
                      const int64_t *ids, const int64_t *placed, int64_t first, int64_t count, float *best_score,
                      int32_t *best_window, float *all_scores) {
    const int32_t positions = q->grid_h * q->grid_w;
    const int32_t windows = q->out_h * q->out_w;
    const size_t image_values = (size_t)positions * q->channels;
    const size_t row_bytes = codes ? image_values / 2 : image_values * sizeof(uint16_t);
    const char *rows = codes ? (const char *)codes : (const char *)features;
    int32_t *bases = malloc(sizeof(int32_t) * windows);
    float *work = malloc(sizeof(float) * (3 * (size_t)windows + positions));
    float *scratch = VFS_STREAMS || codes ? NULL : malloc(sizeof(float) * image_values);
    uint8_t *decoded = codes && VFS_UNPACKS ? malloc(image_values) : NULL;
    if (!bases || !work || (!VFS_STREAMS && !codes && !scratch) || (codes && VFS_UNPACKS && !decoded)) {
        free(bases); free(work); free(scratch); free(decoded);
        return -1;
    }
    float *numerators = work, *denominators = work + windows, *scores = work + 2 * (size_t)windows;
    float *wide = work + 3 * (size_t)windows;
    for (int32_t y = 0, w = 0; y < q->out_h; y++)
        for (int32_t x = 0; x < q->out_w; x++) bases[w++] = y * q->grid_w + x;
    int64_t steps = 0;  /* inner-loop steps per image, to spread the next image's lines over */
    const int32_t n_terms = VFS_EVEN_ODD || codes ? q->n_runs : q->n_terms;
    const int32_t step_values = codes ? VFS_CODE_STEP : VFS_STEP_VALUES;
    for (int32_t t = 0; t < n_terms; t++) steps += (q->term_lengths[t] + step_values - 1) / step_values;
    steps *= (windows + VFS_BLOCK - 1) / VFS_BLOCK;
    const int64_t lines = (int64_t)((row_bytes + 63) / 64);
    const int32_t lines_per_step = (int32_t)(steps > 0 ? (lines + steps - 1) / steps : lines);
#if VFS_SINGLE_CELL
    const int single = codes && single_cell(q);
#endif

    for (int64_t i = 0; i < count; i++) {
        const int64_t id = ids ? ids[i] : first + i;
        prefetcher pf = {NULL, NULL, lines_per_step};
        if (i + VFS_PREFETCH_AHEAD < count) {
            const int64_t ahead = ids ? ids[i + VFS_PREFETCH_AHEAD] : first + i + VFS_PREFETCH_AHEAD;
            pf.next = placed ? rows + placed[i + VFS_PREFETCH_AHEAD] : rows + (size_t)ahead * row_bytes;
            pf.end = pf.next + row_bytes;
        }
        float *out = all_scores ? all_scores + (size_t)i * windows : scores;
#if VFS_SINGLE_CELL
        if (single) {
            single_cell_numerators(q, codes + (size_t)id * row_bytes, numerators, &pf);
            single_cell_scores(q, sqnorms + (size_t)id * positions, numerators, windows, out);
            best_window[i] = best_of(out, windows, &best_score[i]);
            continue;
        }
#endif
        if (codes) {
            code_image_numerators(q, codes + (size_t)id * row_bytes, bases, windows, decoded, numerators, &pf);
        } else {
            const uint16_t *img = placed ? (const uint16_t *)(rows + placed[i]) : features + (size_t)id * image_values;
            image_numerators(q, img, bases, windows, scratch, numerators, &pf);
        }
        image_scores(q, sqnorms + (size_t)id * positions, numerators, denominators, wide, out);
        best_window[i] = best_of(out, windows, &best_score[i]);
    }
    free(bases); free(work); free(scratch); free(decoded);
    return 0;
}

/* Scores `count` images: ids[i] when `ids` is given, else first + i. Writes each image's best score and
 * window index (y * out_w + x) and, when `all_scores` is given, every window's score (count x windows).
 * Returns 0, or -1 when memory for the per-call scratch could not be had. */
int vfs_score_images(const vfs_query *q, const uint16_t *features, const float *sqnorms, const int64_t *ids,
                     int64_t first, int64_t count, float *best_score, int32_t *best_window, float *all_scores) {
    return score_rows(q, features, NULL, sqnorms, ids, NULL, first, count, best_score, best_window, all_scores);
}

/* The same for rows that lie wherever a reader put them: image i's values start `placed[i]` bytes after
 * `features` (each row whole and contiguous, 2-byte aligned), its norms are row ids[i] of `sqnorms`. The
 * two-tier rerank scores the rows it read into its own buffer this way (dashboard/row_reads.py), no copy. */
int vfs_score_placed(const vfs_query *q, const uint16_t *features, const int64_t *placed, const float *sqnorms,
                     const int64_t *ids, int64_t count, float *best_score, int32_t *best_window, float *all_scores) {
    if (!placed || !ids) return -2;
    return score_rows(q, features, NULL, sqnorms, ids, placed, 0, count, best_score, best_window, all_scores);
}

/* The same over 4-bit codes, q->channels / 2 bytes per cell (q->channels a multiple of 32), with the query's
 * code_values laid out for vfs_code_chunk_bytes() (above). Returns -2 for a layout the kernel does not take. */
int vfs_score_codes(const vfs_query *q, const uint8_t *codes, const float *sqnorms, const int64_t *ids,
                    int64_t first, int64_t count, float *best_score, int32_t *best_window, float *all_scores) {
    if (q->channels <= 0 || q->channels % VFS_CODE_GROUP || !q->code_values) return -2;
    return score_rows(q, NULL, codes, sqnorms, ids, NULL, first, count, best_score, best_window, all_scores);
}

/* A product-quantised first stage scored by table lookups ("fast scan"): a prototype to time before building one
 * (benchmarks/fast_scan.py drives it, beside the shipped 4-bit kernel). Not used by the app.
 *
 * Codes: each cell is M sub-quantiser indices of 4 bits. Images come in blocks of 32; within a block, cell p,
 * sub-quantiser pair j: 32 bytes, byte i holding image i's index of sub-quantiser 2j (low nibble) and 2j+1 (high).
 * Query: for each of its n_cells cells and each sub-quantiser, the 16 dot products of that query cell's slice with
 * the sub-quantiser's centroids, quantised to uint8 (one scale for the whole query). Stored per cell and pair as
 * 64 bytes: the table of 2j twice (both 128-bit lanes), then that of 2j+1 twice, so one vpshufb looks up 32 images.
 *
 * The lookups are added into 16-bit sums, one at a time, or (`lookups_per_sum` K = 2 or 4, tables at most 255 / K)
 * K at a time in 8 bits first: fewer operations per lookup, for coarser tables.
 *
 * Window w's numerator for image i = scale * sum over mask cells c, sub-quantisers m of table[c][m][index of
 * image i, cell w + offset_c, sub-quantiser m] + bias; its score divides by sqrt(sum_c weight_c * sqnorm) and the
 * query's norm, as the exact formula does; each image keeps its best score and the first window (row-major) that
 * has it, as the shipped kernel does. */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

typedef struct {
    int32_t grid_h, grid_w, subquantisers;
    int32_t out_h, out_w;
    int32_t n_cells;
    const int32_t *cell_offsets;  /* of each mask cell, relative to the window's top-left */
    const float *cell_weights;    /* weight^2 */
    const uint8_t *tables;        /* n_cells x (M / 2) x 64 bytes, as above */
    float scale, bias, query_norm;
    int32_t lookups_per_sum;      /* 1, 2 or 4 (above) */
} fs_query;

/* one pair's lookups for 32 images: the table of its low nibbles', then of its high nibbles', 8-bit values */
static inline void pair_lookups(const uint8_t *codes, const uint8_t *tables, __m256i *low, __m256i *high) {
    const __m256i nibble = _mm256_set1_epi8(0x0f), packed = _mm256_loadu_si256((const __m256i *)codes);
    *low = _mm256_shuffle_epi8(_mm256_loadu_si256((const __m256i *)tables), _mm256_and_si256(packed, nibble));
    *high = _mm256_shuffle_epi8(_mm256_loadu_si256((const __m256i *)(tables + 32)),
                                _mm256_and_si256(_mm256_srli_epi16(packed, 4), nibble));
}

/* 8-bit values added as 16-bit lanes (`all`: even image + 256 x odd image, wrapping) and their high bytes apart
 * (`high`: the odd images'), so both images' sums can be told apart at the end */
static inline void widen_add(__m256i values, __m256i *all, __m256i *high) {
    *all = _mm256_add_epi16(*all, values);
    *high = _mm256_add_epi16(*high, _mm256_srli_epi16(values, 8));
}

/* the sums of one query cell's lookups for 32 images: even images in the 16-bit lanes of `even`, odd ones in
 * `odd` */
static inline void cell_sums(const uint8_t *codes, const uint8_t *tables, int32_t pairs, int32_t per_sum,
                             __m256i *even, __m256i *odd) {
    __m256i all = _mm256_setzero_si256(), high = _mm256_setzero_si256(), low0, high0, low1, high1;
    if (per_sum == 4) {
        for (int32_t j = 0; j < pairs; j += 2, codes += 64, tables += 128) {
            pair_lookups(codes, tables, &low0, &high0);
            pair_lookups(codes + 32, tables + 64, &low1, &high1);
            widen_add(_mm256_add_epi8(_mm256_add_epi8(low0, high0), _mm256_add_epi8(low1, high1)), &all, &high);
        }
    } else if (per_sum == 2) {
        for (int32_t j = 0; j < pairs; j++, codes += 32, tables += 64) {
            pair_lookups(codes, tables, &low0, &high0);
            widen_add(_mm256_add_epi8(low0, high0), &all, &high);
        }
    } else {
        for (int32_t j = 0; j < pairs; j++, codes += 32, tables += 64) {
            pair_lookups(codes, tables, &low0, &high0);
            widen_add(low0, &all, &high);
            widen_add(high0, &all, &high);
        }
    }
    *even = _mm256_sub_epi16(all, _mm256_slli_epi16(high, 8));
    *odd = high;
}

/* best score and window of each of the 32 images of one block */
static void score_block(const fs_query *q, const uint8_t *block, const float *norms, float *best, int32_t *windows) {
    const int32_t pairs = q->subquantisers / 2;
    const size_t cell_bytes = (size_t)pairs * 32;
    __m256 top[4];
    __m256i where[4];
    for (int u = 0; u < 4; u++) {
        top[u] = _mm256_set1_ps(-INFINITY);
        where[u] = _mm256_setzero_si256();
    }
    for (int32_t y = 0; y < q->out_h; y++)
        for (int32_t x = 0; x < q->out_w; x++) {
            const int32_t corner = y * q->grid_w + x;
            const __m256i window = _mm256_set1_epi32(y * q->out_w + x);
            __m256i sums[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(),
                               _mm256_setzero_si256()};
            __m256 den[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
            for (int32_t c = 0; c < q->n_cells; c++) {
                const int32_t p = corner + q->cell_offsets[c];
                __m256i even, odd;
                cell_sums(block + p * cell_bytes, q->tables + (size_t)c * pairs * 64, pairs, q->lookups_per_sum,
                          &even, &odd);
                /* 16-bit lanes: per 128-bit half, images 0,2,..,14 (even) and 1,3,..,15 (odd) of that half */
                const __m256i lo = _mm256_unpacklo_epi16(even, odd), hi = _mm256_unpackhi_epi16(even, odd);
                /* lo: images 0-7 | 16-23, hi: images 8-15 | 24-31, in order, as 16-bit values */
                const __m256i widened[4] = {
                    _mm256_cvtepu16_epi32(_mm256_castsi256_si128(lo)),
                    _mm256_cvtepu16_epi32(_mm256_castsi256_si128(hi)),
                    _mm256_cvtepu16_epi32(_mm256_extracti128_si256(lo, 1)),
                    _mm256_cvtepu16_epi32(_mm256_extracti128_si256(hi, 1))};
                const __m256 weight = _mm256_set1_ps(q->cell_weights[c]);
                for (int u = 0; u < 4; u++) {
                    sums[u] = _mm256_add_epi32(sums[u], widened[u]);
                    den[u] = _mm256_fmadd_ps(weight, _mm256_loadu_ps(norms + (size_t)p * 32 + 8 * u), den[u]);
                }
            }
            for (int u = 0; u < 4; u++) {
                const __m256 numerator = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums[u]), _mm256_set1_ps(q->scale),
                                                         _mm256_set1_ps(q->bias));
                const __m256 positive = _mm256_cmp_ps(den[u], _mm256_setzero_ps(), _CMP_GT_OQ);
                const __m256 root = _mm256_sqrt_ps(_mm256_blendv_ps(_mm256_set1_ps(1.0f), den[u], positive));
                __m256 s = _mm256_div_ps(numerator, _mm256_mul_ps(root, _mm256_set1_ps(q->query_norm)));
                s = _mm256_and_ps(s, positive);
                const __m256 better = _mm256_cmp_ps(s, top[u], _CMP_GT_OQ);
                top[u] = _mm256_blendv_ps(top[u], s, better);
                where[u] = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(where[u]),
                                                                _mm256_castsi256_ps(window), better));
            }
        }
    for (int u = 0; u < 4; u++) {
        _mm256_storeu_ps(best + 8 * u, top[u]);
        _mm256_storeu_si256((__m256i *)(windows + 8 * u), where[u]);
    }
}

/* blocks [first, first + count) of `codes`; norms per block: cell-major, 32 images a cell */
int fs_score_blocks(const fs_query *q, const uint8_t *codes, const float *norms, int64_t first, int64_t count,
                    float *best, int32_t *windows) {
    const int32_t cells = q->grid_h * q->grid_w;
    const size_t block_bytes = (size_t)cells * (q->subquantisers / 2) * 32, block_norms = (size_t)cells * 32;
    const int32_t per_sum = q->lookups_per_sum;
    if (q->subquantisers % 2 || q->subquantisers > 256 || (per_sum != 1 && per_sum != 2 && per_sum != 4) ||
        (per_sum == 4 && q->subquantisers % 4))
        return -2; /* 16-bit sums hold 257 lookups of 255; 4 lookups a sum take 2 pairs */
    for (int64_t b = first; b < first + count; b++) {
        if (b + 2 < first + count) /* the block after next, into L2, as the shipped kernel prefetches */
            for (size_t k = 0; k < block_bytes; k += 64) __builtin_prefetch(codes + (b + 2) * block_bytes + k, 0, 2);
        score_block(q, codes + b * block_bytes, norms + b * block_norms, best + b * 32, windows + b * 32);
    }
    return 0;
}

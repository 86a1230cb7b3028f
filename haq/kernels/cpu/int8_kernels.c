/* haq's CPU int8 kernels: activation quantization, the int8 x int8 -> int32 product and the rescale
 * fused in one pass (decode-sized batches), and a whole MoE layer's routed experts in one call (decode
 * steps and prefill chunks: register tiles once a block of weights is in L1). Built at first use by
 * haq/kernels/cpu/__init__.py (gcc -O3 -march=native -fopenmp) and called through ctypes; the OpenMP
 * runtime is the one PyTorch already loaded.
 *
 * Grid (haq/kernels/grid.py): symmetric, levels in [-qmax, qmax], scale = max(amax / qmax, 1e-8),
 * q = round-half-even(x / scale). Weights: int8 [N, K] row-major, one float scale per row.
 * With AVX-512 VNNI, vpdpbusd multiplies u8 x s8 into int32: the activations go in as q + 128
 * and the exact product is acc - 128 * rowsum(w), rowsum precomputed per weight. Without it a
 * plain int32 loop (vectorised by the compiler) gives the same integers.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define HAQ_VNNI 1
#else
#define HAQ_VNNI 0
#endif

#define SCALE_EPS 1e-8f
#define ROWS 4 /* weight rows per inner block: four accumulators share each activation load */
/* Software prefetch distance in weight bytes. A decode GEMV reads each weight once, so it runs at
 * the memory's speed only with enough reads in flight; the hardware prefetcher stops at 4 KiB
 * pages and restarts slowly. 8 KiB ahead took a [276480, 576] int8 GEMV on 2 threads from 12 to
 * 20 GB/s on this project's 2-core Xeon (4 and 16 KiB: slower), with the rows' loads interleaved
 * then; on AMD Zen 4 the distance made no difference, the load order did (dot_rows). */
#define PF_BYTES 8192

int haq_has_vnni(void) { return HAQ_VNNI; }

/* Row-wise sums of an int8 [N, K] weight: the u8 offset's compensation. */
void haq_row_sums(const int8_t *w, int64_t N, int64_t K, int32_t *sums) {
    for (int64_t n = 0; n < N; n++) {
        int32_t s = 0;
        for (int64_t k = 0; k < K; k++) s += w[n * K + k];
        sums[n] = s;
    }
}

/* max |x| over n floats, NaN ignored as fmaxf does (vmaxps returns its second operand when either is
 * NaN, so the running max goes second); max is exact in any order: the scalar loop's value. */
static float abs_max(const float *x, int64_t n) {
    float amax = 0.f;
    int64_t k = 0;
#if defined(__AVX512F__)
    __m512 m = _mm512_setzero_ps();
    for (; k + 16 <= n; k += 16) m = _mm512_max_ps(_mm512_abs_ps(_mm512_loadu_ps(x + k)), m);
    amax = _mm512_reduce_max_ps(m);
#endif
    for (; k < n; k++) amax = fmaxf(amax, fabsf(x[k]));
    return amax;
}

/* u8 levels q + 128 of one row, q = clamp(round-half-even(x / scale)): the same division, rounding
 * and clamp per element in 16 lanes as in the scalar tail, so the same levels. */
static void row_levels(const float *row, int64_t K, float scale, int qmax, uint8_t *out) {
    int64_t k = 0;
#if defined(__AVX512F__)
    const __m512 s = _mm512_set1_ps(scale), lo = _mm512_set1_ps((float)-qmax), hi = _mm512_set1_ps((float)qmax);
    for (; k + 16 <= K; k += 16) {
        __m512 q = _mm512_roundscale_ps(_mm512_div_ps(_mm512_loadu_ps(row + k), s),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        q = _mm512_min_ps(_mm512_max_ps(q, lo), hi);
        _mm512_mask_cvtepi32_storeu_epi8(out + k, 0xFFFF, _mm512_add_epi32(_mm512_cvtps_epi32(q), _mm512_set1_epi32(128)));
    }
#endif
    for (; k < K; k++) {
        float q = nearbyintf(row[k] / scale);
        q = fminf(fmaxf(q, (float)-qmax), (float)qmax);
        out[k] = (uint8_t)((int)q + 128);
    }
}

/* x [M, K] float -> levels [M, K] (stored as u8 = q + 128) and scales [M].
 * mode 0: per row (dynamic); 1: one dynamic scale for all rows; 2: the given static scale. */
static void quantize(const float *x, int64_t M, int64_t K, int qmax, int mode, float static_scale,
                     uint8_t *xu, float *xs) {
    float shared = mode == 1 ? abs_max(x, M * K) / (float)qmax : static_scale;
    for (int64_t m = 0; m < M; m++) {
        const float *row = x + m * K;
        float scale = fmaxf(mode == 0 ? abs_max(row, K) / (float)qmax : shared, SCALE_EPS);
        xs[m] = scale;
        row_levels(row, K, scale, qmax, xu + m * K);
    }
}

#define TILE_M 4 /* activation rows per register tile (dot_tile, f32_tile): TILE_M x ROWS accumulators */

#if HAQ_VNNI
/* The four accumulators' horizontal sums at once, less the u8 offset: pairwise interleaved adds,
 * then the lanes. */
static void reduce_rows(const __m512i a[ROWS], const int32_t *sums, int rows, int32_t *acc) {
    __m512i t0 = _mm512_add_epi32(_mm512_unpacklo_epi32(a[0], a[1]), _mm512_unpackhi_epi32(a[0], a[1]));
    __m512i t1 = _mm512_add_epi32(_mm512_unpacklo_epi32(a[2], a[3]), _mm512_unpackhi_epi32(a[2], a[3]));
    __m512i u = _mm512_add_epi32(_mm512_unpacklo_epi64(t0, t1), _mm512_unpackhi_epi64(t0, t1));
    __m128i v = _mm_add_epi32(_mm_add_epi32(_mm512_castsi512_si128(u), _mm512_extracti32x4_epi32(u, 1)),
                              _mm_add_epi32(_mm512_extracti32x4_epi32(u, 2), _mm512_extracti32x4_epi32(u, 3)));
    int32_t lanes[ROWS];
    _mm_storeu_si128((__m128i *)lanes, v);
    for (int r = 0; r < rows; r++) acc[r] = lanes[r] - 128 * sums[r];
}

/* Exact int32 dot products of q <= TILE_M activation rows (stride K) with ROWS weight rows, k
 * outermost: each of the ROWS + q loads per step feeds q or ROWS vpdpbusd (0.5 loads each for a full
 * tile, against 2 in dot_rows), for the rows of a prefill or a large batch, once dot_rows has brought
 * the weight rows into L1. Inlined with q constant, so the accumulators stay in registers.
 * acc[i * ROWS + r]: activation row i with weight row r. */
static inline __attribute__((always_inline)) void dot_tile(const uint8_t *xu, const int8_t *w, int64_t K,
                                                            const int32_t *sums, int32_t *acc, const int q) {
    __m512i a[TILE_M][ROWS], wv[ROWS];
    const int64_t full = K / 64 * 64;
    const __mmask64 mask = full < K ? _cvtu64_mask64((~0ULL) >> (64 - (K - full))) : 0;
#pragma GCC unroll 4
    for (int i = 0; i < q; i++)
#pragma GCC unroll 4
        for (int r = 0; r < ROWS; r++) a[i][r] = _mm512_setzero_si512();
    for (int64_t k = 0; k < full; k += 64) {
#pragma GCC unroll 4
        for (int r = 0; r < ROWS; r++) {
            wv[r] = _mm512_loadu_si512((const void *)(w + r * K + k));
            __asm__("" : "+v"(wv[r])); /* in a register: gcc would fold it into every vpdpbusd as a load */
        }
#pragma GCC unroll 4
        for (int i = 0; i < q; i++) {
            const __m512i xv = _mm512_loadu_si512((const void *)(xu + i * K + k));
#pragma GCC unroll 4
            for (int r = 0; r < ROWS; r++) a[i][r] = _mm512_dpbusd_epi32(a[i][r], xv, wv[r]);
        }
    }
    if (full < K) {
#pragma GCC unroll 4
        for (int r = 0; r < ROWS; r++) wv[r] = _mm512_maskz_loadu_epi8(mask, w + r * K + full);
#pragma GCC unroll 4
        for (int i = 0; i < q; i++) {
            const __m512i xv = _mm512_maskz_loadu_epi8(mask, xu + i * K + full);
#pragma GCC unroll 4
            for (int r = 0; r < ROWS; r++) a[i][r] = _mm512_dpbusd_epi32(a[i][r], xv, wv[r]);
        }
    }
#pragma GCC unroll 4
    for (int i = 0; i < q; i++) reduce_rows(a[i], sums, ROWS, acc + i * ROWS);
}

/* dot_tile for the rows left, 2 to TILE_M of them (one goes through dot_rows). */
static void dot_tile_rows(const uint8_t *xu, const int8_t *w, int64_t K, const int32_t *sums, int32_t *acc, int q) {
    switch (q) {
    case 4: dot_tile(xu, w, K, sums, acc, 4); break;
    case 3: dot_tile(xu, w, K, sums, acc, 3); break;
    default: dot_tile(xu, w, K, sums, acc, 2); break;
    }
}
#endif

/* Exact int32 dot products of one u8 activation row with ROWS consecutive weight rows. */
static void dot_rows(const uint8_t *xu, const int8_t *w, int64_t K, int rows, const int32_t *sums, int32_t *acc) {
#if HAQ_VNNI
    __m512i a[ROWS];
    for (int r = 0; r < ROWS; r++) a[r] = _mm512_setzero_si512();
    /* Row after row, so the block's weights are read in address order (the rows are contiguous):
     * one sequential stream. Interleaving the rows' loads (four streams K bytes apart) read markedly
     * slower on AMD Zen 4 (bench/results/gemv-order.md); the activation row stays in L1. */
    const int64_t full = K / 64 * 64;
    const __mmask64 mask = full < K ? _cvtu64_mask64((~0ULL) >> (64 - (K - full))) : 0;
    for (int r = 0; r < rows; r++) {
        const int8_t *wr = w + r * K;
        for (int64_t k = 0; k < full; k += 64) {
            _mm_prefetch((const char *)(wr + k) + PF_BYTES, _MM_HINT_T0);
            a[r] = _mm512_dpbusd_epi32(a[r], _mm512_loadu_si512((const void *)(xu + k)),
                                       _mm512_loadu_si512((const void *)(wr + k)));
        }
        if (full < K)
            a[r] = _mm512_dpbusd_epi32(a[r], _mm512_maskz_loadu_epi8(mask, xu + full),
                                       _mm512_maskz_loadu_epi8(mask, wr + full));
    }
    reduce_rows(a, sums, rows, acc);
#else
    (void)sums;
    for (int r = 0; r < rows; r++) {
        const int8_t *wr = w + r * K;
        int32_t s = 0;
        for (int64_t k = 0; k < K; k++) s += ((int32_t)xu[k] - 128) * (int32_t)wr[k];
        acc[r] = s;
    }
#endif
}

/* y[m, n] = acc * x_scale[m] * w_scale[n] (+ bias[n]) for rows [n0, n1) of the weight and all M
 * activation rows (ld: y's row stride); each block of ROWS weight rows is read once, row after row
 * for the first activation row (the DRAM-bound GEMV order), then from L1 for the others, in tiles of
 * up to TILE_M rows. The integers are exact either way, so the floats are the same. */
static void gemm_rows(const uint8_t *xu, const float *xs, int64_t M, const int8_t *w, const int32_t *sums,
                      const float *ws, const float *bias, int64_t K, int64_t n0, int64_t n1, float *y, int64_t ld) {
    int32_t acc[TILE_M * ROWS];
    for (int64_t n = n0; n < n1; n += ROWS) {
        int rows = (int)(n1 - n < ROWS ? n1 - n : ROWS);
        for (int64_t m = 0; m < M;) {
            int tile = 1;
#if HAQ_VNNI
            if (m > 0 && rows == ROWS && m + 1 < M) {
                int64_t left = M - m; /* 5 left go as 3 + 2, not 4 + a single row */
                tile = (int)(left == TILE_M + 1 ? TILE_M - 1 : left < TILE_M ? left : TILE_M);
                dot_tile_rows(xu + m * K, w + n * K, K, sums + n, acc, tile);
            } else
#endif
                dot_rows(xu + m * K, w + n * K, K, rows, sums + n, acc);
            for (int i = 0; i < tile; i++, m++) {
#if defined(__AVX512F__)
                if (rows == ROWS) { /* the scalar loop's operations, in its order, four lanes at once */
                    __m128 v = _mm_mul_ps(_mm_mul_ps(_mm_cvtepi32_ps(_mm_loadu_si128((const __m128i *)(acc + i * ROWS))),
                                                     _mm_set1_ps(xs[m])), _mm_loadu_ps(ws + n));
                    _mm_storeu_ps(y + m * ld + n, bias ? _mm_add_ps(v, _mm_loadu_ps(bias + n)) : v);
                    continue;
                }
#endif
                for (int r = 0; r < rows; r++) {
                    float v = (float)acc[i * ROWS + r] * xs[m] * ws[n + r];
                    y[m * ld + n + r] = bias ? v + bias[n + r] : v;
                }
            }
        }
    }
}

/* Blocks of output rows per OpenMP task: about 64 KiB of weights each. */
static int64_t block_rows(int64_t K) {
    int64_t rows = (65536 / (K > 0 ? K : 1)) / ROWS * ROWS;
    return rows < ROWS ? ROWS : rows;
}

/* y [M, N] (row stride ld) = levels @ w^T * scales (+ bias) for one weight's blocks of output rows,
 * shared out over the threads of the enclosing parallel region (one thread outside of one). */
static void linear_blocks(const uint8_t *xu, const float *xs, int64_t M, const int8_t *w, const int32_t *sums,
                          const float *ws, const float *bias, int64_t K, int64_t N, float *y, int64_t ld) {
    int64_t rows = block_rows(K), blocks = (N + rows - 1) / rows;
#pragma omp for schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
        int64_t n0 = b * rows, n1 = n0 + rows < N ? n0 + rows : N;
        gemm_rows(xu, xs, M, w, sums, ws, bias, K, n0, n1, y, ld);
    }
}

#if defined(__AVX512F__)
/* One full tile of f32_rows: rows m0..m0+TILE_M of x against weight rows n..n+ROWS, k outermost, so
 * each loaded vector of x or w feeds TILE_M or ROWS FMAs (0.5 loads per FMA, against 2 row by row);
 * the weight rows prefetched as in the GEMV (the lm_head streams from DRAM). Each (m, n)
 * accumulates over k in the same order as the row-by-row loop: the same floats. */
static void f32_tile(const float *x, int64_t ldx, const float *w, int64_t K, int64_t n, float *y, int64_t ld) {
    __m512 a[TILE_M][ROWS], xv[TILE_M];
    const int64_t full = K / 16 * 16;
    const __mmask16 mask = (__mmask16)((1u << (K - full)) - 1u);
#pragma GCC unroll 4
    for (int i = 0; i < TILE_M; i++)
#pragma GCC unroll 4
        for (int r = 0; r < ROWS; r++) a[i][r] = _mm512_setzero_ps();
    for (int64_t k = 0; k <= full; k += 16) {
        const __mmask16 km = k < full ? (__mmask16)0xFFFF : mask;
        if (!km)
            break;
#pragma GCC unroll 4
        for (int i = 0; i < TILE_M; i++) xv[i] = _mm512_maskz_loadu_ps(km, x + i * ldx + k);
#pragma GCC unroll 4
        for (int r = 0; r < ROWS; r++) {
            _mm_prefetch((const char *)(w + (n + r) * K + k) + PF_BYTES, _MM_HINT_T0);
            const __m512 wv = _mm512_maskz_loadu_ps(km, w + (n + r) * K + k);
#pragma GCC unroll 4
            for (int i = 0; i < TILE_M; i++) a[i][r] = _mm512_fmadd_ps(xv[i], wv, a[i][r]);
        }
    }
    for (int i = 0; i < TILE_M; i++)
        for (int r = 0; r < ROWS; r++) y[i * ld + n + r] = _mm512_reduce_add_ps(a[i][r]);
}
#endif

/* y[m, n] = x[m] . w[n] for float32 rows [n0, n1) and all M rows of x (row stride ldx; y's: ld):
 * the lm_head and routers, and every linear of a float32 model. Full tiles of TILE_M x ROWS go
 * through f32_tile (batched decode, the lm_head of several rows); a single row, and what is left
 * over, streams each weight row after the other (the DRAM-bound GEMV order, see dot_rows). */
static void f32_rows(const float *x, int64_t ldx, int64_t M, const float *w, int64_t K, int64_t n0, int64_t n1,
                     float *y, int64_t ld) {
    for (int64_t n = n0; n < n1; n += ROWS) {
        int rows = (int)(n1 - n < ROWS ? n1 - n : ROWS);
        int64_t m = 0;
#if defined(__AVX512F__)
        if (rows == ROWS)
            for (; m + TILE_M <= M; m += TILE_M) f32_tile(x + m * ldx, ldx, w, K, n, y + m * ld, ld);
#endif
        for (; m < M; m++) {
            const float *xr = x + m * ldx;
#if defined(__AVX512F__)
            __m512 a[ROWS];
            for (int r = 0; r < ROWS; r++) a[r] = _mm512_setzero_ps();
            const int64_t full = K / 16 * 16;
            const __mmask16 mask = (__mmask16)((1u << (K - full)) - 1u);
            for (int r = 0; r < rows; r++) { /* row after row: one sequential stream (see dot_rows) */
                const float *wr = w + (n + r) * K;
                for (int64_t k = 0; k < full; k += 16) {
                    _mm_prefetch((const char *)(wr + k) + PF_BYTES, _MM_HINT_T0);
                    a[r] = _mm512_fmadd_ps(_mm512_loadu_ps(xr + k), _mm512_loadu_ps(wr + k), a[r]);
                }
                if (full < K)
                    a[r] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, xr + full), _mm512_maskz_loadu_ps(mask, wr + full),
                                           a[r]);
            }
            for (int r = 0; r < rows; r++) y[m * ld + n + r] = _mm512_reduce_add_ps(a[r]);
#else
            for (int r = 0; r < rows; r++) {
                const float *wr = w + (n + r) * K;
                float s = 0.f;
                for (int64_t k = 0; k < K; k++) s += xr[k] * wr[k];
                y[m * ld + n + r] = s;
            }
#endif
        }
    }
}

/* y [M, N] (row stride ld) = x [M, K] @ w^T (+ bias) for a float32 weight's blocks of output rows,
 * shared out over the threads of the enclosing parallel region, as linear_blocks. */
static void f32_linear_blocks(const float *x, int64_t M, const float *w, const float *bias, int64_t K, int64_t N,
                              float *y, int64_t ld) {
    int64_t rows = block_rows(4 * K), blocks = (N + rows - 1) / rows;
#pragma omp for schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
        int64_t n0 = b * rows, n1 = n0 + rows < N ? n0 + rows : N;
        f32_rows(x, K, M, w, K, n0, n1, y, ld);
        if (bias)
            for (int64_t m = 0; m < M; m++)
                for (int64_t n = n0; n < n1; n++) y[m * ld + n] += bias[n];
    }
}

/* y [M, N] = quant(x [M, K]) @ w^T * scales (+ bias): the fused W8A8 linear.
 * scratch: M * K bytes + M floats (levels and scales). */
void haq_linear(const float *x, int64_t M, int64_t K, const int8_t *w, const int32_t *sums, const float *ws,
                const float *bias, int64_t N, int qmax, int mode, float static_scale, float *y, int threads,
                uint8_t *scratch) {
    uint8_t *xu = scratch;
    float *xs = (float *)(scratch + ((M * K + 63) / 64) * 64);
    quantize(x, M, K, qmax, mode, static_scale, xu, xs);
#pragma omp parallel num_threads(threads) if (threads > 1 && N * K >= 65536)
    linear_blocks(xu, xs, M, w, sums, ws, bias, K, N, y, N);
}

static float silu(float v) { return v / (1.f + expf(-v)); }

/* g[i] = silu(g[i]) * u[i] over n floats. In 16 lanes e^x is Cephes' expf (x = n ln2 + r, a degree-7
 * polynomial in r, times 2^n): silu within 3e-7 of the scalar one (relative, over [-100, 100]); gcc
 * leaves the scalar loop, one libm call per element, unvectorised. */
static void silu_mul(float *g, const float *u, int64_t n) {
    int64_t i = 0;
#if defined(__AVX512F__)
    const __m512 one = _mm512_set1_ps(1.f);
    for (; i + 16 <= n; i += 16) {
        __m512 v = _mm512_loadu_ps(g + i);
        __m512 x = _mm512_min_ps(_mm512_max_ps(_mm512_sub_ps(_mm512_setzero_ps(), v), _mm512_set1_ps(-88.f)),
                                 _mm512_set1_ps(88.f)); /* -v, where e^x stays finite */
        __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693359375f), x);
        r = _mm512_fnmadd_ps(k, _mm512_set1_ps(-2.12194440e-4f), r);
        __m512 p = _mm512_set1_ps(1.9875691500e-4f);
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
        p = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), one);
        __m512 e = _mm512_scalef_ps(p, k);
        _mm512_storeu_ps(g + i, _mm512_mul_ps(_mm512_div_ps(v, _mm512_add_ps(one, e)), _mm512_loadu_ps(u + i)));
    }
#endif
    for (; i < n; i++) g[i] = silu(g[i]) * u[i];
}

/* One MoE layer's routed experts in one call, for P (token, expert) pairs sorted by expert:
 * each token quantized once and shared by its experts; the pairs of one expert form a segment
 * whose rows go through its gate_up [2I, H] together (its weights read once for all of them);
 * h = silu(gate) * up, quantized per pair; down [H, I] likewise; then out[token] += weight * y in
 * pair order (the ascending-expert order of haq.kernels.moe.combine), or, with out NULL, y
 * written per pair. Pointer tables, indexed by expert, hold the layer's expert tensors (gate_up,
 * its row sums and scales; down, likewise): the weights stay where the caller keeps them.
 * qmax = 0: float32 experts (moe_body_f32; the sums and scales tables are not read).
 * scratch: haq_moe_scratch(T, H, I, P) bytes. */
static int64_t align64(int64_t n) { return (n + 63) / 64 * 64; }

int64_t haq_moe_scratch(int64_t T, int64_t H, int64_t I, int64_t P) {
    int64_t int8 = align64(T * H) + align64(P * H) + align64(P * I) + align64(4 * (P * (2 * I + H) + T + 2 * P));
    int64_t f32 = align64(4 * P * H) * 2 + align64(4 * P * 2 * I); /* moe_body_f32 */
    return (int8 > f32 ? int8 : f32) + 8 * (P + 2 + T + 1 + P); /* segments; each token's pairs */
}

/* An online rotation x -> x (A kron B) of an I = na * nb row, as haq.kernels.rotation's
 * OnlineRotation computes it (X [na, nb] -> A^T (X B)), in place; tmp holds I floats. na = 0: none. */
typedef struct {
    const float *a, *b; /* [na, na], [nb, nb] row-major */
    int64_t na, nb;
} haq_rotation;

static void rotate_row(float *x, const haq_rotation *r, float *tmp) {
    int64_t na = r->na, nb = r->nb;
    for (int64_t i = 0; i < na; i++) {
        float *t = tmp + i * nb;
        const float *xr = x + i * nb;
        for (int64_t l = 0; l < nb; l++) t[l] = 0.f;
        for (int64_t j = 0; j < nb; j++) {
            float v = xr[j];
            const float *br = r->b + j * nb;
            for (int64_t l = 0; l < nb; l++) t[l] += v * br[l];
        }
    }
    for (int64_t k = 0; k < na; k++) {
        float *o = x + k * nb;
        for (int64_t l = 0; l < nb; l++) o[l] = 0.f;
        for (int64_t i = 0; i < na; i++) {
            float w = r->a[i * na + k];
            const float *t = tmp + i * nb;
            for (int64_t l = 0; l < nb; l++) o[l] += w * t[l];
        }
    }
}

/* tok_pair[tok_off[t] .. tok_off[t + 1]): the pairs of token t, ascending (counts, prefix sums, then
 * each pair placed at its token's cursor; the cursors end at the next token's start, so shift back). */
static void token_pairs(const int64_t *pair_token, int64_t T, int64_t P, int64_t *tok_off, int64_t *tok_pair) {
    memset(tok_off, 0, (size_t)(T + 1) * sizeof(int64_t));
    for (int64_t p = 0; p < P; p++) tok_off[pair_token[p] + 1]++;
    for (int64_t t = 0; t < T; t++) tok_off[t + 1] += tok_off[t];
    for (int64_t p = 0; p < P; p++) tok_pair[tok_off[pair_token[p]]++] = p;
    for (int64_t t = T; t > 0; t--) tok_off[t] = tok_off[t - 1];
    tok_off[0] = 0;
}

/* out[t] = sum over t's pairs, in pair order, of weight * y[pair]: the experts' weighted sum. */
static void combine_pairs(const float *y, int64_t T, int64_t H, const int64_t *tok_off, const int64_t *tok_pair,
                          const float *pair_weight, float *out) {
#pragma omp for schedule(static)
    for (int64_t t = 0; t < T; t++) {
        float *o = out + t * H;
        memset(o, 0, (size_t)H * sizeof(float));
        for (int64_t i = tok_off[t]; i < tok_off[t + 1]; i++) {
            float wgt = pair_weight[tok_pair[i]];
            const float *yp = y + tok_pair[i] * H;
            for (int64_t h = 0; h < H; h++) o[h] += yp[h] * wgt;
        }
    }
}

/* seg[s] = the first pair of segment s (the pairs of one expert, sorted by expert), seg[S] = P; returns S. */
static int64_t expert_segments(const int64_t *pair_expert, int64_t P, int64_t *seg) {
    int64_t S = 0;
    for (int64_t p = 0; p < P; p++)
        if (p == 0 || pair_expert[p] != pair_expert[p - 1]) seg[S++] = p;
    seg[S] = P;
    return S;
}

/* The MoE layer inside a parallel region: serial parts in `single`, the GEMMs shared out. What
 * every thread must read (the segment count) lives in scratch, not in a thread's locals. */
static void moe_body(const float *x, int64_t T, int64_t H, int64_t I, int64_t P, const int64_t *pair_token,
                     const int64_t *pair_expert, const float *pair_weight, const int64_t *gu_w, const int64_t *gu_sums,
                     const int64_t *gu_ws, const int64_t *dn_w, const int64_t *dn_sums, const int64_t *dn_ws,
                     const haq_rotation *down_rot, int qmax, float *out, float *y_pairs, uint8_t *scratch) {
    uint8_t *xu_tok = scratch, *xu = xu_tok + align64(T * H), *hu = xu + align64(P * H);
    float *g = (float *)(hu + align64(P * I));
    float *y = g + P * 2 * I, *xs_tok = y + P * H, *xs = xs_tok + T, *hs = xs + P;
    int64_t *seg = (int64_t *)((uint8_t *)g + align64(4 * (P * (2 * I + H) + T + 2 * P))), *nseg = seg + P + 1;
    int64_t *tok_off = nseg + 1, *tok_pair = tok_off + T + 1;
    if (y_pairs) y = y_pairs;
#pragma omp single
    {
        if (out) token_pairs(pair_token, T, P, tok_off, tok_pair);
        quantize(x, T, H, qmax, 0, 0.f, xu_tok, xs_tok);
        for (int64_t p = 0; p < P; p++) { /* levels in pair order */
            memcpy(xu + p * H, xu_tok + pair_token[p] * H, (size_t)H);
            xs[p] = xs_tok[pair_token[p]];
        }
        *nseg = expert_segments(pair_expert, P, seg);
    }
    int64_t S = *nseg;
    int64_t rows_gu = block_rows(H), blocks_gu = (2 * I + rows_gu - 1) / rows_gu;
    int64_t rows_dn = block_rows(I), blocks_dn = (H + rows_dn - 1) / rows_dn;
#pragma omp for collapse(2) schedule(static)
    for (int64_t s = 0; s < S; s++)
        for (int64_t b = 0; b < blocks_gu; b++) {
            int64_t n0 = b * rows_gu, n1 = n0 + rows_gu < 2 * I ? n0 + rows_gu : 2 * I;
            int64_t p0 = seg[s], e = pair_expert[p0];
            gemm_rows(xu + p0 * H, xs + p0, seg[s + 1] - p0, (const int8_t *)gu_w[e], (const int32_t *)gu_sums[e],
                      (const float *)gu_ws[e], NULL, H, n0, n1, g + p0 * 2 * I, 2 * I);
        }
#pragma omp for schedule(static)
    for (int64_t p = 0; p < P; p++) {
        float *gp = g + p * 2 * I;
        silu_mul(gp, gp + I, I);
        if (down_rot && down_rot->na) rotate_row(gp, down_rot, gp + I); /* the up half is spent */
        quantize(gp, 1, I, qmax, 0, 0.f, hu + p * I, hs + p);
    }
#pragma omp for collapse(2) schedule(static)
    for (int64_t s = 0; s < S; s++)
        for (int64_t b = 0; b < blocks_dn; b++) {
            int64_t n0 = b * rows_dn, n1 = n0 + rows_dn < H ? n0 + rows_dn : H;
            int64_t p0 = seg[s], e = pair_expert[p0];
            gemm_rows(hu + p0 * I, hs + p0, seg[s + 1] - p0, (const int8_t *)dn_w[e], (const int32_t *)dn_sums[e],
                      (const float *)dn_ws[e], NULL, I, n0, n1, y + p0 * H, H);
        }
    if (out) combine_pairs(y, T, H, tok_off, tok_pair, pair_weight, out);
}

/* moe_body for float32 experts (tables of float32 gate_up [2I, H] and down [H, I]; no quantization,
 * no rotation): the same segments, the rows of one expert through its weights together. */
static void moe_body_f32(const float *x, int64_t T, int64_t H, int64_t I, int64_t P, const int64_t *pair_token,
                         const int64_t *pair_expert, const float *pair_weight, const int64_t *gu_w,
                         const int64_t *dn_w, float *out, float *y_pairs, uint8_t *scratch) {
    float *xp = (float *)scratch, *y = (float *)(scratch + align64(4 * P * H));
    float *g = (float *)((uint8_t *)y + align64(4 * P * H));
    int64_t *seg = (int64_t *)((uint8_t *)g + align64(4 * P * 2 * I)), *nseg = seg + P + 1;
    int64_t *tok_off = nseg + 1, *tok_pair = tok_off + T + 1;
    if (y_pairs) y = y_pairs;
#pragma omp single
    {
        if (out) token_pairs(pair_token, T, P, tok_off, tok_pair);
        for (int64_t p = 0; p < P; p++) /* rows in pair order */
            memcpy(xp + p * H, x + pair_token[p] * H, (size_t)H * sizeof(float));
        *nseg = expert_segments(pair_expert, P, seg);
    }
    int64_t S = *nseg;
    int64_t rows_gu = block_rows(4 * H), blocks_gu = (2 * I + rows_gu - 1) / rows_gu;
    int64_t rows_dn = block_rows(4 * I), blocks_dn = (H + rows_dn - 1) / rows_dn;
#pragma omp for collapse(2) schedule(static)
    for (int64_t s = 0; s < S; s++)
        for (int64_t b = 0; b < blocks_gu; b++) {
            int64_t n0 = b * rows_gu, n1 = n0 + rows_gu < 2 * I ? n0 + rows_gu : 2 * I;
            int64_t p0 = seg[s];
            f32_rows(xp + p0 * H, H, seg[s + 1] - p0, (const float *)gu_w[pair_expert[p0]], H, n0, n1, g + p0 * 2 * I,
                     2 * I);
        }
#pragma omp for schedule(static)
    for (int64_t p = 0; p < P; p++) silu_mul(g + p * 2 * I, g + p * 2 * I + I, I); /* h: the gate half */
#pragma omp for collapse(2) schedule(static)
    for (int64_t s = 0; s < S; s++)
        for (int64_t b = 0; b < blocks_dn; b++) {
            int64_t n0 = b * rows_dn, n1 = n0 + rows_dn < H ? n0 + rows_dn : H;
            int64_t p0 = seg[s];
            f32_rows(g + p0 * 2 * I, 2 * I, seg[s + 1] - p0, (const float *)dn_w[pair_expert[p0]], I, n0, n1,
                     y + p0 * H, H);
        }
    if (out) combine_pairs(y, T, H, tok_off, tok_pair, pair_weight, out);
}

/* A MoE layer's experts, int8 (qmax > 0) or float32 (qmax = 0: only the gate_up and down tables are read). */
static void moe_any(const float *x, int64_t T, int64_t H, int64_t I, int64_t P, const int64_t *pair_token,
                    const int64_t *pair_expert, const float *pair_weight, const int64_t *gu_w, const int64_t *gu_sums,
                    const int64_t *gu_ws, const int64_t *dn_w, const int64_t *dn_sums, const int64_t *dn_ws,
                    const haq_rotation *down_rot, int qmax, float *out, float *y_pairs, uint8_t *scratch) {
    if (qmax == 0)
        moe_body_f32(x, T, H, I, P, pair_token, pair_expert, pair_weight, gu_w, dn_w, out, y_pairs, scratch);
    else
        moe_body(x, T, H, I, P, pair_token, pair_expert, pair_weight, gu_w, gu_sums, gu_ws, dn_w, dn_sums, dn_ws,
                 down_rot, qmax, out, y_pairs, scratch);
}

void haq_moe(const float *x, int64_t T, int64_t H, int64_t I, int64_t P, const int64_t *pair_token,
             const int64_t *pair_expert, const float *pair_weight, const int64_t *gu_w, const int64_t *gu_sums,
             const int64_t *gu_ws, const int64_t *dn_w, const int64_t *dn_sums, const int64_t *dn_ws,
             const haq_rotation *down_rot, int qmax, float *out, float *y_pairs, int threads, uint8_t *scratch) {
#pragma omp parallel num_threads(threads) if (threads > 1 && P * I * H >= 65536)
    moe_any(x, T, H, I, P, pair_token, pair_expert, pair_weight, gu_w, gu_sums, gu_ws, dn_w, dn_sums, dn_ws,
            down_rot, qmax, out, y_pairs, scratch);
}

/* One decode step of grouped-query attention for B rows, in float32, on a preallocated cache:
 * RoPE (HF's rotate_half layout: x * cos + rotate_half(x) * sin) on q and k, k and v written at
 * column `length` of the [B, kvh, cap, D] buffers, then each query head attends over its row's
 * columns [pads[b], length] (a single pass with a running max, softmax and weighted sum). q, k, v
 * rows are read with their own row strides (slices of one fused projection or separate ones);
 * out is [B, nh * D]. */
static void write_kv(const float *k, const float *v, int64_t kv_stride, int64_t B, int64_t kvh, int64_t D,
                     const float *cos, const float *sin, float *kbuf, float *vbuf, int64_t cap, int64_t length) {
    int64_t half = D / 2;
    for (int64_t b = 0; b < B; b++) { /* the new column: rotated keys, values */
        const float *c = cos + b * D, *s = sin + b * D;
        for (int64_t g = 0; g < kvh; g++) {
            const float *kr = k + b * kv_stride + g * D, *vr = v + b * kv_stride + g * D;
            float *kd = kbuf + ((b * kvh + g) * cap + length) * D, *vd = vbuf + ((b * kvh + g) * cap + length) * D;
            for (int64_t d = 0; d < D; d++) {
                float rot = d < half ? -kr[d + half] : kr[d - half];
                kd[d] = kr[d] * c[d] + rot * s[d];
                vd[d] = vr[d];
            }
        }
    }
}

/* q . k over one head's D floats: four 16-lane partial sums folded at the end instead of one
 * scalar chain of D dependent adds (the attention's score loop was latency-bound on it). */
static float dot_head(const float *a, const float *b, int64_t D) {
#if defined(__AVX512F__)
    if (D % 64 == 0) {
        __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps(), s2 = _mm512_setzero_ps(), s3 = _mm512_setzero_ps();
        for (int64_t d = 0; d < D; d += 64) {
            s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + d), _mm512_loadu_ps(b + d), s0);
            s1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + d + 16), _mm512_loadu_ps(b + d + 16), s1);
            s2 = _mm512_fmadd_ps(_mm512_loadu_ps(a + d + 32), _mm512_loadu_ps(b + d + 32), s2);
            s3 = _mm512_fmadd_ps(_mm512_loadu_ps(a + d + 48), _mm512_loadu_ps(b + d + 48), s3);
        }
        return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)));
    }
    if (D % 16 == 0) {
        __m512 s0 = _mm512_setzero_ps();
        for (int64_t d = 0; d < D; d += 16) s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + d), _mm512_loadu_ps(b + d), s0);
        return _mm512_reduce_add_ps(s0);
    }
#endif
    float s = 0.f;
    for (int64_t d = 0; d < D; d++) s += a[d] * b[d];
    return s;
}

/* One head's attention over the cached columns pads[b]..length, in chunks of ATT_CHUNK columns:
 * the chunk's scores first (independent dot products, not one chain through expf per column),
 * then its exponentials against the running max (the accumulated sums rescaled when it grows),
 * then the weighted values. */
#define ATT_CHUNK 128
static void attend_head(const float *q, int64_t q_stride, int64_t b, int64_t h, int64_t nh, int64_t kvh, int64_t D,
                        const float *cos, const float *sin, const float *kbuf, const float *vbuf, int64_t cap,
                        int64_t length, const int64_t *pads, float scale, float *out) {
    int64_t half = D / 2;
    const float *c = cos + b * D, *s = sin + b * D, *qr = q + b * q_stride + h * D;
    float qh[512], acc[512], p[ATT_CHUNK];
    for (int64_t d = 0; d < D; d++) {
        float rot = d < half ? -qr[d + half] : qr[d - half];
        qh[d] = qr[d] * c[d] + rot * s[d];
        acc[d] = 0.f;
    }
    int64_t g = h / (nh / kvh);
    const float *K = kbuf + (b * kvh + g) * cap * D, *V = vbuf + (b * kvh + g) * cap * D;
    float m = -INFINITY, l = 0.f;
    for (int64_t t0 = pads[b]; t0 <= length; t0 += ATT_CHUNK) {
        int64_t n = length + 1 - t0 < ATT_CHUNK ? length + 1 - t0 : ATT_CHUNK;
        float top = -INFINITY;
        for (int64_t j = 0; j < n; j++) {
            p[j] = dot_head(qh, K + (t0 + j) * D, D) * scale;
            top = fmaxf(top, p[j]);
        }
        if (top > m) { /* a new running max: rescale what was accumulated */
            float r = expf(m - top);
            l *= r;
            for (int64_t d = 0; d < D; d++) acc[d] *= r;
            m = top;
        }
        for (int64_t j = 0; j < n; j++) l += (p[j] = expf(p[j] - m));
        for (int64_t j = 0; j < n; j++) {
            const float *vr = V + (t0 + j) * D;
            for (int64_t d = 0; d < D; d++) acc[d] += p[j] * vr[d];
        }
    }
    float *o = out + b * nh * D + h * D;
    for (int64_t d = 0; d < D; d++) o[d] = acc[d] / l;
}

void haq_decode_attention(const float *q, const float *k, const float *v, int64_t q_stride, int64_t kv_stride,
                          int64_t B, int64_t nh, int64_t kvh, int64_t D, const float *cos, const float *sin,
                          float *kbuf, float *vbuf, int64_t cap, int64_t length, const int64_t *pads, float scale,
                          float *out, int threads) {
    write_kv(k, v, kv_stride, B, kvh, D, cos, sin, kbuf, vbuf, cap, length);
    int par = threads > 1 && B * nh * (length + 1) * D >= 262144;
#pragma omp parallel for collapse(2) schedule(static) num_threads(threads) if (par)
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < nh; h++)
            attend_head(q, q_stride, b, h, nh, kvh, D, cos, sin, kbuf, vbuf, cap, length, pads, scale, out);
}

/* ---- A whole decode step of a llama-layout W8A8 model in one call --------------------------
 * For B rows (one new token each) through every decoder layer: RMSNorm, the fused q/k/v int8
 * linear, RoPE, the cache write and GQA attention, o_proj, the residual, RMSNorm, the router
 * (float32: softmax, top-k, renormalised; Mixtral's) and the routed experts (moe_any), or a
 * dense gated MLP as one expert that every row takes with weight 1 (exact: 0 + 1 * y = y), the
 * residual; then the final norm and the lm_head (float32, or int8 per token). A float32 model
 * (st->qmax = 0) runs the same step with every linear and expert in float32 (f32_rows), nothing
 * quantized. One OpenMP parallel region for the
 * whole step: serial parts (norms, quantization, routing) in `single`, the weight reads shared
 * out; what Python did between those (some 40 ops a layer) is gone. The same integers as the
 * module path (the same kernels and grids); floats equal up to rounding order. */
typedef struct {
    const int8_t *w;
    const int32_t *sums;
    const float *scale, *bias; /* bias may be NULL */
    int64_t n, k;
    const float *wf; /* a float32 model's weight [n, k] instead (then w, sums, scale unused) */
} haq_qlinear;

typedef struct {
    const float *attn_norm, *mlp_norm;
    haq_qlinear qkv, o;
    const float *router;   /* float32 [E, H]; NULL: a dense MLP (tables then hold one expert) */
    const int64_t *tables; /* 6 x E pointers: gate_up levels, row sums, scales; down likewise */
    int64_t inter;         /* the experts' (or the dense MLP's) intermediate size */
    haq_rotation down_rot; /* of the experts' (or the dense MLP's) down inputs; na = 0: none */
    float *kbuf, *vbuf;    /* [B, kv_heads, cap, head_dim] */
    int64_t cap;
} haq_layer;

typedef struct {
    int64_t layers, B, H, heads, kv_heads, head_dim, experts, top_k, vocab, length;
    const int64_t *pads;    /* [B] masked columns before each row's tokens */
    const float *cos, *sin; /* [B, head_dim] */
    const float *final_norm, *lm_head; /* lm_head float32 [vocab, H], or NULL: */
    haq_qlinear lm_head_q;             /* the int8 one (quantize_lm_head) */
    float eps, attn_scale;
    int32_t qmax, threads;
} haq_step;

static void rms_norm(const float *x, int64_t B, int64_t H, const float *w, float eps, float *out) {
    for (int64_t b = 0; b < B; b++) {
        const float *r = x + b * H;
        double ss = 0.0;
        for (int64_t h = 0; h < H; h++) ss += (double)r[h] * r[h];
        float inv = 1.f / sqrtf((float)(ss / (double)H) + eps);
        for (int64_t h = 0; h < H; h++) out[b * H + h] = w[h] * (r[h] * inv);
    }
}

/* Softmax over E router logits, the top_k largest (ties: the lower index), renormalised; the
 * (row, expert, weight) pairs of all rows sorted by expert, rows ascending within an expert. */
static void route_rows(float *logits, int64_t B, int64_t E, int64_t K, int16_t *chosen, int64_t *pair_token,
                       int64_t *pair_expert, float *pair_weight) {
    float *weights = logits; /* overwritten row by row once read */
    float probs[1024], top[64];
    for (int64_t b = 0; b < B; b++) {
        const float *l = logits + b * E;
        float mx = -INFINITY, sum = 0.f;
        for (int64_t e = 0; e < E; e++) mx = fmaxf(mx, l[e]);
        for (int64_t e = 0; e < E; e++) sum += (probs[e] = expf(l[e] - mx));
        for (int64_t e = 0; e < E; e++) probs[e] /= sum;
        float total = 0.f;
        for (int64_t k = 0; k < K; k++) {
            int64_t best = -1;
            for (int64_t e = 0; e < E; e++)
                if (probs[e] >= 0.f && (best < 0 || probs[e] > probs[best])) best = e;
            chosen[b * K + k] = (int16_t)best;
            top[k] = probs[best];
            total += probs[best];
            probs[best] = -1.f; /* taken */
        }
        for (int64_t e = 0; e < E; e++) probs[e] = -1.f; /* row b's weights: -1 where not chosen */
        for (int64_t k = 0; k < K; k++) probs[chosen[b * K + k]] = top[k] / total;
        memcpy(weights + b * E, probs, (size_t)E * sizeof(float));
    }
    int64_t p = 0;
    for (int64_t e = 0; e < E; e++)
        for (int64_t b = 0; b < B; b++)
            if (weights[b * E + e] >= 0.f) {
                pair_token[p] = b, pair_expert[p] = e, pair_weight[p] = weights[b * E + e];
                p++;
            }
}

/* A decode step's linear: int8 on the levels xu and scales xs of x, or (qmax = 0) float32 on x. */
static void step_linear(const haq_qlinear *q, const float *x, const uint8_t *xu, const float *xs, int64_t M,
                        int64_t K, int64_t N, float *y, int64_t ld, int qmax) {
    if (qmax == 0)
        f32_linear_blocks(x, M, q->wf, q->bias, K, N, y, ld);
    else
        linear_blocks(xu, xs, M, q->w, q->sums, q->scale, q->bias, K, N, y, ld);
}

int64_t haq_decode_scratch(const haq_step *st, int64_t max_inter) {
    int64_t B = st->B, H = st->H, D = st->head_dim, nq = (st->heads + 2 * st->kv_heads) * D;
    int64_t P = B * (st->top_k > 1 ? st->top_k : 1), widest = H > st->heads * D ? H : st->heads * D;
    return 4 * (align64(B * H) * 2 + align64(B * nq) + align64(B * st->heads * D) + align64(B) +
                align64(B * (st->experts > 0 ? st->experts : 1)) + align64(P)) +
           align64(B * widest) + 16 * align64(P) + haq_moe_scratch(B, H, max_inter, P) + 64;
}

/* With `seconds` (NULL: not timed), the master thread adds each phase's wall time to its part
 * (STEP_PARTS of them; one more slot holds the last mark): a phase ends at a barrier, so its end
 * is when the master leaves it. */
enum { PART_OTHER, PART_ATTENTION, PART_ROUTER, PART_EXPERTS, PART_LM_HEAD, STEP_PARTS };
#define MARK(seconds, part)                                                                      \
    do {                                                                                         \
        if (seconds) {                                                                           \
            _Pragma("omp master") {                                                              \
                double now_ = omp_get_wtime();                                                   \
                (seconds)[part] += now_ - (seconds)[STEP_PARTS];                                 \
                (seconds)[STEP_PARTS] = now_;                                                    \
            }                                                                                    \
        }                                                                                        \
    } while (0)

int haq_step_parts(void) { return STEP_PARTS; }

void haq_decode_step(const haq_step *st, const haq_layer *layers, float *x, float *logits, int16_t *routing,
                     uint8_t *scratch, double *seconds) {
    int64_t B = st->B, H = st->H, nh = st->heads, kvh = st->kv_heads, D = st->head_dim, E = st->experts;
    int64_t nq = (nh + 2 * kvh) * D, P_moe = B * st->top_k, widest = H > nh * D ? H : nh * D;
    float *xn = (float *)scratch, *tmp = xn + align64(B * H), *qkv = tmp + align64(B * H);
    float *att = qkv + align64(B * nq), *xs = att + align64(B * nh * D), *rl = xs + align64(B);
    float *pair_weight = rl + align64(B * (E > 0 ? E : 1));
    int64_t *pair_token = (int64_t *)(pair_weight + align64(P_moe > B ? P_moe : B));
    int64_t *pair_expert = pair_token + align64(P_moe > B ? P_moe : B);
    uint8_t *xu = (uint8_t *)(pair_expert + align64(P_moe > B ? P_moe : B));
    uint8_t *moe_scratch = xu + align64(B * widest);
    if (seconds) seconds[STEP_PARTS] = omp_get_wtime();
#pragma omp parallel num_threads(st->threads)
    for (int64_t l = 0; l < st->layers; l++) {
        const haq_layer *L = layers + l;
        const int64_t *t = L->tables;
        int64_t Ex = L->router ? E : 1, P = L->router ? P_moe : B;
#pragma omp single
        {
            rms_norm(x, B, H, L->attn_norm, st->eps, xn);
            if (st->qmax) quantize(xn, B, H, st->qmax, 0, 0.f, xu, xs);
        }
        MARK(seconds, PART_OTHER);
        step_linear(&L->qkv, xn, xu, xs, B, H, nq, qkv, nq, st->qmax);
#pragma omp single
        write_kv(qkv + nh * D, qkv + (nh + kvh) * D, nq, B, kvh, D, st->cos, st->sin, L->kbuf, L->vbuf, L->cap,
                 st->length);
#pragma omp for collapse(2) schedule(static)
        for (int64_t b = 0; b < B; b++)
            for (int64_t h = 0; h < nh; h++)
                attend_head(qkv, nq, b, h, nh, kvh, D, st->cos, st->sin, L->kbuf, L->vbuf, L->cap, st->length,
                            st->pads, st->attn_scale, att);
#pragma omp single
        if (st->qmax) quantize(att, B, nh * D, st->qmax, 0, 0.f, xu, xs);
        step_linear(&L->o, att, xu, xs, B, nh * D, H, tmp, H, st->qmax);
        MARK(seconds, PART_ATTENTION);
#pragma omp single
        {
            for (int64_t i = 0; i < B * H; i++) x[i] += tmp[i];
            rms_norm(x, B, H, L->mlp_norm, st->eps, xn);
        }
        MARK(seconds, PART_OTHER);
#pragma omp single
        {
            if (L->router) {
                f32_rows(xn, H, B, L->router, H, 0, E, rl, E);
                route_rows(rl, B, E, st->top_k, routing + l * B * st->top_k, pair_token, pair_expert, pair_weight);
            } else {
                for (int64_t b = 0; b < B; b++) pair_token[b] = b, pair_expert[b] = 0, pair_weight[b] = 1.f;
            }
        }
        MARK(seconds, PART_ROUTER);
        moe_any(xn, B, H, L->inter, P, pair_token, pair_expert, pair_weight, t, t + Ex, t + 2 * Ex, t + 3 * Ex,
                t + 4 * Ex, t + 5 * Ex, &L->down_rot, st->qmax, tmp, NULL, moe_scratch);
        MARK(seconds, PART_EXPERTS);
#pragma omp single
        for (int64_t i = 0; i < B * H; i++) x[i] += tmp[i];
    }
    rms_norm(x, B, H, st->final_norm, st->eps, xn);
    if (seconds) { /* the last residual and the final norm */
        double now = omp_get_wtime();
        seconds[PART_OTHER] += now - seconds[STEP_PARTS];
        seconds[STEP_PARTS] = now;
    }
    if (st->lm_head == NULL) {
        const haq_qlinear *q = &st->lm_head_q;
        quantize(xn, B, H, st->qmax, 0, 0.f, xu, xs);
#pragma omp parallel num_threads(st->threads)
        linear_blocks(xu, xs, B, q->w, q->sums, q->scale, q->bias, H, st->vocab, logits, st->vocab);
    } else {
#pragma omp parallel num_threads(st->threads)
        f32_linear_blocks(xn, B, st->lm_head, NULL, H, st->vocab, logits, st->vocab);
    }
    if (seconds) seconds[PART_LM_HEAD] += omp_get_wtime() - seconds[STEP_PARTS];
}

/* GPTQ's column loop over one block of `count` columns, in the transposed layout (haq.quant.gptq):
 * W1 [count, rows] holds the block's columns of W as rows, Hinv1 [count, count] the block of the upper
 * Cholesky factor, s [rows] the per-channel scales. For each column i: q = clamp(round(w / s)),
 * err = (w - q s) / Hinv1[i, i], and the later columns of the block get W1[j] -= Hinv1[i, j] err.
 * Writes the levels into Q1 and err into Err1 (both [count, rows]); W1 is updated in place. Output
 * channels (rows of W) never interact, so threads take disjoint row ranges and the loop has no
 * Python step per column. */
void haq_gptq_block(float *W1, const float *Hinv1, const float *s, int64_t count, int64_t rows, float qmax,
                    float *Q1, float *Err1) {
    #pragma omp parallel for schedule(static)
    for (int64_t r0 = 0; r0 < rows; r0 += 64) {
        const int64_t r1 = r0 + 64 < rows ? r0 + 64 : rows;
        for (int64_t i = 0; i < count; i++) {
            const float d = Hinv1[i * count + i];
            float *w = W1 + i * rows, *q = Q1 + i * rows, *err = Err1 + i * rows;
            for (int64_t r = r0; r < r1; r++) {
                float level = nearbyintf(w[r] / s[r]);
                level = level > qmax ? qmax : (level < -qmax ? -qmax : level);
                q[r] = level;
                err[r] = (w[r] - level * s[r]) / d;
            }
            for (int64_t j = i + 1; j < count; j++) {
                const float h = Hinv1[i * count + j];
                float *wj = W1 + j * rows;
                for (int64_t r = r0; r < r1; r++) wj[r] -= h * err[r];
            }
        }
    }
}

/* Round-to-nearest symmetric quantize-dequantize of each row of x [rows, cols] (float32), as
 * haq.kernels.grid computes it in torch: s = max(max_j |x_j| / qmax, eps), q = clamp(rint(x / s)),
 * out = q * s. One pass per row instead of torch's six whole-tensor passes; a NaN in a row makes
 * its scale NaN, as torch's amax does. The fake-quant of calibration (the alpha search, the block
 * error) is mostly this. */
void haq_fake_quant_rows(const float *x, int64_t rows, int64_t cols, float qmax, float eps, float *out) {
    #pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * cols;
        float *o = out + r * cols;
        float m = 0.0f;
        for (int64_t j = 0; j < cols; j++) {
            const float a = fabsf(xr[j]);
            m = (a > m || a != a) ? a : m;
        }
        float s = m / qmax;
        s = s < eps ? eps : s;
        for (int64_t j = 0; j < cols; j++) {
            float level = nearbyintf(xr[j] / s);
            level = level > qmax ? qmax : (level < -qmax ? -qmax : level);
            o[j] = level * s;
        }
    }
}

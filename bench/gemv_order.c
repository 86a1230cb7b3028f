/* The two load orders of haq's int8 GEMV loop (haq/kernels/cpu/int8_kernels.c, dot_rows), alone:
 * "interleaved" walks K once and loads the 4 weight rows of a block at each step (4 streams K bytes
 * apart); "sequential" reads the block's rows one after another (one stream in address order).
 * Prints GB/s of weights read for each order and thread count; exact int32 sums, checked equal. */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define ROWS 4
#define PF 8192

static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }

static void gemv(const uint8_t *x, const int8_t *w, int64_t N, int64_t K, int32_t *y, int sequential, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n += ROWS) {
        __m512i a[ROWS];
        for (int r = 0; r < ROWS; r++) a[r] = _mm512_setzero_si512();
        const int8_t *b = w + n * K;
        if (sequential) {
            for (int r = 0; r < ROWS; r++)
                for (int64_t k = 0; k < K; k += 64) {
                    _mm_prefetch((const char *)(b + r * K + k) + PF, _MM_HINT_T0);
                    a[r] = _mm512_dpbusd_epi32(a[r], _mm512_loadu_si512(x + k), _mm512_loadu_si512(b + r * K + k));
                }
        } else {
            for (int64_t k = 0; k < K; k += 64) {
                __m512i xv = _mm512_loadu_si512(x + k);
                for (int r = 0; r < ROWS; r++) {
                    _mm_prefetch((const char *)(b + r * K + k) + PF, _MM_HINT_T0);
                    a[r] = _mm512_dpbusd_epi32(a[r], xv, _mm512_loadu_si512(b + r * K + k));
                }
            }
        }
        for (int r = 0; r < ROWS; r++) y[n + r] = _mm512_reduce_add_epi32(a[r]);
    }
}

int main(int argc, char **argv) {
    int64_t N = argc > 1 ? atoll(argv[1]) : 276480, K = argc > 2 ? atoll(argv[2]) : 576;
    int repeats = argc > 3 ? atoi(argv[3]) : 9;
    int8_t *w = aligned_alloc(64, N * K);
    uint8_t *x = aligned_alloc(64, K);
    int32_t *y0 = aligned_alloc(64, N * 4), *y1 = aligned_alloc(64, N * 4);
    for (int64_t i = 0; i < N * K; i++) w[i] = (int8_t)(i * 7 + 3);
    for (int64_t i = 0; i < K; i++) x[i] = (uint8_t)(i * 13);
    for (int threads = 1; threads <= 2; threads++)
        for (int round = 0; round < repeats; round++)
            for (int sequential = 0; sequential <= 1; sequential++) {  /* interleaved rounds */
                double t = now();
                gemv(x, w, N, K, sequential ? y1 : y0, sequential, threads);
                t = now() - t;
                printf("%d %d %.6f\n", threads, sequential, t);
            }
    for (int64_t i = 0; i < N; i++)
        if (y0[i] != y1[i]) { fprintf(stderr, "sums differ at row %lld\n", (long long)i); return 1; }
    return 0;
}

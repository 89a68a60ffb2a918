/* The machine's FMA peak: independent fused multiply-add chains on every thread, with
 * the widest vectors the CPU has (AVX-512 or AVX2). Prints GFLOP/s as JSON. */
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>

#include "ot_cli.h"

#define ITERS 20000000L

__attribute__((target("avx2,fma"))) static double run_avx2(void) {
  __m256 a[10], b = _mm256_set1_ps(0.999999f), c = _mm256_set1_ps(1e-7f);
  for (int i = 0; i < 10; i++) a[i] = _mm256_set1_ps((float)i);
  for (long n = 0; n < ITERS; n++)
    for (int i = 0; i < 10; i++) a[i] = _mm256_fmadd_ps(a[i], b, c);
  float s = 0, out[8];
  for (int i = 0; i < 10; i++) {
    _mm256_storeu_ps(out, a[i]);
    s += out[0];
  }
  return s;
}

__attribute__((target("avx512f"))) static double run_avx512(void) {
  __m512 a[12], b = _mm512_set1_ps(0.999999f), c = _mm512_set1_ps(1e-7f);
  for (int i = 0; i < 12; i++) a[i] = _mm512_set1_ps((float)i);
  for (long n = 0; n < ITERS; n++)
    for (int i = 0; i < 12; i++) a[i] = _mm512_fmadd_ps(a[i], b, c);
  float s = 0;
  for (int i = 0; i < 12; i++) s += _mm512_reduce_add_ps(a[i]);
  return s;
}

int main(int argc, char **argv) {
  int threads = argc > 1 ? atoi(argv[1]) : omp_get_num_procs();
  int wide = __builtin_cpu_supports("avx512f");
  double flops_per_thread = wide ? ITERS * 12.0 * 16 * 2 : ITERS * 10.0 * 8 * 2;
  double sink = 0, t0 = ot_now();
#pragma omp parallel num_threads(threads) reduction(+ : sink)
  sink += wide ? run_avx512() : run_avx2();
  double dt = ot_now() - t0;
  printf("{\"isa\": \"%s\", \"threads\": %d, \"gflops\": %.1f, \"sink\": %g}\n", wide ? "avx512" : "avx2",
         threads, flops_per_thread * threads / dt / 1e9, sink);
  return 0;
}

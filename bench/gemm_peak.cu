/* Measured matrix-product peak of this GPU through cuBLAS, the denominator of the MFU
 * figures in bench/bench_cuda.sh: square GEMMs (default 8192) in
 *   fp32      fp32 in/out, fp32 compute (what OT_CUDA_BF16=0 runs),
 *   fp32-bf16 fp32 in/out, CUBLAS_COMPUTE_32F_FAST_16BF (what OT_CUDA_BF16=1 runs),
 *   bf16      bf16 in, fp32 out and accumulation (the tensor-core ceiling).
 * Prints one JSON line: {"device": ..., "fp32_tflops": ..., ...}. Exit 1 without a GPU. */
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdio.h>
#include <stdlib.h>

static int fail(const char *what, const char *why) {
  fprintf(stderr, "gemm_peak: %s: %s\n", what, why);
  return 1;
}

#define CK(x)                                                                                                   \
  do {                                                                                                          \
    cudaError_t e_ = (x);                                                                                       \
    if (e_ != cudaSuccess) return fail(#x, cudaGetErrorString(e_));                                             \
  } while (0)
#define CB(x)                                                                                                   \
  do {                                                                                                          \
    cublasStatus_t s_ = (x);                                                                                    \
    if (s_ != CUBLAS_STATUS_SUCCESS) return fail(#x, cublasGetStatusString(s_));                                \
  } while (0)

/* TFLOP/s of the best of `reps` timed runs of C = A B (n x n x n). */
static int time_gemm(cublasHandle_t h, int n, cudaDataType_t ab, cublasComputeType_t ct, const void *A,
                     const void *B, float *C, int reps, double *tflops) {
  float alpha = 1.0f, beta = 0.0f;
  cudaEvent_t t0, t1;
  CK(cudaEventCreate(&t0));
  CK(cudaEventCreate(&t1));
  double best = 1e30;
  for (int r = 0; r < reps + 2; r++) { /* two untimed warm-ups */
    CK(cudaEventRecord(t0));
    CB(cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_N, n, n, n, &alpha, A, ab, n, B, ab, n, &beta, C, CUDA_R_32F, n, ct,
                    CUBLAS_GEMM_DEFAULT));
    CK(cudaEventRecord(t1));
    CK(cudaEventSynchronize(t1));
    float ms;
    CK(cudaEventElapsedTime(&ms, t0, t1));
    if (r >= 2 && ms < best) best = ms;
  }
  cudaEventDestroy(t0);
  cudaEventDestroy(t1);
  *tflops = 2.0 * n * (double)n * n / (best * 1e-3) / 1e12;
  return 0;
}

static __global__ void fill(float *x, __nv_bfloat16 *y, size_t n) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    float v = (float)((i * 2654435761u) % 1000) / 1000.0f - 0.5f;
    x[i] = v;
    y[i] = __float2bfloat16(v);
  }
}

int main(int argc, char **argv) {
  int n = argc > 1 ? atoi(argv[1]) : 8192, reps = 10;
  if (n < 256 || n > 32768) return fail("size", "expected 256..32768");
  int count = 0;
  cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess || count == 0)
    return fail("no CUDA device", e != cudaSuccess ? cudaGetErrorString(e) : "the driver reports no GPU");
  cudaDeviceProp p;
  CK(cudaGetDeviceProperties(&p, 0));
  size_t nn = (size_t)n * n;
  float *A, *B, *C;
  __nv_bfloat16 *Ah, *Bh;
  CK(cudaMalloc(&A, nn * 4));
  CK(cudaMalloc(&B, nn * 4));
  CK(cudaMalloc(&C, nn * 4));
  CK(cudaMalloc(&Ah, nn * 2));
  CK(cudaMalloc(&Bh, nn * 2));
  fill<<<1024, 256>>>(A, Ah, nn);
  fill<<<1024, 256>>>(B, Bh, nn);
  CK(cudaGetLastError());
  cublasHandle_t h;
  CB(cublasCreate(&h));
  double f32, f32bf, bf;
  if (time_gemm(h, n, CUDA_R_32F, CUBLAS_COMPUTE_32F, A, B, C, reps, &f32) ||
      time_gemm(h, n, CUDA_R_32F, CUBLAS_COMPUTE_32F_FAST_16BF, A, B, C, reps, &f32bf) ||
      time_gemm(h, n, CUDA_R_16BF, CUBLAS_COMPUTE_32F, Ah, Bh, C, reps, &bf))
    return 1;
  printf("{\"device\": \"%s\", \"n\": %d, \"fp32_tflops\": %.1f, \"fp32_fast_bf16_tflops\": %.1f, "
         "\"bf16_tflops\": %.1f}\n",
         p.name, n, f32, f32bf, bf);
  cublasDestroy(h);
  cudaFree(A);
  cudaFree(B);
  cudaFree(C);
  cudaFree(Ah);
  cudaFree(Bh);
  return 0;
}

/* A CPU stand-in for the parts of the CUDA runtime, cuBLAS and cuBLASLt that
 * kernels/cuda uses, so the CUDA backend's own sources (kernels included) run on a
 * machine without a GPU. Blocks run one after another; the threads of a block are
 * coroutines, with barriers for __syncthreads/__syncwarp and warp shuffles, so indexing,
 * tiling, masking and reduction bugs show up in tests/test_backend_ops. It says nothing
 * about speed, occupancy, memory coalescing or races the GPU's memory model allows and
 * this one hides: those need the real GPU run (docs/cuda.md).
 * "cuBLAS" here is OpenBLAS; CUBLAS_COMPUTE_32F_FAST_16BF rounds inputs to bf16 first. */
#ifndef OT_CUDA_EMU_H
#define OT_CUDA_EMU_H

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

using std::max;
using std::min;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(x)
#define __shared__ static /* blocks run one at a time: a static is block-shared memory */

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

/* ---- runtime ---- */
typedef enum {
  cudaSuccess = 0,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidValue = 1,
} cudaError_t;
typedef struct ot_emu_stream *cudaStream_t;
typedef enum {
  cudaMemcpyHostToDevice = 1,
  cudaMemcpyDeviceToHost = 2,
  cudaMemcpyDeviceToDevice = 3
} cudaMemcpyKind;
#define cudaStreamNonBlocking 1
typedef struct {
  char name[256];
  int major, minor, multiProcessorCount;
} cudaDeviceProp;

const char *cudaGetErrorString(cudaError_t e);
cudaError_t cudaGetLastError(void);
cudaError_t cudaGetDeviceCount(int *n);
cudaError_t cudaGetDeviceProperties(cudaDeviceProp *p, int dev);
cudaError_t cudaSetDevice(int dev);
cudaError_t cudaStreamCreateWithFlags(cudaStream_t *s, unsigned flags);
cudaError_t cudaStreamDestroy(cudaStream_t s);
cudaError_t cudaStreamSynchronize(cudaStream_t s);
cudaError_t cudaMalloc(void **p, size_t bytes);
cudaError_t cudaFree(void *p);
cudaError_t cudaMemcpyAsync(void *dst, const void *src, size_t bytes, cudaMemcpyKind kind, cudaStream_t s);
cudaError_t cudaMemsetAsync(void *p, int v, size_t bytes, cudaStream_t s);

/* ---- the execution model ---- */
extern dim3 threadIdx, blockIdx, blockDim, gridDim;
void __syncthreads(void);
void __syncwarp(unsigned mask = 0xffffffffu);
float ot_emu_shfl_xor(float v, int o);
double ot_emu_shfl_xor_d(double v, int o);
static inline float __shfl_xor_sync(unsigned, float v, int o) { return ot_emu_shfl_xor(v, o); }
static inline double __shfl_xor_sync(unsigned, double v, int o) { return ot_emu_shfl_xor_d(v, o); }
float atomicAdd(float *p, float v);
double atomicAdd(double *p, double v);
void *ot_emu_dynamic_smem(void);

/* Runs body(thread) for every thread of every block (blocks in order). */
struct ot_emu_body {
  virtual void run() = 0;
  virtual ~ot_emu_body() {}
};
void ot_emu_run(dim3 grid, dim3 block, size_t smem, ot_emu_body *body);

template <typename F> struct ot_emu_fn : ot_emu_body {
  F f;
  ot_emu_fn(F f_) : f(f_) {}
  void run() override { f(); }
};

/* kernel<<<g, b, smem, s>>>(args...) is rewritten to ot_emu_launch(g, b, smem, s, kernel, args...) */
template <typename... KA, typename... A>
void ot_emu_launch(dim3 g, dim3 b, size_t smem, cudaStream_t, void (*k)(KA...), A... args) {
  auto f = [=]() { k(args...); };
  ot_emu_fn<decltype(f)> body(f);
  ot_emu_run(g, b, smem, &body);
}
template <typename... KA, typename... A> void ot_emu_launch(dim3 g, dim3 b, void (*k)(KA...), A... args) {
  ot_emu_launch(g, b, 0, (cudaStream_t)0, k, args...);
}

/* ---- cuBLAS / cuBLASLt ---- */
typedef enum {
  CUBLAS_STATUS_SUCCESS = 0,
  CUBLAS_STATUS_ALLOC_FAILED = 3,
  CUBLAS_STATUS_INVALID_VALUE = 7
} cublasStatus_t;
typedef enum { CUBLAS_OP_N = 0, CUBLAS_OP_T = 1 } cublasOperation_t;
typedef enum { CUDA_R_32F = 0, CUDA_R_16BF = 14 } cudaDataType_t;
typedef enum { CUBLAS_COMPUTE_32F = 68, CUBLAS_COMPUTE_32F_FAST_16BF = 75 } cublasComputeType_t;
#define CUBLAS_GEMM_DEFAULT (-1)
typedef struct ot_emu_blas *cublasHandle_t;
typedef struct ot_emu_blas *cublasLtHandle_t;
const char *cublasGetStatusString(cublasStatus_t s);
cublasStatus_t cublasCreate(cublasHandle_t *h);
cublasStatus_t cublasDestroy(cublasHandle_t h);
cublasStatus_t cublasSetStream(cublasHandle_t h, cudaStream_t s);
cublasStatus_t cublasGemmEx(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                            const void *alpha, const void *A, cudaDataType_t at, int lda, const void *B,
                            cudaDataType_t bt, int ldb, const void *beta, void *C, cudaDataType_t ct, int ldc,
                            cublasComputeType_t comp, int algo);

typedef enum {
  CUBLASLT_MATMUL_DESC_TRANSA,
  CUBLASLT_MATMUL_DESC_TRANSB,
  CUBLASLT_MATMUL_DESC_EPILOGUE,
  CUBLASLT_MATMUL_DESC_BIAS_POINTER
} cublasLtMatmulDescAttributes_t;
typedef enum { CUBLASLT_EPILOGUE_DEFAULT = 1, CUBLASLT_EPILOGUE_BIAS = 4 } cublasLtEpilogue_t;
typedef enum {
  CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES = 1,
  CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
  CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
  CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
  CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES
} cublasLtMatmulPreferenceAttributes_t;
typedef struct ot_emu_desc *cublasLtMatmulDesc_t;
typedef struct ot_emu_layout *cublasLtMatrixLayout_t;
typedef struct ot_emu_pref *cublasLtMatmulPreference_t;
typedef struct {
  int id;
} cublasLtMatmulAlgo_t;
typedef struct {
  cublasLtMatmulAlgo_t algo;
} cublasLtMatmulHeuristicResult_t;
cublasStatus_t cublasLtCreate(cublasLtHandle_t *h);
cublasStatus_t cublasLtDestroy(cublasLtHandle_t h);
cublasStatus_t cublasLtMatmulDescCreate(cublasLtMatmulDesc_t *d, cublasComputeType_t c, cudaDataType_t s);
cublasStatus_t cublasLtMatmulDescDestroy(cublasLtMatmulDesc_t d);
cublasStatus_t cublasLtMatmulDescSetAttribute(cublasLtMatmulDesc_t d, cublasLtMatmulDescAttributes_t a,
                                              const void *v, size_t n);
cublasStatus_t cublasLtMatrixLayoutCreate(cublasLtMatrixLayout_t *l, cudaDataType_t t, uint64_t rows,
                                          uint64_t cols, int64_t ld);
cublasStatus_t cublasLtMatrixLayoutDestroy(cublasLtMatrixLayout_t l);
cublasStatus_t cublasLtMatmulPreferenceCreate(cublasLtMatmulPreference_t *p);
cublasStatus_t cublasLtMatmulPreferenceDestroy(cublasLtMatmulPreference_t p);
cublasStatus_t cublasLtMatmulPreferenceSetAttribute(cublasLtMatmulPreference_t p,
                                                    cublasLtMatmulPreferenceAttributes_t a, const void *v,
                                                    size_t n);
cublasStatus_t cublasLtMatmulAlgoGetHeuristic(cublasLtHandle_t h, cublasLtMatmulDesc_t d,
                                              cublasLtMatrixLayout_t a, cublasLtMatrixLayout_t b,
                                              cublasLtMatrixLayout_t c, cublasLtMatrixLayout_t dd,
                                              cublasLtMatmulPreference_t p, int want,
                                              cublasLtMatmulHeuristicResult_t *res, int *n);
cublasStatus_t cublasLtMatmul(cublasLtHandle_t h, cublasLtMatmulDesc_t d, const void *alpha, const void *A,
                              cublasLtMatrixLayout_t la, const void *B, cublasLtMatrixLayout_t lb,
                              const void *beta, const void *C, cublasLtMatrixLayout_t lc, void *D,
                              cublasLtMatrixLayout_t ld, const cublasLtMatmulAlgo_t *algo, void *ws,
                              size_t wsb, cudaStream_t s);

#endif

/* Shared by the CUDA backend's translation units: the context, error capture, the
 * row-major GEMM wrapper and the entry points of the attention and LoRA files. */
#ifndef OT_CUDA_INTERNAL_H
#define OT_CUDA_INTERNAL_H

#ifdef OT_CUDA_EMU /* tests/cuda_emu: the same sources run on the CPU, for checks without a GPU */
#include "cuda_emu.h"
#define OT_EXTERN_SHARED(T, name) T *name = (T *)ot_emu_dynamic_smem()
#else
#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_runtime.h>
#define OT_EXTERN_SHARED(T, name) extern __shared__ T name[]
#endif
#include <stddef.h>
#include <stdint.h>

extern "C" {
#include "ot_backend.h"
#include "ot_error.h"
}

typedef struct {
  int device;
  unsigned flags;
  cudaStream_t stream;
  cublasHandle_t blas;
  cublasLtHandle_t lt;
  void *lt_ws; /* cuBLASLt workspace */
  size_t lt_ws_bytes;
  cublasComputeType_t compute; /* fp32, or fp32 with bf16 tensor-core inputs */
  double *sumsq_dev;           /* one double for sumsq's reduction */
  void *meta_dev;              /* SGMV segment table (grown on demand) */
  size_t meta_bytes;
  void *meta_host;
  float *sgmv_t; /* SGMV shrink results (grown on demand) */
  size_t sgmv_t_bytes;
  int n_sm;
  /* first error since the last sync: ops cannot return one */
  int err;
  char err_msg[256];
} ot_cuda_ctx;

static inline ot_cuda_ctx *ot_cuda(ot_backend *be) { return (ot_cuda_ctx *)be->ctx; }

/* Record the first failure (ops); sync/download report it. */
void ot_cuda_note(ot_cuda_ctx *c, cudaError_t e, const char *what);
void ot_cuda_note_blas(ot_cuda_ctx *c, cublasStatus_t s, const char *what);
#define OT_CUDA_LAUNCHED(c, what) ot_cuda_note((c), cudaGetLastError(), (what))

/* cblas_sgemm(CblasRowMajor, ...) on the backend's stream: C = alpha op(A) op(B) + beta C. */
void ot_cuda_gemm(ot_cuda_ctx *c, int transA, int transB, int M, int N, int K, float alpha, const float *A,
                  int lda, const float *B, int ldb, float beta, float *C, int ldc);

/* Grid size for grid-stride loops over n elements. */
static inline unsigned ot_cuda_grid(ot_cuda_ctx *c, size_t n, int block) {
  size_t g = (n + block - 1) / block, cap = (size_t)c->n_sm * 32;
  if (g > cap) g = cap;
  return g ? (unsigned)g : 1u;
}

/* ot_cuda_attention.cu */
void ot_cuda_attention_fwd(ot_backend *be, float *out, float *att, const float *qkv, int B, int T, int C,
                           int NH);
void ot_cuda_attention_bwd(ot_backend *be, float *dqkv, float *datt, const float *dout, const float *qkv,
                           const float *att, int B, int T, int C, int NH);
size_t ot_cuda_attention_state(ot_backend *be, int B, int T, int C, int NH);
void ot_cuda_embed_fwd(ot_backend *be, float *out, const int32_t *tokens, const int32_t *pos,
                       const float *wte, const float *wpe, int N, int C);
void ot_cuda_attention_kv_fwd(ot_backend *be, float *out, float *kcache, float *vcache, const float *qkv,
                              const int32_t *pos, const int32_t *slot, const int32_t *table, int N, int C,
                              int NH, int bs, int mb);

/* ot_cuda_lora.cu */
void ot_cuda_rmsnorm_fwd(ot_backend *be, float *out, float *rstd, const float *inp, const float *w, int N,
                         int C, float eps);
void ot_cuda_rmsnorm_bwd(ot_backend *be, float *dinp, float *dw, const float *dout, const float *inp,
                         const float *w, const float *rstd, int N, int C);
void ot_cuda_rope(ot_backend *be, float *x, const int32_t *pos, const float *inv_freq, int N, int H, int D,
                  int inverse);
void ot_cuda_swiglu_fwd(ot_backend *be, float *out, const float *gate, const float *up, size_t n);
void ot_cuda_swiglu_bwd(ot_backend *be, float *dgate, float *dup, const float *dout, const float *gate,
                        const float *up, size_t n);
void ot_cuda_gqa_fwd(ot_backend *be, float *out, float *att, const float *q, const float *k, const float *v,
                     int B, int T, int NH, int NKV, int D);
void ot_cuda_gqa_bwd(ot_backend *be, float *dq, float *dk, float *dv, float *datt, const float *dout,
                     const float *q, const float *k, const float *v, const float *att, int B, int T, int NH,
                     int NKV, int D);
void ot_cuda_gqa_kv_fwd(ot_backend *be, float *out, float *kcache, float *vcache, const float *q,
                        const float *k, const float *v, const int32_t *pos, const int32_t *slot,
                        const int32_t *table, int N, int NH, int NKV, int D, int bs, int mb);
void ot_cuda_lora_fwd(ot_backend *be, float *out, float *t, float *xd, const float *x, const float *A,
                      const float *B, int N, int IN, int OUT, int r, float scale, float p, uint64_t seed);
void ot_cuda_lora_bwd(ot_backend *be, float *dx, float *dA, float *dB, float *dt, float *xd,
                      const float *dout, const float *x, const float *t, const float *A, const float *B,
                      int N, int IN, int OUT, int r, float scale, float p, uint64_t seed);
void ot_cuda_lora_sgmv_fwd(ot_backend *be, float *out, const float *x, const float *const *A,
                           const float *const *Bt, const int *row0, const int *n, const int *r,
                           const float *scale, int S, int IN, int OUT);

/* warp / block reductions (blockDim.x a multiple of 32) */
static __device__ __forceinline__ float ot_warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
static __device__ __forceinline__ float ot_warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

/* Causal softmax of one row of scores a[0..t] by one warp (mx: this lane's partial maximum of
 * them); a[t+1..T) become 0. Ends with the warp in step, so the row can be read at once. */
static __device__ __forceinline__ void ot_warp_softmax_causal(float *a, int t, int T, float mx) {
  int lane = threadIdx.x & 31;
  mx = ot_warp_max(mx);
  float sum = 0.0f;
  for (int t2 = lane; t2 <= t; t2 += 32) {
    float e = expf(a[t2] - mx);
    a[t2] = e;
    sum += e;
  }
  float inv = 1.0f / ot_warp_sum(sum);
  for (int t2 = lane; t2 <= t; t2 += 32) a[t2] *= inv;
  for (int t2 = t + 1 + lane; t2 < T; t2 += 32) a[t2] = 0.0f;
  __syncwarp();
}

#endif

/* The CPU stand-in declared in cuda_emu.h. */
#include "cuda_emu.h"

#include <cblas.h>

#include <stdio.h>
#include <ucontext.h>

#include <memory>

dim3 threadIdx, blockIdx, blockDim, gridDim;

/* The threads of a block are coroutines (ucontext) on one OS thread: a thread runs until
 * it reaches a barrier or ends; a barrier opens when every live thread of its scope
 * (block or warp) waits at it. Deterministic, and cheap enough for thousands of threads. */
namespace {
enum { RUN, WAIT_BLOCK, WAIT_WARP, DONE };
struct fiber {
  ucontext_t ctx;
  int state;
  dim3 idx;
};
ucontext_t sched;
std::vector<fiber> fibers;
std::vector<char> stacks;
const size_t STACK = 256 << 10;
unsigned cur_t, n_threads;
std::vector<double> xchg;
std::vector<unsigned char> smem;
ot_emu_body *cur_body;

void yield(int state) {
  fibers[cur_t].state = state;
  swapcontext(&fibers[cur_t].ctx, &sched);
}

void entry(void) {
  cur_body->run();
  fibers[cur_t].state = DONE;
  swapcontext(&fibers[cur_t].ctx, &sched);
}

[[noreturn]] void deadlock(const char *why) {
  fprintf(stderr, "cuda_emu: %s (block %u,%u,%u)\n", why, blockIdx.x, blockIdx.y, blockIdx.z);
  abort();
}
} // namespace

void *ot_emu_dynamic_smem(void) { return smem.data(); }

void __syncthreads(void) { yield(WAIT_BLOCK); }
void __syncwarp(unsigned) { yield(WAIT_WARP); }

double ot_emu_shfl_xor_d(double v, int o) {
  unsigned me = cur_t;
  xchg[me] = v;
  yield(WAIT_WARP);
  unsigned other = me ^ (unsigned)o;
  if (other >= n_threads || fibers[other].state == DONE) deadlock("shuffle with a lane that has exited");
  double r = xchg[other];
  yield(WAIT_WARP);
  return r;
}
float ot_emu_shfl_xor(float v, int o) { return (float)ot_emu_shfl_xor_d(v, o); }

float atomicAdd(float *p, float v) {
  float old = *p;
  *p = old + v;
  return old;
}
double atomicAdd(double *p, double v) {
  double old = *p;
  *p = old + v;
  return old;
}

void ot_emu_run(dim3 grid, dim3 block, size_t sm, ot_emu_body *body) {
  unsigned nt = block.x * block.y * block.z;
  if (nt == 0 || nt > 1024) deadlock("block size outside 1..1024");
  gridDim = grid;
  blockDim = block;
  n_threads = nt;
  cur_body = body;
  fibers.assign(nt, fiber{});
  if (stacks.size() < nt * STACK) stacks.resize(nt * STACK);
  xchg.assign(nt, 0.0);
  for (unsigned bz = 0; bz < grid.z; bz++)
    for (unsigned by = 0; by < grid.y; by++)
      for (unsigned bx = 0; bx < grid.x; bx++) {
        blockIdx = dim3(bx, by, bz);
        smem.assign(sm ? sm : 1, 0x7f);
        for (unsigned t = 0; t < nt; t++) {
          fiber &f = fibers[t];
          f.state = RUN;
          f.idx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
          getcontext(&f.ctx);
          f.ctx.uc_stack.ss_sp = &stacks[t * STACK];
          f.ctx.uc_stack.ss_size = STACK;
          f.ctx.uc_link = nullptr;
          makecontext(&f.ctx, entry, 0);
        }
        unsigned done = 0;
        while (done < nt) {
          int ran = 0;
          for (unsigned t = 0; t < nt; t++) {
            if (fibers[t].state != RUN) continue;
            cur_t = t;
            threadIdx = fibers[t].idx;
            swapcontext(&sched, &fibers[t].ctx);
            ran = 1;
            if (fibers[t].state == DONE) done++;
          }
          if (done == nt) break;
          /* open the barriers every live thread of the scope has reached */
          int opened = 0;
          for (unsigned w0 = 0; w0 < nt; w0 += 32) {
            unsigned w1 = std::min(nt, w0 + 32), waiting = 0, live = 0;
            for (unsigned t = w0; t < w1; t++) {
              if (fibers[t].state == DONE) continue;
              live++;
              waiting += fibers[t].state == WAIT_WARP;
            }
            if (live && waiting == live) {
              for (unsigned t = w0; t < w1; t++)
                if (fibers[t].state == WAIT_WARP) fibers[t].state = RUN;
              opened = 1;
            }
          }
          unsigned live = 0, at_block = 0;
          for (unsigned t = 0; t < nt; t++) {
            if (fibers[t].state == DONE) continue;
            live++;
            at_block += fibers[t].state == WAIT_BLOCK;
          }
          if (live && at_block == live) {
            for (unsigned t = 0; t < nt; t++)
              if (fibers[t].state == WAIT_BLOCK) fibers[t].state = RUN;
            opened = 1;
          }
          if (!opened && !ran) deadlock("threads wait at different barriers (divergent __syncthreads?)");
          if (!opened) {
            int any = 0;
            for (unsigned t = 0; t < nt && !any; t++) any = fibers[t].state == RUN;
            if (!any) deadlock("threads wait at different barriers (divergent __syncthreads?)");
          }
        }
      }
}

/* ---- runtime ---- */
static cudaError_t last = cudaSuccess;
const char *cudaGetErrorString(cudaError_t e) {
  return e == cudaSuccess ? "no error" : "emulated CUDA error";
}
cudaError_t cudaGetLastError(void) {
  cudaError_t e = last;
  last = cudaSuccess;
  return e;
}
cudaError_t cudaGetDeviceCount(int *n) {
  *n = 1;
  return cudaSuccess;
}
cudaError_t cudaGetDeviceProperties(cudaDeviceProp *p, int) {
  memset(p, 0, sizeof *p);
  strcpy(p->name, "CPU emulation of a CUDA device");
  p->major = 9;
  p->multiProcessorCount = 1; /* few blocks: each emulated block costs thread creations */
  return cudaSuccess;
}
cudaError_t cudaSetDevice(int) { return cudaSuccess; }
cudaError_t cudaStreamCreateWithFlags(cudaStream_t *s, unsigned) {
  *s = (cudaStream_t)1;
  return cudaSuccess;
}
cudaError_t cudaStreamDestroy(cudaStream_t) { return cudaSuccess; }
cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
cudaError_t cudaMalloc(void **p, size_t bytes) {
  /* garbage, as on a GPU: code that reads memory it never wrote should not pass by luck */
  unsigned char *m = (unsigned char *)malloc(bytes);
  if (!m) return cudaErrorMemoryAllocation;
  memset(m, 0x7f, bytes);
  *p = m;
  return cudaSuccess;
}
cudaError_t cudaFree(void *p) {
  free(p);
  return cudaSuccess;
}
cudaError_t cudaMemcpyAsync(void *dst, const void *src, size_t bytes, cudaMemcpyKind, cudaStream_t) {
  memmove(dst, src, bytes);
  return cudaSuccess;
}
cudaError_t cudaMemsetAsync(void *p, int v, size_t bytes, cudaStream_t) {
  memset(p, v, bytes);
  return cudaSuccess;
}

/* ---- cuBLAS ---- */
const char *cublasGetStatusString(cublasStatus_t s) { return s ? "emulated cuBLAS error" : "success"; }
cublasStatus_t cublasCreate(cublasHandle_t *h) {
  *h = (cublasHandle_t)1;
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasDestroy(cublasHandle_t) { return CUBLAS_STATUS_SUCCESS; }
cublasStatus_t cublasSetStream(cublasHandle_t, cudaStream_t) { return CUBLAS_STATUS_SUCCESS; }

static float to_bf16(float x) { /* round to nearest even, as the tensor cores' input conversion */
  uint32_t u;
  memcpy(&u, &x, 4);
  u = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
  memcpy(&x, &u, 4);
  return x;
}

/* column-major C = alpha op(A) op(B) + beta C; op(A) is m x k */
static void gemm_cm(int ta, int tb, int m, int n, int k, float alpha, const float *A, int lda, const float *B,
                    int ldb, float beta, float *C, int ldc, int bf16) {
  std::vector<float> a16, b16;
  if (bf16) {
    size_t na = (size_t)lda * (ta ? m : k), nb = (size_t)ldb * (tb ? k : n);
    a16.assign(A, A + na);
    b16.assign(B, B + nb);
    for (auto &x : a16) x = to_bf16(x);
    for (auto &x : b16) x = to_bf16(x);
    A = a16.data();
    B = b16.data();
  }
  cblas_sgemm(CblasColMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, m, n, k, alpha,
              A, lda, B, ldb, beta, C, ldc);
}

cublasStatus_t cublasGemmEx(cublasHandle_t, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                            const void *alpha, const void *A, cudaDataType_t at, int lda, const void *B,
                            cudaDataType_t bt, int ldb, const void *beta, void *C, cudaDataType_t ct, int ldc,
                            cublasComputeType_t comp, int) {
  if (at != CUDA_R_32F || bt != CUDA_R_32F || ct != CUDA_R_32F) return CUBLAS_STATUS_INVALID_VALUE;
  gemm_cm(ta, tb, m, n, k, *(const float *)alpha, (const float *)A, lda, (const float *)B, ldb,
          *(const float *)beta, (float *)C, ldc, comp == CUBLAS_COMPUTE_32F_FAST_16BF);
  return CUBLAS_STATUS_SUCCESS;
}

struct ot_emu_desc {
  cublasComputeType_t comp;
  int ta, tb;
  cublasLtEpilogue_t epi;
  const float *bias;
};
struct ot_emu_layout {
  uint64_t rows, cols;
  int64_t ld;
};

cublasStatus_t cublasLtCreate(cublasLtHandle_t *h) {
  *h = (cublasLtHandle_t)1;
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtDestroy(cublasLtHandle_t) { return CUBLAS_STATUS_SUCCESS; }
cublasStatus_t cublasLtMatmulDescCreate(cublasLtMatmulDesc_t *d, cublasComputeType_t c, cudaDataType_t) {
  *d = new ot_emu_desc{c, 0, 0, CUBLASLT_EPILOGUE_DEFAULT, nullptr};
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatmulDescDestroy(cublasLtMatmulDesc_t d) {
  delete d;
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatmulDescSetAttribute(cublasLtMatmulDesc_t d, cublasLtMatmulDescAttributes_t a,
                                              const void *v, size_t) {
  switch (a) {
  case CUBLASLT_MATMUL_DESC_TRANSA: d->ta = *(const cublasOperation_t *)v == CUBLAS_OP_T; break;
  case CUBLASLT_MATMUL_DESC_TRANSB: d->tb = *(const cublasOperation_t *)v == CUBLAS_OP_T; break;
  case CUBLASLT_MATMUL_DESC_EPILOGUE: d->epi = *(const cublasLtEpilogue_t *)v; break;
  case CUBLASLT_MATMUL_DESC_BIAS_POINTER: d->bias = *(const float *const *)v; break;
  }
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatrixLayoutCreate(cublasLtMatrixLayout_t *l, cudaDataType_t, uint64_t rows,
                                          uint64_t cols, int64_t ld) {
  *l = new ot_emu_layout{rows, cols, ld};
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatrixLayoutDestroy(cublasLtMatrixLayout_t l) {
  delete l;
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatmulPreferenceCreate(cublasLtMatmulPreference_t *p) {
  *p = (cublasLtMatmulPreference_t)1;
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatmulPreferenceDestroy(cublasLtMatmulPreference_t) { return CUBLAS_STATUS_SUCCESS; }
cublasStatus_t cublasLtMatmulPreferenceSetAttribute(cublasLtMatmulPreference_t,
                                                    cublasLtMatmulPreferenceAttributes_t, const void *,
                                                    size_t) {
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatmulAlgoGetHeuristic(cublasLtHandle_t, cublasLtMatmulDesc_t, cublasLtMatrixLayout_t,
                                              cublasLtMatrixLayout_t, cublasLtMatrixLayout_t,
                                              cublasLtMatrixLayout_t, cublasLtMatmulPreference_t, int,
                                              cublasLtMatmulHeuristicResult_t *res, int *n) {
  res->algo.id = 0;
  *n = 1;
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatmul(cublasLtHandle_t, cublasLtMatmulDesc_t d, const void *alpha, const void *A,
                              cublasLtMatrixLayout_t la, const void *B, cublasLtMatrixLayout_t lb,
                              const void *beta, const void *C, cublasLtMatrixLayout_t lc, void *D,
                              cublasLtMatrixLayout_t ld, const cublasLtMatmulAlgo_t *, void *, size_t,
                              cudaStream_t) {
  if (C != D) return CUBLAS_STATUS_INVALID_VALUE; /* only what the backend uses */
  int m = (int)ld->rows, n = (int)ld->cols, k = d->ta ? (int)la->rows : (int)la->cols;
  if ((d->tb ? (int)lb->cols : (int)lb->rows) != k || lc->rows != ld->rows)
    return CUBLAS_STATUS_INVALID_VALUE;
  float be = *(const float *)beta;
  float *out = (float *)D;
  gemm_cm(d->ta, d->tb, m, n, k, *(const float *)alpha, (const float *)A, (int)la->ld, (const float *)B,
          (int)lb->ld, be, out, (int)ld->ld, d->comp == CUBLAS_COMPUTE_32F_FAST_16BF);
  if (d->epi == CUBLASLT_EPILOGUE_BIAS)
    for (int j = 0; j < n; j++)
      for (int i = 0; i < m; i++) out[(size_t)j * ld->ld + i] += d->bias[i];
  return CUBLAS_STATUS_SUCCESS;
}

/* LoRA on the GPU: the training branch (the CPU backend's GEMM sequence on cuBLAS,
 * dropout masks regenerated from the same counter hash) and SGMV for serving many
 * adapters in one batch (Punica): a shrink kernel t = x A_s^T and an expand kernel
 * out += scale_s t B_s^T, each row finding its segment by binary search. */
#include <stdlib.h>
#include <string.h>

#include "ot_cuda_internal.h"

static __global__ void dropout_kernel(float *xd, const float *src, size_t n, float p, uint64_t seed,
                                      int accumulate) {
  float s = 1.0f / (1.0f - p);
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    float v = ot_dropout_keep(seed, i, p) ? src[i] * s : 0.0f;
    xd[i] = accumulate ? xd[i] + v : v;
  }
}

static void dropout(ot_cuda_ctx *c, float *xd, const float *src, size_t n, float p, uint64_t seed,
                    int accumulate) {
  dropout_kernel<<<ot_cuda_grid(c, n, 256), 256, 0, c->stream>>>(xd, src, n, p, seed, accumulate);
  OT_CUDA_LAUNCHED(c, "LoRA dropout");
}

void ot_cuda_lora_fwd(ot_backend *be, float *out, float *t, float *xd, const float *x, const float *A,
                      const float *B, int N, int IN, int OUT, int r, float scale, float p, uint64_t seed) {
  ot_cuda_ctx *c = ot_cuda(be);
  const float *src = x;
  if (p > 0.0f) {
    dropout(c, xd, x, (size_t)N * IN, p, seed, 0);
    src = xd;
  }
  ot_cuda_gemm(c, 0, 1, N, r, IN, 1.0f, src, IN, A, IN, 0.0f, t, r);
  ot_cuda_gemm(c, 0, 1, N, OUT, r, scale, t, r, B, r, 1.0f, out, OUT);
}

void ot_cuda_lora_bwd(ot_backend *be, float *dx, float *dA, float *dB, float *dt, float *xd,
                      const float *dout, const float *x, const float *t, const float *A, const float *B,
                      int N, int IN, int OUT, int r, float scale, float p, uint64_t seed) {
  ot_cuda_ctx *c = ot_cuda(be);
  if (dB) ot_cuda_gemm(c, 1, 0, OUT, r, N, scale, dout, OUT, t, r, 1.0f, dB, r);
  if (!dA && !dx) return;
  ot_cuda_gemm(c, 0, 0, N, r, OUT, scale, dout, OUT, B, r, 0.0f, dt, r);
  if (dA) {
    const float *src = x;
    if (p > 0.0f) {
      dropout(c, xd, x, (size_t)N * IN, p, seed, 0);
      src = xd;
    }
    ot_cuda_gemm(c, 1, 0, r, IN, N, 1.0f, dt, r, src, IN, 1.0f, dA, IN);
  }
  if (dx) {
    if (p > 0.0f) {
      ot_cuda_gemm(c, 0, 0, N, IN, r, 1.0f, dt, r, A, IN, 0.0f, xd, IN);
      dropout(c, dx, xd, (size_t)N * IN, p, seed, 1);
    } else {
      ot_cuda_gemm(c, 0, 0, N, IN, r, 1.0f, dt, r, A, IN, 1.0f, dx, IN);
    }
  }
}

/* ---- SGMV --------------------------------------------------------------------------- */

/* Device copy of the host segment table, packed as seg[n_seg+1] | A[n_seg] | B[n_seg] | scale[n_seg]. */
typedef struct {
  const int32_t *seg;
  const float *const *A;
  const float *const *B;
  const float *scale;
  int n_seg;
} sgmv_meta;

/* the segment s with seg[s] <= row < seg[s+1] (empty segments are skipped over) */
static __device__ int segment_of(const int32_t *seg, int n_seg, int row) {
  int lo = 0, hi = n_seg - 1;
  while (lo < hi) {
    int mid = (lo + hi + 1) >> 1;
    if (seg[mid] <= row)
      lo = mid;
    else
      hi = mid - 1;
  }
  return lo;
}

/* One block per row; warps take ranks j: t[i,j] = x_i . A_s[j,:]. */
static __global__ void sgmv_shrink_kernel(float *t, const float *x, sgmv_meta m, int IN, int r) {
  int i = blockIdx.x, s = segment_of(m.seg, m.n_seg, i);
  const float *A = m.A[s];
  if (!A) return;
  const float *xi = x + (size_t)i * IN;
  int lane = threadIdx.x & 31, nw = blockDim.x >> 5;
  for (int j = threadIdx.x >> 5; j < r; j += nw) {
    const float *a = A + (size_t)j * IN;
    float acc = 0.0f;
    for (int k = lane; k < IN; k += 32) acc += xi[k] * a[k];
    acc = ot_warp_sum(acc);
    if (lane == 0) t[(size_t)i * r + j] = acc;
  }
}

/* Grid (rows, column tiles); t_i staged in shared memory: out[i,o] += scale_s t_i . B_s[o,:]. */
static __global__ void sgmv_expand_kernel(float *out, const float *t, sgmv_meta m, int OUT, int r) {
  OT_EXTERN_SHARED(float, ti);
  int i = blockIdx.x, s = segment_of(m.seg, m.n_seg, i);
  const float *B = m.B[s];
  if (!B) return;
  for (int j = threadIdx.x; j < r; j += blockDim.x) ti[j] = t[(size_t)i * r + j];
  __syncthreads();
  int o = blockIdx.y * blockDim.x + threadIdx.x;
  if (o >= OUT) return;
  const float *b = B + (size_t)o * r;
  float acc = 0.0f;
  for (int j = 0; j < r; j++) acc += ti[j] * b[j];
  out[(size_t)i * OUT + o] += m.scale[s] * acc;
}

void ot_cuda_lora_sgmv(ot_backend *be, float *out, float *t, const float *x, int n_seg, const int32_t *seg,
                       const float *const *A, const float *const *B, const float *scale, int IN, int OUT,
                       int r) {
  ot_cuda_ctx *c = ot_cuda(be);
  if (n_seg <= 0 || r <= 0) return;
  int N = seg[n_seg];
  if (N <= 0) return;
  size_t seg_b = ((sizeof(int32_t) * (n_seg + 1) + 15) / 16) * 16, ptr_b = sizeof(void *) * n_seg;
  size_t need = seg_b + 2 * ptr_b + sizeof(float) * n_seg;
  if (need > c->meta_bytes) {
    size_t cap = need * 2;
    void *h = realloc(c->meta_host, cap);
    if (!h) {
      ot_cuda_note(c, cudaErrorMemoryAllocation, "lora_sgmv");
      return;
    }
    c->meta_host = h;
    cudaFree(c->meta_dev); /* waits for kernels still reading the old table */
    c->meta_dev = NULL;
    c->meta_bytes = 0;
    cudaError_t e = cudaMalloc(&c->meta_dev, cap);
    if (e != cudaSuccess) {
      ot_cuda_note(c, e, "lora_sgmv");
      return;
    }
    c->meta_bytes = cap;
  }
  char *h = (char *)c->meta_host, *d = (char *)c->meta_dev;
  memcpy(h, seg, sizeof(int32_t) * (n_seg + 1));
  memcpy(h + seg_b, A, ptr_b);
  memcpy(h + seg_b + ptr_b, B, ptr_b);
  memcpy(h + seg_b + 2 * ptr_b, scale, sizeof(float) * n_seg);
  /* a pageable copy is staged before returning; stream order protects the device table */
  ot_cuda_note(c, cudaMemcpyAsync(d, h, need, cudaMemcpyHostToDevice, c->stream), "lora_sgmv");
  sgmv_meta m = {(const int32_t *)d, (const float *const *)(d + seg_b),
                 (const float *const *)(d + seg_b + ptr_b), (const float *)(d + seg_b + 2 * ptr_b), n_seg};
  sgmv_shrink_kernel<<<N, 128, 0, c->stream>>>(t, x, m, IN, r);
  dim3 grid(N, (OUT + 127) / 128);
  sgmv_expand_kernel<<<grid, 128, sizeof(float) * r, c->stream>>>(out, t, m, OUT, r);
  OT_CUDA_LAUNCHED(c, "lora_sgmv");
}

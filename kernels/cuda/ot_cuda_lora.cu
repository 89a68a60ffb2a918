/* LoRA on the GPU: the training branch (the CPU backend's GEMM sequence on cuBLAS,
 * dropout masks regenerated from the same counter hash) and SGMV for serving many
 * adapters in one batch (Punica): a shrink kernel t = scale_s x A_s^T and an expand kernel
 * out += t Bt_s over the rows of every segment, each row finding its segment by binary search. */
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

/* Device copy of the host segment tables. The rows of all segments, laid end to end, are the
 * "work rows" w = 0 .. cum[S]-1; work row w of segment s is x row row0[s] + w - cum[s], and its
 * shrink result lives at t + toff[s] + (w - cum[s]) * r[s]. */
typedef struct {
  const int *cum; /* [S+1] */
  const int *row0, *r;
  const long long *toff;
  const float *scale;
  const float *const *A;
  const float *const *Bt;
  int S;
} sgmv_meta;

/* the segment s with cum[s] <= w < cum[s+1] (empty segments are skipped over) */
static __device__ int segment_of(const int *cum, int S, int w) {
  int lo = 0, hi = S - 1;
  while (lo < hi) {
    int mid = (lo + hi + 1) >> 1;
    if (cum[mid] <= w)
      lo = mid;
    else
      hi = mid - 1;
  }
  return lo;
}

/* Shrink, one block per work row, warps over ranks: t[j] = scale_s x_i . A_s[j,:]. */
static __global__ void sgmv_shrink_kernel(float *t, const float *x, sgmv_meta m, int IN) {
  int w = blockIdx.x, s = segment_of(m.cum, m.S, w), r = m.r[s], k = w - m.cum[s];
  const float *A = m.A[s];
  const float *xi = x + (size_t)(m.row0[s] + k) * IN;
  float *ti = t + m.toff[s] + (size_t)k * r;
  int lane = threadIdx.x & 31, nw = blockDim.x >> 5;
  for (int j = threadIdx.x >> 5; j < r; j += nw) {
    const float *a = A + (size_t)j * IN;
    float acc = 0.0f;
    for (int c = lane; c < IN; c += 32) acc += xi[c] * a[c];
    acc = ot_warp_sum(acc);
    if (lane == 0) ti[j] = m.scale[s] * acc;
  }
}

/* Expand, grid (work rows, column tiles), t_i staged in shared memory:
 * out[i,o] += sum_j t_i[j] Bt_s[j,o] (reads of Bt_s coalesced along o). */
static __global__ void sgmv_expand_kernel(float *out, const float *t, sgmv_meta m, int OUT) {
  OT_EXTERN_SHARED(float, ts);
  int w = blockIdx.x, s = segment_of(m.cum, m.S, w), r = m.r[s], k = w - m.cum[s];
  const float *ti = t + m.toff[s] + (size_t)k * r;
  for (int j = threadIdx.x; j < r; j += blockDim.x) ts[j] = ti[j];
  __syncthreads();
  int o = blockIdx.y * blockDim.x + threadIdx.x;
  if (o >= OUT) return;
  const float *bt = m.Bt[s] + o;
  float acc = 0.0f;
  for (int j = 0; j < r; j++) acc += ts[j] * bt[(size_t)j * OUT];
  out[(size_t)(m.row0[s] + k) * OUT + o] += acc;
}

/* Grows a device buffer (and its host twin) to `need` bytes; stream-ordered users of the old one
 * are waited for by cudaFree. */
static int grow(ot_cuda_ctx *c, void **dev, void **host, size_t *cap, size_t need, const char *what) {
  if (need <= *cap) return 0;
  size_t n = need * 2;
  if (host) {
    void *h = realloc(*host, n);
    if (!h) {
      ot_cuda_note(c, cudaErrorMemoryAllocation, what);
      return -1;
    }
    *host = h;
  }
  cudaFree(*dev);
  *dev = NULL;
  *cap = 0;
  cudaError_t e = cudaMalloc(dev, n);
  if (e != cudaSuccess) {
    ot_cuda_note(c, e, what);
    return -1;
  }
  *cap = n;
  return 0;
}

void ot_cuda_lora_sgmv_fwd(ot_backend *be, float *out, const float *x, const float *const *A,
                           const float *const *Bt, const int *row0, const int *n, const int *r,
                           const float *scale, int S, int IN, int OUT) {
  ot_cuda_ctx *c = ot_cuda(be);
  if (S <= 0) return;
  /* host tables: segments with rows and a rank only (the others add nothing) */
  size_t ib = sizeof(int) * (S + 1), pb = sizeof(void *) * S;
  size_t o_row0 = ((ib + 15) / 16) * 16, o_r = o_row0 + o_row0, o_toff = o_r + o_row0;
  size_t o_scale = o_toff + sizeof(long long) * S, o_A = ((o_scale + sizeof(float) * S + 15) / 16) * 16;
  size_t o_Bt = o_A + pb, need = o_Bt + pb;
  if (grow(c, &c->meta_dev, &c->meta_host, &c->meta_bytes, need, "lora_sgmv_fwd")) return;
  char *h = (char *)c->meta_host;
  int *cum = (int *)h, *hrow0 = (int *)(h + o_row0), *hr = (int *)(h + o_r);
  long long *toff = (long long *)(h + o_toff);
  float *hscale = (float *)(h + o_scale);
  const float **hA = (const float **)(h + o_A), **hBt = (const float **)(h + o_Bt);
  int k = 0, rmax = 0;
  long long tn = 0;
  cum[0] = 0;
  for (int s = 0; s < S; s++) {
    if (n[s] <= 0 || r[s] <= 0 || !A[s] || !Bt[s]) continue;
    hrow0[k] = row0[s];
    hr[k] = r[s];
    toff[k] = tn;
    hscale[k] = scale[s];
    hA[k] = A[s];
    hBt[k] = Bt[s];
    cum[k + 1] = cum[k] + n[s];
    tn += (long long)n[s] * r[s];
    if (r[s] > rmax) rmax = r[s];
    k++;
  }
  if (k == 0) return;
  if (grow(c, (void **)&c->sgmv_t, NULL, &c->sgmv_t_bytes, sizeof(float) * (size_t)tn, "lora_sgmv_fwd"))
    return;
  char *d = (char *)c->meta_dev;
  /* a pageable copy is staged before returning; stream order protects the device table */
  ot_cuda_note(c, cudaMemcpyAsync(d, h, need, cudaMemcpyHostToDevice, c->stream), "lora_sgmv_fwd");
  sgmv_meta m = {(const int *)d,
                 (const int *)(d + o_row0),
                 (const int *)(d + o_r),
                 (const long long *)(d + o_toff),
                 (const float *)(d + o_scale),
                 (const float *const *)(d + o_A),
                 (const float *const *)(d + o_Bt),
                 k};
  int W = cum[k];
  sgmv_shrink_kernel<<<W, 128, 0, c->stream>>>(c->sgmv_t, x, m, IN);
  dim3 grid(W, (OUT + 127) / 128);
  sgmv_expand_kernel<<<grid, 128, sizeof(float) * rmax, c->stream>>>(out, c->sgmv_t, m, OUT);
  OT_CUDA_LAUNCHED(c, "lora_sgmv_fwd");
}

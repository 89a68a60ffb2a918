/* Ops of the LLaMA family on the GPU: RMSNorm, rotary embeddings, SwiGLU and grouped-query
 * attention (materialised softmax, one warp per row of scores; the fused flash path covers
 * GPT-2's packed layout only so far). Tested op by op against the CPU backend, on a GPU and
 * under the CPU emulation (tests/cuda_emu). */
#include <math.h>
#include <stdint.h>

#include "ot_cuda_internal.h"

/* ---- RMSNorm: one warp per row ------------------------------------------------------- */

static __global__ void rmsnorm_fwd_kernel(float *out, float *rstd, const float *inp, const float *w, int N, int C,
                                          float eps) {
  int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5), lane = threadIdx.x & 31;
  if (row >= N) return;
  const float *x = inp + (size_t)row * C;
  float ss = 0.0f;
  for (int i = lane; i < C; i += 32) ss += x[i] * x[i];
  float s = 1.0f / sqrtf(ot_warp_sum(ss) / (float)C + eps);
  float *o = out + (size_t)row * C;
  for (int i = lane; i < C; i += 32) o[i] = x[i] * s * w[i];
  if (lane == 0 && rstd) rstd[row] = s;
}

static __global__ void rmsnorm_bwd_dx_kernel(float *dinp, const float *dout, const float *inp, const float *w,
                                             const float *rstd, int N, int C) {
  int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5), lane = threadIdx.x & 31;
  if (row >= N) return;
  const float *x = inp + (size_t)row * C, *d = dout + (size_t)row * C;
  float *dx = dinp + (size_t)row * C;
  float s = rstd[row], dot = 0.0f;
  for (int i = lane; i < C; i += 32) dot += w[i] * d[i] * x[i];
  float k = s * s * s * ot_warp_sum(dot) / (float)C;
  for (int i = lane; i < C; i += 32) dx[i] += s * w[i] * d[i] - k * x[i];
}

/* dw[c] += sum_i dout[i,c] x[i,c] rstd[i]: one thread per column */
static __global__ void rmsnorm_bwd_dw_kernel(float *dw, const float *dout, const float *inp, const float *rstd,
                                             int N, int C) {
  int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= C) return;
  float acc = 0.0f;
  for (int i = 0; i < N; i++) acc += dout[(size_t)i * C + c] * inp[(size_t)i * C + c] * rstd[i];
  dw[c] += acc;
}

void ot_cuda_rmsnorm_fwd(ot_backend *be, float *out, float *rstd, const float *inp, const float *w, int N, int C,
                         float eps) {
  ot_cuda_ctx *c = ot_cuda(be);
  if (N <= 0) return;
  rmsnorm_fwd_kernel<<<(N + 7) / 8, 256, 0, c->stream>>>(out, rstd, inp, w, N, C, eps);
  OT_CUDA_LAUNCHED(c, "rmsnorm_fwd");
}

void ot_cuda_rmsnorm_bwd(ot_backend *be, float *dinp, float *dw, const float *dout, const float *inp,
                         const float *w, const float *rstd, int N, int C) {
  ot_cuda_ctx *c = ot_cuda(be);
  if (N <= 0) return;
  if (dinp) rmsnorm_bwd_dx_kernel<<<(N + 7) / 8, 256, 0, c->stream>>>(dinp, dout, inp, w, rstd, N, C);
  if (dw) rmsnorm_bwd_dw_kernel<<<(C + 255) / 256, 256, 0, c->stream>>>(dw, dout, inp, rstd, N, C);
  OT_CUDA_LAUNCHED(c, "rmsnorm_bwd");
}

/* ---- rotary embedding: one thread per (row, pair), all heads ------------------------ */

static __global__ void rope_kernel(float *x, const int32_t *pos, const float *inv_freq, int N, int H, int D,
                                   int inverse) {
  int half = D / 2;
  size_t n = (size_t)N * half;
  for (size_t e = blockIdx.x * (size_t)blockDim.x + threadIdx.x; e < n; e += (size_t)gridDim.x * blockDim.x) {
    size_t i = e / half;
    int j = (int)(e % half);
    double a = (double)pos[i] * (double)inv_freq[j]; /* as the CPU: the angle in double */
    float cs = (float)cos(a), sn = (float)(inverse ? -sin(a) : sin(a));
    for (int h = 0; h < H; h++) {
      float *r = x + (i * H + h) * D;
      float x1 = r[j], x2 = r[j + half];
      r[j] = x1 * cs - x2 * sn;
      r[j + half] = x2 * cs + x1 * sn;
    }
  }
}

void ot_cuda_rope(ot_backend *be, float *x, const int32_t *pos, const float *inv_freq, int N, int H, int D,
                  int inverse) {
  ot_cuda_ctx *c = ot_cuda(be);
  if (N <= 0) return;
  rope_kernel<<<ot_cuda_grid(c, (size_t)N * (D / 2), 256), 256, 0, c->stream>>>(x, pos, inv_freq, N, H, D,
                                                                                  inverse);
  OT_CUDA_LAUNCHED(c, "rope");
}

/* ---- SwiGLU ------------------------------------------------------------------------- */

static __global__ void swiglu_fwd_kernel(float *out, const float *gate, const float *up, size_t n) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    float g = gate[i];
    out[i] = g / (1.0f + expf(-g)) * up[i];
  }
}

static __global__ void swiglu_bwd_kernel(float *dgate, float *dup, const float *dout, const float *gate,
                                         const float *up, size_t n) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    float g = gate[i], sg = 1.0f / (1.0f + expf(-g)), d = dout[i], u = up[i];
    dgate[i] = d * u * sg * (1.0f + g * (1.0f - sg));
    dup[i] = d * g * sg;
  }
}

void ot_cuda_swiglu_fwd(ot_backend *be, float *out, const float *gate, const float *up, size_t n) {
  ot_cuda_ctx *c = ot_cuda(be);
  if (!n) return;
  swiglu_fwd_kernel<<<ot_cuda_grid(c, n, 256), 256, 0, c->stream>>>(out, gate, up, n);
  OT_CUDA_LAUNCHED(c, "swiglu_fwd");
}

void ot_cuda_swiglu_bwd(ot_backend *be, float *dgate, float *dup, const float *dout, const float *gate,
                        const float *up, size_t n) {
  ot_cuda_ctx *c = ot_cuda(be);
  if (!n) return;
  swiglu_bwd_kernel<<<ot_cuda_grid(c, n, 256), 256, 0, c->stream>>>(dgate, dup, dout, gate, up, n);
  OT_CUDA_LAUNCHED(c, "swiglu_bwd");
}

/* ---- grouped-query attention, materialised: one warp per (b, h, t) row --------------- */

static __global__ void gqa_fwd_kernel(float *out, float *att, const float *q, const float *k, const float *v,
                                      int B, int T, int NH, int NKV, int D, float scale) {
  int lane = threadIdx.x & 31;
  size_t row = (size_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (row >= (size_t)B * NH * T) return;
  int t = (int)(row % T), bh = (int)(row / T), b = bh / NH, h = bh % NH, kh = h / (NH / NKV);
  size_t QW = (size_t)NH * D, KW = (size_t)NKV * D;
  const float *qr = q + ((size_t)b * T + t) * QW + (size_t)h * D;
  float *a = att + row * T;
  float mx = -INFINITY;
  for (int t2 = lane; t2 <= t; t2 += 32) {
    const float *kr = k + ((size_t)b * T + t2) * KW + (size_t)kh * D;
    float s = 0.0f;
    for (int d = 0; d < D; d++) s += qr[d] * kr[d];
    s *= scale;
    a[t2] = s;
    mx = fmaxf(mx, s);
  }
  ot_warp_softmax_causal(a, t, T, mx);
  float *o = out + ((size_t)b * T + t) * QW + (size_t)h * D;
  for (int d = lane; d < D; d += 32) {
    float acc = 0.0f;
    for (int t2 = 0; t2 <= t; t2++) acc += a[t2] * v[((size_t)b * T + t2) * KW + (size_t)kh * D + d];
    o[d] = acc;
  }
}

/* datt = att * (dO . v - sum att dO.v) * scale, and dq from it */
static __global__ void gqa_bwd_dq_kernel(float *dq, float *datt, const float *dout, const float *k,
                                         const float *v, const float *att, int B, int T, int NH, int NKV, int D,
                                         float scale) {
  int lane = threadIdx.x & 31;
  size_t row = (size_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (row >= (size_t)B * NH * T) return;
  int t = (int)(row % T), bh = (int)(row / T), b = bh / NH, h = bh % NH, kh = h / (NH / NKV);
  size_t QW = (size_t)NH * D, KW = (size_t)NKV * D;
  const float *a = att + row * T, *d = dout + ((size_t)b * T + t) * QW + (size_t)h * D;
  float *da = datt + row * T;
  float s = 0.0f;
  for (int t2 = lane; t2 <= t; t2 += 32) {
    const float *vr = v + ((size_t)b * T + t2) * KW + (size_t)kh * D;
    float x = 0.0f;
    for (int j = 0; j < D; j++) x += d[j] * vr[j];
    da[t2] = x;
    s += a[t2] * x;
  }
  s = ot_warp_sum(s);
  for (int t2 = lane; t2 <= t; t2 += 32) da[t2] = a[t2] * (da[t2] - s) * scale;
  __syncwarp();
  float *dqr = dq + ((size_t)b * T + t) * QW + (size_t)h * D;
  for (int j = lane; j < D; j += 32) {
    float acc = 0.0f;
    for (int t2 = 0; t2 <= t; t2++) acc += da[t2] * k[((size_t)b * T + t2) * KW + (size_t)kh * D + j];
    dqr[j] = acc;
  }
}

/* dk_t = sum over the group's heads and t1 >= t of dpre[t1, t] q_t1; dv_t likewise with att and dO */
static __global__ void gqa_bwd_dkv_kernel(float *dk, float *dv, const float *datt, const float *dout,
                                          const float *q, const float *att, int B, int T, int NH, int NKV,
                                          int D) {
  int lane = threadIdx.x & 31;
  size_t row = (size_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (row >= (size_t)B * NKV * T) return;
  int t = (int)(row % T), bk = (int)(row / T), b = bk / NKV, kh = bk % NKV, group = NH / NKV;
  size_t QW = (size_t)NH * D, KW = (size_t)NKV * D;
  for (int j = lane; j < D; j += 32) {
    float ak = 0.0f, av = 0.0f;
    for (int h = kh * group; h < (kh + 1) * group; h++) {
      const float *dp = datt + ((size_t)b * NH + h) * T * T, *a = att + ((size_t)b * NH + h) * T * T;
      for (int t1 = t; t1 < T; t1++) {
        size_t r = ((size_t)b * T + t1) * QW + (size_t)h * D + j;
        ak += dp[(size_t)t1 * T + t] * q[r];
        av += a[(size_t)t1 * T + t] * dout[r];
      }
    }
    dk[((size_t)b * T + t) * KW + (size_t)kh * D + j] = ak;
    dv[((size_t)b * T + t) * KW + (size_t)kh * D + j] = av;
  }
}

void ot_cuda_gqa_fwd(ot_backend *be, float *out, float *att, const float *q, const float *k, const float *v, int B,
                     int T, int NH, int NKV, int D) {
  ot_cuda_ctx *c = ot_cuda(be);
  size_t rows = (size_t)B * NH * T;
  if (!rows) return;
  gqa_fwd_kernel<<<(unsigned)((rows + 7) / 8), 256, 0, c->stream>>>(out, att, q, k, v, B, T, NH, NKV, D,
                                                                     1.0f / sqrtf((float)D));
  OT_CUDA_LAUNCHED(c, "gqa_fwd");
}

void ot_cuda_gqa_bwd(ot_backend *be, float *dq, float *dk, float *dv, float *datt, const float *dout,
                     const float *q, const float *k, const float *v, const float *att, int B, int T, int NH,
                     int NKV, int D) {
  ot_cuda_ctx *c = ot_cuda(be);
  size_t rows = (size_t)B * NH * T, kv_rows = (size_t)B * NKV * T;
  if (!rows) return;
  gqa_bwd_dq_kernel<<<(unsigned)((rows + 7) / 8), 256, 0, c->stream>>>(dq, datt, dout, k, v, att, B, T, NH, NKV,
                                                                        D, 1.0f / sqrtf((float)D));
  gqa_bwd_dkv_kernel<<<(unsigned)((kv_rows + 7) / 8), 256, 0, c->stream>>>(dk, dv, datt, dout, q, att, B, T, NH,
                                                                            NKV, D);
  OT_CUDA_LAUNCHED(c, "gqa_bwd");
}

/* ---- grouped-query attention against a KV cache: one warp per (row, head) ---------- */

static __global__ void gqa_kv_store_kernel(float *kcache, float *vcache, const float *k, const float *v,
                                           const int32_t *pos, const int32_t *slot, const int32_t *table, int N,
                                           int KW, int bs, int mb) {
  size_t n = (size_t)N * KW;
  for (size_t e = blockIdx.x * (size_t)blockDim.x + threadIdx.x; e < n; e += (size_t)gridDim.x * blockDim.x) {
    size_t i = e / KW, ch = e % KW;
    size_t at = ((size_t)table[(size_t)slot[i] * mb + pos[i] / bs] * bs + (size_t)(pos[i] % bs)) * KW + ch;
    kcache[at] = k[e];
    vcache[at] = v[e];
  }
}

#define GKV_DPL 8 /* output dims per lane: heads up to 256 */

static __global__ void gqa_kv_kernel(float *out, const float *kcache, const float *vcache, const float *q,
                                     const int32_t *pos, const int32_t *slot, const int32_t *table, int N, int NH,
                                     int NKV, int D, int bs, int mb, float scale) {
  int lane = threadIdx.x & 31;
  size_t w = (size_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (w >= (size_t)N * NH) return;
  int i = (int)(w / NH), h = (int)(w % NH), kh = h / (NH / NKV), P = pos[i];
  size_t KW = (size_t)NKV * D;
  const float *qr = q + (size_t)i * NH * D + (size_t)h * D;
  const int32_t *tb = table + (size_t)slot[i] * mb; /* the sequence's blocks */
  float m = -INFINITY, l = 0.0f, acc[GKV_DPL];
  for (int j = 0; j < GKV_DPL; j++) acc[j] = 0.0f;
  for (int t = 0; t <= P; t++) {
    size_t at = ((size_t)tb[t / bs] * bs + (size_t)(t % bs)) * KW + (size_t)kh * D;
    const float *kt = kcache + at, *vt = vcache + at;
    float dot = 0.0f;
    for (int d = lane; d < D; d += 32) dot += qr[d] * kt[d];
    float s = ot_warp_sum(dot) * scale;
    float mn = fmaxf(m, s), corr = expf(m - mn), p = expf(s - mn);
    l = l * corr + p;
    for (int j = 0; j < GKV_DPL; j++) {
      int d = lane + 32 * j;
      if (d < D) acc[j] = acc[j] * corr + p * vt[d];
    }
    m = mn;
  }
  float *o = out + (size_t)i * NH * D + (size_t)h * D;
  for (int j = 0; j < GKV_DPL; j++) {
    int d = lane + 32 * j;
    if (d < D) o[d] = acc[j] / l;
  }
}

void ot_cuda_gqa_kv_fwd(ot_backend *be, float *out, float *kcache, float *vcache, const float *q, const float *k,
                        const float *v, const int32_t *pos, const int32_t *slot, const int32_t *table, int N, int NH,
                        int NKV, int D, int bs, int mb) {
  ot_cuda_ctx *c = ot_cuda(be);
  if (N <= 0) return;
  if (D > 32 * GKV_DPL) {
    ot_cuda_note(c, cudaErrorInvalidValue, "gqa_kv_fwd: head_dim above 256");
    return;
  }
  gqa_kv_store_kernel<<<ot_cuda_grid(c, (size_t)N * NKV * D, 256), 256, 0, c->stream>>>(kcache, vcache, k, v, pos,
                                                                                        slot, table, N, NKV * D, bs,
                                                                                        mb);
  size_t warps = (size_t)N * NH;
  gqa_kv_kernel<<<(unsigned)((warps + 7) / 8), 256, 0, c->stream>>>(out, kcache, vcache, q, pos, slot, table, N, NH,
                                                                     NKV, D, bs, mb, 1.0f / sqrtf((float)D));
  OT_CUDA_LAUNCHED(c, "gqa_kv_fwd");
}

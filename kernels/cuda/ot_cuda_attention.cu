/* Causal multi-head attention on the GPU, two ways.
 *
 * Fused (default, head size <= 128): flash-attention style. Thread blocks take BLK
 * queries; K/V tiles of BLK keys go through shared memory; each thread keeps one
 * query's running max, sum and output (online softmax), so no T x T matrix exists.
 * `att` keeps only each row's log-sum-exp [B,NH,T]; backward recomputes the
 * probabilities from it (FlashAttention-2's split: one kernel for dQ per query tile,
 * one for dK/dV per key tile, no atomics), with D_i = sum_j P_ij dP_ij kept in `datt`.
 *
 * Materialised (OT_CUDA_NO_FLASH, or head size > 128): the CPU backend's algorithm,
 * probabilities in att[B,NH,T,T], one warp per query row.
 *
 * Both are plain fp32 CUDA-core code: correct first; tensor cores are future work. */
#include <math.h>

#include "ot_cuda_internal.h"

#define FLASH_MAX_HS 128

static __device__ __forceinline__ const float *qkv_row(const float *qkv, int b, int t, int T, int C, int part,
                                                       int h, int hs) {
  return qkv + ((size_t)b * T + t) * 3 * C + (size_t)part * C + (size_t)h * hs;
}

/* Rows t0 .. t0+BLK-1 (zeros past T) of one head into a shared tile; row t of the head
 * starts at rows + t * stride. The whole block loads, each thread a strided share. */
template <int HS, int BLK>
static __device__ __forceinline__ void load_tile(float (*tile)[HS + 1], const float *rows, size_t stride,
                                                 int t0, int T, int hs) {
  for (int k = threadIdx.x; k < BLK * hs; k += BLK) {
    int i = k / hs, d = k % hs;
    tile[i][d] = t0 + i < T ? rows[(size_t)(t0 + i) * stride + d] : 0.0f;
  }
}

/* ---- fused forward ------------------------------------------------------------------- */

template <int HS, int BLK>
static __global__ void __launch_bounds__(BLK)
    flash_fwd_kernel(float *out, float *lse, const float *qkv, int T, int C, int NH, int hs, float scale) {
  __shared__ float Qs[BLK][HS + 1], Ks[BLK][HS + 1], Vs[BLK][HS + 1];
  int bh = blockIdx.y, b = bh / NH, h = bh % NH;
  int q0 = blockIdx.x * BLK, tq = q0 + threadIdx.x;
  bool active = tq < T;
  const size_t qs = 3 * (size_t)C; /* row stride of q, k and v */
  load_tile<HS, BLK>(Qs, qkv_row(qkv, b, 0, T, C, 0, h, hs), qs, q0, T, hs);
  float o[HS];
#pragma unroll
  for (int d = 0; d < HS; d++) o[d] = 0.0f;
  float m = -INFINITY, l = 0.0f;
  int kend = min(T, q0 + BLK); /* causal: no key after the block's last query */
  for (int k0 = 0; k0 < kend; k0 += BLK) {
    __syncthreads();
    load_tile<HS, BLK>(Ks, qkv_row(qkv, b, 0, T, C, 1, h, hs), qs, k0, T, hs);
    load_tile<HS, BLK>(Vs, qkv_row(qkv, b, 0, T, C, 2, h, hs), qs, k0, T, hs);
    __syncthreads();
    if (!active) continue;
    int jn = min(BLK, tq - k0 + 1);
    for (int j = 0; j < jn; j++) {
      float s = 0.0f;
#pragma unroll
      for (int d = 0; d < HS; d++)
        if (d < hs) s += Qs[threadIdx.x][d] * Ks[j][d];
      s *= scale;
      if (s > m) { /* new running max: rescale what was summed so far */
        float corr = expf(m - s);
        l *= corr;
#pragma unroll
        for (int d = 0; d < HS; d++) o[d] *= corr;
        m = s;
      }
      float p = expf(s - m);
      l += p;
#pragma unroll
      for (int d = 0; d < HS; d++)
        if (d < hs) o[d] += p * Vs[j][d];
    }
  }
  if (!active) return;
  float inv = 1.0f / l;
  float *dst = out + ((size_t)b * T + tq) * C + (size_t)h * hs;
#pragma unroll
  for (int d = 0; d < HS; d++)
    if (d < hs) dst[d] = o[d] * inv;
  lse[(size_t)bh * T + tq] = m + logf(l);
}

/* ---- fused backward: dQ and D per query tile ------------------------------------------- */

template <int HS, int BLK>
static __global__ void __launch_bounds__(BLK)
    flash_bwd_dq_kernel(float *dqkv, float *Dsave, const float *dout, const float *qkv, const float *lse,
                        int T, int C, int NH, int hs, float scale) {
  __shared__ float Qs[BLK][HS + 1], dOs[BLK][HS + 1], Ks[BLK][HS + 1], Vs[BLK][HS + 1];
  int bh = blockIdx.y, b = bh / NH, h = bh % NH;
  int q0 = blockIdx.x * BLK, tq = q0 + threadIdx.x, me = threadIdx.x;
  bool active = tq < T;
  const size_t qs = 3 * (size_t)C;
  load_tile<HS, BLK>(Qs, qkv_row(qkv, b, 0, T, C, 0, h, hs), qs, q0, T, hs);
  load_tile<HS, BLK>(dOs, dout + (size_t)b * T * C + (size_t)h * hs, C, q0, T, hs);
  float L = active ? lse[(size_t)bh * T + tq] : 0.0f;
  int kend = min(T, q0 + BLK);
  /* pass 1: D = sum_j P_ij (dO_i . v_j) = dO_i . O_i */
  float D = 0.0f;
  for (int k0 = 0; k0 < kend; k0 += BLK) {
    __syncthreads();
    load_tile<HS, BLK>(Ks, qkv_row(qkv, b, 0, T, C, 1, h, hs), qs, k0, T, hs);
    load_tile<HS, BLK>(Vs, qkv_row(qkv, b, 0, T, C, 2, h, hs), qs, k0, T, hs);
    __syncthreads();
    if (!active) continue;
    int jn = min(BLK, tq - k0 + 1);
    for (int j = 0; j < jn; j++) {
      float s = 0.0f, dp = 0.0f;
#pragma unroll
      for (int d = 0; d < HS; d++)
        if (d < hs) {
          s += Qs[me][d] * Ks[j][d];
          dp += dOs[me][d] * Vs[j][d];
        }
      D += expf(s * scale - L) * dp;
    }
  }
  /* pass 2: dq_i = scale sum_j P_ij (dP_ij - D_i) k_j */
  float dq[HS];
#pragma unroll
  for (int d = 0; d < HS; d++) dq[d] = 0.0f;
  for (int k0 = 0; k0 < kend; k0 += BLK) {
    __syncthreads();
    load_tile<HS, BLK>(Ks, qkv_row(qkv, b, 0, T, C, 1, h, hs), qs, k0, T, hs);
    load_tile<HS, BLK>(Vs, qkv_row(qkv, b, 0, T, C, 2, h, hs), qs, k0, T, hs);
    __syncthreads();
    if (!active) continue;
    int jn = min(BLK, tq - k0 + 1);
    for (int j = 0; j < jn; j++) {
      float s = 0.0f, dp = 0.0f;
#pragma unroll
      for (int d = 0; d < HS; d++)
        if (d < hs) {
          s += Qs[me][d] * Ks[j][d];
          dp += dOs[me][d] * Vs[j][d];
        }
      float ds = expf(s * scale - L) * (dp - D) * scale;
#pragma unroll
      for (int d = 0; d < HS; d++)
        if (d < hs) dq[d] += ds * Ks[j][d];
    }
  }
  if (!active) return;
  float *dst = dqkv + ((size_t)b * T + tq) * 3 * C + (size_t)h * hs;
#pragma unroll
  for (int d = 0; d < HS; d++)
    if (d < hs) dst[d] = dq[d];
  Dsave[(size_t)bh * T + tq] = D;
}

/* ---- fused backward: dK, dV per key tile ----------------------------------------------- */

template <int HS, int BLK>
static __global__ void __launch_bounds__(BLK)
    flash_bwd_dkv_kernel(float *dqkv, const float *Dsave, const float *dout, const float *qkv,
                         const float *lse, int T, int C, int NH, int hs, float scale) {
  __shared__ float Ks[BLK][HS + 1], Vs[BLK][HS + 1], Qs[BLK][HS + 1], dOs[BLK][HS + 1];
  __shared__ float Ls[BLK], Ds[BLK];
  int bh = blockIdx.y, b = bh / NH, h = bh % NH;
  int k0 = blockIdx.x * BLK, tk = k0 + threadIdx.x, me = threadIdx.x;
  bool active = tk < T;
  const size_t qs = 3 * (size_t)C;
  load_tile<HS, BLK>(Ks, qkv_row(qkv, b, 0, T, C, 1, h, hs), qs, k0, T, hs);
  load_tile<HS, BLK>(Vs, qkv_row(qkv, b, 0, T, C, 2, h, hs), qs, k0, T, hs);
  float dk[HS], dv[HS];
#pragma unroll
  for (int d = 0; d < HS; d++) dk[d] = dv[d] = 0.0f;
  /* causal: only queries at or after this tile's first key */
  for (int q0 = k0; q0 < T; q0 += BLK) {
    __syncthreads();
    load_tile<HS, BLK>(Qs, qkv_row(qkv, b, 0, T, C, 0, h, hs), qs, q0, T, hs);
    load_tile<HS, BLK>(dOs, dout + (size_t)b * T * C + (size_t)h * hs, C, q0, T, hs);
    if (q0 + (int)threadIdx.x < T) {
      Ls[threadIdx.x] = lse[(size_t)bh * T + q0 + threadIdx.x];
      Ds[threadIdx.x] = Dsave[(size_t)bh * T + q0 + threadIdx.x];
    }
    __syncthreads();
    if (!active) continue;
    int i0 = max(0, tk - q0), in = min(BLK, T - q0);
    for (int i = i0; i < in; i++) {
      float s = 0.0f, dp = 0.0f;
#pragma unroll
      for (int d = 0; d < HS; d++)
        if (d < hs) {
          s += Qs[i][d] * Ks[me][d];
          dp += dOs[i][d] * Vs[me][d];
        }
      float p = expf(s * scale - Ls[i]);
      float ds = p * (dp - Ds[i]) * scale;
#pragma unroll
      for (int d = 0; d < HS; d++)
        if (d < hs) {
          dv[d] += p * dOs[i][d];
          dk[d] += ds * Qs[i][d];
        }
    }
  }
  if (!active) return;
  float *row = dqkv + ((size_t)b * T + tk) * 3 * C + (size_t)h * hs;
#pragma unroll
  for (int d = 0; d < HS; d++)
    if (d < hs) {
      row[C + d] = dk[d];
      row[2 * (size_t)C + d] = dv[d];
    }
}

/* ---- materialised path: one warp per (b, h, t) row -------------------------------------- */

static __global__ void att_fwd_kernel(float *out, float *att, const float *qkv, int B, int T, int C, int NH,
                                      float scale) {
  int hs = C / NH, lane = threadIdx.x & 31;
  size_t row = (size_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (row >= (size_t)B * NH * T) return;
  int t = (int)(row % T), bh = (int)(row / T), b = bh / NH, h = bh % NH;
  const float *q = qkv_row(qkv, b, t, T, C, 0, h, hs);
  float *a = att + row * T;
  float mx = -INFINITY;
  for (int t2 = lane; t2 <= t; t2 += 32) {
    const float *k = qkv_row(qkv, b, t2, T, C, 1, h, hs);
    float s = 0.0f;
    for (int d = 0; d < hs; d++) s += q[d] * k[d];
    s *= scale;
    a[t2] = s;
    mx = fmaxf(mx, s);
  }
  ot_warp_softmax_causal(a, t, T, mx);
  float *o = out + ((size_t)b * T + t) * C + (size_t)h * hs;
  for (int d = lane; d < hs; d += 32) {
    float acc = 0.0f;
    for (int t2 = 0; t2 <= t; t2++) acc += a[t2] * qkv_row(qkv, b, t2, T, C, 2, h, hs)[d];
    o[d] = acc;
  }
}

/* datt[t, t2] = att * (dO_t . v_t2 - sum_t2 att dO.v) * scale: the pre-softmax gradient */
static __global__ void att_bwd_dpre_kernel(float *datt, const float *dout, const float *qkv, const float *att,
                                           int B, int T, int C, int NH, float scale) {
  int hs = C / NH, lane = threadIdx.x & 31;
  size_t row = (size_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (row >= (size_t)B * NH * T) return;
  int t = (int)(row % T), bh = (int)(row / T), b = bh / NH, h = bh % NH;
  const float *a = att + row * T, *d = dout + ((size_t)b * T + t) * C + (size_t)h * hs;
  float *da = datt + row * T;
  float s = 0.0f;
  for (int t2 = lane; t2 <= t; t2 += 32) {
    const float *v = qkv_row(qkv, b, t2, T, C, 2, h, hs);
    float x = 0.0f;
    for (int k = 0; k < hs; k++) x += d[k] * v[k];
    da[t2] = x;
    s += a[t2] * x;
  }
  s = ot_warp_sum(s);
  for (int t2 = lane; t2 <= t; t2 += 32) da[t2] = a[t2] * (da[t2] - s) * scale;
}

/* dq_t = sum_{t2<=t} dpre[t,t2] k_t2; dk_t = sum_{t1>=t} dpre[t1,t] q_t1; dv_t = sum_{t1>=t} att[t1,t] dO_t1
 */
static __global__ void att_bwd_gather_kernel(float *dqkv, const float *datt, const float *dout,
                                             const float *qkv, const float *att, int B, int T, int C,
                                             int NH) {
  int hs = C / NH, lane = threadIdx.x & 31;
  size_t row = (size_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (row >= (size_t)B * NH * T) return;
  int t = (int)(row % T), bh = (int)(row / T), b = bh / NH, h = bh % NH;
  const float *dp = datt + (size_t)bh * T * T, *a = att + (size_t)bh * T * T;
  float *dq = dqkv + ((size_t)b * T + t) * 3 * C + (size_t)h * hs;
  for (int d = lane; d < hs; d += 32) {
    float q = 0.0f, k = 0.0f, v = 0.0f;
    for (int t2 = 0; t2 <= t; t2++) q += dp[(size_t)t * T + t2] * qkv_row(qkv, b, t2, T, C, 1, h, hs)[d];
    for (int t1 = t; t1 < T; t1++) {
      k += dp[(size_t)t1 * T + t] * qkv_row(qkv, b, t1, T, C, 0, h, hs)[d];
      v += a[(size_t)t1 * T + t] * dout[((size_t)b * T + t1) * C + (size_t)h * hs + d];
    }
    dq[d] = q;
    dq[C + d] = k;
    dq[2 * (size_t)C + d] = v;
  }
}

/* ---- dispatch ------------------------------------------------------------------------ */

static int use_flash(ot_cuda_ctx *c, int B, int C, int NH) {
  /* B * NH is gridDim.y of the fused kernels (at most 65535) */
  return !(c->flags & OT_CUDA_NO_FLASH) && C / NH <= FLASH_MAX_HS && (long)B * NH <= 65535;
}

size_t ot_cuda_attention_state(ot_backend *be, int B, int T, int C, int NH) {
  if (use_flash(ot_cuda(be), B, C, NH)) return (size_t)B * NH * T;
  return (size_t)B * NH * T * T;
}

#define FLASH_CASE(HS, BLK, KERNEL, ...)                                                                     \
  KERNEL<HS, BLK><<<dim3((T + BLK - 1) / BLK, B * NH), BLK, 0, c->stream>>>(__VA_ARGS__)

void ot_cuda_attention_fwd(ot_backend *be, float *out, float *att, const float *qkv, int B, int T, int C,
                           int NH) {
  ot_cuda_ctx *c = ot_cuda(be);
  int hs = C / NH;
  float scale = 1.0f / sqrtf((float)hs);
  if (B <= 0 || T <= 0) return;
  if (use_flash(c, B, C, NH)) {
    if (hs <= 32)
      FLASH_CASE(32, 64, flash_fwd_kernel, out, att, qkv, T, C, NH, hs, scale);
    else if (hs <= 64)
      FLASH_CASE(64, 32, flash_fwd_kernel, out, att, qkv, T, C, NH, hs, scale);
    else
      FLASH_CASE(128, 16, flash_fwd_kernel, out, att, qkv, T, C, NH, hs, scale);
  } else {
    size_t rows = (size_t)B * NH * T;
    att_fwd_kernel<<<(unsigned)((rows + 7) / 8), 256, 0, c->stream>>>(out, att, qkv, B, T, C, NH, scale);
  }
  OT_CUDA_LAUNCHED(c, "attention_fwd");
}

void ot_cuda_attention_bwd(ot_backend *be, float *dqkv, float *datt, const float *dout, const float *qkv,
                           const float *att, int B, int T, int C, int NH) {
  ot_cuda_ctx *c = ot_cuda(be);
  int hs = C / NH;
  float scale = 1.0f / sqrtf((float)hs);
  if (B <= 0 || T <= 0) return;
  if (use_flash(c, B, C, NH)) {
    /* att holds the log-sum-exp; datt receives D for the dK/dV kernel */
    if (hs <= 32) {
      FLASH_CASE(32, 64, flash_bwd_dq_kernel, dqkv, datt, dout, qkv, att, T, C, NH, hs, scale);
      FLASH_CASE(32, 64, flash_bwd_dkv_kernel, dqkv, datt, dout, qkv, att, T, C, NH, hs, scale);
    } else if (hs <= 64) {
      FLASH_CASE(64, 32, flash_bwd_dq_kernel, dqkv, datt, dout, qkv, att, T, C, NH, hs, scale);
      FLASH_CASE(64, 32, flash_bwd_dkv_kernel, dqkv, datt, dout, qkv, att, T, C, NH, hs, scale);
    } else {
      FLASH_CASE(128, 16, flash_bwd_dq_kernel, dqkv, datt, dout, qkv, att, T, C, NH, hs, scale);
      FLASH_CASE(128, 16, flash_bwd_dkv_kernel, dqkv, datt, dout, qkv, att, T, C, NH, hs, scale);
    }
  } else {
    size_t rows = (size_t)B * NH * T;
    unsigned g = (unsigned)((rows + 7) / 8);
    att_bwd_dpre_kernel<<<g, 256, 0, c->stream>>>(datt, dout, qkv, att, B, T, C, NH, scale);
    att_bwd_gather_kernel<<<g, 256, 0, c->stream>>>(dqkv, datt, dout, qkv, att, B, T, C, NH);
  }
  OT_CUDA_LAUNCHED(c, "attention_bwd");
}

/* ---- inference with a KV cache (cloud/ot_serve_engine.c) ------------------------------ */

static __global__ void embed_kernel(float *out, const int32_t *tokens, const int32_t *pos, const float *wte,
                                    const float *wpe, int N, int C) {
  size_t n = (size_t)N * C;
  for (size_t e = blockIdx.x * (size_t)blockDim.x + threadIdx.x; e < n; e += (size_t)gridDim.x * blockDim.x) {
    size_t i = e / C, c = e % C;
    out[e] = wte[(size_t)tokens[i] * C + c] + (wpe ? wpe[(size_t)pos[i] * C + c] : 0.0f);
  }
}

void ot_cuda_embed_fwd(ot_backend *be, float *out, const int32_t *tokens, const int32_t *pos,
                       const float *wte, const float *wpe, int N, int C) {
  ot_cuda_ctx *c = ot_cuda(be);
  if (N <= 0) return;
  embed_kernel<<<ot_cuda_grid(c, (size_t)N * C, 256), 256, 0, c->stream>>>(out, tokens, pos, wte, wpe, N, C);
  OT_CUDA_LAUNCHED(c, "embed_fwd");
}

/* every row's k and v into its sequence's block first, so rows of one prefill see each other */
static __global__ void kv_store_kernel(float *kcache, float *vcache, const float *qkv, const int32_t *pos,
                                       const int32_t *slot, const int32_t *table, int N, int C, int bs, int mb) {
  size_t n = (size_t)N * C;
  for (size_t e = blockIdx.x * (size_t)blockDim.x + threadIdx.x; e < n; e += (size_t)gridDim.x * blockDim.x) {
    size_t i = e / C, ch = e % C;
    size_t at = ((size_t)table[(size_t)slot[i] * mb + pos[i] / bs] * bs + (size_t)(pos[i] % bs)) * C + ch;
    kcache[at] = qkv[i * 3 * C + C + ch];
    vcache[at] = qkv[i * 3 * C + 2 * (size_t)C + ch];
  }
}

#define KV_WARPS 4 /* warps per (row, head), each over every KV_WARPS-th key */
#define KV_DPL 8   /* output dims per lane per pass: heads up to 256 in one pass */

/* One block per (row, head). Each warp runs an online softmax over its share of the keys
 * 0..pos (lanes split the head's dims), then warp 0 merges the KV_WARPS partial (max, sum,
 * output) triples. Heads wider than 32*KV_DPL take several passes, recomputing the scores. */
static __global__ void __launch_bounds__(KV_WARPS * 32)
    attention_kv_kernel(float *out, const float *kcache, const float *vcache, const float *qkv,
                        const int32_t *pos, const int32_t *slot, const int32_t *table, int C, int NH, int bs,
                        int mb, float scale) {
  __shared__ float sm[KV_WARPS], sl[KV_WARPS], so[KV_WARPS][32 * KV_DPL];
  int i = blockIdx.x / NH, h = blockIdx.x % NH, hs = C / NH;
  int lane = threadIdx.x & 31, wp = threadIdx.x >> 5, P = pos[i];
  const float *q = qkv + (size_t)i * 3 * C + (size_t)h * hs;
  const int32_t *tb = table + (size_t)slot[i] * mb; /* the sequence's blocks */
  float *o = out + (size_t)i * C + (size_t)h * hs;
  for (int d0 = 0; d0 < hs; d0 += 32 * KV_DPL) {
    float m = -INFINITY, l = 0.0f, acc[KV_DPL];
    for (int k = 0; k < KV_DPL; k++) acc[k] = 0.0f;
    for (int t = wp; t <= P; t += KV_WARPS) {
      size_t at = ((size_t)tb[t / bs] * bs + (size_t)(t % bs)) * C + (size_t)h * hs;
      const float *kt = kcache + at, *vt = vcache + at;
      float dot = 0.0f;
      for (int d = lane; d < hs; d += 32) dot += q[d] * kt[d];
      float s = ot_warp_sum(dot) * scale;
      float mn = fmaxf(m, s), corr = expf(m - mn), p = expf(s - mn);
      l = l * corr + p;
      for (int k = 0; k < KV_DPL; k++) {
        int d = d0 + lane + 32 * k;
        if (d < hs) acc[k] = acc[k] * corr + p * vt[d];
      }
      m = mn;
    }
    if (lane == 0) {
      sm[wp] = m;
      sl[wp] = l;
    }
    for (int k = 0; k < KV_DPL; k++) so[wp][lane + 32 * k] = acc[k];
    __syncthreads();
    if (wp == 0) { /* warp 0 always has key 0, so M is finite; warps without keys weigh 0 */
      float M = sm[0];
      for (int w = 1; w < KV_WARPS; w++) M = fmaxf(M, sm[w]);
      float L = 0.0f, f[KV_WARPS];
      for (int w = 0; w < KV_WARPS; w++) {
        f[w] = expf(sm[w] - M);
        L += sl[w] * f[w];
      }
      float inv = 1.0f / L;
      for (int k = 0; k < KV_DPL; k++) {
        int d = d0 + lane + 32 * k;
        if (d >= hs) break;
        float v = 0.0f;
        for (int w = 0; w < KV_WARPS; w++) v += so[w][lane + 32 * k] * f[w];
        o[d] = v * inv;
      }
    }
    __syncthreads();
  }
}

void ot_cuda_attention_kv_fwd(ot_backend *be, float *out, float *kcache, float *vcache, const float *qkv,
                              const int32_t *pos, const int32_t *slot, const int32_t *table, int N, int C, int NH,
                              int bs, int mb) {
  ot_cuda_ctx *c = ot_cuda(be);
  if (N <= 0) return;
  kv_store_kernel<<<ot_cuda_grid(c, (size_t)N * C, 256), 256, 0, c->stream>>>(kcache, vcache, qkv, pos, slot,
                                                                              table, N, C, bs, mb);
  float scale = 1.0f / sqrtf((float)(C / NH));
  attention_kv_kernel<<<(unsigned)N * NH, KV_WARPS * 32, 0, c->stream>>>(out, kcache, vcache, qkv, pos, slot,
                                                                         table, C, NH, bs, mb, scale);
  OT_CUDA_LAUNCHED(c, "attention_kv_fwd");
}

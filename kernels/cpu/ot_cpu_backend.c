/* CPU backend: the reference implementation of every op.
 * Matrix products go to OpenBLAS (its OpenMP build, so it shares one thread pool
 * with the loops here); everything else is OpenMP loops with AVX2/FMA where the
 * compiler cannot vectorise on its own (exp, tanh, reductions). */
#include <cblas.h>
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "ot_backend.h"
#include "ot_error.h"

void openblas_set_num_threads(int num_threads);

#define NT (be->n_threads)

/* The CPU backend's own state: a scratch the low-precision products widen into, kept between
 * calls (a fresh multi-megabyte buffer per product costs page faults as large as the work).
 * Like every op of a backend, used by one thread at a time. */
typedef struct {
  float *scratch;
  size_t cap; /* floats */
} cpu_ctx;

/* ---- vector math ---------------------------------------------------------------- */

/* exp(x) for 8 floats, ~1 ulp on the range that matters (Cody-Waite reduction,
 * degree-6 polynomial); saturates to 0 / +inf outside [-87.3, 88.7]. */
static inline __m256 exp256(__m256 x) {
  const __m256 hi = _mm256_set1_ps(88.7228f), lo = _mm256_set1_ps(-87.3365f);
  __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  __m256 over = _mm256_cmp_ps(x, hi, _CMP_GT_OQ);
  x = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
  __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  __m256 r2 = _mm256_mul_ps(r, r);
  p = _mm256_fmadd_ps(p, r2, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  __m256 res = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  res = _mm256_andnot_ps(under, res);
  return _mm256_blendv_ps(res, _mm256_set1_ps(INFINITY), over);
}

static inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

static inline float dot(const float *a, const float *b, int n) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int i = 0;
  for (; i + 16 <= n; i += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
  }
  for (; i + 8 <= n; i += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
  float s = hsum256(_mm256_add_ps(acc0, acc1));
  for (; i < n; i++) s += a[i] * b[i];
  return s;
}

/* y += a * x */
static inline void axpy(float *y, float a, const float *x, int n) {
  __m256 va = _mm256_set1_ps(a);
  int i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
  for (; i < n; i++) y[i] += a * x[i];
}

/* ---- memory ---------------------------------------------------------------------- */

static void cpu_destroy(ot_backend *be) {
  cpu_ctx *c = be->ctx;
  if (c) free(c->scratch);
  free(c);
  free(be);
}

static int cpu_alloc(ot_backend *be, size_t bytes, void **out) {
  (void)be;
  void *p = NULL;
  /* 64-byte alignment: cache lines and AVX-512 loads inside OpenBLAS */
  if (posix_memalign(&p, 64, bytes ? bytes : 64) != 0)
    return ot_error(OT_ERR_NOMEM, "cannot allocate %zu bytes", bytes);
  *out = p;
  return OT_OK;
}

static void cpu_free(ot_backend *be, void *p) {
  (void)be;
  free(p);
}

static void cpu_discard(ot_backend *be, void *p, size_t bytes) {
  (void)be;
  uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE), a = (uintptr_t)p, b = a + bytes;
  a = (a + page - 1) / page * page; /* whole pages inside the range only */
  b = b / page * page;
  if (b > a) (void)madvise((void *)a, b - a, MADV_DONTNEED);
}

static int cpu_copy(ot_backend *be, void *dst, const void *src, size_t bytes) {
  (void)be;
  memcpy(dst, src, bytes);
  return OT_OK;
}

static int cpu_zero(ot_backend *be, void *p, size_t bytes) {
  (void)be;
  memset(p, 0, bytes);
  return OT_OK;
}

static int cpu_sync(ot_backend *be) {
  (void)be;
  return OT_OK;
}

/* ---- encoder --------------------------------------------------------------------- */

static void cpu_encoder_fwd(ot_backend *be, float *out, const int32_t *tokens, const float *wte,
                            const float *wpe, int B, int T, int C) {
#pragma omp parallel for num_threads(NT) schedule(static)
  for (int i = 0; i < B * T; i++) {
    const float *e = wte + (size_t)tokens[i] * C;
    float *o = out + (size_t)i * C;
    if (!wpe) {
      memcpy(o, e, sizeof(float) * C);
      continue;
    }
    const float *p = wpe + (size_t)(i % T) * C;
    for (int c = 0; c < C; c++) o[c] = e[c] + p[c];
  }
}

static void cpu_encoder_bwd(ot_backend *be, float *dwte, float *dwpe, const float *dout,
                            const int32_t *tokens, int B, int T, int C) {
  /* Threads own disjoint channel ranges, so repeated tokens never race. */
#pragma omp parallel num_threads(NT)
  {
    int nt = omp_get_num_threads(), id = omp_get_thread_num();
    int c0 = (int)((long)C * id / nt), c1 = (int)((long)C * (id + 1) / nt);
    for (int i = 0; i < B * T; i++) {
      const float *d = dout + (size_t)i * C;
      if (dwte) {
        float *g = dwte + (size_t)tokens[i] * C;
        for (int c = c0; c < c1; c++) g[c] += d[c];
      }
      if (dwpe) {
        float *g = dwpe + (size_t)(i % T) * C;
        for (int c = c0; c < c1; c++) g[c] += d[c];
      }
    }
  }
}

/* ---- layernorm ------------------------------------------------------------------- */

static void cpu_layernorm_fwd(ot_backend *be, float *out, float *mean, float *rstd, const float *inp,
                              const float *w, const float *b, int N, int C, float eps) {
#pragma omp parallel for num_threads(NT) schedule(static)
  for (int i = 0; i < N; i++) {
    const float *x = inp + (size_t)i * C;
    float *o = out + (size_t)i * C;
    float m = 0.0f;
#pragma omp simd reduction(+ : m)
    for (int c = 0; c < C; c++) m += x[c];
    m /= (float)C;
    float v = 0.0f;
#pragma omp simd reduction(+ : v)
    for (int c = 0; c < C; c++) v += (x[c] - m) * (x[c] - m);
    v /= (float)C;
    float s = 1.0f / sqrtf(v + eps);
    for (int c = 0; c < C; c++) o[c] = (x[c] - m) * s * w[c] + b[c];
    if (mean) mean[i] = m;
    if (rstd) rstd[i] = s;
  }
}

static void cpu_layernorm_bwd(ot_backend *be, float *dinp, float *dw, float *db, const float *dout,
                              const float *inp, const float *w, const float *mean, const float *rstd, int N,
                              int C) {
  if (dinp) {
#pragma omp parallel for num_threads(NT) schedule(static)
    for (int i = 0; i < N; i++) {
      const float *x = inp + (size_t)i * C, *d = dout + (size_t)i * C;
      float *dx = dinp + (size_t)i * C;
      float m = mean[i], s = rstd[i];
      float dnorm_mean = 0.0f, dnorm_norm_mean = 0.0f;
#pragma omp simd reduction(+ : dnorm_mean, dnorm_norm_mean)
      for (int c = 0; c < C; c++) {
        float dn = w[c] * d[c];
        dnorm_mean += dn;
        dnorm_norm_mean += dn * (x[c] - m) * s;
      }
      dnorm_mean /= (float)C;
      dnorm_norm_mean /= (float)C;
      for (int c = 0; c < C; c++) {
        float norm = (x[c] - m) * s;
        dx[c] += (w[c] * d[c] - dnorm_mean - norm * dnorm_norm_mean) * s;
      }
    }
  }
  if (dw || db) {
    /* Column sums: threads own channel ranges (no races, no per-thread copies). */
#pragma omp parallel num_threads(NT)
    {
      int nt = omp_get_num_threads(), id = omp_get_thread_num();
      int c0 = (int)((long)C * id / nt), c1 = (int)((long)C * (id + 1) / nt);
      for (int i = 0; i < N; i++) {
        const float *x = inp + (size_t)i * C, *d = dout + (size_t)i * C;
        float m = mean[i], s = rstd[i];
        if (dw)
          for (int c = c0; c < c1; c++) dw[c] += d[c] * (x[c] - m) * s;
        if (db)
          for (int c = c0; c < c1; c++) db[c] += d[c];
      }
    }
  }
}

/* ---- matmul ---------------------------------------------------------------------- */

static void cpu_matmul_fwd(ot_backend *be, float *out, const float *inp, const float *w, const float *bias,
                           int N, int IN, int OUT, ot_wlayout layout) {
  float beta = 0.0f;
  if (bias) {
#pragma omp parallel for num_threads(NT) schedule(static)
    for (int i = 0; i < N; i++) memcpy(out + (size_t)i * OUT, bias, sizeof(float) * OUT);
    beta = 1.0f;
  }
  if (layout == OT_W_IN_OUT)
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, N, OUT, IN, 1.0f, inp, IN, w, OUT, beta, out, OUT);
  else
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, N, OUT, IN, 1.0f, inp, IN, w, IN, beta, out, OUT);
}

/* Low-precision weights: blocks of LOWP_COLS output features are widened into an
 * [IN x LOWP_COLS] scratch and multiplied by OpenBLAS; only the scratch is ever fp32. */
#define LOWP_COLS 256

static float *lowp_scratch(ot_backend *be, size_t n) {
  cpu_ctx *c = be->ctx;
  if (n > c->cap) {
    float *p = malloc(n * sizeof(float));
    if (!p) return NULL;
    free(c->scratch);
    c->scratch = p;
    c->cap = n;
  }
  return c->scratch;
}

/* n values of a row, widened: bf16 (the high half of an fp32), or int8 times a scale that is one
 * number for the row (sc) or one per value (scv). */
static void widen_row(float *dst, const void *src, ot_lowp kind, int n, float sc, const float *scv) {
  int c = 0;
  if (kind == OT_LOWP_BF16) {
    const uint16_t *s16 = src;
    for (; c + 8 <= n; c += 8) {
      __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(s16 + c)));
      _mm256_storeu_ps(dst + c, _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)));
    }
    for (; c < n; c++) {
      uint32_t u = (uint32_t)s16[c] << 16;
      memcpy(&dst[c], &u, sizeof u);
    }
    return;
  }
  const int8_t *s8 = src;
  for (; c + 8 <= n; c += 8) {
    __m256 v = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(s8 + c))));
    __m256 k = scv ? _mm256_loadu_ps(scv + c) : _mm256_set1_ps(sc);
    _mm256_storeu_ps(dst + c, _mm256_mul_ps(v, k));
  }
  for (; c < n; c++) dst[c] = s8[c] * (scv ? scv[c] : sc);
}

/* Widens output features o0..o0+nb of W into s: [nb][IN] (OUT_IN) or [IN][nb] (IN_OUT). */
static void widen_lowp(ot_backend *be, float *s, const void *w, ot_lowp kind, const float *scale, int IN,
                       int OUT, int o0, int nb, ot_wlayout layout) {
  size_t esz = kind == OT_LOWP_BF16 ? 2 : 1;
  if (layout == OT_W_OUT_IN) {
#pragma omp parallel for num_threads(NT) schedule(static)
    for (int r = 0; r < nb; r++)
      widen_row(s + (size_t)r * IN, (const char *)w + (size_t)(o0 + r) * IN * esz, kind, IN,
                scale ? scale[o0 + r] : 0.0f, NULL);
  } else {
#pragma omp parallel for num_threads(NT) schedule(static)
    for (int r = 0; r < IN; r++)
      widen_row(s + (size_t)r * nb, (const char *)w + ((size_t)r * OUT + o0) * esz, kind, nb, 0.0f,
                scale ? scale + o0 : NULL);
  }
}

static void cpu_matmul_fwd_lowp(ot_backend *be, float *out, const float *inp, const void *w, ot_lowp kind,
                                const float *scale, const float *bias, int N, int IN, int OUT,
                                ot_wlayout layout) {
  float *s = lowp_scratch(be, (size_t)IN * LOWP_COLS);
  if (!s) { /* no error channel in an op: a result that cannot be mistaken for one */
    for (size_t i = 0; i < (size_t)N * OUT; i++) out[i] = NAN;
    return;
  }
  float beta = 0.0f;
  if (bias) {
#pragma omp parallel for num_threads(NT) schedule(static)
    for (int i = 0; i < N; i++) memcpy(out + (size_t)i * OUT, bias, sizeof(float) * OUT);
    beta = 1.0f;
  }
  for (int o0 = 0; o0 < OUT; o0 += LOWP_COLS) {
    int nb = OUT - o0 < LOWP_COLS ? OUT - o0 : LOWP_COLS;
    widen_lowp(be, s, w, kind, scale, IN, OUT, o0, nb, layout);
    if (layout == OT_W_OUT_IN)
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, N, nb, IN, 1.0f, inp, IN, s, IN, beta, out + o0,
                  OUT);
    else
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, N, nb, IN, 1.0f, inp, IN, s, nb, beta, out + o0,
                  OUT);
  }
}

static void cpu_matmul_bwd_lowp(ot_backend *be, float *dinp, const float *dout, const void *w, ot_lowp kind,
                                const float *scale, int N, int IN, int OUT, ot_wlayout layout) {
  float *s = lowp_scratch(be, (size_t)IN * LOWP_COLS);
  if (!s) {
    for (size_t i = 0; i < (size_t)N * IN; i++) dinp[i] = NAN;
    return;
  }
  for (int o0 = 0; o0 < OUT; o0 += LOWP_COLS) {
    int nb = OUT - o0 < LOWP_COLS ? OUT - o0 : LOWP_COLS;
    float beta = o0 ? 1.0f : 0.0f;
    widen_lowp(be, s, w, kind, scale, IN, OUT, o0, nb, layout);
    if (layout == OT_W_OUT_IN)
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, N, IN, nb, 1.0f, dout + o0, OUT, s, IN, beta,
                  dinp, IN);
    else
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, N, IN, nb, 1.0f, dout + o0, OUT, s, nb, beta, dinp,
                  IN);
  }
}

static void cpu_matmul_bwd(ot_backend *be, float *dinp, float *dw, float *dbias, const float *dout,
                           const float *inp, const float *w, int N, int IN, int OUT, ot_wlayout layout) {
  if (dinp) {
    if (layout == OT_W_IN_OUT)
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, N, IN, OUT, 1.0f, dout, OUT, w, OUT, 0.0f, dinp,
                  IN);
    else
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, N, IN, OUT, 1.0f, dout, OUT, w, IN, 0.0f, dinp,
                  IN);
  }
  if (dw) {
    if (layout == OT_W_IN_OUT)
      cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, IN, OUT, N, 1.0f, inp, IN, dout, OUT, 1.0f, dw,
                  OUT);
    else
      cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, OUT, IN, N, 1.0f, dout, OUT, inp, IN, 1.0f, dw,
                  IN);
  }
  if (dbias) {
#pragma omp parallel num_threads(NT)
    {
      int nt = omp_get_num_threads(), id = omp_get_thread_num();
      int c0 = (int)((long)OUT * id / nt), c1 = (int)((long)OUT * (id + 1) / nt);
      for (int i = 0; i < N; i++) {
        const float *d = dout + (size_t)i * OUT;
        for (int c = c0; c < c1; c++) dbias[c] += d[c];
      }
    }
  }
}

/* ---- LoRA ------------------------------------------------------------------------ */

/* xd = drop(src) (scale 1/(1-p) on kept elements); accumulate: xd += drop(src) instead. */
static void cpu_dropout(ot_backend *be, float *xd, const float *src, size_t n, float p, uint64_t seed,
                        int accumulate) {
  float s = 1.0f / (1.0f - p);
#pragma omp parallel for num_threads(NT) schedule(static)
  for (size_t i = 0; i < n; i++) {
    float v = ot_dropout_keep(seed, i, p) ? src[i] * s : 0.0f;
    xd[i] = accumulate ? xd[i] + v : v;
  }
}

static void cpu_lora_fwd(ot_backend *be, float *out, float *t, float *xd, const float *x, const float *A,
                         const float *B, int N, int IN, int OUT, int r, float scale, float p, uint64_t seed) {
  const float *src = x;
  if (p > 0.0f) {
    cpu_dropout(be, xd, x, (size_t)N * IN, p, seed, 0);
    src = xd;
  }
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, N, r, IN, 1.0f, src, IN, A, IN, 0.0f, t, r);
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, N, OUT, r, scale, t, r, B, r, 1.0f, out, OUT);
}

static void cpu_lora_bwd(ot_backend *be, float *dx, float *dA, float *dB, float *dt, float *xd,
                         const float *dout, const float *x, const float *t, const float *A, const float *B,
                         int N, int IN, int OUT, int r, float scale, float p, uint64_t seed) {
  if (dB)
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, OUT, r, N, scale, dout, OUT, t, r, 1.0f, dB, r);
  if (!dA && !dx) return;
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, N, r, OUT, scale, dout, OUT, B, r, 0.0f, dt, r);
  if (dA) {
    const float *src = x;
    if (p > 0.0f) {
      cpu_dropout(be, xd, x, (size_t)N * IN, p, seed, 0);
      src = xd;
    }
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, r, IN, N, 1.0f, dt, r, src, IN, 1.0f, dA, IN);
  }
  if (dx) {
    if (p > 0.0f) { /* dx += drop'(dt A): the same mask and scale on the way back */
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, N, IN, r, 1.0f, dt, r, A, IN, 0.0f, xd, IN);
      cpu_dropout(be, dx, xd, (size_t)N * IN, p, seed, 1);
    } else {
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, N, IN, r, 1.0f, dt, r, A, IN, 1.0f, dx, IN);
    }
  }
}

/* ---- attention ------------------------------------------------------------------- */

static void cpu_attention_fwd(ot_backend *be, float *out, float *att, const float *qkv, int B, int T, int C,
                              int NH) {
  int hs = C / NH;
  float scale = 1.0f / sqrtf((float)hs);
  size_t C3 = (size_t)3 * C;
#pragma omp parallel for collapse(2) num_threads(NT) schedule(dynamic, 1)
  for (int b = 0; b < B; b++) {
    for (int h = 0; h < NH; h++) {
      for (int t = 0; t < T; t++) {
        const float *q = qkv + ((size_t)b * T + t) * C3 + (size_t)h * hs;
        float *a = att + (((size_t)b * NH + h) * T + t) * T;
        float maxv = -INFINITY;
        for (int t2 = 0; t2 <= t; t2++) {
          const float *k = qkv + ((size_t)b * T + t2) * C3 + C + (size_t)h * hs;
          float s = dot(q, k, hs) * scale;
          a[t2] = s;
          if (s > maxv) maxv = s;
        }
        float sum = 0.0f;
        int t2 = 0;
        __m256 vmax = _mm256_set1_ps(maxv), vsum = _mm256_setzero_ps();
        for (; t2 + 8 <= t + 1; t2 += 8) {
          __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(a + t2), vmax));
          _mm256_storeu_ps(a + t2, e);
          vsum = _mm256_add_ps(vsum, e);
        }
        sum = hsum256(vsum);
        for (; t2 <= t; t2++) {
          a[t2] = expf(a[t2] - maxv);
          sum += a[t2];
        }
        float inv = 1.0f / sum;
        for (t2 = 0; t2 <= t; t2++) a[t2] *= inv;
        for (t2 = t + 1; t2 < T; t2++) a[t2] = 0.0f;
        float *o = out + ((size_t)b * T + t) * C + (size_t)h * hs;
        memset(o, 0, sizeof(float) * hs);
        for (t2 = 0; t2 <= t; t2++) {
          const float *v = qkv + ((size_t)b * T + t2) * C3 + 2 * (size_t)C + (size_t)h * hs;
          axpy(o, a[t2], v, hs);
        }
      }
    }
  }
}

static void cpu_attention_bwd(ot_backend *be, float *dqkv, float *datt, const float *dout, const float *qkv,
                              const float *att, int B, int T, int C, int NH) {
  int hs = C / NH;
  float scale = 1.0f / sqrtf((float)hs);
  size_t C3 = (size_t)3 * C;
  /* One task per (batch, head): dk and dv accumulate over all queries of the head. */
#pragma omp parallel for collapse(2) num_threads(NT) schedule(dynamic, 1)
  for (int b = 0; b < B; b++) {
    for (int h = 0; h < NH; h++) {
      for (int t = 0; t < T; t++) {
        float *row = dqkv + ((size_t)b * T + t) * C3 + (size_t)h * hs;
        memset(row, 0, sizeof(float) * hs);
        memset(row + C, 0, sizeof(float) * hs);
        memset(row + 2 * (size_t)C, 0, sizeof(float) * hs);
      }
      for (int t = 0; t < T; t++) {
        const float *a = att + (((size_t)b * NH + h) * T + t) * T;
        float *da = datt + (((size_t)b * NH + h) * T + t) * T;
        const float *d = dout + ((size_t)b * T + t) * C + (size_t)h * hs;
        const float *q = qkv + ((size_t)b * T + t) * C3 + (size_t)h * hs;
        float *dq = dqkv + ((size_t)b * T + t) * C3 + (size_t)h * hs;
        /* through out = att @ v */
        float s = 0.0f;
        for (int t2 = 0; t2 <= t; t2++) {
          const float *v = qkv + ((size_t)b * T + t2) * C3 + 2 * (size_t)C + (size_t)h * hs;
          float *dv = dqkv + ((size_t)b * T + t2) * C3 + 2 * (size_t)C + (size_t)h * hs;
          da[t2] = dot(d, v, hs);
          axpy(dv, a[t2], d, hs);
          s += a[t2] * da[t2];
        }
        /* through softmax, then the scaled q.k products */
        for (int t2 = 0; t2 <= t; t2++) {
          float dpre = a[t2] * (da[t2] - s) * scale;
          const float *k = qkv + ((size_t)b * T + t2) * C3 + C + (size_t)h * hs;
          float *dk = dqkv + ((size_t)b * T + t2) * C3 + C + (size_t)h * hs;
          axpy(dq, dpre, k, hs);
          axpy(dk, dpre, q, hs);
        }
      }
    }
  }
}

/* ---- GELU (tanh approximation) --------------------------------------------------- */

#define GELU_S 0.7978845608028654f /* sqrt(2/pi) */
#define GELU_A 0.044715f

/* tanh(u) = 1 - 2 / (exp(2u) + 1): exact limits at +-inf, no cancellation in 1 + tanh. */
static inline __m256 tanh256(__m256 u) {
  __m256 e = exp256(_mm256_add_ps(u, u));
  return _mm256_sub_ps(_mm256_set1_ps(1.0f),
                       _mm256_div_ps(_mm256_set1_ps(2.0f), _mm256_add_ps(e, _mm256_set1_ps(1.0f))));
}

static void cpu_gelu_fwd(ot_backend *be, float *out, const float *inp, size_t n) {
  size_t nv = n / 8 * 8;
#pragma omp parallel for num_threads(NT) schedule(static)
  for (size_t i = 0; i < nv; i += 8) {
    __m256 x = _mm256_loadu_ps(inp + i);
    __m256 x3 = _mm256_mul_ps(_mm256_mul_ps(x, x), x);
    __m256 u = _mm256_mul_ps(_mm256_set1_ps(GELU_S), _mm256_fmadd_ps(_mm256_set1_ps(GELU_A), x3, x));
    __m256 t = tanh256(u);
    _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), x),
                                            _mm256_add_ps(_mm256_set1_ps(1.0f), t)));
  }
  for (size_t i = nv; i < n; i++) {
    float x = inp[i];
    out[i] = 0.5f * x * (1.0f + tanhf(GELU_S * (x + GELU_A * x * x * x)));
  }
}

static void cpu_gelu_bwd(ot_backend *be, float *dinp, const float *inp, const float *dout, size_t n) {
  size_t nv = n / 8 * 8;
#pragma omp parallel for num_threads(NT) schedule(static)
  for (size_t i = 0; i < nv; i += 8) {
    __m256 x = _mm256_loadu_ps(inp + i);
    __m256 x2 = _mm256_mul_ps(x, x);
    __m256 u = _mm256_mul_ps(_mm256_set1_ps(GELU_S),
                             _mm256_fmadd_ps(_mm256_set1_ps(GELU_A), _mm256_mul_ps(x2, x), x));
    __m256 t = tanh256(u);
    __m256 one = _mm256_set1_ps(1.0f), half = _mm256_set1_ps(0.5f);
    __m256 sech2 = _mm256_fnmadd_ps(t, t, one);
    __m256 du =
        _mm256_mul_ps(_mm256_set1_ps(GELU_S), _mm256_fmadd_ps(_mm256_set1_ps(3.0f * GELU_A), x2, one));
    __m256 g = _mm256_fmadd_ps(_mm256_mul_ps(half, x), _mm256_mul_ps(sech2, du),
                               _mm256_mul_ps(half, _mm256_add_ps(one, t)));
    _mm256_storeu_ps(dinp + i, _mm256_mul_ps(g, _mm256_loadu_ps(dout + i)));
  }
  for (size_t i = nv; i < n; i++) {
    float x = inp[i];
    float t = tanhf(GELU_S * (x + GELU_A * x * x * x));
    float g = 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * GELU_S * (1.0f + 3.0f * GELU_A * x * x);
    dinp[i] = g * dout[i];
  }
}

static void cpu_add(ot_backend *be, float *out, const float *a, const float *b, size_t n) {
#pragma omp parallel for num_threads(NT) schedule(static)
  for (size_t i = 0; i < n; i++) out[i] = a[i] + b[i];
}

/* ---- softmax cross-entropy ------------------------------------------------------- */

static void cpu_crossentropy_fwd(ot_backend *be, float *losses, float *probs, const float *logits,
                                 const int32_t *targets, int N, int V) {
#pragma omp parallel for num_threads(NT) schedule(static)
  for (int i = 0; i < N; i++) {
    const float *x = logits + (size_t)i * V;
    float *p = probs + (size_t)i * V;
    float maxv = -INFINITY;
    for (int j = 0; j < V; j++) maxv = x[j] > maxv ? x[j] : maxv;
    /* the target's logit is read before probs (which may alias logits) overwrite it */
    float xt = (targets && targets[i] >= 0) ? x[targets[i]] : 0.0f;
    __m256 vmax = _mm256_set1_ps(maxv), vsum = _mm256_setzero_ps();
    int j = 0;
    for (; j + 8 <= V; j += 8) {
      __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(x + j), vmax));
      _mm256_storeu_ps(p + j, e);
      vsum = _mm256_add_ps(vsum, e);
    }
    double sum = hsum256(vsum);
    for (; j < V; j++) {
      p[j] = expf(x[j] - maxv);
      sum += p[j];
    }
    float inv = (float)(1.0 / sum);
    for (j = 0; j < V; j++) p[j] *= inv;
    if (losses) losses[i] = (targets && targets[i] >= 0) ? (float)(log(sum) + maxv - xt) : 0.0f;
  }
}

static void cpu_crossentropy_bwd(ot_backend *be, float *dlogits, const float *probs, const int32_t *targets,
                                 float scale, int N, int V) {
#pragma omp parallel for num_threads(NT) schedule(static)
  for (int i = 0; i < N; i++) {
    const float *p = probs + (size_t)i * V;
    float *d = dlogits + (size_t)i * V;
    if (targets[i] < 0) {
      memset(d, 0, sizeof(float) * V);
      continue;
    }
    for (int j = 0; j < V; j++) d[j] = p[j] * scale;
    d[targets[i]] -= scale;
  }
}

/* ---- hidden-state distillation -------------------------------------------------- */

static float kd_row_rms(const float *t, int C, float eps) {
  double ss = 0.0;
  for (int c = 0; c < C; c++) ss += (double)t[c] * t[c];
  return (float)sqrt(ss / C) + eps;
}

static void cpu_kd_fwd(ot_backend *be, float *losses, const float *s, const float *t, int N, int C,
                       float eps) {
#pragma omp parallel for num_threads(NT) schedule(static)
  for (int i = 0; i < N; i++) {
    const float *si = s + (size_t)i * C, *ti = t + (size_t)i * C;
    float inv = 1.0f / kd_row_rms(ti, C, eps);
    double acc = 0.0;
    for (int c = 0; c < C; c++) {
      float d = (ti[c] - si[c]) * inv;
      acc += (double)d * d;
    }
    losses[i] = (float)acc;
  }
}

static void cpu_kd_bwd(ot_backend *be, float *ds, const float *s, const float *t, float scale, int N, int C,
                       float eps) {
#pragma omp parallel for num_threads(NT) schedule(static)
  for (int i = 0; i < N; i++) {
    const float *si = s + (size_t)i * C, *ti = t + (size_t)i * C;
    float r = kd_row_rms(ti, C, eps), k = 2.0f * scale / (r * r);
    for (int c = 0; c < C; c++) ds[(size_t)i * C + c] = k * (si[c] - ti[c]);
  }
}

/* ---- optimizers ------------------------------------------------------------------ */

static void cpu_adamw(ot_backend *be, float *p, float *g, float *m, float *v, size_t n, float lr, float beta1,
                      float beta2, float eps, float wd, int t) {
  /* Same arithmetic order as torch.optim.AdamW (single-tensor path). */
  float bc1 = 1.0f - powf(beta1, (float)t), bc2 = 1.0f - powf(beta2, (float)t);
  float step = lr / bc1, bc2_sqrt = sqrtf(bc2), decay = 1.0f - lr * wd;
#pragma omp parallel for num_threads(NT) schedule(static)
  for (size_t i = 0; i < n; i++) {
    float gi = g[i];
    g[i] = 0.0f;
    float mi = m[i] * beta1 + (1.0f - beta1) * gi;
    float vi = v[i] * beta2 + (1.0f - beta2) * gi * gi;
    m[i] = mi;
    v[i] = vi;
    p[i] = p[i] * decay - step * mi / (sqrtf(vi) / bc2_sqrt + eps);
  }
}

static void cpu_sgd(ot_backend *be, float *p, float *g, float *buf, size_t n, float lr, float momentum,
                    float wd, int first_step) {
#pragma omp parallel for num_threads(NT) schedule(static)
  for (size_t i = 0; i < n; i++) {
    float d = g[i] + wd * p[i];
    g[i] = 0.0f;
    if (momentum != 0.0f) {
      d = first_step ? d : momentum * buf[i] + d;
      buf[i] = d;
    }
    p[i] -= lr * d;
  }
}

static void cpu_scale(ot_backend *be, float *x, float s, size_t n) {
#pragma omp parallel for num_threads(NT) schedule(static)
  for (size_t i = 0; i < n; i++) x[i] *= s;
}

static double cpu_sumsq(ot_backend *be, const float *x, size_t n) {
  double s = 0.0;
#pragma omp parallel for num_threads(NT) reduction(+ : s) schedule(static)
  for (size_t i = 0; i < n; i++) s += (double)x[i] * x[i];
  return s;
}

/* ---- inference with a KV cache --------------------------------------------------- */

static void cpu_embed_fwd(ot_backend *be, float *out, const int32_t *tokens, const int32_t *pos,
                          const float *wte, const float *wpe, int N, int C) {
#pragma omp parallel for num_threads(NT) schedule(static)
  for (int i = 0; i < N; i++) {
    const float *e = wte + (size_t)tokens[i] * C;
    float *o = out + (size_t)i * C;
    if (!wpe) {
      memcpy(o, e, sizeof(float) * C);
      continue;
    }
    const float *p = wpe + (size_t)pos[i] * C;
    for (int c = 0; c < C; c++) o[c] = e[c] + p[c];
  }
}

/* Online softmax (flash-attention style) over chunks of 64 keys: no scratch, one pass over the
 * cache; each (row, head) accumulates straight into its slice of out [N, NH*D]. Row i's query
 * heads start at q + i*ldq; head h reads key/value head h / (NH/NKV) of its sequence's blocks
 * (paged cache [n_blocks, bs, NKV*D], table [n_slots, mb]), positions 0..pos[i]. */
static void kv_attend(ot_backend *be, float *out, const float *q, size_t ldq, const float *kcache,
                      const float *vcache, const int32_t *pos, const int32_t *slot, const int32_t *table,
                      int N, int NH, int NKV, int D, int bs, int mb) {
  size_t KW = (size_t)NKV * D, QW = (size_t)NH * D;
  int group = NH / NKV;
  float scale = 1.0f / sqrtf((float)D);
#pragma omp parallel for collapse(2) num_threads(NT) schedule(dynamic, 4)
  for (int i = 0; i < N; i++) {
    for (int h = 0; h < NH; h++) {
      const float *qr = q + i * ldq + (size_t)h * D;
      const int32_t *tb = table + (size_t)slot[i] * mb;
      size_t hoff = (size_t)(h / group) * D;
      float *o = out + i * QW + (size_t)h * D;
      memset(o, 0, sizeof(float) * D);
      float m = -INFINITY, l = 0.0f, s[64];
      const float *vt[64];
      for (int t0 = 0; t0 <= pos[i]; t0 += 64) {
        int n = pos[i] + 1 - t0 < 64 ? pos[i] + 1 - t0 : 64;
        float bm = m;
        for (int j = 0; j < n; j++) {
          int t = t0 + j;
          size_t at = ((size_t)tb[t / bs] * bs + (size_t)(t % bs)) * KW + hoff;
          vt[j] = vcache + at;
          s[j] = dot(qr, kcache + at, D) * scale;
          if (s[j] > bm) bm = s[j];
        }
        if (bm > m) { /* rescale what was accumulated under the old maximum */
          float corr = expf(m - bm);
          l *= corr;
          for (int d = 0; d < D; d++) o[d] *= corr;
          m = bm;
        }
        for (int j = 0; j < n; j++) {
          float p = expf(s[j] - m);
          l += p;
          axpy(o, p, vt[j], D);
        }
      }
      float inv = 1.0f / l;
      for (int d = 0; d < D; d++) o[d] *= inv;
    }
  }
}

/* Row i's key and value [KW] (at k + i*ldk, v + i*ldk) into its sequence's block at pos[i]. */
static void kv_store(ot_backend *be, float *kcache, float *vcache, const float *k, const float *v, size_t ldk,
                     const int32_t *pos, const int32_t *slot, const int32_t *table, int N, size_t KW, int bs,
                     int mb) {
#pragma omp parallel for num_threads(NT) schedule(static)
  for (int i = 0; i < N; i++) {
    size_t at = ((size_t)table[(size_t)slot[i] * mb + pos[i] / bs] * bs + (size_t)(pos[i] % bs)) * KW;
    memcpy(kcache + at, k + i * ldk, sizeof(float) * KW);
    memcpy(vcache + at, v + i * ldk, sizeof(float) * KW);
  }
}

static void cpu_attention_kv_fwd(ot_backend *be, float *out, float *kcache, float *vcache, const float *qkv,
                                 const int32_t *pos, const int32_t *slot, const int32_t *table, int N, int C,
                                 int NH, int bs, int mb) {
  size_t C3 = (size_t)3 * C;
  kv_store(be, kcache, vcache, qkv + C, qkv + 2 * (size_t)C, C3, pos, slot, table, N, (size_t)C, bs, mb);
  kv_attend(be, out, qkv, C3, kcache, vcache, pos, slot, table, N, NH, NH, C / NH, bs, mb);
}

/* Rows are dealt to threads round-robin across segments, so one long prefill segment and many
 * one-row decode segments both spread over the threads; per row: r dot products over IN (the
 * shrink), then r axpys over OUT (the expand, B stored transposed). */
static void cpu_lora_sgmv_fwd(ot_backend *be, float *out, const float *x, const float *const *A,
                              const float *const *Bt, const int *row0, const int *n, const int *r,
                              const float *scale, int S, int IN, int OUT) {
#pragma omp parallel num_threads(NT)
  {
    int nt = omp_get_num_threads(), id = omp_get_thread_num(), k = 0;
    float t[64];
    for (int s = 0; s < S; s++)
      for (int i = row0[s]; i < row0[s] + n[s]; i++, k++) {
        if (k % nt != id) continue;
        const float *xi = x + (size_t)i * IN;
        float *oi = out + (size_t)i * OUT;
        for (int c0 = 0; c0 < r[s]; c0 += 64) { /* ranks above 64 in chunks */
          int c1 = r[s] - c0 < 64 ? r[s] : c0 + 64;
          for (int c = c0; c < c1; c++) t[c - c0] = scale[s] * dot(xi, A[s] + (size_t)c * IN, IN);
          for (int c = c0; c < c1; c++) axpy(oi, t[c - c0], Bt[s] + (size_t)c * OUT, OUT);
        }
      }
  }
}

/* ---- LLaMA family: RMSNorm, rotary embeddings, SwiGLU, grouped-query attention --------- */

static void cpu_rmsnorm_fwd(ot_backend *be, float *out, float *rstd, const float *inp, const float *w, int N,
                            int C, float eps) {
#pragma omp parallel for num_threads(NT) schedule(static)
  for (int i = 0; i < N; i++) {
    const float *x = inp + (size_t)i * C;
    float *o = out + (size_t)i * C;
    float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
    for (int c = 0; c < C; c++) ss += x[c] * x[c];
    float s = 1.0f / sqrtf(ss / (float)C + eps);
    for (int c = 0; c < C; c++) o[c] = x[c] * s * w[c];
    if (rstd) rstd[i] = s;
  }
}

static void cpu_rmsnorm_bwd(ot_backend *be, float *dinp, float *dw, const float *dout, const float *inp,
                            const float *w, const float *rstd, int N, int C) {
  if (dinp) {
    /* y = x s w: dx = s (w d) - x s^3 mean(w d x) */
#pragma omp parallel for num_threads(NT) schedule(static)
    for (int i = 0; i < N; i++) {
      const float *x = inp + (size_t)i * C, *d = dout + (size_t)i * C;
      float *dx = dinp + (size_t)i * C;
      float s = rstd[i], dot_ = 0.0f;
#pragma omp simd reduction(+ : dot_)
      for (int c = 0; c < C; c++) dot_ += w[c] * d[c] * x[c];
      float k = s * s * s * dot_ / (float)C;
      for (int c = 0; c < C; c++) dx[c] += s * w[c] * d[c] - k * x[c];
    }
  }
  if (dw) {
#pragma omp parallel num_threads(NT)
    {
      int nt = omp_get_num_threads(), id = omp_get_thread_num();
      int c0 = (int)((long)C * id / nt), c1 = (int)((long)C * (id + 1) / nt);
      for (int i = 0; i < N; i++) {
        const float *x = inp + (size_t)i * C, *d = dout + (size_t)i * C;
        float s = rstd[i];
        for (int c = c0; c < c1; c++) dw[c] += d[c] * x[c] * s;
      }
    }
  }
}

static void cpu_rope(ot_backend *be, float *x, const int32_t *pos, const float *inv_freq, int N, int H, int D,
                     int inverse) {
  int half = D / 2;
#pragma omp parallel for num_threads(NT) schedule(static)
  for (int i = 0; i < N; i++) {
    for (int j = 0; j < half; j++) {
      /* the angle in double: positions times frequencies lose digits in float */
      double a = (double)pos[i] * (double)inv_freq[j];
      float c = (float)cos(a), s = (float)(inverse ? -sin(a) : sin(a));
      for (int h = 0; h < H; h++) {
        float *r = x + ((size_t)i * H + h) * D;
        float x1 = r[j], x2 = r[j + half];
        r[j] = x1 * c - x2 * s;
        r[j + half] = x2 * c + x1 * s;
      }
    }
  }
}

static inline float silu(float g) { return g / (1.0f + expf(-g)); }

static void cpu_swiglu_fwd(ot_backend *be, float *out, const float *gate, const float *up, size_t n) {
#pragma omp parallel for num_threads(NT) schedule(static)
  for (size_t i = 0; i < n; i++) out[i] = silu(gate[i]) * up[i];
}

static void cpu_swiglu_bwd(ot_backend *be, float *dgate, float *dup, const float *dout, const float *gate,
                           const float *up, size_t n) {
#pragma omp parallel for num_threads(NT) schedule(static)
  for (size_t i = 0; i < n; i++) {
    float g = gate[i], sg = 1.0f / (1.0f + expf(-g)), d = dout[i], u = up[i];
    dgate[i] = d * u * sg * (1.0f + g * (1.0f - sg));
    dup[i] = d * g * sg;
  }
}

static void cpu_gqa_fwd(ot_backend *be, float *out, float *att, const float *q, const float *k,
                        const float *v, int B, int T, int NH, int NKV, int D) {
  float scale = 1.0f / sqrtf((float)D);
  size_t QW = (size_t)NH * D, KW = (size_t)NKV * D;
  int group = NH / NKV;
#pragma omp parallel for collapse(2) num_threads(NT) schedule(dynamic, 1)
  for (int b = 0; b < B; b++) {
    for (int h = 0; h < NH; h++) {
      int kh = h / group;
      for (int t = 0; t < T; t++) {
        const float *qr = q + ((size_t)b * T + t) * QW + (size_t)h * D;
        float *a = att + (((size_t)b * NH + h) * T + t) * T;
        float maxv = -INFINITY;
        for (int t2 = 0; t2 <= t; t2++) {
          float s = dot(qr, k + ((size_t)b * T + t2) * KW + (size_t)kh * D, D) * scale;
          a[t2] = s;
          if (s > maxv) maxv = s;
        }
        float sum = 0.0f;
        for (int t2 = 0; t2 <= t; t2++) {
          a[t2] = expf(a[t2] - maxv);
          sum += a[t2];
        }
        float inv = 1.0f / sum;
        for (int t2 = 0; t2 <= t; t2++) a[t2] *= inv;
        for (int t2 = t + 1; t2 < T; t2++) a[t2] = 0.0f;
        float *o = out + ((size_t)b * T + t) * QW + (size_t)h * D;
        memset(o, 0, sizeof(float) * D);
        for (int t2 = 0; t2 <= t; t2++) axpy(o, a[t2], v + ((size_t)b * T + t2) * KW + (size_t)kh * D, D);
      }
    }
  }
}

static void cpu_gqa_bwd(ot_backend *be, float *dq, float *dk, float *dv, float *datt, const float *dout,
                        const float *q, const float *k, const float *v, const float *att, int B, int T,
                        int NH, int NKV, int D) {
  float scale = 1.0f / sqrtf((float)D);
  size_t QW = (size_t)NH * D, KW = (size_t)NKV * D;
  int group = NH / NKV;
  /* One task per (batch, key/value head): its dk and dv gather every query head of the group. */
#pragma omp parallel for collapse(2) num_threads(NT) schedule(dynamic, 1)
  for (int b = 0; b < B; b++) {
    for (int kh = 0; kh < NKV; kh++) {
      for (int t = 0; t < T; t++) {
        memset(dk + ((size_t)b * T + t) * KW + (size_t)kh * D, 0, sizeof(float) * D);
        memset(dv + ((size_t)b * T + t) * KW + (size_t)kh * D, 0, sizeof(float) * D);
        for (int h = kh * group; h < (kh + 1) * group; h++)
          memset(dq + ((size_t)b * T + t) * QW + (size_t)h * D, 0, sizeof(float) * D);
      }
      for (int h = kh * group; h < (kh + 1) * group; h++) {
        for (int t = 0; t < T; t++) {
          const float *a = att + (((size_t)b * NH + h) * T + t) * T;
          float *da = datt + (((size_t)b * NH + h) * T + t) * T;
          const float *d = dout + ((size_t)b * T + t) * QW + (size_t)h * D;
          const float *qr = q + ((size_t)b * T + t) * QW + (size_t)h * D;
          float *dqr = dq + ((size_t)b * T + t) * QW + (size_t)h * D;
          float s = 0.0f;
          for (int t2 = 0; t2 <= t; t2++) {
            size_t kv = ((size_t)b * T + t2) * KW + (size_t)kh * D;
            da[t2] = dot(d, v + kv, D);
            axpy(dv + kv, a[t2], d, D);
            s += a[t2] * da[t2];
          }
          for (int t2 = 0; t2 <= t; t2++) {
            size_t kv = ((size_t)b * T + t2) * KW + (size_t)kh * D;
            float dpre = a[t2] * (da[t2] - s) * scale;
            axpy(dqr, dpre, k + kv, D);
            axpy(dk + kv, dpre, qr, D);
          }
        }
      }
    }
  }
}

static void cpu_gqa_kv_fwd(ot_backend *be, float *out, float *kcache, float *vcache, const float *q,
                           const float *k, const float *v, const int32_t *pos, const int32_t *slot,
                           const int32_t *table, int N, int NH, int NKV, int D, int bs, int mb) {
  size_t KW = (size_t)NKV * D;
  kv_store(be, kcache, vcache, k, v, KW, pos, slot, table, N, KW, bs, mb);
  kv_attend(be, out, q, (size_t)NH * D, kcache, vcache, pos, slot, table, N, NH, NKV, D, bs, mb);
}

static const ot_backend_ops cpu_ops = {
    .name = "cpu",
    .host_visible = 1,
    .destroy = cpu_destroy,
    .alloc = cpu_alloc,
    .free = cpu_free,
    .discard = cpu_discard,
    .upload = cpu_copy,
    .download = cpu_copy,
    .copy = cpu_copy,
    .zero = cpu_zero,
    .sync = cpu_sync,
    .encoder_fwd = cpu_encoder_fwd,
    .encoder_bwd = cpu_encoder_bwd,
    .layernorm_fwd = cpu_layernorm_fwd,
    .layernorm_bwd = cpu_layernorm_bwd,
    .matmul_fwd = cpu_matmul_fwd,
    .matmul_fwd_lowp = cpu_matmul_fwd_lowp,
    .matmul_bwd_lowp = cpu_matmul_bwd_lowp,
    .matmul_bwd = cpu_matmul_bwd,
    .attention_fwd = cpu_attention_fwd,
    .attention_bwd = cpu_attention_bwd,
    .gelu_fwd = cpu_gelu_fwd,
    .gelu_bwd = cpu_gelu_bwd,
    .add = cpu_add,
    .crossentropy_fwd = cpu_crossentropy_fwd,
    .crossentropy_bwd = cpu_crossentropy_bwd,
    .kd_fwd = cpu_kd_fwd,
    .kd_bwd = cpu_kd_bwd,
    .lora_fwd = cpu_lora_fwd,
    .lora_bwd = cpu_lora_bwd,
    .adamw = cpu_adamw,
    .sgd = cpu_sgd,
    .scale = cpu_scale,
    .sumsq = cpu_sumsq,
    .embed_fwd = cpu_embed_fwd,
    .attention_kv_fwd = cpu_attention_kv_fwd,
    .lora_sgmv_fwd = cpu_lora_sgmv_fwd,
    .rmsnorm_fwd = cpu_rmsnorm_fwd,
    .rmsnorm_bwd = cpu_rmsnorm_bwd,
    .rope = cpu_rope,
    .swiglu_fwd = cpu_swiglu_fwd,
    .swiglu_bwd = cpu_swiglu_bwd,
    .gqa_fwd = cpu_gqa_fwd,
    .gqa_bwd = cpu_gqa_bwd,
    .gqa_kv_fwd = cpu_gqa_kv_fwd,
};

int ot_backend_cpu_create(int n_threads, ot_backend **out) {
  if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma"))
    return ot_error(OT_ERR_UNSUPPORTED, "the CPU backend needs AVX2 and FMA, which this processor lacks");
  ot_backend *be = calloc(1, sizeof *be);
  cpu_ctx *ctx = calloc(1, sizeof *ctx);
  if (!be || !ctx) {
    free(be);
    free(ctx);
    return ot_error(OT_ERR_NOMEM, "cannot allocate the CPU backend");
  }
  be->ctx = ctx;
  be->ops = &cpu_ops;
  be->n_threads = n_threads > 0 ? n_threads : omp_get_num_procs();
  /* OpenBLAS (OpenMP build) reads its own thread count; keep it equal to ours. */
  openblas_set_num_threads(be->n_threads);
  *out = be;
  return OT_OK;
}

/* Every backend against the CPU reference, op by op, at several shapes (odd sizes that
 * are not multiples of any tile), and a few GPT-2 training steps. Without a GPU the
 * CUDA cases skip visibly; what runs everywhere: clean CUDA failure and CPU fallback,
 * the SGMV op (lora_sgmv_fwd) against a naive loop, and the whole harness with the CPU at 1 thread
 * against the CPU at 2 (results must not depend on the thread count).
 *
 * Tolerances (||dut - ref|| / ||ref|| per output tensor):
 *   pointwise ops 1e-5; row reductions (layernorm, softmax, KD, attention, column sums,
 *   scatter-adds) 5e-5; cuBLAS-based ops (matmul, LoRA) 1e-4 in fp32, 3e-2 in bf16 (8-bit
 *   mantissa inputs, fp32 accumulation). Training losses: 1e-4 fp32, 5e-3 bf16. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ot_backend.h"
#include "ot_error.h"
#include "ot_model.h"
#include "ot_optim.h"
#include "ot_safetensors.h"
#include "ot_test_util.h"

enum { POINT, REDUCE, GEMM };

/* test_backend_ops_emu: the same tests with the CUDA sources on tests/cuda_emu */
#ifdef OT_CUDA_EMULATED
#define EMU " [CPU emulation]"
#else
#define EMU ""
#endif

typedef struct {
  const char *name;
  ot_backend *be;
  int bf16;
} dut;

static ot_backend *ref;
static char cuda_why[512];

/* ---- a run: inputs generated identically on any backend, outputs fetched to the host ---- */

#define MAXB 24
typedef struct {
  ot_backend *be;
  uint64_t seed;
  void *bufs[MAXB];
  int nb;
  float *out[8];
  size_t nout[8];
  const char *oname[8];
  int ocls[8];
  int no;
} run;

static float urand(uint64_t *s) {
  return (float)((ot_mix64((*s)++) >> 11) * (2.0 / 9007199254740992.0) - 1.0);
}

static void *dev_from(run *r, const void *host, size_t bytes) {
  void *p;
  assert_int_equal(r->be->ops->alloc(r->be, bytes, &p), 0);
  assert_int_equal(r->be->ops->upload(r->be, p, host, bytes), 0);
  assert_true(r->nb < MAXB);
  r->bufs[r->nb++] = p;
  return p;
}

/* n floats uniform in [-a, a] (a shifted by `lo`: [lo - a, lo + a]) */
static float *in_rand(run *r, size_t n, float a, float lo) {
  float *h = malloc((n ? n : 1) * sizeof(float));
  for (size_t i = 0; i < n; i++) h[i] = lo + a * urand(&r->seed);
  float *d = dev_from(r, h, (n ? n : 1) * sizeof(float));
  free(h);
  return d;
}

/* tokens in [0, V); with neg, about one in five is -1 (ignored target) */
static int32_t *in_tokens(run *r, size_t n, int V, int neg) {
  int32_t *h = calloc(n + 1, sizeof(int32_t));
  for (size_t i = 0; i < n; i++) {
    uint64_t u = ot_mix64(r->seed++);
    h[i] = neg && u % 5 == 0 ? -1 : (int32_t)((u >> 8) % (uint64_t)V);
  }
  int32_t *d = dev_from(r, h, n * sizeof(int32_t));
  free(h);
  return d;
}

static void out_f(run *r, const char *name, int cls, const float *dev, size_t n) {
  assert_true(r->no < 8);
  float *h = malloc((n ? n : 1) * sizeof(float));
  int rc = r->be->ops->download(r->be, h, dev, n * sizeof(float));
  if (rc) fail_msg("%s: download of %s: %s", r->be->ops->name, name, ot_error_detail());
  r->out[r->no] = h;
  r->nout[r->no] = n;
  r->oname[r->no] = name;
  r->ocls[r->no++] = cls;
}

static void run_free(run *r) {
  for (int i = 0; i < r->nb; i++) r->be->ops->free(r->be, r->bufs[i]);
  for (int i = 0; i < r->no; i++) free(r->out[i]);
}

typedef void (*case_fn)(run *r, const int *d);

/* ---- the ops ------------------------------------------------------------------------ */

static void c_encoder_fwd(run *r, const int *d) { /* B T C V */
  int B = d[0], T = d[1], C = d[2], V = d[3];
  int32_t *tok = in_tokens(r, (size_t)B * T, V, 0);
  float *wte = in_rand(r, (size_t)V * C, 1, 0), *wpe = in_rand(r, (size_t)T * C, 1, 0);
  float *out = in_rand(r, (size_t)B * T * C, 1, 0);
  r->be->ops->encoder_fwd(r->be, out, tok, wte, wpe, B, T, C);
  out_f(r, "out", POINT, out, (size_t)B * T * C);
}

static void c_encoder_bwd(run *r, const int *d) { /* B T C V mask(1 dwte, 2 dwpe) */
  int B = d[0], T = d[1], C = d[2], V = d[3], mask = d[4];
  int32_t *tok = in_tokens(r, (size_t)B * T, V, 0);
  float *dout = in_rand(r, (size_t)B * T * C, 1, 0);
  float *dwte = in_rand(r, (size_t)V * C, 1, 0), *dwpe = in_rand(r, (size_t)T * C, 1, 0);
  r->be->ops->encoder_bwd(r->be, mask & 1 ? dwte : NULL, mask & 2 ? dwpe : NULL, dout, tok, B, T, C);
  out_f(r, "dwte", REDUCE, dwte, (size_t)V * C);
  out_f(r, "dwpe", REDUCE, dwpe, (size_t)T * C);
}

static void c_layernorm_fwd(run *r, const int *d) { /* N C */
  int N = d[0], C = d[1];
  float *x = in_rand(r, (size_t)N * C, 2, 0.5f), *w = in_rand(r, C, 1, 1), *b = in_rand(r, C, 1, 0);
  float *out = in_rand(r, (size_t)N * C, 1, 0), *mean = in_rand(r, N, 1, 0), *rstd = in_rand(r, N, 1, 0);
  r->be->ops->layernorm_fwd(r->be, out, mean, rstd, x, w, b, N, C, 1e-5f);
  out_f(r, "out", REDUCE, out, (size_t)N * C);
  out_f(r, "mean", REDUCE, mean, N);
  out_f(r, "rstd", REDUCE, rstd, N);
}

static void c_layernorm_bwd(run *r, const int *d) { /* N C mask(1 dinp, 2 dw, 4 db) */
  int N = d[0], C = d[1], mask = d[2];
  float *x = in_rand(r, (size_t)N * C, 2, 0.5f), *w = in_rand(r, C, 1, 1), *b = in_rand(r, C, 1, 0);
  float *out = in_rand(r, (size_t)N * C, 1, 0), *mean = in_rand(r, N, 1, 0), *rstd = in_rand(r, N, 1, 0);
  float *dout = in_rand(r, (size_t)N * C, 1, 0), *dinp = in_rand(r, (size_t)N * C, 1, 0);
  float *dw = in_rand(r, C, 1, 0), *db = in_rand(r, C, 1, 0);
  r->be->ops->layernorm_fwd(r->be, out, mean, rstd, x, w, b, N, C, 1e-5f);
  r->be->ops->layernorm_bwd(r->be, mask & 1 ? dinp : NULL, mask & 2 ? dw : NULL, mask & 4 ? db : NULL, dout,
                            x, w, mean, rstd, N, C);
  out_f(r, "dinp", REDUCE, dinp, (size_t)N * C);
  out_f(r, "dw", REDUCE, dw, C);
  out_f(r, "db", REDUCE, db, C);
}

static void c_matmul_fwd(run *r, const int *d) { /* N IN OUT layout bias */
  int N = d[0], IN = d[1], OUT = d[2];
  float *x = in_rand(r, (size_t)N * IN, 1, 0), *w = in_rand(r, (size_t)IN * OUT, 1, 0);
  float *b = d[4] ? in_rand(r, OUT, 1, 0) : NULL, *out = in_rand(r, (size_t)N * OUT, 1, 0);
  r->be->ops->matmul_fwd(r->be, out, x, w, b, N, IN, OUT, (ot_wlayout)d[3]);
  out_f(r, "out", GEMM, out, (size_t)N * OUT);
}

static void c_matmul_bwd(run *r, const int *d) { /* N IN OUT layout mask(1 dinp, 2 dw, 4 dbias) */
  int N = d[0], IN = d[1], OUT = d[2], mask = d[4];
  float *x = in_rand(r, (size_t)N * IN, 1, 0), *w = in_rand(r, (size_t)IN * OUT, 1, 0);
  float *dout = in_rand(r, (size_t)N * OUT, 1, 0), *dinp = in_rand(r, (size_t)N * IN, 1, 0);
  float *dw = in_rand(r, (size_t)IN * OUT, 1, 0), *db = in_rand(r, OUT, 1, 0);
  r->be->ops->matmul_bwd(r->be, mask & 1 ? dinp : NULL, mask & 2 ? dw : NULL, mask & 4 ? db : NULL, dout, x,
                         w, N, IN, OUT, (ot_wlayout)d[3]);
  out_f(r, "dinp", GEMM, dinp, (size_t)N * IN);
  out_f(r, "dw", GEMM, dw, (size_t)IN * OUT);
  out_f(r, "dbias", REDUCE, db, OUT);
}

static size_t att_floats(ot_backend *be, int B, int T, int C, int NH) {
  return be->ops->attention_state ? be->ops->attention_state(be, B, T, C, NH) : (size_t)B * NH * T * T;
}

static void c_attention(run *r, const int *d) { /* B T C NH */
  int B = d[0], T = d[1], C = d[2], NH = d[3];
  size_t N = (size_t)B * T, na = att_floats(r->be, B, T, C, NH);
  float *qkv = in_rand(r, N * 3 * C, 1.5f, 0), *out = in_rand(r, N * C, 1, 0);
  float *dout = in_rand(r, N * C, 1, 0), *dqkv = in_rand(r, N * 3 * C, 1, 0);
  /* sizes differ between backends: drawn last, so the inputs above are the same */
  float *att = in_rand(r, na, 1, 0), *datt = in_rand(r, na, 1, 0);
  r->be->ops->attention_fwd(r->be, out, att, qkv, B, T, C, NH);
  r->be->ops->attention_bwd(r->be, dqkv, datt, dout, qkv, att, B, T, C, NH);
  out_f(r, "out", REDUCE, out, N * C);
  out_f(r, "dqkv", REDUCE, dqkv, N * 3 * C);
  /* probabilities only where the backend keeps them (probed at T = 2: a log-sum-exp
   * backend needs 2 floats per head there, probabilities 4) */
  if (att_floats(r->be, 1, 2, C, NH) == (size_t)4 * NH) out_f(r, "att", REDUCE, att, na);
}

static void c_gelu(run *r, const int *d) { /* n */
  size_t n = (size_t)d[0];
  float *x = in_rand(r, n, 4, 0), *out = in_rand(r, n, 1, 0), *dout = in_rand(r, n, 1, 0);
  float *dx = in_rand(r, n, 1, 0);
  r->be->ops->gelu_fwd(r->be, out, x, n);
  r->be->ops->gelu_bwd(r->be, dx, x, dout, n);
  out_f(r, "out", POINT, out, n);
  out_f(r, "dinp", POINT, dx, n);
}

static void c_add_scale(run *r, const int *d) { /* n */
  size_t n = (size_t)d[0];
  float *a = in_rand(r, n, 1, 0), *b = in_rand(r, n, 1, 0), *out = in_rand(r, n, 1, 0);
  r->be->ops->add(r->be, out, a, b, n);
  r->be->ops->scale(r->be, a, -0.37f, n);
  out_f(r, "add", POINT, out, n);
  out_f(r, "scale", POINT, a, n);
  float s = (float)r->be->ops->sumsq(r->be, b, n);
  assert_int_equal(r->be->ops->sync(r->be), 0);
  float *h = malloc(sizeof(float));
  *h = s;
  r->out[r->no] = h;
  r->nout[r->no] = 1;
  r->oname[r->no] = "sumsq";
  r->ocls[r->no++] = REDUCE;
}

static void c_crossentropy(run *r, const int *d) { /* N V alias */
  int N = d[0], V = d[1], alias = d[2];
  size_t n = (size_t)N * V;
  float *logits = in_rand(r, n, 5, 0), *probs = alias ? logits : in_rand(r, n, 1, 0);
  float *losses = in_rand(r, N, 1, 0), *dl = alias ? logits : in_rand(r, n, 1, 0);
  int32_t *tg = in_tokens(r, N, V, 1);
  r->be->ops->crossentropy_fwd(r->be, losses, probs, logits, tg, N, V);
  out_f(r, "losses", REDUCE, losses, N);
  out_f(r, "probs", REDUCE, probs, n);
  r->be->ops->crossentropy_bwd(r->be, dl, probs, tg, 0.3f, N, V);
  out_f(r, "dlogits", REDUCE, dl, n);
}

static void c_kd(run *r, const int *d) { /* N C */
  int N = d[0], C = d[1];
  size_t n = (size_t)N * C;
  float *s = in_rand(r, n, 1, 0), *t = in_rand(r, n, 2, 0.1f), *l = in_rand(r, N, 1, 0),
        *ds = in_rand(r, n, 1, 0);
  r->be->ops->kd_fwd(r->be, l, s, t, N, C, 1e-6f);
  r->be->ops->kd_bwd(r->be, ds, s, t, 0.25f, N, C, 1e-6f);
  out_f(r, "losses", REDUCE, l, N);
  out_f(r, "ds", REDUCE, ds, n);
}

static void c_lora(run *r, const int *d) { /* N IN OUT r p*100 mask(1 dx, 2 dA, 4 dB) */
  int N = d[0], IN = d[1], OUT = d[2], R = d[3], mask = d[5];
  float p = (float)d[4] / 100.0f, sc = 2.0f;
  uint64_t seed = 0x5eed;
  float *x = in_rand(r, (size_t)N * IN, 1, 0), *A = in_rand(r, (size_t)R * IN, 1, 0);
  float *Bm = in_rand(r, (size_t)OUT * R, 1, 0), *out = in_rand(r, (size_t)N * OUT, 1, 0);
  float *t = in_rand(r, (size_t)N * R, 1, 0), *xd = in_rand(r, (size_t)N * IN, 1, 0);
  float *dout = in_rand(r, (size_t)N * OUT, 1, 0), *dx = in_rand(r, (size_t)N * IN, 1, 0);
  float *dA = in_rand(r, (size_t)R * IN, 1, 0), *dB = in_rand(r, (size_t)OUT * R, 1, 0);
  float *dt = in_rand(r, (size_t)N * R, 1, 0);
  r->be->ops->lora_fwd(r->be, out, t, xd, x, A, Bm, N, IN, OUT, R, sc, p, seed);
  out_f(r, "out", GEMM, out, (size_t)N * OUT);
  out_f(r, "t", GEMM, t, (size_t)N * R);
  r->be->ops->lora_bwd(r->be, mask & 1 ? dx : NULL, mask & 2 ? dA : NULL, mask & 4 ? dB : NULL, dt, xd, dout,
                       x, t, A, Bm, N, IN, OUT, R, sc, p, seed);
  out_f(r, "dx", GEMM, dx, (size_t)N * IN);
  out_f(r, "dA", GEMM, dA, (size_t)R * IN);
  out_f(r, "dB", GEMM, dB, (size_t)OUT * R);
}

static void c_adamw(run *r, const int *d) { /* n t */
  size_t n = (size_t)d[0];
  float *p = in_rand(r, n, 1, 0), *g = in_rand(r, n, 1, 0), *m = in_rand(r, n, 0.1f, 0);
  float *v = in_rand(r, n, 0.01f, 0.011f);
  r->be->ops->adamw(r->be, p, g, m, v, n, 1e-3f, 0.9f, 0.999f, 1e-8f, 0.1f, d[1]);
  out_f(r, "p", POINT, p, n);
  out_f(r, "g", POINT, g, n);
  out_f(r, "m", POINT, m, n);
  out_f(r, "v", POINT, v, n);
}

static void c_sgd(run *r, const int *d) { /* n momentum*100 first_step */
  size_t n = (size_t)d[0];
  float mom = (float)d[1] / 100.0f;
  float *p = in_rand(r, n, 1, 0), *g = in_rand(r, n, 1, 0), *buf = in_rand(r, n, 1, 0);
  r->be->ops->sgd(r->be, p, g, mom != 0.0f ? buf : NULL, n, 0.05f, mom, 0.01f, d[2]);
  out_f(r, "p", POINT, p, n);
  out_f(r, "g", POINT, g, n);
  out_f(r, "buf", POINT, buf, n);
}

/* Segments from d: IN OUT S gap, then S pairs (rows, rank). Segment s starts `gap` rows after the
 * end of segment s-1 (rows in no segment must stay untouched), and `gap` rows follow the last. */
static int sgmv_layout(const int *d, int *row0, int *n, int *rk) {
  int S = d[2], gap = d[3], at = 0;
  for (int s = 0; s < S; s++) {
    row0[s] = at + gap;
    n[s] = d[4 + 2 * s];
    rk[s] = d[5 + 2 * s];
    at = row0[s] + n[s];
  }
  return at + gap;
}

static void c_sgmv_fwd(run *r, const int *d) { /* IN OUT S gap (rows rank)... */
  int IN = d[0], OUT = d[1], S = d[2], row0[6], n[6], rk[6];
  int N = sgmv_layout(d, row0, n, rk);
  const float *A[6], *Bt[6];
  float scale[6];
  for (int s = 0; s < S; s++) {
    A[s] = in_rand(r, (size_t)rk[s] * IN, 1, 0);
    Bt[s] = in_rand(r, (size_t)rk[s] * OUT, 1, 0);
    scale[s] = 0.5f + (float)s;
  }
  float *x = in_rand(r, (size_t)N * IN, 1, 0), *out = in_rand(r, (size_t)N * OUT, 1, 0);
  r->be->ops->lora_sgmv_fwd(r->be, out, x, A, Bt, row0, n, rk, scale, S, IN, OUT);
  out_f(r, "out", GEMM, out, (size_t)N * OUT);
}

static int32_t *in_ints(run *r, const int32_t *h, size_t n) {
  return dev_from(r, h, (n ? n : 1) * sizeof(int32_t));
}

static void c_embed_fwd(run *r, const int *d) { /* N C V T_max */
  int N = d[0], C = d[1], V = d[2], T_max = d[3];
  int32_t *tok = in_tokens(r, N, V, 0), *p = calloc(N + 1, sizeof(int32_t));
  for (int i = 0; i < N; i++)
    p[i] = i == N - 1 ? T_max - 1 : (int32_t)(ot_mix64(r->seed++) % (uint64_t)T_max);
  int32_t *pos = in_ints(r, p, N);
  free(p);
  float *wte = in_rand(r, (size_t)V * C, 1, 0), *wpe = in_rand(r, (size_t)T_max * C, 1, 0);
  float *out = in_rand(r, (size_t)N * C, 1, 0);
  r->be->ops->embed_fwd(r->be, out, tok, pos, wte, wpe, N, C);
  out_f(r, "out", POINT, out, (size_t)N * C);
}

/* Rows of (slot, first position, rows) groups g[0..]: each group is a run of consecutive
 * positions of one slot (rows > 1: a prefill; 1: a decode step), the cache holding earlier
 * positions from before (random). Rows are dealt round-robin across groups, so one prefill's
 * rows are not contiguous in the batch. Returns N. */
static int kv_rows(const int *g, int max_groups, int32_t *ps, int32_t *sl) {
  int ng = 0, N = 0;
  while (ng < max_groups && g[3 * ng + 2] > 0) ng++;
  for (int k = 0, more = 1; more; k++) {
    more = 0;
    for (int j = 0; j < ng; j++) {
      if (k >= g[3 * j + 2]) continue;
      assert_true(N < 512);
      sl[N] = g[3 * j];
      ps[N++] = g[3 * j + 1] + k;
      more = 1;
    }
  }
  return N;
}

/* The block table of n_slots sequences of T_max positions in blocks of bs (0: fixed slots, one
 * block of T_max each, table[s] = s): the pool has 3 spare blocks and the sequences' blocks are
 * a random permutation of it, so neighbouring positions live in scattered blocks. */
static int32_t *kv_table(run *r, int n_slots, int T_max, int *bs, int *mb, int *nb) {
  int fixed = *bs == 0;
  if (fixed) *bs = T_max;
  *mb = (T_max + *bs - 1) / *bs;
  *nb = n_slots * *mb + (fixed ? 0 : 3);
  int32_t *perm = malloc((size_t)*nb * sizeof(int32_t));
  assert_non_null(perm);
  for (int i = 0; i < *nb; i++) perm[i] = i;
  for (int i = *nb - 1; i > 0 && !fixed; i--) {
    int j = (int)(ot_mix64(r->seed++) % (uint64_t)(i + 1)), t = perm[i];
    perm[i] = perm[j];
    perm[j] = t;
  }
  int32_t *t = in_ints(r, perm, (size_t)n_slots * *mb);
  free(perm);
  return t;
}

/* d: C NH T_max n_slots, then (slot, first position, rows) groups; bs: positions per block
 * (0 = fixed slots) */
static void attention_kv_case(run *r, const int *d, int bs) {
  int C = d[0], NH = d[1], T_max = d[2], ns = d[3], mb, nb;
  int32_t ps[512] = {0}, sl[512] = {0};
  int N = kv_rows(d + 4, 4, ps, sl);
  int32_t *table = kv_table(r, ns, T_max, &bs, &mb, &nb);
  size_t nc = (size_t)nb * bs * C;
  float *qkv = in_rand(r, (size_t)N * 3 * C, 1.5f, 0), *out = in_rand(r, (size_t)N * C, 1, 0);
  float *kc = in_rand(r, nc, 1.5f, 0), *vc = in_rand(r, nc, 1, 0);
  int32_t *pos = in_ints(r, ps, N), *slot = in_ints(r, sl, N);
  r->be->ops->attention_kv_fwd(r->be, out, kc, vc, qkv, pos, slot, table, N, C, NH, bs, mb);
  out_f(r, "out", REDUCE, out, (size_t)N * C);
  out_f(r, "kcache", POINT, kc, nc);
  out_f(r, "vcache", POINT, vc, nc);
}

static void c_attention_kv(run *r, const int *d) { attention_kv_case(r, d, 0); }
static void c_attention_kv_paged(run *r, const int *d) { attention_kv_case(r, d + 1, d[0]); }

/* ---- the LLaMA family's ops ---- */

static void c_rmsnorm(run *r, const int *d) { /* N C mask(1 dinp, 2 dw) */
  int N = d[0], C = d[1], mask = d[2];
  float *x = in_rand(r, (size_t)N * C, 2, 0.5f), *w = in_rand(r, C, 1, 1);
  float *out = in_rand(r, (size_t)N * C, 1, 0), *rstd = in_rand(r, N, 1, 0);
  float *dout = in_rand(r, (size_t)N * C, 1, 0), *dinp = in_rand(r, (size_t)N * C, 1, 0),
        *dw = in_rand(r, C, 1, 0);
  r->be->ops->rmsnorm_fwd(r->be, out, rstd, x, w, N, C, 1e-6f);
  r->be->ops->rmsnorm_bwd(r->be, mask & 1 ? dinp : NULL, mask & 2 ? dw : NULL, dout, x, w, rstd, N, C);
  out_f(r, "out", REDUCE, out, (size_t)N * C);
  out_f(r, "rstd", REDUCE, rstd, N);
  out_f(r, "dinp", REDUCE, dinp, (size_t)N * C);
  out_f(r, "dw", REDUCE, dw, C);
}

static void c_rope(run *r, const int *d) { /* N H D max_pos */
  int N = d[0], H = d[1], D = d[2];
  int32_t *p = calloc((size_t)N + 1, sizeof(int32_t));
  for (int i = 0; i < N; i++) p[i] = (int32_t)(ot_mix64(r->seed++) % (uint64_t)d[3]);
  int32_t *pos = in_ints(r, p, N);
  free(p);
  float fr[256];
  for (int j = 0; j < D / 2; j++) fr[j] = (float)pow(10000.0, -2.0 * j / D);
  float *inv = dev_from(r, fr, (size_t)(D / 2) * sizeof(float));
  float *x = in_rand(r, (size_t)N * H * D, 1, 0), *y = in_rand(r, (size_t)N * H * D, 1, 0);
  r->be->ops->rope(r->be, x, pos, inv, N, H, D, 0);
  r->be->ops->rope(r->be, y, pos, inv, N, H, D, 1);
  out_f(r, "rotated", POINT, x, (size_t)N * H * D);
  out_f(r, "inverse", POINT, y, (size_t)N * H * D);
}

static void c_swiglu(run *r, const int *d) { /* n */
  size_t n = (size_t)d[0];
  float *g = in_rand(r, n, 4, 0), *u = in_rand(r, n, 2, 0), *out = in_rand(r, n, 1, 0);
  float *dout = in_rand(r, n, 1, 0), *dg = in_rand(r, n, 1, 0), *du = in_rand(r, n, 1, 0);
  r->be->ops->swiglu_fwd(r->be, out, g, u, n);
  r->be->ops->swiglu_bwd(r->be, dg, du, dout, g, u, n);
  out_f(r, "out", POINT, out, n);
  out_f(r, "dgate", POINT, dg, n);
  out_f(r, "dup", POINT, du, n);
}

static void c_gqa(run *r, const int *d) { /* B T NH NKV D */
  int B = d[0], T = d[1], NH = d[2], NKV = d[3], D = d[4];
  size_t N = (size_t)B * T, QW = (size_t)NH * D, KW = (size_t)NKV * D, na = (size_t)B * NH * T * T;
  float *q = in_rand(r, N * QW, 1.5f, 0), *k = in_rand(r, N * KW, 1.5f, 0), *v = in_rand(r, N * KW, 1, 0);
  float *out = in_rand(r, N * QW, 1, 0), *dout = in_rand(r, N * QW, 1, 0);
  float *dq = in_rand(r, N * QW, 1, 0), *dk = in_rand(r, N * KW, 1, 0), *dv = in_rand(r, N * KW, 1, 0);
  float *att = in_rand(r, na, 1, 0), *datt = in_rand(r, na, 1, 0);
  r->be->ops->gqa_fwd(r->be, out, att, q, k, v, B, T, NH, NKV, D);
  r->be->ops->gqa_bwd(r->be, dq, dk, dv, datt, dout, q, k, v, att, B, T, NH, NKV, D);
  out_f(r, "out", REDUCE, out, N * QW);
  out_f(r, "dq", REDUCE, dq, N * QW);
  out_f(r, "dk", REDUCE, dk, N * KW);
  out_f(r, "dv", REDUCE, dv, N * KW);
  out_f(r, "att", REDUCE, att, na);
}

/* d: NH NKV D T_max n_slots, then (slot, first position, rows) groups as attention_kv */
static void gqa_kv_case(run *r, const int *d, int bs) {
  int NH = d[0], NKV = d[1], D = d[2], T_max = d[3], ns = d[4], mb, nb;
  int32_t ps[512] = {0}, sl[512] = {0};
  int N = kv_rows(d + 5, 3, ps, sl);
  int32_t *table = kv_table(r, ns, T_max, &bs, &mb, &nb);
  size_t KW = (size_t)NKV * D, QW = (size_t)NH * D, nc = (size_t)nb * bs * KW;
  float *q = in_rand(r, N * QW, 1.5f, 0), *k = in_rand(r, N * KW, 1.5f, 0), *v = in_rand(r, N * KW, 1, 0);
  float *out = in_rand(r, N * QW, 1, 0), *kc = in_rand(r, nc, 1.5f, 0), *vc = in_rand(r, nc, 1, 0);
  int32_t *pos = in_ints(r, ps, N), *slot = in_ints(r, sl, N);
  r->be->ops->gqa_kv_fwd(r->be, out, kc, vc, q, k, v, pos, slot, table, N, NH, NKV, D, bs, mb);
  out_f(r, "out", REDUCE, out, N * QW);
  out_f(r, "kcache", POINT, kc, nc);
  out_f(r, "vcache", POINT, vc, nc);
}

static void c_gqa_kv(run *r, const int *d) { gqa_kv_case(r, d, 0); }
static void c_gqa_kv_paged(run *r, const int *d) { gqa_kv_case(r, d + 1, d[0]); }

typedef struct {
  const char *op;
  case_fn fn;
  int d[20];
} op_case;

static const op_case cases[] = {
    {"encoder_fwd", c_encoder_fwd, {2, 5, 24, 50}},
    {"encoder_fwd", c_encoder_fwd, {3, 17, 77, 300}},
    {"encoder_bwd", c_encoder_bwd, {2, 5, 24, 7, 3}},
    {"encoder_bwd", c_encoder_bwd, {3, 17, 77, 11, 3}},
    {"encoder_bwd", c_encoder_bwd, {3, 17, 77, 11, 2}},
    {"layernorm_fwd", c_layernorm_fwd, {1, 8}},
    {"layernorm_fwd", c_layernorm_fwd, {37, 77}},
    {"layernorm_fwd", c_layernorm_fwd, {64, 768}},
    {"layernorm_bwd", c_layernorm_bwd, {1, 8, 7}},
    {"layernorm_bwd", c_layernorm_bwd, {37, 77, 7}},
    {"layernorm_bwd", c_layernorm_bwd, {300, 768, 6}},
    {"layernorm_bwd", c_layernorm_bwd, {37, 77, 1}},
    {"layernorm_bwd", c_layernorm_bwd, {600, 40, 7}}, /* column sums split over blocks */
    {"matmul_fwd", c_matmul_fwd, {1, 3, 5, OT_W_IN_OUT, 1}},
    {"matmul_fwd", c_matmul_fwd, {37, 77, 129, OT_W_IN_OUT, 1}},
    {"matmul_fwd", c_matmul_fwd, {37, 77, 129, OT_W_OUT_IN, 0}},
    {"matmul_fwd", c_matmul_fwd, {64, 256, 192, OT_W_OUT_IN, 1}},
    {"matmul_fwd", c_matmul_fwd, {130, 65, 33, OT_W_IN_OUT, 0}},
    {"matmul_bwd", c_matmul_bwd, {1, 3, 5, OT_W_IN_OUT, 7}},
    {"matmul_bwd", c_matmul_bwd, {37, 77, 129, OT_W_IN_OUT, 7}},
    {"matmul_bwd", c_matmul_bwd, {37, 77, 129, OT_W_OUT_IN, 7}},
    {"matmul_bwd", c_matmul_bwd, {130, 65, 33, OT_W_OUT_IN, 2}},
    {"matmul_bwd", c_matmul_bwd, {130, 65, 33, OT_W_IN_OUT, 5}},
    {"matmul_bwd", c_matmul_bwd, {520, 16, 20, OT_W_IN_OUT, 7}},
    {"attention", c_attention, {1, 1, 8, 2}},
    {"attention", c_attention, {2, 17, 48, 3}},  /* head size 16 */
    {"attention", c_attention, {2, 33, 64, 2}},  /* 32 */
    {"attention", c_attention, {2, 70, 128, 2}}, /* 64, T over two tiles */
    {"attention", c_attention, {1, 37, 256, 2}}, /* 128 */
    {"attention", c_attention, {1, 9, 320, 2}},  /* 160: beyond the fused kernel */
    {"attention", c_attention, {1, 129, 96, 3}}, /* 32, many tiles */
    {"gelu", c_gelu, {1}},
    {"gelu", c_gelu, {4099}},
    {"add/scale/sumsq", c_add_scale, {1}},
    {"add/scale/sumsq", c_add_scale, {10007}},
    {"crossentropy", c_crossentropy, {3, 5, 0}},
    {"crossentropy", c_crossentropy, {17, 1000, 0}},
    {"crossentropy", c_crossentropy, {4, 50257, 1}},
    {"kd", c_kd, {1, 7}},
    {"kd", c_kd, {33, 300}},
    {"lora", c_lora, {5, 16, 24, 4, 0, 7}},
    {"lora", c_lora, {37, 77, 129, 8, 10, 7}},
    {"lora", c_lora, {37, 77, 129, 8, 10, 4}},
    {"lora", c_lora, {37, 77, 129, 3, 0, 3}},
    {"adamw", c_adamw, {1, 1}},
    {"adamw", c_adamw, {4097, 5}},
    {"sgd", c_sgd, {1000, 90, 1}},
    {"sgd", c_sgd, {1000, 90, 0}},
    {"sgd", c_sgd, {1000, 0, 0}},
    /* IN OUT S gap (rows rank)...: ranks differ per segment, 70 is over the CPU's chunk of 64 */
    {"lora_sgmv_fwd", c_sgmv_fwd, {16, 24, 1, 0, 5, 4}},
    {"lora_sgmv_fwd", c_sgmv_fwd, {77, 129, 4, 1, 3, 8, 1, 1, 7, 3, 2, 70}},
    {"lora_sgmv_fwd", c_sgmv_fwd, {96, 33, 5, 0, 9, 16, 0, 4, 30, 5, 1, 2, 4, 7}},
    {"lora_sgmv_fwd", c_sgmv_fwd, {768, 2304, 3, 2, 1, 8, 1, 16, 6, 4}}, /* GPT-2 small's qkv */
    /* N C V T_max, the last row at T_max - 1 */
    {"embed_fwd", c_embed_fwd, {1, 8, 10, 4}},
    {"embed_fwd", c_embed_fwd, {37, 77, 300, 64}},
    {"embed_fwd", c_embed_fwd, {130, 768, 50, 1024}},
    /* C NH T_max slots (slot first-position rows)...: prefills, decodes up to T_max - 1 */
    {"attention_kv", c_attention_kv, {64, 4, 40, 3, 0, 0, 17, 1, 39, 1, 2, 30, 10}}, /* head size 16 */
    {"attention_kv", c_attention_kv, {45, 3, 33, 2, 0, 5, 28, 1, 32, 1}},            /* 15 */
    {"attention_kv", c_attention_kv, {128, 2, 130, 2, 0, 0, 130, 1, 129, 1}},        /* 64, 130 keys */
    {"attention_kv", c_attention_kv, {3, 3, 5, 2, 0, 0, 5, 1, 4, 1}},                /* 1 */
    {"attention_kv", c_attention_kv, {600, 2, 9, 1, 0, 3, 6}},                       /* 300: two passes */
    {"attention_kv", c_attention_kv, {256, 1, 70, 4, 3, 69, 1, 0, 69, 1, 2, 0, 1, 1, 60, 10}}, /* 256 */
    /* paged: block size, then as above; blocks scattered over a pool with spare blocks */
    {"attention_kv_paged", c_attention_kv_paged, {16, 64, 4, 40, 3, 0, 0, 17, 1, 39, 1, 2, 30, 10}},
    {"attention_kv_paged", c_attention_kv_paged, {1, 45, 3, 33, 2, 0, 5, 28, 1, 32, 1}},     /* 1 position */
    {"attention_kv_paged", c_attention_kv_paged, {7, 128, 2, 130, 2, 0, 0, 130, 1, 129, 1}}, /* odd */
    {"attention_kv_paged", c_attention_kv_paged, {4, 600, 2, 9, 1, 0, 3, 6}},
    {"attention_kv_paged", c_attention_kv_paged, {16, 256, 1, 70, 4, 3, 69, 1, 0, 69, 1, 2, 0, 1, 1, 60, 10}},
    /* N C mask */
    {"rmsnorm", c_rmsnorm, {1, 8, 3}},
    {"rmsnorm", c_rmsnorm, {37, 77, 3}},
    {"rmsnorm", c_rmsnorm, {300, 768, 1}},
    {"rmsnorm", c_rmsnorm, {64, 40, 2}},
    /* N H D max_pos */
    {"rope", c_rope, {1, 1, 2, 4}},
    {"rope", c_rope, {37, 3, 64, 4096}},
    {"rope", c_rope, {20, 8, 128, 100000}},
    {"swiglu", c_swiglu, {1}},
    {"swiglu", c_swiglu, {4099}},
    /* B T NH NKV D */
    {"gqa", c_gqa, {1, 1, 2, 1, 8}},
    {"gqa", c_gqa, {2, 17, 4, 2, 16}},
    {"gqa", c_gqa, {2, 33, 6, 1, 32}},
    {"gqa", c_gqa, {1, 40, 4, 4, 64}},
    {"gqa", c_gqa, {1, 9, 8, 2, 128}},
    /* NH NKV D T_max slots (slot first-position rows)... */
    {"gqa_kv", c_gqa_kv, {4, 2, 16, 40, 3, 0, 0, 17, 1, 39, 1, 2, 30, 10}},
    {"gqa_kv", c_gqa_kv, {8, 1, 64, 70, 2, 0, 5, 28, 1, 69, 1}},
    {"gqa_kv", c_gqa_kv, {2, 2, 256, 9, 1, 0, 3, 6}},
    {"gqa_kv_paged", c_gqa_kv_paged, {16, 4, 2, 16, 40, 3, 0, 0, 17, 1, 39, 1, 2, 30, 10}},
    {"gqa_kv_paged", c_gqa_kv_paged, {5, 8, 1, 64, 70, 2, 0, 5, 28, 1, 69, 1}},
    {"gqa_kv_paged", c_gqa_kv_paged, {1, 2, 2, 256, 9, 1, 0, 3, 6}},
};

static double tolerance(int cls, int bf16) {
  if (cls == POINT) return 1e-5;
  if (cls == REDUCE) return 5e-5;
  return bf16 ? 3e-2 : 1e-4;
}

/* Runs every case on the reference and on `d`; fails on the first output out of tolerance. */
static void compare_all(const dut *d) {
  double worst[3] = {0, 0, 0};
  for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
    const op_case *c = &cases[k];
    run a = {.be = ref, .seed = 1000 + k}, b = {.be = d->be, .seed = 1000 + k};
    c->fn(&a, c->d);
    c->fn(&b, c->d);
    assert_int_equal(b.be->ops->sync(b.be), 0);
    /* a backend with fused attention has no probabilities to compare (always the last output) */
    int n = a.no < b.no ? a.no : b.no;
    if (a.no != b.no) assert_string_equal((a.no > b.no ? a.oname : b.oname)[n], "att");
    for (int i = 0; i < n; i++) {
      double e = ot_test_rel_err(b.out[i], a.out[i], a.nout[i]), tol = tolerance(a.ocls[i], d->bf16);
      if (e > worst[a.ocls[i]]) worst[a.ocls[i]] = e;
      if (!(e <= tol)) {
        for (size_t j = 0; j < a.nout[i]; j++)
          if (fabsf(b.out[i][j] - a.out[i][j]) > 1e-3f + 1e-3f * fabsf(a.out[i][j])) {
            printf("first mismatch of %s at [%zu]: %g, cpu %g\n", a.oname[i], j, b.out[i][j], a.out[i][j]);
            break;
          }
        fail_msg("%s vs cpu: %s case %zu (%d %d %d %d %d), output %s: relative error %.3g > %.0e", d->name,
                 c->op, k, c->d[0], c->d[1], c->d[2], c->d[3], c->d[4], a.oname[i], e, tol);
      }
    }
    run_free(&a);
    run_free(&b);
  }
  printf("%s vs cpu: %zu cases; worst relative error pointwise %.2g, reductions %.2g, GEMM %.2g\n", d->name,
         sizeof cases / sizeof cases[0], worst[POINT], worst[REDUCE], worst[GEMM]);
}

/* ---- tests that run everywhere ------------------------------------------------------- */

static void test_cuda_create_fails_cleanly(void **state) {
  (void)state;
  ot_backend *be = (ot_backend *)&be; /* sentinel: must stay untouched on failure */
  int rc = ot_backend_cuda_create(0, 0, &be);
  if (rc == OT_OK) {
    printf("a CUDA device is present: creation succeeded (%s)\n", be->ops->name);
    assert_string_equal(be->ops->name, "cuda");
    ot_backend_free(be);
    return;
  }
  assert_int_equal(rc, OT_ERR_UNSUPPORTED);
  assert_ptr_equal(be, (ot_backend *)&be);
#ifdef OT_HAVE_CUDA
  assert_memory_equal(ot_error_detail(), "no CUDA device: ", 16);
#else
  assert_non_null(strstr(ot_error_detail(), "no CUDA backend"));
#endif
  printf("CUDA backend creation fails cleanly: %s\n", ot_error_detail());
  char why[512];
  snprintf(why, sizeof why, "%s", ot_error_detail());
  /* the generic entry point says the same, and the command path falls back to the CPU */
  assert_int_equal(ot_backend_create(OT_BACKEND_CUDA, 1, &be), OT_ERR_UNSUPPORTED);
  int fell_back = 0;
  assert_int_equal(ot_backend_create_or_cpu(OT_BACKEND_CUDA, 1, &be, &fell_back), OT_OK);
  assert_int_equal(fell_back, 1);
  assert_string_equal(be->ops->name, "cpu");
  assert_string_equal(ot_error_detail(), why);
  ot_backend_free(be);
  assert_int_equal(ot_backend_create_or_cpu(OT_BACKEND_CPU, 1, &be, &fell_back), OT_OK);
  assert_int_equal(fell_back, 0);
  ot_backend_free(be);
}

/* `--backend cuda` on a command: with no GPU a warning and the CPU's result; with one,
 * the GPU's perplexity matching the CPU's. */
static void test_cli_backend_cuda(void **state) {
  (void)state;
#ifdef OT_CUDA_EMULATED
  printf("SKIP: the commands link the real backend library, not the emulation\n");
  skip();
#endif
  char *dir = ot_test_tmpdir("backend_ops_cli");
  char path[512];
  snprintf(path, sizeof path, "%s/text.txt", dir);
  FILE *f = fopen(path, "w");
  assert_non_null(f);
  fputs(
      "The jury further said in term-end presentments that the City Executive Committee, which had over-all "
      "charge of the election, deserves the praise and thanks of the City of Atlanta for the manner in which "
      "the election was conducted.\n",
      f);
  fclose(f);
  static char out_cpu[1 << 14], out_cuda[1 << 14];
  const char *cmd =
      "%s/cloud/offtune-cloud eval --model %s/models/brown-8x128 --text %s --json --backend %s 2>&1";
  int rc = ot_test_run(out_cpu, sizeof out_cpu, cmd, ot_test_binary_dir(), ot_test_source_dir(), path, "cpu");
  if (rc) fail_msg("eval --backend cpu: %s", out_cpu);
  rc = ot_test_run(out_cuda, sizeof out_cuda, cmd, ot_test_binary_dir(), ot_test_source_dir(), path, "cuda");
  if (rc) fail_msg("eval --backend cuda: %s", out_cuda);
  double l_cpu = ot_test_json_number(strchr(out_cpu, '{'), "loss");
  double l_cuda = ot_test_json_number(strchr(out_cuda, '{'), "loss");
  ot_backend *be;
  if (ot_backend_cuda_create(0, 0, &be) == OT_OK) {
    ot_backend_free(be);
    printf("eval loss: cpu %.6f, cuda %.6f\n", l_cpu, l_cuda);
    assert_true(fabs(l_cuda - l_cpu) < 1e-4 * fabs(l_cpu));
  } else {
    const char *w = strstr(out_cuda, "warning: no CUDA");
    if (!w) w = strstr(out_cuda, "warning: this build of offtune has no CUDA backend");
    if (!w) fail_msg("no fallback warning in: %s", out_cuda);
    printf("eval --backend cuda without a GPU: %.*s", (int)(strchr(w, '\n') - w + 1), w);
    assert_true(l_cuda == l_cpu);
  }
  free(dir);
}

static void test_missing_op_is_an_error(void **state) {
  (void)state;
  assert_int_equal(OT_BACKEND_REQUIRE(ref, lora_sgmv_fwd), OT_OK);
  assert_int_equal(OT_BACKEND_REQUIRE(ref, embed_fwd), OT_OK);
  assert_int_equal(OT_BACKEND_REQUIRE(ref, attention_kv_fwd), OT_OK);
  assert_int_equal(OT_BACKEND_REQUIRE(ref, attention_state), OT_ERR_UNSUPPORTED); /* the CPU keeps full att */
  assert_non_null(strstr(ot_error_detail(), "cpu backend does not implement the attention_state op"));
}

/* lora_sgmv_fwd (CPU) against a naive double-precision loop: the other backends are compared
 * with the CPU, so the CPU itself is checked here; rows in no segment stay untouched. */
static void test_sgmv_cpu_reference(void **state) {
  (void)state;
  const int shapes[][16] = {{16, 24, 1, 0, 5, 4},
                            {77, 129, 4, 1, 3, 8, 1, 1, 7, 3, 2, 70},
                            {96, 33, 5, 0, 9, 16, 0, 4, 30, 5, 1, 2, 4, 7}};
  double worst = 0;
  for (size_t k = 0; k < sizeof shapes / sizeof shapes[0]; k++) {
    const int *d = shapes[k];
    int IN = d[0], OUT = d[1], S = d[2], row0[6], n[6], rk[6];
    int N = sgmv_layout(d, row0, n, rk);
    run a = {.be = ref, .seed = 77 + k};
    c_sgmv_fwd(&a, d);
    /* regenerate the same inputs on the host, in the order c_sgmv_fwd drew them */
    uint64_t s = 77 + k;
    float *A[6], *Bt[6];
    for (int i = 0; i < S; i++) {
      A[i] = malloc(sizeof(float) * (rk[i] * IN + 1));
      Bt[i] = malloc(sizeof(float) * (rk[i] * OUT + 1));
      for (int j = 0; j < rk[i] * IN; j++) A[i][j] = urand(&s);
      for (int j = 0; j < rk[i] * OUT; j++) Bt[i][j] = urand(&s);
    }
    float *x = malloc(sizeof(float) * N * IN), *out = malloc(sizeof(float) * N * OUT);
    for (int j = 0; j < N * IN; j++) x[j] = urand(&s);
    for (int j = 0; j < N * OUT; j++) out[j] = urand(&s);
    float *before = malloc(sizeof(float) * N * OUT);
    memcpy(before, out, sizeof(float) * N * OUT);
    for (int i = 0; i < S; i++)
      for (int row = row0[i]; row < row0[i] + n[i]; row++) {
        double t[80];
        for (int j = 0; j < rk[i]; j++) {
          t[j] = 0;
          for (int c = 0; c < IN; c++) t[j] += (double)x[row * IN + c] * A[i][j * IN + c];
        }
        for (int o = 0; o < OUT; o++) {
          double acc = 0;
          for (int j = 0; j < rk[i]; j++) acc += t[j] * Bt[i][j * OUT + o];
          out[row * OUT + o] = (float)(out[row * OUT + o] + (0.5 + i) * acc);
        }
      }
    double e = ot_test_rel_err(a.out[0], out, (size_t)N * OUT);
    if (e > worst) worst = e;
    if (!(e < 1e-5)) fail_msg("lora_sgmv_fwd case %zu: relative error %.3g against the naive loop", k, e);
    for (int row = 0; row < N; row++) {
      int in_seg = 0;
      for (int i = 0; i < S; i++) in_seg |= row >= row0[i] && row < row0[i] + n[i];
      if (!in_seg)
        for (int o = 0; o < OUT; o++) assert_true(a.out[0][row * OUT + o] == before[row * OUT + o]);
    }
    for (int i = 0; i < S; i++) {
      free(A[i]);
      free(Bt[i]);
    }
    free(x);
    free(out);
    free(before);
    run_free(&a);
  }
  printf("lora_sgmv_fwd (cpu) vs naive loop: worst relative error %.2g (tolerance 1e-5)\n", worst);
}

/* Products with low-precision weights (frozen weights kept in bf16, or int8 with a scale per output
 * feature) against a float64 loop over the same stored values: both layouts, widths that are not a
 * multiple of the kernel's block. */
static void test_matmul_lowp_cpu(void **state) {
  (void)state;
  const int shapes[][3] = {{7, 40, 300}, {5, 513, 256}, {3, 64, 17}};
  double worst[2] = {0, 0};
  for (size_t k = 0; k < sizeof shapes / sizeof shapes[0]; k++)
    for (int kind = 0; kind < 2; kind++)
      for (int layout = 0; layout < 2; layout++) {
        int N = shapes[k][0], IN = shapes[k][1], OUT = shapes[k][2];
        uint64_t s = 91 + k;
        uint16_t *w16 = malloc(sizeof(uint16_t) * IN * OUT);
        int8_t *w8 = malloc((size_t)IN * OUT);
        float *x = malloc(sizeof(float) * N * IN), *bias = malloc(sizeof(float) * OUT),
              *scale = malloc(sizeof(float) * OUT), *dout = malloc(sizeof(float) * N * OUT),
              *out = malloc(sizeof(float) * N * OUT), *dx = malloc(sizeof(float) * N * IN),
              *want = malloc(sizeof(float) * N * OUT), *want_dx = malloc(sizeof(float) * N * IN);
        for (int i = 0; i < IN * OUT; i++) {
          w16[i] = ot_f32_to_bf16(urand(&s));
          w8[i] = (int8_t)(lrintf(urand(&s) * 254.0f) % 128);
        }
        for (int i = 0; i < OUT; i++) scale[i] = 0.001f + 0.01f * fabsf(urand(&s));
        for (int i = 0; i < N * IN; i++) x[i] = urand(&s);
        for (int i = 0; i < OUT; i++) bias[i] = urand(&s);
        for (int i = 0; i < N * OUT; i++) dout[i] = urand(&s);
        /* W[i][o] is stored at i * OUT + o (IN_OUT) or o * IN + i (OUT_IN) */
        for (int r = 0; r < N; r++)
          for (int o = 0; o < OUT; o++) {
            double acc = bias[o];
            for (int i = 0; i < IN; i++) {
              size_t at = layout == OT_W_IN_OUT ? (size_t)i * OUT + o : (size_t)o * IN + i;
              double wv = kind == OT_LOWP_BF16 ? ot_bf16_to_f32(w16[at]) : (double)(w8[at] * scale[o]);
              acc += (double)x[r * IN + i] * wv;
            }
            want[r * OUT + o] = (float)acc;
          }
        for (int r = 0; r < N; r++)
          for (int i = 0; i < IN; i++) {
            double acc = 0;
            for (int o = 0; o < OUT; o++) {
              size_t at = layout == OT_W_IN_OUT ? (size_t)i * OUT + o : (size_t)o * IN + i;
              double wv = kind == OT_LOWP_BF16 ? ot_bf16_to_f32(w16[at]) : (double)(w8[at] * scale[o]);
              acc += (double)dout[r * OUT + o] * wv;
            }
            want_dx[r * IN + i] = (float)acc;
          }
        const void *w = kind == OT_LOWP_BF16 ? (const void *)w16 : (const void *)w8;
        ref->ops->matmul_fwd_lowp(ref, out, x, w, (ot_lowp)kind, scale, bias, N, IN, OUT, (ot_wlayout)layout);
        ref->ops->matmul_bwd_lowp(ref, dx, dout, w, (ot_lowp)kind, scale, N, IN, OUT, (ot_wlayout)layout);
        double e1 = ot_test_rel_err(out, want, (size_t)N * OUT),
               e2 = ot_test_rel_err(dx, want_dx, (size_t)N * IN);
        if (!(e1 < 1e-6) || !(e2 < 1e-6))
          fail_msg("%s products %dx%dx%d layout %d: relative error fwd %.3g bwd %.3g", kind ? "int8" : "bf16",
                   N, IN, OUT, layout, e1, e2);
        worst[kind] = fmax(worst[kind], fmax(e1, e2));
        free(w16);
        free(w8);
        free(x);
        free(bias);
        free(scale);
        free(dout);
        free(out);
        free(dx);
        free(want);
        free(want_dx);
      }
  printf("matmul_fwd_lowp / matmul_bwd_lowp (cpu) vs float64 loop: worst relative error bf16 %.2g, int8 %.2g "
         "(tolerance 1e-6)\n",
         worst[0], worst[1]);
}

static void test_ops_cpu_thread_count(void **state) {
  (void)state;
  dut d = {"cpu (1 thread)", NULL, 0};
  assert_int_equal(ot_backend_cpu_create(1, &d.be), 0);
  compare_all(&d);
  ot_backend_free(d.be);
}

/* ---- CUDA ---------------------------------------------------------------------------- */

/* The CUDA backend with these flags, or a visible skip saying why there is none. */
static ot_backend *cuda_or_skip(unsigned flags) {
  ot_backend *be;
  if (ot_backend_cuda_create(0, flags, &be) == OT_OK) return be;
  snprintf(cuda_why, sizeof cuda_why, "%s", ot_error_detail());
  printf("SKIP: %s\n", cuda_why);
  fflush(stdout);
  skip();
  return NULL;
}

static void test_ops_cuda_fp32_flash(void **state) {
  (void)state;
  dut d = {"cuda fp32 (fused attention)" EMU, cuda_or_skip(0), 0};
  compare_all(&d);
  ot_backend_free(d.be);
}

static void test_ops_cuda_fp32_materialised(void **state) {
  (void)state;
  dut d = {"cuda fp32 (materialised attention)" EMU, cuda_or_skip(OT_CUDA_NO_FLASH), 0};
  compare_all(&d);
  ot_backend_free(d.be);
}

static void test_ops_cuda_bf16(void **state) {
  (void)state;
  dut d = {"cuda bf16" EMU, cuda_or_skip(OT_CUDA_BF16), 1};
  compare_all(&d);
  ot_backend_free(d.be);
}

/* A small GPT-2 or grouped-query LLaMA (odd sequence length, 2 tiles of attention) trained
 * for a few AdamW steps on both backends from the same initialisation: the losses must agree. */
static void train_losses(ot_backend *be, ot_arch arch, int steps, float *losses) {
  ot_model_config cfg = {.n_layer = 3,
                         .n_head = 4,
                         .n_embd = 64,
                         .vocab_size = 211,
                         .n_positions = 64,
                         .layer_norm_epsilon = 1e-5f,
                         .arch = arch};
  if (arch == OT_ARCH_LLAMA) {
    cfg.n_kv_head = 2; /* grouped-query: rmsnorm, rope, swiglu, gqa on the backend */
    cfg.n_ff = 176;
    cfg.rope_theta = 10000.0f;
  }
  assert_int_equal(ot_model_config_complete(&cfg), 0);
  ot_model *m;
  ot_optimizer *opt;
  ot_optim_config oc;
  ot_optim_config_default(&oc, OT_OPTIM_ADAMW);
  assert_int_equal(ot_model_create(&cfg, be, &m), 0);
  assert_int_equal(ot_model_init_random(m, 7), 0);
  int B = 3, T = 45;
  assert_int_equal(ot_model_prepare(m, B, T, 1), 0);
  assert_int_equal(ot_optimizer_create(&oc, be, ot_model_param(m, 0), ot_model_param_count(m), &opt), 0);
  int32_t in[3 * 45], tg[3 * 45];
  uint64_t s = 3;
  for (int i = 0; i < B * T; i++) {
    in[i] = (int32_t)(ot_mix64(s++) % 211);
    tg[i] = i % 13 == 0 ? -1 : (int32_t)(ot_mix64(s++) % 211);
  }
  for (int k = 0; k < steps; k++) {
    int rc = ot_model_forward(m, in, tg, B, T, &losses[k]);
    if (rc == OT_OK) rc = ot_model_backward(m);
    if (rc == OT_OK) rc = ot_optimizer_step(opt, 3e-3f, NULL);
    if (rc) fail_msg("%s: training step %d: %s", be->ops->name, k, ot_error_detail());
  }
  ot_optimizer_free(opt);
  ot_model_free(m);
}

static void train_compare(ot_arch arch, unsigned flags, double tol) {
  ot_backend *be = cuda_or_skip(flags);
  float want[6], got[6];
  train_losses(ref, arch, 6, want);
  train_losses(be, arch, 6, got);
  for (int k = 0; k < 6; k++) {
    printf("%s step %d: loss cpu %.6f, cuda %.6f\n", ot_arch_name(arch), k, want[k], got[k]);
    if (!(fabs(got[k] - want[k]) <= tol * fabs(want[k])))
      fail_msg("step %d: cuda loss %.6f, cpu %.6f (relative tolerance %.0e)", k, got[k], want[k], tol);
  }
  assert_true(want[5] < want[0]); /* it did learn */
  ot_backend_free(be);
}

static void test_gpt2_train_cuda_fp32(void **state) {
  (void)state;
  train_compare(OT_ARCH_GPT2, 0, 1e-4);
}

static void test_gpt2_train_cuda_bf16(void **state) {
  (void)state;
  train_compare(OT_ARCH_GPT2, OT_CUDA_BF16, 5e-3);
}

static void test_llama_train_cuda_fp32(void **state) {
  (void)state;
  train_compare(OT_ARCH_LLAMA, 0, 1e-4);
}

static void test_llama_train_cuda_bf16(void **state) {
  (void)state;
  train_compare(OT_ARCH_LLAMA, OT_CUDA_BF16, 5e-3);
}

static int setup(void **state) {
  (void)state;
  return ot_backend_cpu_create(2, &ref);
}

static int teardown(void **state) {
  (void)state;
  ot_backend_free(ref);
  return 0;
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_cuda_create_fails_cleanly),
      cmocka_unit_test(test_cli_backend_cuda),
      cmocka_unit_test(test_missing_op_is_an_error),
      cmocka_unit_test(test_sgmv_cpu_reference),
      cmocka_unit_test(test_matmul_lowp_cpu),
      cmocka_unit_test(test_ops_cpu_thread_count),
      cmocka_unit_test(test_ops_cuda_fp32_flash),
      cmocka_unit_test(test_ops_cuda_fp32_materialised),
      cmocka_unit_test(test_ops_cuda_bf16),
      cmocka_unit_test(test_gpt2_train_cuda_fp32),
      cmocka_unit_test(test_gpt2_train_cuda_bf16),
      cmocka_unit_test(test_llama_train_cuda_fp32),
      cmocka_unit_test(test_llama_train_cuda_bf16),
  };
  return cmocka_run_group_tests(tests, setup, teardown);
}

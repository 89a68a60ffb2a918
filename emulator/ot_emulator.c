#include "ot_emulator.h"

#include <cjson/cJSON.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ot_json.h"
#include "ot_error.h"
#include "ot_fileio.h"
#include "ot_rng.h"
#include "ot_safetensors.h"

/* ---- layer drop ------------------------------------------------------------------ */

int ot_emu_layer_drop(int L, int a, int b, int k, int *kept) {
  if (a < 0 || b < 0) return ot_error(OT_ERR_INVALID, "bottom %d and top %d must be >= 0", a, b);
  int n = L - a - b;
  if (n < 1) return ot_error(OT_ERR_INVALID, "%d blocks leave no middle after bottom %d and top %d", L, a, b);
  if (k < 1 || k > n)
    return ot_error(OT_ERR_INVALID, "keep %d: must be between 1 and the middle's %d blocks", k, n);
  for (int i = 0; i < k; i++) {
    /* round(i*(n-1)/(k-1)) with halves rounded up, in integers so no float ties drift */
    long num = (long)i * (n - 1), den = k - 1;
    kept[i] = a + (k == 1 ? 0 : (int)((2 * num + den) / (2 * den)));
  }
  return OT_OK;
}

int ot_emu_keep_for_ratio(int L, int a, int b, float r, int *k) {
  int n = L - a - b;
  if (!(r >= 0.0f && r < 1.0f)) return ot_error(OT_ERR_INVALID, "drop ratio %g must be in [0, 1)", r);
  if (n < 1) return ot_error(OT_ERR_INVALID, "%d blocks leave no middle after bottom %d and top %d", L, a, b);
  int v = (int)lround(n * (1.0 - r));
  *k = v < 1 ? 1 : v;
  return OT_OK;
}

int ot_emu_plan_make(int L, int a, int b, int k, ot_emu_plan *out) {
  if (L > OT_EMU_MAX_LAYERS)
    return ot_error(OT_ERR_RANGE, "%d blocks: at most %d supported", L, OT_EMU_MAX_LAYERS);
  ot_emu_plan p;
  memset(&p, 0, sizeof p);
  int rc = ot_emu_layer_drop(L, a, b, k, p.src + a);
  if (rc) return rc;
  for (int i = 0; i < a; i++) p.src[i] = i;
  for (int j = 0; j < b; j++) p.src[a + k + j] = L - b + j;
  p.full_layers = L;
  p.bottom = a;
  p.top = b;
  p.keep = k;
  *out = p;
  return OT_OK;
}

/* ---- building ------------------------------------------------------------------- */

static int copy_param(ot_model *dst, int di, ot_model *src, int si) {
  ot_param *d = ot_model_param(dst, di), *s = ot_model_param(src, si);
  if (!d || !s || d->numel != s->numel)
    return ot_error(OT_ERR_INTERNAL, "parameter %d/%d do not match", di, si);
  ot_backend *be = ot_model_backend(dst);
  return be->ops->copy(be, d->data, s->data, d->numel * sizeof(float));
}

int ot_emu_build(ot_model *full, const ot_emu_plan *p, ot_model **out) {
  const ot_model_config *fc = ot_model_cfg(full);
  if (fc->n_layer != p->full_layers)
    return ot_error(OT_ERR_MISMATCH, "plan is for %d blocks, the model has %d", p->full_layers, fc->n_layer);
  ot_model_config cfg = *fc;
  cfg.n_layer = ot_emu_n_layer(p);
  ot_model *m = NULL;
  int rc = ot_model_create(&cfg, ot_model_backend(full), &m);
  if (rc) return rc;
  /* embeddings, final norm and head as they are; the kept blocks from their sources */
  for (int g = 0; g < OT_G_COUNT && rc == OT_OK; g++)
    if (ot_model_global_param_index(m, g) >= 0 && !(g == OT_G_HEAD && fc->tie_embeddings))
      rc = copy_param(m, ot_model_global_param_index(m, g), full, ot_model_global_param_index(full, g));
  for (int i = 0; i < cfg.n_layer && rc == OT_OK; i++)
    for (int k = 0; k < OT_R_COUNT && rc == OT_OK; k++)
      if (ot_model_block_param_index(m, i, k) >= 0)
        rc = copy_param(m, ot_model_block_param_index(m, i, k), full,
                        ot_model_block_param_index(full, p->src[i], k));
  if (rc == OT_OK) rc = ot_model_backend(full)->ops->sync(ot_model_backend(full));
  if (rc) {
    ot_model_free(m);
    return rc;
  }
  *out = m;
  return OT_OK;
}

void ot_emu_set_trainable(ot_model *emu, const ot_emu_plan *p, ot_emu_part part) {
  ot_model_set_all_trainable(emu, 0);
  for (int i = 0; i < ot_emu_n_layer(p); i++) {
    int adapter = ot_emu_is_adapter(p, i);
    if ((part == OT_EMU_TRAIN_ADAPTER) != adapter) continue;
    for (int k = 0; k < OT_R_COUNT; k++)
      if (ot_model_block_param_index(emu, i, k) >= 0)
        ot_model_param(emu, ot_model_block_param_index(emu, i, k))->trainable = 1;
  }
}

/* ---- a middle perturbed afresh each step -------------------------------------------- */

struct ot_emu_noise {
  ot_model *m;
  int n;          /* matrices */
  int *idx;       /* their parameter indices */
  float *sd;      /* noise standard deviation of each: scale x rms */
  float *orig;    /* the matrices as loaded, one after another */
  float *scratch; /* one perturbed matrix */
  size_t total;
  uint64_t seed;
};

void ot_emu_noise_free(ot_emu_noise *n) {
  if (!n) return;
  free(n->idx);
  free(n->sd);
  free(n->orig);
  free(n->scratch);
  free(n);
}

int ot_emu_noise_create(ot_model *emu, const ot_emu_plan *p, float scale, uint64_t seed, ot_emu_noise **out) {
  if (!(scale > 0 && scale <= 100))
    return ot_error(OT_ERR_INVALID, "middle noise %g: expected 0 < S <= 100", scale);
  if (ot_model_cfg(emu)->n_layer != ot_emu_n_layer(p))
    return ot_error(OT_ERR_MISMATCH, "emulator has %d blocks, the plan %d", ot_model_cfg(emu)->n_layer,
                    ot_emu_n_layer(p));
  ot_emu_noise *n = calloc(1, sizeof *n);
  int cap = p->keep * OT_R_COUNT;
  if (!n || !(n->idx = malloc(cap * sizeof(int))) || !(n->sd = malloc(cap * sizeof(float)))) {
    ot_emu_noise_free(n);
    return ot_error(OT_ERR_NOMEM, "cannot allocate");
  }
  n->m = emu;
  n->seed = seed;
  size_t largest = 0;
  int rc = OT_OK;
  for (int i = p->bottom; i < p->bottom + p->keep && rc == OT_OK; i++)
    for (int r = 0; r < OT_R_COUNT; r++) {
      int k = ot_model_block_param_index(emu, i, r);
      ot_param *t = k >= 0 ? ot_model_param(emu, k) : NULL;
      if (!t || t->ndim != 2) continue; /* norm gains and biases stay as they are */
      if (!t->data || t->trainable) {
        rc = ot_error(OT_ERR_INVALID, "middle noise needs the middle frozen and in fp32 (%s)", t->name);
        break;
      }
      n->idx[n->n++] = k;
      n->total += t->numel;
      if (t->numel > largest) largest = t->numel;
    }
  if (rc == OT_OK &&
      (!(n->orig = malloc(n->total * sizeof(float))) || !(n->scratch = malloc(largest * sizeof(float)))))
    rc = ot_error(OT_ERR_NOMEM, "cannot allocate %zu floats for the middle's copy", n->total);
  ot_backend *be = ot_model_backend(emu);
  float *h = n->orig;
  for (int j = 0; j < n->n && rc == OT_OK; j++) {
    ot_param *t = ot_model_param(emu, n->idx[j]);
    rc = be->ops->download(be, h, t->data, t->numel * sizeof(float));
    double ss = 0;
    for (size_t e = 0; e < t->numel; e++) ss += (double)h[e] * h[e];
    n->sd[j] = (float)(scale * sqrt(ss / (double)t->numel));
    h += t->numel;
  }
  if (rc) {
    ot_emu_noise_free(n);
    return rc;
  }
  *out = n;
  return OT_OK;
}

static int noise_write(ot_emu_noise *n, int perturb, int64_t step) {
  ot_backend *be = ot_model_backend(n->m);
  const float *h = n->orig;
  int rc = OT_OK;
  for (int j = 0; j < n->n && rc == OT_OK; j++) {
    ot_param *t = ot_model_param(n->m, n->idx[j]);
    const float *src = h;
    if (perturb) {
      /* one stream per (step, matrix): splitmix64 from a hash of both */
      uint64_t st = ot_dropout_seed(n->seed, (uint64_t)step, (uint64_t)j);
      ot_rng_fill_normal(&st, n->sd[j], n->scratch, t->numel);
      for (size_t e = 0; e < t->numel; e++) n->scratch[e] += h[e];
      src = n->scratch;
    }
    rc = be->ops->upload(be, t->data, src, t->numel * sizeof(float));
    h += t->numel;
  }
  return rc;
}

int ot_emu_noise_apply(ot_emu_noise *n, int64_t step) { return noise_write(n, 1, step); }
int ot_emu_noise_restore(ot_emu_noise *n) { return noise_write(n, 0, 0); }

void ot_emu_noise_size(const ot_emu_noise *n, int *tensors, size_t *scalars) {
  *tensors = n->n;
  *scalars = n->total;
}

/* ---- digests and the package ------------------------------------------------------ */

int ot_emu_save(const ot_model *emu, const ot_emu_plan *p, const ot_tokenizer *tok, const char *dir) {
  if (ot_model_cfg(emu)->n_layer != ot_emu_n_layer(p))
    return ot_error(OT_ERR_MISMATCH, "emulator has %d blocks, the plan %d", ot_model_cfg(emu)->n_layer,
                    ot_emu_n_layer(p));
  unsigned char int8[OT_EMU_MAX_LAYERS] = {0};
  for (int i = 0; i < p->keep && p->int8_middle; i++) int8[p->bottom + i] = 1; /* frozen on the device */
  int rc = ot_model_save_dir_int8(emu, dir, int8);
  if (rc == OT_OK) rc = ot_tokenizer_save_dir(tok, dir);
  return rc ? rc : ot_emu_write_plan(p, dir);
}

int ot_emu_write_plan(const ot_emu_plan *p, const char *dir) {
  int rc;
  cJSON *j = cJSON_CreateObject();
  if (j) {
    cJSON_AddNumberToObject(j, "format_version", 1);
    cJSON_AddStringToObject(j, "digest_algorithm", "blake2b-256");
    cJSON_AddStringToObject(j, "base_model_digest", p->base_digest);
    cJSON_AddNumberToObject(j, "full_n_layer", p->full_layers);
    cJSON_AddNumberToObject(j, "bottom", p->bottom);
    cJSON_AddNumberToObject(j, "top", p->top);
    cJSON_AddItemToObject(j, "kept_middle", ot_json_new_int_array(p->src + p->bottom, p->keep));
    cJSON_AddItemToObject(j, "block_source", ot_json_new_int_array(p->src, ot_emu_n_layer(p)));
    cJSON_AddBoolToObject(j, "middle_int8", p->int8_middle);
    if (p->base_name[0]) cJSON_AddStringToObject(j, "base_model_name", p->base_name);
    if (p->gap.tokens > 0) { /* what the model owner gives away, as the cloud measured it */
      cJSON *g = cJSON_AddObjectToObject(j, "measured_gap");
      if (g) {
        cJSON_AddStringToObject(g, "text", p->gap.text);
        cJSON_AddNumberToObject(g, "tokens", p->gap.tokens);
        cJSON_AddNumberToObject(g, "full_perplexity", p->gap.full_ppl);
        cJSON_AddNumberToObject(g, "emulator_perplexity", p->gap.emu_ppl);
        cJSON_AddNumberToObject(g, "gap", ot_emu_gap_value(&p->gap));
        if (p->gap.target > 0) cJSON_AddNumberToObject(g, "target", p->gap.target);
      }
    }
  }
  rc = ot_json_write(dir, "emulator.json", j);
  cJSON_Delete(j);
  return rc;
}

int ot_emu_plan_load(const char *dir, ot_emu_plan *out) {
  cJSON *j = NULL;
  int rc = ot_json_read(dir, "emulator.json", &j);
  if (rc) return rc;
  ot_emu_plan p;
  memset(&p, 0, sizeof p);
  int version = 0, kept[OT_EMU_MAX_LAYERS];
  rc = ot_json_int(j, "format_version", &version);
  if (rc == OT_OK && version != 1)
    rc = ot_error(OT_ERR_UNSUPPORTED, "%s/emulator.json: format_version %d (this build reads 1)", dir,
                  version);
  if (rc == OT_OK) rc = ot_json_int(j, "full_n_layer", &p.full_layers);
  if (rc == OT_OK) rc = ot_json_int(j, "bottom", &p.bottom);
  if (rc == OT_OK) rc = ot_json_int(j, "top", &p.top);
  if (rc == OT_OK) rc = ot_json_int_array(j, "kept_middle", kept, -1, OT_EMU_MAX_LAYERS, &p.keep);
  if (rc == OT_OK && (p.full_layers < 1 || p.full_layers > OT_EMU_MAX_LAYERS || p.bottom < 0 || p.top < 0 ||
                      p.keep < 1 || p.bottom + p.keep + p.top > p.full_layers))
    rc = ot_error(OT_ERR_FORMAT, "%s/emulator.json: inconsistent block counts", dir);
  if (rc == OT_OK)
    rc = ot_json_int_array(j, "block_source", p.src, ot_emu_n_layer(&p), OT_EMU_MAX_LAYERS, NULL);
  /* bottom and top are the full model's own first and last blocks; the middle ascends */
  for (int i = 0; i < ot_emu_n_layer(&p) && rc == OT_OK; i++) {
    int want_ok = i < p.bottom ? p.src[i] == i
                  : i >= p.bottom + p.keep
                      ? p.src[i] == p.full_layers - ot_emu_n_layer(&p) + i
                      : p.src[i] == kept[i - p.bottom] && p.src[i] >= p.bottom &&
                            p.src[i] < p.full_layers - p.top && (i == p.bottom || p.src[i] > p.src[i - 1]);
    if (!want_ok)
      rc = ot_error(OT_ERR_FORMAT, "%s/emulator.json: block_source[%d] = %d does not fit", dir, i, p.src[i]);
  }
  const cJSON *d = cJSON_GetObjectItemCaseSensitive(j, "base_model_digest");
  if (rc == OT_OK && !ot_json_hex_digest_ok(cJSON_GetStringValue(d)))
    rc = ot_error(OT_ERR_FORMAT, "%s/emulator.json: base_model_digest must be 64 hex digits", dir);
  if (rc == OT_OK) snprintf(p.base_digest, sizeof p.base_digest, "%s", cJSON_GetStringValue(d));
  p.int8_middle = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(j, "middle_int8")); /* absent: fp32 */
  const char *name = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(j, "base_model_name"));
  if (name && strlen(name) < sizeof p.base_name) snprintf(p.base_name, sizeof p.base_name, "%s", name);
  const cJSON *g = cJSON_GetObjectItemCaseSensitive(j, "measured_gap"); /* optional: informative only */
  if (rc == OT_OK && g) {
    const cJSON *fp = cJSON_GetObjectItemCaseSensitive(g, "full_perplexity"),
                *ep = cJSON_GetObjectItemCaseSensitive(g, "emulator_perplexity"),
                *tk = cJSON_GetObjectItemCaseSensitive(g, "tokens"),
                *tg = cJSON_GetObjectItemCaseSensitive(g, "target");
    const char *tx = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(g, "text"));
    if (!cJSON_IsNumber(fp) || !cJSON_IsNumber(ep) || !ot_json_is_int(tk) || !(fp->valuedouble >= 1.0) ||
        !(ep->valuedouble >= 1.0) || tk->valueint < 1 || (tg && !cJSON_IsNumber(tg)) || !tx)
      rc = ot_error(OT_ERR_FORMAT,
                    "%s/emulator.json: measured_gap needs text, tokens >= 1 and perplexities >= 1", dir);
    if (rc == OT_OK) {
      p.gap.full_ppl = fp->valuedouble;
      p.gap.emu_ppl = ep->valuedouble;
      p.gap.tokens = tk->valueint;
      p.gap.target = tg ? tg->valuedouble : 0.0;
      snprintf(p.gap.text, sizeof p.gap.text, "%s", tx);
    }
  }
  cJSON_Delete(j);
  if (rc == OT_OK) *out = p;
  return rc;
}

int ot_emu_load(const char *dir, ot_backend *be, ot_model **m, ot_tokenizer **tok, ot_emu_plan *p) {
  ot_emu_plan plan;
  ot_model *model = NULL;
  ot_tokenizer *t = NULL;
  int rc = ot_emu_plan_load(dir, &plan);
  if (rc == OT_OK) rc = ot_model_load_dir(dir, be, &model);
  if (rc == OT_OK && ot_model_cfg(model)->n_layer != ot_emu_n_layer(&plan))
    rc = ot_error(OT_ERR_MISMATCH, "%s: config.json has %d blocks, emulator.json %d", dir,
                  ot_model_cfg(model)->n_layer, ot_emu_n_layer(&plan));
  if (rc == OT_OK) rc = ot_tokenizer_load_dir_optional(dir, &t); /* none: token ids only */
  if (rc == OT_OK && t && ot_tokenizer_vocab_size(t) > ot_model_cfg(model)->vocab_size)
    rc = ot_error(OT_ERR_MISMATCH, "%s: tokenizer larger than the model's vocabulary", dir);
  if (rc) {
    ot_tokenizer_free(t);
    ot_model_free(model);
    return rc;
  }
  *m = model;
  *tok = t;
  *p = plan;
  return OT_OK;
}

/* ---- distillation ---------------------------------------------------------------- */

struct ot_distill {
  ot_model *teacher, *student;
  ot_emu_plan plan;
  int B, T;
  float w;
  float *ht, *dhs, *kdl; /* backend: teacher hidden [N,C], its gradient [N,C], per-row KD [N] */
  float *host_kdl;
  float last_ce, last_kd;
};

int ot_distill_create(ot_model *teacher, ot_model *student, const ot_emu_plan *p, int B, int T,
                      float kd_weight, ot_distill **out) {
  ot_backend *be = ot_model_backend(student);
  const ot_model_config *tc = ot_model_cfg(teacher), *sc = ot_model_cfg(student);
  if (be != ot_model_backend(teacher))
    return ot_error(OT_ERR_INVALID, "teacher and student need one backend");
  if (tc->n_layer != p->full_layers || sc->n_layer != ot_emu_n_layer(p) || tc->n_embd != sc->n_embd ||
      tc->vocab_size != sc->vocab_size)
    return ot_error(OT_ERR_MISMATCH, "teacher (%d blocks) and student (%d blocks) do not fit the plan",
                    tc->n_layer, sc->n_layer);
  ot_distill *d = calloc(1, sizeof *d);
  if (!d) return ot_error(OT_ERR_NOMEM, "cannot allocate distillation state");
  d->teacher = teacher;
  d->student = student;
  d->plan = *p;
  d->B = B;
  d->T = T;
  d->w = kd_weight;
  size_t N = (size_t)B * T, C = sc->n_embd;
  ot_emu_set_trainable(student, p, OT_EMU_TRAIN_MIDDLE);
  int rc = ot_model_prepare(teacher, B, T, 0);
  if (rc == OT_OK) rc = ot_model_prepare(student, B, T, 1);
  if (rc == OT_OK) rc = be->ops->alloc(be, N * C * sizeof(float), (void **)&d->ht);
  if (rc == OT_OK) rc = be->ops->alloc(be, N * C * sizeof(float), (void **)&d->dhs);
  if (rc == OT_OK) rc = be->ops->alloc(be, N * sizeof(float), (void **)&d->kdl);
  if (rc == OT_OK && !(d->host_kdl = malloc(N * sizeof(float))))
    rc = ot_error(OT_ERR_NOMEM, "cannot allocate");
  if (rc) {
    ot_distill_free(d);
    return rc;
  }
  *out = d;
  return OT_OK;
}

void ot_distill_free(ot_distill *d) {
  if (!d) return;
  ot_backend *be = ot_model_backend(d->student);
  if (d->ht) be->ops->free(be, d->ht);
  if (d->dhs) be->ops->free(be, d->dhs);
  if (d->kdl) be->ops->free(be, d->kdl);
  free(d->host_kdl);
  free(d);
}

int ot_distill_step(void *vd, const int32_t *inputs, const int32_t *targets, float *loss) {
  ot_distill *d = vd;
  ot_backend *be = ot_model_backend(d->student);
  int N = d->B * d->T, C = ot_model_cfg(d->student)->n_embd;
  int t_layer = d->plan.full_layers - d->plan.top - 1, s_layer = d->plan.bottom + d->plan.keep - 1;
  const float *hs = NULL;
  float ce = 0.0f;
  int rc = ot_model_forward_to_block(d->teacher, inputs, d->B, d->T, t_layer, d->ht);
  if (rc == OT_OK) rc = ot_model_forward(d->student, inputs, targets, d->B, d->T, &ce);
  if (rc == OT_OK) rc = ot_model_block_output(d->student, s_layer, &hs);
  if (rc) return rc;
  be->ops->kd_fwd(be, d->kdl, hs, d->ht, N, C, OT_EMU_KD_EPS);
  rc = be->ops->download(be, d->host_kdl, d->kdl, (size_t)N * sizeof(float));
  if (rc) return rc;
  double sum = 0.0;
  for (int i = 0; i < N; i++) sum += d->host_kdl[i];
  double denom = (double)N * C;
  be->ops->kd_bwd(be, d->dhs, hs, d->ht, (float)(d->w / denom), N, C, OT_EMU_KD_EPS);
  /* gradients are zero here: prepare zeroed them and each optimizer step consumes them */
  rc = ot_model_set_block_grad(d->student, s_layer, d->dhs);
  if (rc == OT_OK) rc = ot_model_backward(d->student);
  if (rc) return rc;
  d->last_ce = ce;
  d->last_kd = (float)(sum / denom);
  *loss = ce + d->w * d->last_kd;
  return OT_OK;
}

void ot_distill_last(const ot_distill *d, float *ce, float *kd) {
  *ce = d->last_ce;
  *kd = d->last_kd;
}

const ot_peft_map *ot_emu_peft_map(const ot_emu_plan *p, ot_peft_map *m) {
  _Static_assert(OT_EMU_MAX_LAYERS <= OT_PEFT_MAX_LAYERS, "an emulator's blocks fit a block map");
  memset(m, 0, sizeof *m);
  m->n_layer = ot_emu_n_layer(p);
  for (int i = 0; i < m->n_layer; i++) {
    m->full[i] = p->src[i];
    m->adapter[i] = (unsigned char)ot_emu_is_adapter(p, i);
  }
  snprintf(m->base_digest, sizeof m->base_digest, "%s", p->base_digest);
  snprintf(m->base_name, sizeof m->base_name, "%s", p->base_name);
  return m;
}

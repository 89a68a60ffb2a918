#include "ot_emulator.h"

#include <cjson/cJSON.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ot_emu_internal.h"
#include "ot_error.h"
#include "ot_fileio.h"
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

/* ---- digests and the package ------------------------------------------------------ */

cJSON *ot_emu_int_array(const int *v, int n) {
  cJSON *a = cJSON_CreateArray();
  for (int i = 0; a && i < n; i++) cJSON_AddItemToArray(a, cJSON_CreateNumber(v[i]));
  return a;
}

int ot_emu_write_json(const char *dir, const char *name, cJSON *j) {
  char *path = NULL, *text = j ? cJSON_Print(j) : NULL;
  int rc = text ? ot_path_join(dir, name, &path) : ot_error(OT_ERR_NOMEM, "cannot format %s", name);
  if (rc == OT_OK) rc = ot_file_write_atomic(path, text, strlen(text));
  free(path);
  free(text);
  return rc;
}

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
    cJSON_AddItemToObject(j, "kept_middle", ot_emu_int_array(p->src + p->bottom, p->keep));
    cJSON_AddItemToObject(j, "block_source", ot_emu_int_array(p->src, ot_emu_n_layer(p)));
    cJSON_AddBoolToObject(j, "middle_int8", p->int8_middle);
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
  rc = ot_emu_write_json(dir, "emulator.json", j);
  cJSON_Delete(j);
  return rc;
}

/* A JSON number that is an int. The range comes first: converting 1e10 to int is undefined
 * (fuzz_adapter_config found it with "format_version": -2.1e10). */
static int json_is_int(const cJSON *v) {
  return cJSON_IsNumber(v) && v->valuedouble >= INT_MIN && v->valuedouble <= INT_MAX &&
         v->valuedouble == (double)(int)v->valuedouble;
}

int ot_emu_json_int(const cJSON *j, const char *key, int *out) {
  const cJSON *v = cJSON_GetObjectItemCaseSensitive(j, key);
  if (!json_is_int(v)) return ot_error(OT_ERR_FORMAT, "'%s' must be an integer", key);
  *out = (int)v->valuedouble;
  return OT_OK;
}

/* Reads an integer array of exactly n entries (n < 0: any length up to cap). */
int ot_emu_json_int_array(const cJSON *j, const char *key, int *v, int n, int cap, int *count) {
  const cJSON *a = cJSON_GetObjectItemCaseSensitive(j, key);
  if (!cJSON_IsArray(a)) return ot_error(OT_ERR_FORMAT, "'%s' must be an array", key);
  int len = cJSON_GetArraySize(a);
  if ((n >= 0 && len != n) || len > cap) return ot_error(OT_ERR_FORMAT, "'%s' has %d entries", key, len);
  int i = 0;
  const cJSON *e;
  cJSON_ArrayForEach(e, a) {
    if (!json_is_int(e)) return ot_error(OT_ERR_FORMAT, "'%s' must hold integers", key);
    v[i++] = (int)e->valuedouble;
  }
  if (count) *count = len;
  return OT_OK;
}

int ot_emu_read_json(const char *dir, const char *name, cJSON **out) {
  char *path = NULL, *buf = NULL;
  size_t len;
  int rc = ot_path_join(dir, name, &path);
  if (rc == OT_OK) rc = ot_file_read_all(path, 1 << 20, &buf, &len);
  if (rc == OT_OK) {
    *out = cJSON_Parse(buf);
    if (!*out) rc = ot_error(OT_ERR_FORMAT, "%s: not valid JSON", path);
  }
  free(buf);
  free(path);
  return rc;
}

int ot_emu_hex_digest_ok(const char *s) {
  if (!s || strlen(s) != 64) return 0;
  for (int i = 0; i < 64; i++)
    if (!((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f'))) return 0;
  return 1;
}

int ot_emu_plan_load(const char *dir, ot_emu_plan *out) {
  cJSON *j = NULL;
  int rc = ot_emu_read_json(dir, "emulator.json", &j);
  if (rc) return rc;
  ot_emu_plan p;
  memset(&p, 0, sizeof p);
  int version = 0, kept[OT_EMU_MAX_LAYERS];
  rc = ot_emu_json_int(j, "format_version", &version);
  if (rc == OT_OK && version != 1)
    rc = ot_error(OT_ERR_UNSUPPORTED, "%s/emulator.json: format_version %d (this build reads 1)", dir,
                  version);
  if (rc == OT_OK) rc = ot_emu_json_int(j, "full_n_layer", &p.full_layers);
  if (rc == OT_OK) rc = ot_emu_json_int(j, "bottom", &p.bottom);
  if (rc == OT_OK) rc = ot_emu_json_int(j, "top", &p.top);
  if (rc == OT_OK) rc = ot_emu_json_int_array(j, "kept_middle", kept, -1, OT_EMU_MAX_LAYERS, &p.keep);
  if (rc == OT_OK && (p.full_layers < 1 || p.full_layers > OT_EMU_MAX_LAYERS || p.bottom < 0 || p.top < 0 ||
                      p.keep < 1 || p.bottom + p.keep + p.top > p.full_layers))
    rc = ot_error(OT_ERR_FORMAT, "%s/emulator.json: inconsistent block counts", dir);
  if (rc == OT_OK)
    rc = ot_emu_json_int_array(j, "block_source", p.src, ot_emu_n_layer(&p), OT_EMU_MAX_LAYERS, NULL);
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
  if (rc == OT_OK && !ot_emu_hex_digest_ok(cJSON_GetStringValue(d)))
    rc = ot_error(OT_ERR_FORMAT, "%s/emulator.json: base_model_digest must be 64 hex digits", dir);
  if (rc == OT_OK) snprintf(p.base_digest, sizeof p.base_digest, "%s", cJSON_GetStringValue(d));
  p.int8_middle = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(j, "middle_int8")); /* absent: fp32 */
  const cJSON *g = cJSON_GetObjectItemCaseSensitive(j, "measured_gap"); /* optional: informative only */
  if (rc == OT_OK && g) {
    const cJSON *fp = cJSON_GetObjectItemCaseSensitive(g, "full_perplexity"),
                *ep = cJSON_GetObjectItemCaseSensitive(g, "emulator_perplexity"),
                *tk = cJSON_GetObjectItemCaseSensitive(g, "tokens"),
                *tg = cJSON_GetObjectItemCaseSensitive(g, "target");
    const char *tx = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(g, "text"));
    if (!cJSON_IsNumber(fp) || !cJSON_IsNumber(ep) || !json_is_int(tk) || !(fp->valuedouble >= 1.0) ||
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

/* ---- offsite adapters ------------------------------------------------------------ */

/* Tensors per block of m (the roles its architecture has). */
static int block_tensors(ot_model *m) {
  int n = 0;
  for (int k = 0; k < OT_R_COUNT; k++) n += ot_model_block_param_index(m, 0, k) >= 0;
  return n;
}

int ot_offsite_save(ot_model *emu, const ot_emu_plan *p, const char *dir) {
  int nl = ot_emu_n_layer(p), n_adapter = p->bottom + p->top;
  if (ot_model_cfg(emu)->n_layer != nl) return ot_error(OT_ERR_MISMATCH, "emulator does not fit its plan");
  ot_backend *be = ot_model_backend(emu);
  int rc = ot_mkdir_p(dir);
  if (rc) return rc;
  size_t total = 0;
  for (int i = 0; i < nl; i++)
    if (ot_emu_is_adapter(p, i))
      for (int k = 0; k < OT_R_COUNT; k++)
        if (ot_model_block_param_index(emu, i, k) >= 0)
          total += ot_model_param(emu, ot_model_block_param_index(emu, i, k))->numel;
  float *host = malloc((total ? total : 1) * sizeof(float));
  char(*names)[128] = calloc((size_t)(n_adapter ? n_adapter : 1) * OT_R_COUNT, sizeof *names);
  const char *prefix = ot_arch_get(ot_model_cfg(emu)->arch)->block_prefix;
  char *st_path = NULL;
  ot_st_writer *w = NULL;
  if (!host || !names) rc = ot_error(OT_ERR_NOMEM, "cannot allocate adapter buffer");
  if (rc == OT_OK) rc = ot_st_writer_new(&w);
  if (rc == OT_OK) rc = ot_st_writer_set_metadata(w, "format", "pt");
  float *h = host;
  int t = 0;
  for (int i = 0; i < nl && rc == OT_OK; i++) {
    if (!ot_emu_is_adapter(p, i)) continue;
    for (int k = 0; k < OT_R_COUNT && rc == OT_OK; k++) {
      if (ot_model_block_param_index(emu, i, k) < 0) continue;
      ot_param *pr = ot_model_param(emu, ot_model_block_param_index(emu, i, k));
      int layer = 0;
      const char *rest = "";
      ot_block_tensor_split(pr->name, &layer, &rest);
      snprintf(names[t], sizeof names[t], "%s%d.%s", prefix, p->src[i], rest);
      rc = be->ops->download(be, h, pr->data, pr->numel * sizeof(float));
      int64_t shape[2] = {pr->shape[0], pr->shape[1]};
      if (rc == OT_OK) rc = ot_st_writer_add(w, names[t++], OT_DTYPE_F32, pr->ndim, shape, h);
      h += pr->numel;
    }
  }
  if (rc == OT_OK) rc = ot_path_join(dir, "adapter_model.safetensors", &st_path);
  if (rc == OT_OK) rc = ot_st_writer_save(w, st_path);
  char digest[OT_DIGEST_HEX];
  if (rc == OT_OK) rc = ot_file_digest(st_path, digest);
  if (rc == OT_OK) {
    int bottom[OT_EMU_MAX_LAYERS], top[OT_EMU_MAX_LAYERS];
    for (int i = 0; i < p->bottom; i++) bottom[i] = p->src[i];
    for (int j = 0; j < p->top; j++) top[j] = p->src[p->bottom + p->keep + j];
    cJSON *j = cJSON_CreateObject();
    if (j) {
      cJSON_AddStringToObject(j, "adapter_type", "offsite");
      cJSON_AddNumberToObject(j, "format_version", 1);
      cJSON_AddStringToObject(j, "digest_algorithm", "blake2b-256");
      cJSON_AddStringToObject(j, "base_model_digest", p->base_digest);
      cJSON_AddStringToObject(j, "adapter_digest", digest);
      cJSON_AddItemToObject(j, "bottom", ot_emu_int_array(bottom, p->bottom));
      cJSON_AddItemToObject(j, "top", ot_emu_int_array(top, p->top));
    }
    rc = ot_emu_write_json(dir, "adapter_config.json", j);
    cJSON_Delete(j);
  }
  ot_st_writer_free(w);
  free(st_path);
  free(names);
  free(host);
  return rc;
}

/* Local block of full block f: itself on the full model, the adapter block that came from
 * it on an emulator; -1 if none. */
int ot_emu_local_block(const ot_emu_plan *plan, int n_layer, int f) {
  if (!plan) return f >= 0 && f < n_layer ? f : -1;
  for (int i = 0; i < ot_emu_n_layer(plan); i++)
    if (ot_emu_is_adapter(plan, i) && plan->src[i] == f) return i;
  return -1;
}

int ot_offsite_apply(ot_model *m, const ot_emu_plan *plan, const char *base_digest, const char *dir) {
  int L = ot_model_cfg(m)->n_layer;
  if (plan) base_digest = plan->base_digest;
  cJSON *j = NULL;
  int rc = ot_emu_read_json(dir, "adapter_config.json", &j);
  if (rc) return rc;
  int version = 0, blocks[2 * OT_EMU_MAX_LAYERS], nb = 0, nt = 0;
  const char *type = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(j, "adapter_type"));
  const char *base = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(j, "base_model_digest"));
  const char *want = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(j, "adapter_digest"));
  if (!type || strcmp(type, "offsite") != 0)
    rc = ot_error(OT_ERR_UNSUPPORTED, "%s: adapter_type '%s' (expected offsite)", dir, type ? type : "?");
  if (rc == OT_OK) rc = ot_emu_json_int(j, "format_version", &version);
  if (rc == OT_OK && version != 1) rc = ot_error(OT_ERR_UNSUPPORTED, "%s: format_version %d", dir, version);
  if (rc == OT_OK && (!ot_emu_hex_digest_ok(base) || !ot_emu_hex_digest_ok(want)))
    rc = ot_error(OT_ERR_FORMAT, "%s: adapter_config.json needs base_model_digest and adapter_digest", dir);
  if (rc == OT_OK && strcmp(base, base_digest) != 0)
    rc = ot_error(OT_ERR_MISMATCH, "%s: adapter was tuned for base model %.16s..., this model is %.16s...",
                  dir, base, base_digest);
  if (rc == OT_OK) rc = ot_emu_json_int_array(j, "bottom", blocks, -1, OT_EMU_MAX_LAYERS, &nb);
  if (rc == OT_OK) rc = ot_emu_json_int_array(j, "top", blocks + nb, -1, OT_EMU_MAX_LAYERS, &nt);
  for (int i = 0; i < nb + nt && rc == OT_OK; i++)
    if (ot_emu_local_block(plan, L, blocks[i]) < 0)
      rc = ot_error(OT_ERR_MISMATCH, "%s: adapter block %d does not exist in this model", dir, blocks[i]);
  char got[OT_DIGEST_HEX], *st_path = NULL;
  if (rc == OT_OK) rc = ot_path_join(dir, "adapter_model.safetensors", &st_path);
  if (rc == OT_OK) rc = ot_file_digest(st_path, got);
  if (rc == OT_OK && strcmp(got, want) != 0)
    rc = ot_error(OT_ERR_MISMATCH,
                  "%s: adapter_model.safetensors does not match its recorded digest (tampered?)", st_path);
  ot_safetensors *st = NULL;
  if (rc == OT_OK) rc = ot_st_open(st_path, &st);
  /* stage every tensor on the host first, so a bad one changes nothing */
  int n_slots = (nb + nt) * OT_R_COUNT, n_need = (nb + nt) * block_tensors(m);
  const char *prefix = ot_arch_get(ot_model_cfg(m)->arch)->block_prefix;
  float **stage = rc == OT_OK ? calloc((size_t)(n_slots ? n_slots : 1), sizeof *stage) : NULL;
  ot_param **dst = rc == OT_OK ? calloc((size_t)(n_slots ? n_slots : 1), sizeof *dst) : NULL;
  if (rc == OT_OK && (!stage || !dst)) rc = ot_error(OT_ERR_NOMEM, "cannot allocate");
  int n_seen = 0;
  for (size_t i = 0; rc == OT_OK && i < ot_st_count(st); i++) {
    const ot_st_tensor *t = ot_st_at(st, i);
    int f = -1, slot = -1;
    const char *rest = NULL;
    if (ot_block_tensor_split(t->name, &f, &rest))
      for (int b = 0; b < nb + nt; b++)
        if (blocks[b] == f) slot = b;
    char local[128];
    ot_param *p = NULL;
    if (slot >= 0) {
      snprintf(local, sizeof local, "%s%d.%s", prefix, ot_emu_local_block(plan, L, f), rest);
      p = ot_model_find_param(m, local);
    }
    if (!p) {
      rc = ot_error(OT_ERR_MISMATCH, "%s: tensor '%s' is not a parameter of the adapter's blocks", st_path,
                    t->name);
      break;
    }
    int k;
    for (k = 0; k < OT_R_COUNT; k++)
      if (ot_model_param(m, ot_model_block_param_index(m, ot_emu_local_block(plan, L, f), k)) == p) break;
    if (k == OT_R_COUNT) {
      rc = ot_error(OT_ERR_MISMATCH, "%s: tensor '%s' is not a block weight", st_path, t->name);
      break;
    }
    int idx = slot * OT_R_COUNT + k;
    if (t->ndim != p->ndim || t->shape[0] != p->shape[0] || (p->ndim == 2 && t->shape[1] != p->shape[1])) {
      rc = ot_error(OT_ERR_MISMATCH, "%s: tensor '%s' has the wrong shape for this model", st_path, t->name);
      break;
    }
    if (stage[idx]) {
      rc = ot_error(OT_ERR_FORMAT, "%s: tensor '%s' appears twice", st_path, t->name);
      break;
    }
    stage[idx] = malloc(p->numel * sizeof(float));
    if (!stage[idx]) rc = ot_error(OT_ERR_NOMEM, "cannot allocate");
    if (rc == OT_OK) rc = ot_st_read_f32(st, t, stage[idx], p->numel);
    dst[idx] = p;
    n_seen++;
  }
  if (rc == OT_OK && n_seen != n_need)
    rc = ot_error(OT_ERR_MISMATCH, "%s: %d of the %d tensors of the adapter's blocks are missing", st_path,
                  n_need - n_seen, n_need);
  ot_backend *be = ot_model_backend(m);
  for (int i = 0; i < n_slots && rc == OT_OK; i++)
    if (dst[i]) rc = be->ops->upload(be, dst[i]->data, stage[i], dst[i]->numel * sizeof(float));
  if (rc == OT_OK) rc = be->ops->sync(be);
  for (int i = 0; stage && i < n_slots; i++) free(stage[i]);
  free(stage);
  free(dst);
  ot_st_close(st);
  free(st_path);
  cJSON_Delete(j);
  return rc;
}

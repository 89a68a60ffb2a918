#include "ot_adapter.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ot_emu_internal.h"
#include "ot_error.h"
#include "ot_fileio.h"
#include "ot_safetensors.h"

static const char *kind_names[] = {"offsite", "lora", "bottleneck", "bitfit"};
/* BitFit trains the biases an architecture has, norm biases included, in this order */
#define N_BIAS 8
static const int bias_roles[N_BIAS] = {OT_R_ATTN_NORM_B, OT_R_QKV_B, OT_R_Q_B,        OT_R_K_B,
                                       OT_R_V_B,         OT_R_O_B,   OT_R_FFN_NORM_B, OT_R_UP_B};
static const char *bn_sites[2] = {"attn", "mlp"};
static const char *bn_parts[4] = {"down.weight", "down.bias", "up.weight", "up.bias"};
#define PEFT_PREFIX "base_model.model."

void ot_adapter_config_default(ot_adapter_config *c) {
  *c = (ot_adapter_config){OT_ADAPTER_OFFSITE, 8, 16.0f, 0.05f, OT_SITES_ALL, 16, 0};
}

int ot_adapter_parse_kind(const char *name, ot_adapter_kind *out) {
  for (int k = 0; k < 4; k++)
    if (name && strcmp(name, kind_names[k]) == 0) {
      *out = (ot_adapter_kind)k;
      return OT_OK;
    }
  return ot_error(OT_ERR_INVALID, "adapter kind '%s': expected offsite, lora, bottleneck or bitfit",
                  name ? name : "");
}

const char *ot_adapter_kind_name(ot_adapter_kind k) { return (unsigned)k < 4 ? kind_names[k] : "?"; }

static int config_check(const ot_adapter_config *c) {
  if ((unsigned)c->kind > OT_ADAPTER_BITFIT)
    return ot_error(OT_ERR_INVALID, "unknown adapter kind %d", c->kind);
  if (c->kind == OT_ADAPTER_LORA && (c->lora_r < 1 || !(c->lora_alpha > 0.0f) || !isfinite(c->lora_alpha) ||
                                     !(c->lora_dropout >= 0.0f && c->lora_dropout < 1.0f) || !c->lora_sites ||
                                     c->lora_sites >> OT_SITE_COUNT))
    return ot_error(OT_ERR_INVALID,
                    "LoRA needs r >= 1, alpha > 0, dropout in [0, 1) and at least one target");
  if (c->kind == OT_ADAPTER_BOTTLENECK && c->bottleneck_dim < 1)
    return ot_error(OT_ERR_INVALID, "bottleneck size %d must be >= 1", c->bottleneck_dim);
  return OT_OK;
}

/* Biases of m that BitFit trains (roles into out[]); their number. */
static int bitfit_roles(ot_model *m, int *out) {
  int n = 0;
  for (int i = 0; i < N_BIAS; i++)
    if (ot_model_block_param_index(m, 0, bias_roles[i]) >= 0) out[n++] = bias_roles[i];
  int down = ot_model_block_param_index(m, 0, OT_R_DOWN_B) >= 0;
  if (down) out[n++] = OT_R_DOWN_B;
  return n;
}

/* LoRA sites of config c on model m: "all" means the sites the architecture has; naming one it
 * lacks is refused, not ignored. */
static int lora_sites_for(ot_model *m, const ot_adapter_config *c, unsigned *out) {
  unsigned have = ot_arch_sites(ot_model_cfg(m)->arch);
  if (c->lora_sites == OT_SITES_ALL) {
    *out = have;
    return OT_OK;
  }
  if (c->lora_sites & ~have)
    return ot_error(OT_ERR_UNSUPPORTED, "LoRA targets name a module a %s model does not have",
                    ot_arch_name(ot_model_cfg(m)->arch));
  *out = c->lora_sites;
  return OT_OK;
}

/* 1 if a block tensor (name after "{prefix}{i}.") belongs to the adapter kind. */
static int kind_owns(ot_model *m, ot_adapter_kind k, const char *rest) {
  if (k == OT_ADAPTER_OFFSITE) return 1;
  if (k == OT_ADAPTER_LORA) return strstr(rest, ".lora_") != NULL;
  if (k == OT_ADAPTER_BOTTLENECK) return strncmp(rest, "adapter_", 8) == 0;
  int roles[N_BIAS + 1], n = bitfit_roles(m, roles);
  const ot_arch_info *ai = ot_arch_get(ot_model_cfg(m)->arch);
  for (int i = 0; i < n; i++)
    if (strcmp(rest, ai->role_names[roles[i]]) == 0) return 1;
  return 0;
}

static ot_block_ext block_ext(const ot_adapter_config *c, unsigned sites) {
  ot_block_ext e = {0, 0, 0.0f, 0.0f, 0};
  if (c->kind == OT_ADAPTER_LORA) e = (ot_block_ext){sites, c->lora_r, c->lora_alpha, c->lora_dropout, 0};
  if (c->kind == OT_ADAPTER_BOTTLENECK) e.bottleneck = c->bottleneck_dim;
  return e;
}

int ot_adapter_attach(ot_model *emu, const ot_emu_plan *p, const ot_adapter_config *c) {
  int rc = config_check(c);
  if (rc) return rc;
  int L = ot_model_cfg(emu)->n_layer;
  if (L != ot_emu_n_layer(p)) return ot_error(OT_ERR_MISMATCH, "emulator does not fit its plan");
  if (c->kind == OT_ADAPTER_OFFSITE) {
    ot_emu_set_trainable(emu, p, OT_EMU_TRAIN_ADAPTER);
    return OT_OK;
  }
  int roles[N_BIAS + 1];
  if (c->kind == OT_ADAPTER_BITFIT && bitfit_roles(emu, roles) == 0)
    return ot_error(OT_ERR_UNSUPPORTED, "a %s model without biases has nothing for BitFit to train",
                    ot_arch_name(ot_model_cfg(emu)->arch));
  unsigned sites = 0;
  if (c->kind == OT_ADAPTER_LORA) rc = lora_sites_for(emu, c, &sites);
  if (rc) return rc;
  if (c->kind == OT_ADAPTER_LORA || c->kind == OT_ADAPTER_BOTTLENECK) {
    ot_block_ext *ext = calloc((size_t)L, sizeof *ext);
    if (!ext) return ot_error(OT_ERR_NOMEM, "cannot allocate");
    for (int i = 0; i < L; i++)
      if (ot_emu_is_adapter(p, i)) ext[i] = block_ext(c, sites);
    rc = ot_model_add_extensions(emu, ext, c->seed);
    free(ext);
    if (rc) return rc;
  }
  ot_model_set_all_trainable(emu, 0);
  for (int i = 0; i < ot_model_param_count(emu); i++) {
    ot_param *pr = ot_model_param(emu, i);
    int layer;
    const char *rest;
    if (ot_block_tensor_split(pr->name, &layer, &rest) && ot_emu_is_adapter(p, layer) &&
        kind_owns(emu, c->kind, rest))
      pr->trainable = 1;
  }
  return OT_OK;
}

/* ---- the tensors of an adapter ----------------------------------------------------- */

typedef struct {
  char file[160];  /* name in adapter_model.safetensors (full-model block index) */
  char local[128]; /* name in the model it goes to */
  int ndim, shape[2];
  size_t numel;
} want_t;

static void want_set(want_t *w, const char *pre, const char *block_prefix, int f, int l, const char *rest,
                     int d0, int d1) {
  snprintf(w->file, sizeof w->file, "%s%s%d.%s", pre, block_prefix, f, rest);
  snprintf(w->local, sizeof w->local, "%s%d.%s", block_prefix, l, rest);
  w->ndim = d1 ? 2 : 1;
  w->shape[0] = d0;
  w->shape[1] = d1;
  w->numel = (size_t)d0 * (d1 ? d1 : 1);
}

/* Expected tensors of model m's adapter for full blocks full[0..n) that are local blocks loc[];
 * *count entries. */
static int expected(ot_model *m, const ot_adapter_config *c, const int *full, const int *loc, int n,
                    want_t **out, int *count) {
  unsigned sites = 0;
  int rc = c->kind == OT_ADAPTER_LORA ? lora_sites_for(m, c, &sites) : OT_OK;
  if (rc) return rc;
  want_t *w = calloc((size_t)n * 2 * OT_SITE_COUNT + 1, sizeof *w);
  if (!w) return ot_error(OT_ERR_NOMEM, "cannot allocate");
  const ot_arch_info *ai = ot_arch_get(ot_model_cfg(m)->arch);
  int C = ot_model_cfg(m)->n_embd, k = 0, roles[N_BIAS + 1], nroles = bitfit_roles(m, roles);
  for (int b = 0; b < n; b++) {
    char rest[96];
    if (c->kind == OT_ADAPTER_LORA) {
      for (int s = 0; s < OT_SITE_COUNT; s++) {
        int in, outw;
        if (!((sites >> s) & 1)) continue;
        ot_model_site_dims(m, s, &in, &outw);
        snprintf(rest, sizeof rest, "%s.lora_A.weight", ai->site_modules[s]);
        want_set(&w[k++], PEFT_PREFIX, ai->block_prefix, full[b], loc[b], rest, c->lora_r, in);
        snprintf(rest, sizeof rest, "%s.lora_B.weight", ai->site_modules[s]);
        want_set(&w[k++], PEFT_PREFIX, ai->block_prefix, full[b], loc[b], rest, outw, c->lora_r);
      }
    } else if (c->kind == OT_ADAPTER_BOTTLENECK) {
      int d = c->bottleneck_dim;
      const int sh[4][2] = {{C, d}, {d, 0}, {d, C}, {C, 0}};
      for (int s = 0; s < 2; s++)
        for (int j = 0; j < 4; j++) {
          snprintf(rest, sizeof rest, "adapter_%s.%s", bn_sites[s], bn_parts[j]);
          want_set(&w[k++], "", ai->block_prefix, full[b], loc[b], rest, sh[j][0], sh[j][1]);
        }
    } else {
      for (int j = 0; j < nroles; j++) {
        const ot_param *p = ot_model_param(m, ot_model_block_param_index(m, loc[b], roles[j]));
        want_set(&w[k++], "", ai->block_prefix, full[b], loc[b], ai->role_names[roles[j]], p->shape[0], 0);
      }
    }
  }
  *out = w;
  *count = k;
  return OT_OK;
}

/* A float as JSON shows it in decimal (0.05, not 0.05000000074505806). */
static cJSON *json_float(float v) {
  char b[32];
  snprintf(b, sizeof b, "%.7g", v);
  return cJSON_CreateNumber(strtod(b, NULL));
}

int ot_adapter_save(ot_model *emu, const ot_emu_plan *p, const ot_adapter_config *c, const char *dir) {
  if (!c || c->kind == OT_ADAPTER_OFFSITE) return ot_offsite_save(emu, p, dir);
  int rc = config_check(c);
  if (rc) return rc;
  int L = ot_model_cfg(emu)->n_layer;
  if (L != ot_emu_n_layer(p)) return ot_error(OT_ERR_MISMATCH, "emulator does not fit its plan");
  int full[OT_EMU_MAX_LAYERS], loc[OT_EMU_MAX_LAYERS], n = 0;
  for (int i = 0; i < L; i++)
    if (ot_emu_is_adapter(p, i)) {
      full[n] = p->src[i];
      loc[n++] = i;
    }
  want_t *w = NULL;
  int nw = 0;
  rc = expected(emu, c, full, loc, n, &w, &nw);
  if (rc) return rc;
  unsigned sites = 0;
  if (c->kind == OT_ADAPTER_LORA) lora_sites_for(emu, c, &sites); /* checked by expected() */
  int gpt2 = ot_model_cfg(emu)->arch == OT_ARCH_GPT2;
  const ot_arch_info *ai = ot_arch_get(ot_model_cfg(emu)->arch);
  size_t total = 0;
  for (int i = 0; i < nw; i++) total += w[i].numel;
  float *host = malloc((total ? total : 1) * sizeof(float)), *h = host;
  ot_st_writer *wr = NULL;
  char *st_path = NULL, digest[OT_DIGEST_HEX];
  ot_backend *be = ot_model_backend(emu);
  rc = host ? ot_mkdir_p(dir) : ot_error(OT_ERR_NOMEM, "cannot allocate adapter buffer");
  if (rc == OT_OK) rc = ot_st_writer_new(&wr);
  if (rc == OT_OK) rc = ot_st_writer_set_metadata(wr, "format", "pt");
  for (int i = 0; i < nw && rc == OT_OK; i++) {
    ot_param *pr = ot_model_find_param(emu, w[i].local);
    if (!pr || pr->numel != w[i].numel) {
      rc = ot_error(OT_ERR_INVALID, "%s: the %s adapter is not attached to this emulator", w[i].local,
                    kind_names[c->kind]);
      break;
    }
    int64_t shape[2] = {w[i].shape[0], w[i].shape[1]};
    rc = be->ops->download(be, h, pr->data, pr->numel * sizeof(float));
    if (rc == OT_OK) rc = ot_st_writer_add(wr, w[i].file, OT_DTYPE_F32, w[i].ndim, shape, h);
    h += pr->numel;
  }
  if (rc == OT_OK) rc = ot_path_join(dir, "adapter_model.safetensors", &st_path);
  if (rc == OT_OK) rc = ot_st_writer_save(wr, st_path);
  if (rc == OT_OK) rc = ot_file_digest(st_path, digest);
  if (rc == OT_OK) {
    cJSON *j = cJSON_CreateObject();
    if (j && c->kind == OT_ADAPTER_LORA) { /* PEFT's LoraConfig keys; PEFT ignores the others */
      cJSON_AddStringToObject(j, "peft_type", "LORA");
      cJSON_AddStringToObject(j, "task_type", "CAUSAL_LM");
      cJSON_AddNullToObject(j, "base_model_name_or_path");
      cJSON_AddNumberToObject(j, "r", c->lora_r);
      cJSON_AddItemToObject(j, "lora_alpha", json_float(c->lora_alpha));
      cJSON_AddItemToObject(j, "lora_dropout", json_float(c->lora_dropout));
      cJSON *t = cJSON_AddArrayToObject(j, "target_modules");
      for (int s = 0; t && s < OT_SITE_COUNT; s++)
        if ((sites >> s) & 1) cJSON_AddItemToArray(t, cJSON_CreateString(ai->site_modules[s]));
      cJSON_AddBoolToObject(j, "fan_in_fan_out", gpt2); /* GPT-2's Conv1D stores W as [in, out] */
      cJSON_AddStringToObject(j, "bias", "none");
      cJSON_AddStringToObject(j, "layers_pattern", gpt2 ? "h" : "layers");
      cJSON_AddTrueToObject(j, "inference_mode");
    }
    if (j && c->kind == OT_ADAPTER_BOTTLENECK)
      cJSON_AddNumberToObject(j, "bottleneck_dim", c->bottleneck_dim);
    if (j) {
      cJSON_AddItemToObject(j, "layers_to_transform", ot_emu_int_array(full, n));
      cJSON_AddStringToObject(j, "adapter_type", kind_names[c->kind]);
      cJSON_AddNumberToObject(j, "format_version", 1);
      cJSON_AddStringToObject(j, "digest_algorithm", "blake2b-256");
      cJSON_AddStringToObject(j, "base_model_digest", p->base_digest);
      cJSON_AddStringToObject(j, "adapter_digest", digest);
    }
    rc = ot_emu_write_json(dir, "adapter_config.json", j);
    cJSON_Delete(j);
  }
  ot_st_writer_free(wr);
  free(st_path);
  free(host);
  free(w);
  return rc;
}

int ot_adapter_read_kind(const char *dir, ot_adapter_kind *out) {
  cJSON *j = NULL;
  int rc = ot_emu_read_json(dir, "adapter_config.json", &j);
  if (rc) return rc;
  const char *type = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(j, "adapter_type"));
  ot_adapter_kind k = OT_ADAPTER_OFFSITE;
  rc = ot_adapter_parse_kind(type, &k);
  if (rc)
    rc = ot_error(OT_ERR_UNSUPPORTED, "%s: adapter_type '%s' is not one offtune knows", dir,
                  type ? type : "?");
  cJSON_Delete(j);
  if (rc == OT_OK) *out = k;
  return rc;
}

static int json_float_in(const cJSON *j, const char *key, double lo, double hi, float *out) {
  const cJSON *v = cJSON_GetObjectItemCaseSensitive(j, key);
  if (!cJSON_IsNumber(v) || !(v->valuedouble >= lo && v->valuedouble < hi))
    return ot_error(OT_ERR_FORMAT, "'%s' must be a number in [%g, %g)", key, lo, hi);
  *out = (float)v->valuedouble;
  return OT_OK;
}

/* The adapter's settings from adapter_config.json (kind already known) for model m. */
static int read_settings(ot_model *m, const cJSON *j, ot_adapter_config *c) {
  int rc = OT_OK;
  if (c->kind == OT_ADAPTER_LORA) {
    rc = ot_emu_json_int(j, "r", &c->lora_r);
    if (rc == OT_OK && c->lora_r < 1) rc = ot_error(OT_ERR_FORMAT, "'r' must be >= 1");
    if (rc == OT_OK) rc = json_float_in(j, "lora_alpha", 1e-30, INFINITY, &c->lora_alpha);
    if (rc == OT_OK) rc = json_float_in(j, "lora_dropout", 0.0, 1.0, &c->lora_dropout);
    const cJSON *t = cJSON_GetObjectItemCaseSensitive(j, "target_modules"), *e;
    if (rc == OT_OK && !cJSON_IsArray(t)) rc = ot_error(OT_ERR_FORMAT, "'target_modules' must be a list");
    c->lora_sites = 0;
    unsigned have = ot_arch_sites(ot_model_cfg(m)->arch);
    if (rc == OT_OK) cJSON_ArrayForEach(e, t) {
        unsigned s = 0;
        if (!cJSON_IsString(e) || strchr(e->valuestring, ',') || ot_lora_parse_targets(e->valuestring, &s) ||
            !(s & have)) {
          rc = ot_error(OT_ERR_UNSUPPORTED, "target module '%.64s' is not a linear layer of a %s model",
                        cJSON_IsString(e) ? e->valuestring : "?", ot_arch_name(ot_model_cfg(m)->arch));
          break;
        }
        c->lora_sites |= s & have;
      }
    /* PEFT's flag for Conv1D weights stored [in, out]: it must say what the layers are */
    int gpt2 = ot_model_cfg(m)->arch == OT_ARCH_GPT2;
    const cJSON *f = cJSON_GetObjectItemCaseSensitive(j, "fan_in_fan_out");
    if (rc == OT_OK && ((gpt2 && f && !cJSON_IsTrue(f)) || (!gpt2 && cJSON_IsTrue(f))))
      rc = ot_error(OT_ERR_UNSUPPORTED, "fan_in_fan_out must be %s for a %s model", gpt2 ? "true" : "false",
                    ot_arch_name(ot_model_cfg(m)->arch));
    const cJSON *b = cJSON_GetObjectItemCaseSensitive(j, "bias");
    if (rc == OT_OK && b && !(cJSON_IsString(b) && strcmp(b->valuestring, "none") == 0))
      rc = ot_error(OT_ERR_UNSUPPORTED, "LoRA with trained biases (bias != \"none\")");
    if (rc == OT_OK && !c->lora_sites) rc = ot_error(OT_ERR_FORMAT, "'target_modules' is empty");
  } else if (c->kind == OT_ADAPTER_BOTTLENECK) {
    rc = ot_emu_json_int(j, "bottleneck_dim", &c->bottleneck_dim);
    if (rc == OT_OK && c->bottleneck_dim < 1) rc = ot_error(OT_ERR_FORMAT, "'bottleneck_dim' must be >= 1");
  }
  return rc;
}

static int ext_equal(const ot_block_ext *a, const ot_block_ext *b) {
  return a->lora_sites == b->lora_sites && a->bottleneck == b->bottleneck &&
         (!a->lora_sites || (a->lora_r == b->lora_r && a->lora_alpha == b->lora_alpha));
}

int ot_adapter_apply(ot_model *m, const ot_emu_plan *plan, const char *base_digest, const char *dir) {
  ot_adapter_config c;
  ot_adapter_config_default(&c);
  int rc = ot_adapter_read_kind(dir, &c.kind);
  if (rc) return rc;
  if (c.kind == OT_ADAPTER_OFFSITE) return ot_offsite_apply(m, plan, base_digest, dir);
  if (plan) base_digest = plan->base_digest;
  int L = ot_model_cfg(m)->n_layer;
  cJSON *j = NULL;
  rc = ot_emu_read_json(dir, "adapter_config.json", &j);
  if (rc) return rc;
  int version = 0, full[OT_EMU_MAX_LAYERS], loc[OT_EMU_MAX_LAYERS], n = 0;
  const char *base = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(j, "base_model_digest"));
  const char *want_digest = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(j, "adapter_digest"));
  rc = ot_emu_json_int(j, "format_version", &version);
  if (rc == OT_OK && version != 1) rc = ot_error(OT_ERR_UNSUPPORTED, "%s: format_version %d", dir, version);
  if (rc == OT_OK && (!ot_emu_hex_digest_ok(base) || !ot_emu_hex_digest_ok(want_digest)))
    rc = ot_error(OT_ERR_FORMAT, "%s: adapter_config.json needs base_model_digest and adapter_digest", dir);
  if (rc == OT_OK && strcmp(base, base_digest) != 0)
    rc = ot_error(OT_ERR_MISMATCH, "%s: adapter was tuned for base model %.16s..., this model is %.16s...",
                  dir, base, base_digest);
  if (rc == OT_OK) rc = read_settings(m, j, &c);
  if (rc == OT_OK) rc = ot_emu_json_int_array(j, "layers_to_transform", full, -1, OT_EMU_MAX_LAYERS, &n);
  if (rc == OT_OK && n < 1) rc = ot_error(OT_ERR_FORMAT, "%s: 'layers_to_transform' is empty", dir);
  for (int i = 0; i < n && rc == OT_OK; i++) {
    loc[i] = ot_emu_local_block(plan, L, full[i]);
    if (loc[i] < 0)
      rc = ot_error(OT_ERR_MISMATCH, "%s: adapter block %d does not exist in this model", dir, full[i]);
    for (int k = 0; k < i && rc == OT_OK; k++)
      if (full[k] == full[i]) rc = ot_error(OT_ERR_FORMAT, "%s: block %d listed twice", dir, full[i]);
  }
  char want_hex[OT_DIGEST_HEX] = "";
  if (rc == OT_OK) snprintf(want_hex, sizeof want_hex, "%s", want_digest);
  cJSON_Delete(j);
  char got[OT_DIGEST_HEX], *st_path = NULL;
  want_t *w = NULL;
  int nw = 0;
  if (rc == OT_OK) rc = expected(m, &c, full, loc, n, &w, &nw);
  /* the file can be no larger than its tensors in fp32 and their header: anything larger
   * (or not a regular file) is refused before a byte is read */
  uint64_t max_bytes = 8 + 4096;
  for (int k = 0; k < nw; k++) max_bytes += w[k].numel * sizeof(float) + 256;
  if (rc == OT_OK) rc = ot_path_join(dir, "adapter_model.safetensors", &st_path);
  if (rc == OT_OK) rc = ot_file_digest_max(st_path, max_bytes, got);
  if (rc == OT_OK && strcmp(got, want_hex) != 0)
    rc = ot_error(OT_ERR_MISMATCH,
                  "%s: adapter_model.safetensors does not match its recorded digest (tampered?)", st_path);
  /* stage every tensor on the host first, so a bad one changes nothing */
  float **stage = rc == OT_OK ? calloc((size_t)nw + 1, sizeof *stage) : NULL;
  if (rc == OT_OK && !stage) rc = ot_error(OT_ERR_NOMEM, "cannot allocate");
  ot_safetensors *st = NULL;
  if (rc == OT_OK) rc = ot_st_open(st_path, &st);
  for (size_t i = 0; rc == OT_OK && i < ot_st_count(st); i++) {
    const ot_st_tensor *t = ot_st_at(st, i);
    int k = 0;
    while (k < nw && strcmp(w[k].file, t->name) != 0) k++;
    if (k == nw) {
      rc = ot_error(OT_ERR_MISMATCH, "%s: tensor '%s' is not part of this %s adapter", st_path, t->name,
                    kind_names[c.kind]);
      break;
    }
    if (t->ndim != w[k].ndim || t->shape[0] != w[k].shape[0] ||
        (w[k].ndim == 2 && t->shape[1] != w[k].shape[1])) {
      rc = ot_error(OT_ERR_MISMATCH, "%s: tensor '%s' has the wrong shape for this model", st_path, t->name);
      break;
    }
    if (stage[k]) {
      rc = ot_error(OT_ERR_FORMAT, "%s: tensor '%s' appears twice", st_path, t->name);
      break;
    }
    stage[k] = malloc(w[k].numel * sizeof(float));
    rc = stage[k] ? ot_st_read_f32(st, t, stage[k], w[k].numel) : ot_error(OT_ERR_NOMEM, "cannot allocate");
  }
  for (int k = 0; k < nw && rc == OT_OK; k++)
    if (!stage[k]) rc = ot_error(OT_ERR_MISMATCH, "%s: tensor '%s' is missing", st_path, w[k].file);
  /* LoRA and bottleneck tensors need their extensions: added here, or already the same */
  if (rc == OT_OK && (c.kind == OT_ADAPTER_LORA || c.kind == OT_ADAPTER_BOTTLENECK)) {
    ot_block_ext *ext = calloc((size_t)L, sizeof *ext);
    if (!ext) rc = ot_error(OT_ERR_NOMEM, "cannot allocate");
    for (int i = 0; i < n && ext; i++) ext[loc[i]] = block_ext(&c, c.lora_sites);
    if (rc == OT_OK && ot_model_param_count(m) > ot_model_base_param_count(m)) {
      for (int l = 0; l < L && rc == OT_OK; l++)
        if (!ext_equal(&ext[l], ot_model_block_ext(m, l)))
          rc = ot_error(OT_ERR_MISMATCH, "%s: the model already carries other adapter tensors (block %d)",
                        dir, l);
    } else if (rc == OT_OK) {
      rc = ot_model_add_extensions(m, ext, c.seed);
    }
    free(ext);
  }
  ot_backend *be = ot_model_backend(m);
  for (int k = 0; k < nw && rc == OT_OK; k++) {
    ot_param *p = ot_model_find_param(m, w[k].local);
    if (!p || p->numel != w[k].numel) rc = ot_error(OT_ERR_INTERNAL, "%s: no such model tensor", w[k].local);
    if (rc == OT_OK) rc = be->ops->upload(be, p->data, stage[k], p->numel * sizeof(float));
  }
  if (rc == OT_OK) rc = be->ops->sync(be);
  for (int k = 0; stage && k < nw; k++) free(stage[k]);
  free(stage);
  free(w);
  ot_st_close(st);
  free(st_path);
  return rc;
}

int ot_adapter_merge(ot_model *m, const char *base_digest, const char *dir) {
  ot_adapter_kind k;
  int rc = ot_adapter_read_kind(dir, &k);
  if (rc) return rc;
  if (k != OT_ADAPTER_LORA)
    return ot_error(OT_ERR_UNSUPPORTED, "%s: only LoRA adapters merge into the base weights (this one is %s)",
                    dir, kind_names[k]);
  if (ot_model_param_count(m) > ot_model_base_param_count(m))
    return ot_error(OT_ERR_INVALID, "merge needs a plain model without adapter tensors");
  rc = ot_adapter_apply(m, NULL, base_digest, dir);
  return rc ? rc : ot_model_merge_lora(m);
}

/* Adapter directories: writing (format 2), reading formats 1 and 2, PEFT's adapter_config.json
 * both ways, and importing a LoRA saved by Hugging Face PEFT. */
#include <cjson/cJSON.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "ot_error.h"
#include "ot_fileio.h"
#include "ot_json.h"
#include "ot_peft_internal.h"
#include "ot_safetensors.h"

static int gpt2_layout(ot_arch a) { return a == OT_ARCH_GPT2; } /* Conv1D [in, out]: fan_in_fan_out */

/* The error rc again, its detail prefixed with the directory it is about. */
static int in_dir(int rc, const char *dir) {
  char detail[512];
  snprintf(detail, sizeof detail, "%s", ot_error_detail());
  return ot_error(rc, "%s: %s", dir, detail);
}

/* ---- PEFT's adapter_config.json ---------------------------------------------------------- */

static cJSON *peft_config_json(const ot_peft_adapter *a) {
  const ot_arch_info *ai = ot_arch_get(a->arch);
  cJSON *j = cJSON_CreateObject();
  if (!j) return NULL;
  cJSON_AddStringToObject(j, "peft_type", "LORA");
  cJSON_AddStringToObject(j, "task_type", "CAUSAL_LM");
  if (a->base_name[0])
    cJSON_AddStringToObject(j, "base_model_name_or_path", a->base_name);
  else
    cJSON_AddNullToObject(j, "base_model_name_or_path");
  cJSON_AddNullToObject(j, "revision");
  cJSON_AddTrueToObject(j, "inference_mode");
  cJSON_AddNumberToObject(j, "r", a->c.lora_r);
  cJSON_AddItemToObject(j, "lora_alpha", ot_json_new_float(a->c.lora_alpha));
  cJSON_AddItemToObject(j, "lora_dropout", ot_json_new_float(a->c.lora_dropout));
  cJSON *t = cJSON_AddArrayToObject(j, "target_modules");
  for (int s = 0; t && s < OT_SITE_COUNT; s++)
    if ((a->c.lora_sites >> s) & 1) cJSON_AddItemToArray(t, cJSON_CreateString(ai->site_modules[s]));
  cJSON_AddBoolToObject(j, "fan_in_fan_out", gpt2_layout(a->arch));
  cJSON_AddStringToObject(j, "bias", "none");
  cJSON_AddBoolToObject(j, "use_rslora", a->c.lora_rslora);
  cJSON_AddFalseToObject(j, "use_dora");
  cJSON_AddTrueToObject(j, "init_lora_weights");
  cJSON_AddItemToObject(j, "layers_to_transform", ot_json_new_int_array(a->blocks, a->n_blocks));
  cJSON_AddStringToObject(j, "layers_pattern", gpt2_layout(a->arch) ? "h" : "layers");
  cJSON_AddItemToObject(j, "rank_pattern", cJSON_CreateObject());
  cJSON_AddItemToObject(j, "alpha_pattern", cJSON_CreateObject());
  cJSON_AddNullToObject(j, "modules_to_save");
  cJSON_AddStringToObject(j, "peft_version", OT_PEFT_VERSION);
  return j;
}

/* A value that leaves PEFT's default behaviour: anything but null, false, "", {} or []. */
static int is_set(const cJSON *v) {
  if (!v || cJSON_IsNull(v) || cJSON_IsFalse(v)) return 0;
  if (cJSON_IsString(v)) return v->valuestring[0] != '\0';
  if (cJSON_IsArray(v) || cJSON_IsObject(v)) return v->child != NULL;
  return 1;
}

/* Keys PEFT writes that do not change the adapter's maths at inference (or that are read
 * below): accepted whatever their value. */
static const char *const peft_plain_keys[] = {
    "peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "r", "lora_alpha",
    "lora_dropout", "target_modules", "fan_in_fan_out", "bias", "use_rslora", "init_lora_weights",
    "layers_to_transform", "layers_pattern", "auto_mapping", "peft_version", "runtime_config", "eva_config",
    "corda_config", "qalora_group_size", "megatron_core", "ensure_weight_tying",
    /* offtune's own fields of format 1, read by the caller */
    "adapter_type", "format_version", "digest_algorithm", "base_model_digest", "adapter_digest",
    "bottleneck_dim", NULL};

/* Keys whose non-default value changes the maths, with what it means. */
static const struct {
  const char *key, *what;
} peft_refused[] = {{"use_dora", "DoRA (weight-decomposed LoRA)"},
                    {"rank_pattern", "per-module ranks (rank_pattern)"},
                    {"alpha_pattern", "per-module alphas (alpha_pattern)"},
                    {"modules_to_save", "fully trained extra modules (modules_to_save)"},
                    {"layer_replication", "layer replication"},
                    {"loftq_config", "LoftQ (the adapter expects a quantised base)"},
                    {"megatron_config", "Megatron-parallel LoRA layers"},
                    {"lora_bias", "a bias on lora_B (lora_bias)"},
                    {"use_qalora", "QALoRA"},
                    {"exclude_modules", "excluded modules (exclude_modules)"},
                    {"target_parameters", "LoRA on parameters (target_parameters)"},
                    {"trainable_token_indices", "trainable token embeddings"},
                    {"alora_invocation_tokens", "activated LoRA (alora_invocation_tokens)"},
                    {"arrow_config", "Arrow routing (arrow_config)"},
                    {NULL, NULL}};

int ot_peft_parse_lora_config(const cJSON *j, const ot_model_config *cfg, ot_peft_config *c, int *blocks,
                              int *n_blocks) {
  if (!cJSON_IsObject(j)) return ot_error(OT_ERR_FORMAT, "adapter_config.json is not a JSON object");
  const cJSON *e;
  cJSON_ArrayForEach(e, j) {
    for (int i = 0; peft_refused[i].key; i++)
      if (strcmp(e->string, peft_refused[i].key) == 0 && is_set(e))
        return ot_error(OT_ERR_UNSUPPORTED,
                        "'%s': offtune does not implement %s, and ignoring it would change "
                        "the adapter's maths",
                        e->string, peft_refused[i].what);
    int known = 0;
    for (int i = 0; !known && peft_plain_keys[i]; i++) known = strcmp(e->string, peft_plain_keys[i]) == 0;
    for (int i = 0; !known && peft_refused[i].key; i++) known = strcmp(e->string, peft_refused[i].key) == 0;
    if (!known && is_set(e))
      return ot_error(OT_ERR_UNSUPPORTED,
                      "'%.64s' in adapter_config.json is not a setting offtune knows; "
                      "refused rather than ignored",
                      e->string);
  }
  const char *type = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(j, "peft_type"));
  if (type && strcmp(type, "LORA") != 0)
    return ot_error(OT_ERR_UNSUPPORTED, "peft_type '%.32s': only LORA adapters import", type);
  int rc = ot_json_int(j, "r", &c->lora_r);
  if (rc == OT_OK && c->lora_r < 1) rc = ot_error(OT_ERR_FORMAT, "'r' must be >= 1");
  if (rc == OT_OK) rc = ot_json_float_in(j, "lora_alpha", 1e-30, INFINITY, &c->lora_alpha);
  const cJSON *d = cJSON_GetObjectItemCaseSensitive(j, "lora_dropout");
  c->lora_dropout = 0.0f;
  if (rc == OT_OK && d) rc = ot_json_float_in(j, "lora_dropout", 0.0, 1.0, &c->lora_dropout);
  const cJSON *rs = cJSON_GetObjectItemCaseSensitive(j, "use_rslora");
  if (rc == OT_OK && rs && !cJSON_IsBool(rs))
    rc = ot_error(OT_ERR_FORMAT, "'use_rslora' must be true or false");
  c->lora_rslora = cJSON_IsTrue(rs);
  /* target modules: a list of module names, or "all-linear"; a regular expression is refused */
  const cJSON *t = cJSON_GetObjectItemCaseSensitive(j, "target_modules");
  unsigned have = ot_arch_sites(cfg->arch);
  c->lora_sites = 0;
  if (rc == OT_OK && cJSON_IsString(t)) {
    if (strcmp(t->valuestring, "all-linear") == 0)
      c->lora_sites = have;
    else
      rc = ot_error(OT_ERR_UNSUPPORTED,
                    "target_modules '%.64s' is a regular expression; list the modules instead",
                    t->valuestring);
  } else if (rc == OT_OK && cJSON_IsArray(t)) {
    cJSON_ArrayForEach(e, t) {
      unsigned s = 0;
      if (!cJSON_IsString(e) || strchr(e->valuestring, ',') || ot_lora_parse_targets(e->valuestring, &s) ||
          !(s & have)) {
        rc = ot_error(OT_ERR_UNSUPPORTED, "target module '%.64s' is not a linear layer of a %s model",
                      cJSON_IsString(e) ? e->valuestring : "?", ot_arch_name(cfg->arch));
        break;
      }
      c->lora_sites |= s & have;
    }
  } else if (rc == OT_OK) {
    rc = ot_error(OT_ERR_FORMAT, "'target_modules' must be a list");
  }
  if (rc == OT_OK && !c->lora_sites) rc = ot_error(OT_ERR_FORMAT, "'target_modules' is empty");
  /* PEFT's flag for Conv1D weights stored [in, out]: it must say what the layers are */
  int g = gpt2_layout(cfg->arch);
  const cJSON *f = cJSON_GetObjectItemCaseSensitive(j, "fan_in_fan_out");
  if (rc == OT_OK && ((g && f && !cJSON_IsTrue(f)) || (!g && cJSON_IsTrue(f))))
    rc = ot_error(OT_ERR_UNSUPPORTED, "fan_in_fan_out must be %s for a %s model", g ? "true" : "false",
                  ot_arch_name(cfg->arch));
  const cJSON *b = cJSON_GetObjectItemCaseSensitive(j, "bias");
  if (rc == OT_OK && b && !(cJSON_IsString(b) && strcmp(b->valuestring, "none") == 0))
    rc = ot_error(OT_ERR_UNSUPPORTED, "LoRA with trained biases (bias != \"none\")");
  const cJSON *lp = cJSON_GetObjectItemCaseSensitive(j, "layers_pattern");
  const char *want_lp = g ? "h" : "layers";
  if (rc == OT_OK && is_set(lp) && !(cJSON_IsString(lp) && strcmp(lp->valuestring, want_lp) == 0) &&
      !(cJSON_IsArray(lp) && cJSON_GetArraySize(lp) == 1 && cJSON_IsString(cJSON_GetArrayItem(lp, 0)) &&
        strcmp(cJSON_GetArrayItem(lp, 0)->valuestring, want_lp) == 0))
    rc = ot_error(OT_ERR_UNSUPPORTED, "layers_pattern must be \"%s\" for a %s model", want_lp,
                  ot_arch_name(cfg->arch));
  const cJSON *lt = cJSON_GetObjectItemCaseSensitive(j, "layers_to_transform");
  *n_blocks = -1;
  if (rc == OT_OK && cJSON_IsNumber(lt)) {
    rc = ot_json_int(j, "layers_to_transform", &blocks[0]);
    *n_blocks = 1;
  } else if (rc == OT_OK && is_set(lt)) {
    rc = ot_json_int_array(j, "layers_to_transform", blocks, -1, OT_PEFT_MAX_LAYERS, n_blocks);
  }
  for (int i = 0; rc == OT_OK && i < *n_blocks; i++) {
    if (blocks[i] < 0 || blocks[i] >= OT_PEFT_MAX_LAYERS)
      rc = ot_error(OT_ERR_FORMAT, "layers_to_transform: block %d out of range", blocks[i]);
    for (int k = 0; k < i && rc == OT_OK; k++)
      if (blocks[k] == blocks[i])
        rc = ot_error(OT_ERR_FORMAT, "layers_to_transform: block %d listed twice", blocks[i]);
  }
  return rc;
}

/* ---- writing ------------------------------------------------------------------------------- */

static int remove_if_present(const char *dir, const char *name) {
  char *p = NULL;
  int rc = ot_path_join(dir, name, &p);
  if (rc == OT_OK && unlink(p) != 0 && errno != ENOENT)
    rc = ot_error(OT_ERR_IO, "cannot remove %s: %s", p, strerror(errno));
  free(p);
  return rc;
}

int ot_peft_write(const ot_peft_adapter *a, const ot_peft_want *w, const char *dir) {
  ot_st_writer *wr = NULL;
  char *st_path = NULL, digest[OT_DIGEST_HEX];
  int rc = ot_mkdir_p(dir);
  /* the metadata goes last: a directory with offtune_adapter.json is complete */
  if (rc == OT_OK) rc = remove_if_present(dir, OT_PEFT_META_FILE);
  if (rc == OT_OK) rc = ot_st_writer_new(&wr);
  if (rc == OT_OK) rc = ot_st_writer_set_metadata(wr, "format", "pt");
  for (int i = 0; i < a->n && rc == OT_OK; i++) {
    int64_t shape[2] = {a->t[i].shape[0], a->t[i].shape[1]};
    rc = ot_st_writer_add(wr, w[i].file, OT_DTYPE_F32, a->t[i].ndim, shape, a->t[i].data);
  }
  if (rc == OT_OK) rc = ot_path_join(dir, OT_PEFT_TENSOR_FILE, &st_path);
  if (rc == OT_OK) rc = ot_st_writer_save(wr, st_path);
  if (rc == OT_OK) rc = ot_file_digest(st_path, digest);
  if (rc == OT_OK && a->c.kind == OT_PEFT_LORA) {
    cJSON *j = peft_config_json(a);
    rc = j ? ot_json_write(dir, OT_PEFT_CONFIG_FILE, j) : ot_error(OT_ERR_NOMEM, "cannot allocate");
    cJSON_Delete(j);
  } else if (rc == OT_OK) {
    rc = remove_if_present(dir, OT_PEFT_CONFIG_FILE);
  }
  if (rc == OT_OK) {
    cJSON *j = cJSON_CreateObject();
    if (j) {
      cJSON_AddNumberToObject(j, "format_version", OT_PEFT_FORMAT);
      cJSON_AddStringToObject(j, "adapter_type", ot_peft_kind_name(a->c.kind));
      cJSON_AddStringToObject(j, "architecture", ot_arch_name(a->arch));
      cJSON_AddItemToObject(j, "blocks", ot_json_new_int_array(a->blocks, a->n_blocks));
      if (a->c.kind == OT_PEFT_BOTTLENECK) cJSON_AddNumberToObject(j, "bottleneck_dim", a->c.bottleneck_dim);
      cJSON_AddStringToObject(j, "digest_algorithm", "blake2b-256");
      cJSON_AddStringToObject(j, "base_model_digest", a->base_digest);
      cJSON_AddStringToObject(j, "adapter_digest", digest);
    }
    rc = j ? ot_json_write(dir, OT_PEFT_META_FILE, j) : ot_error(OT_ERR_NOMEM, "cannot allocate");
    cJSON_Delete(j);
  }
  ot_st_writer_free(wr);
  free(st_path);
  return rc;
}

/* ---- reading -------------------------------------------------------------------------------- */

static int file_in(const char *dir, const char *name) {
  char *p = NULL;
  int yes = ot_path_join(dir, name, &p) == OT_OK && ot_file_exists(p);
  free(p);
  return yes;
}

int ot_peft_is_adapter_dir(const char *dir) {
  return file_in(dir, OT_PEFT_META_FILE) || file_in(dir, OT_PEFT_CONFIG_FILE);
}

/* The file holding offtune's fields: offtune_adapter.json (format 2), else adapter_config.json
 * when it has them (format 1). A PEFT config without them is a foreign adapter. */
static int read_meta_json(const char *dir, cJSON **out, int *version) {
  int v2 = file_in(dir, OT_PEFT_META_FILE);
  cJSON *j = NULL;
  int rc = ot_json_read(dir, v2 ? OT_PEFT_META_FILE : OT_PEFT_CONFIG_FILE, &j);
  if (rc) return rc;
  if (!v2 && !cJSON_GetObjectItemCaseSensitive(j, "adapter_type")) {
    rc = cJSON_GetObjectItemCaseSensitive(j, "peft_type")
             ? ot_error(OT_ERR_UNSUPPORTED,
                        "%s: a PEFT adapter not bound to a base model yet: import it first "
                        "(offtune-cloud import-peft)",
                        dir)
             : ot_error(OT_ERR_FORMAT, "%s: adapter_config.json has no adapter_type", dir);
    cJSON_Delete(j);
    return rc;
  }
  rc = ot_json_int(j, "format_version", version);
  if (rc == OT_OK && *version != (v2 ? 2 : 1))
    rc = ot_error(OT_ERR_UNSUPPORTED, "%s: format_version %d", dir, *version);
  if (rc) {
    cJSON_Delete(j);
    return rc;
  }
  *out = j;
  return OT_OK;
}

int ot_peft_read_kind(const char *dir, ot_peft_kind *out) {
  cJSON *j = NULL;
  int version = 0, rc = read_meta_json(dir, &j, &version);
  if (rc) return rc;
  const char *type = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(j, "adapter_type"));
  ot_peft_kind k = OT_PEFT_OFFSITE;
  rc = ot_peft_parse_kind(type, &k);
  if (rc)
    rc = ot_error(OT_ERR_UNSUPPORTED, "%s: adapter_type '%s' is not one offtune knows", dir,
                  type ? type : "?");
  cJSON_Delete(j);
  if (rc == OT_OK) *out = k;
  return rc;
}

/* Header of the adapter in dir: kind, settings, blocks, digests. */
static int read_header(const char *dir, const ot_model_config *cfg, ot_peft_adapter *a, char *want_digest) {
  cJSON *j = NULL, *pj = NULL;
  int version = 0, rc = ot_peft_read_kind(dir, &a->c.kind);
  if (rc == OT_OK) rc = read_meta_json(dir, &j, &version);
  if (rc) return rc;
  a->arch = cfg->arch;
  const char *arch = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(j, "architecture"));
  ot_arch fa = cfg->arch;
  if (version == 2 && (!arch || ot_arch_parse(arch, &fa) != OT_OK))
    rc = ot_error(OT_ERR_FORMAT, "%s: offtune_adapter.json needs a known 'architecture'", dir);
  if (rc == OT_OK && fa != cfg->arch)
    rc = ot_error(OT_ERR_MISMATCH, "%s: a %s adapter does not fit a %s model", dir, ot_arch_name(fa),
                  ot_arch_name(cfg->arch));
  const char *base = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(j, "base_model_digest"));
  const char *dg = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(j, "adapter_digest"));
  if (rc == OT_OK && (!ot_json_hex_digest_ok(base) || !ot_json_hex_digest_ok(dg)))
    rc =
        ot_error(OT_ERR_FORMAT, "%s: the adapter's metadata needs base_model_digest and adapter_digest", dir);
  if (rc == OT_OK) {
    snprintf(a->base_digest, sizeof a->base_digest, "%s", base);
    snprintf(want_digest, OT_DIGEST_HEX, "%s", dg);
  }
  /* blocks: format 2 lists them; format 1 has bottom + top (offsite) or layers_to_transform */
  a->n_blocks = 0;
  if (rc == OT_OK && version == 2) {
    rc = ot_json_int_array(j, "blocks", a->blocks, -1, OT_PEFT_MAX_LAYERS, &a->n_blocks);
  } else if (rc == OT_OK && a->c.kind == OT_PEFT_OFFSITE) {
    int nb = 0, nt = 0;
    rc = ot_json_int_array(j, "bottom", a->blocks, -1, OT_PEFT_MAX_LAYERS, &nb);
    if (rc == OT_OK) rc = ot_json_int_array(j, "top", a->blocks + nb, -1, OT_PEFT_MAX_LAYERS - nb, &nt);
    a->n_blocks = nb + nt;
  } else if (rc == OT_OK) {
    rc = ot_json_int_array(j, "layers_to_transform", a->blocks, -1, OT_PEFT_MAX_LAYERS, &a->n_blocks);
  }
  if (rc == OT_OK && a->n_blocks < 1) rc = ot_error(OT_ERR_FORMAT, "%s: the adapter lists no blocks", dir);
  for (int i = 0; i < a->n_blocks && rc == OT_OK; i++) {
    if (a->blocks[i] < 0) rc = ot_error(OT_ERR_FORMAT, "%s: block %d", dir, a->blocks[i]);
    for (int k = 0; k < i && rc == OT_OK; k++)
      if (a->blocks[k] == a->blocks[i])
        rc = ot_error(OT_ERR_FORMAT, "%s: block %d listed twice", dir, a->blocks[i]);
  }
  if (rc == OT_OK && a->c.kind == OT_PEFT_BOTTLENECK) {
    rc = ot_json_int(j, "bottleneck_dim", &a->c.bottleneck_dim);
    if (rc == OT_OK && a->c.bottleneck_dim < 1) rc = ot_error(OT_ERR_FORMAT, "'bottleneck_dim' must be >= 1");
  }
  if (rc == OT_OK && a->c.kind == OT_PEFT_LORA) {
    if (version == 2) rc = ot_json_read(dir, OT_PEFT_CONFIG_FILE, &pj);
    int pb[OT_PEFT_MAX_LAYERS], npb = -1;
    if (rc == OT_OK) rc = ot_peft_parse_lora_config(version == 2 ? pj : j, cfg, &a->c, pb, &npb);
    if (rc) rc = in_dir(rc, dir);
    /* PEFT's layer list must be offtune's (it is what PEFT will apply the tensors to) */
    int same = npb == a->n_blocks;
    for (int i = 0; same && i < npb; i++) same = pb[i] == a->blocks[i];
    if (rc == OT_OK && version == 2 && !same)
      rc = ot_error(OT_ERR_MISMATCH,
                    "%s: layers_to_transform of adapter_config.json differs from the blocks "
                    "in offtune_adapter.json",
                    dir);
  }
  cJSON_Delete(pj);
  cJSON_Delete(j);
  return rc;
}

/* Reads the tensors named in w from st into a (allocated here); every one exactly once. */
static int read_tensors(const ot_safetensors *st, const char *st_path, const ot_peft_want *w, int nw,
                        ot_peft_adapter *a) {
  int rc = ot_peft_adapter_alloc(a, w, nw);
  unsigned char *seen = rc == OT_OK ? calloc((size_t)nw + 1, 1) : NULL;
  if (rc == OT_OK && !seen) rc = ot_error(OT_ERR_NOMEM, "cannot allocate");
  for (size_t i = 0; rc == OT_OK && i < ot_st_count(st); i++) {
    const ot_st_tensor *t = ot_st_at(st, i);
    int k = 0;
    while (k < nw && strcmp(t->name, w[k].file) != 0) k++;
    if (k == nw) {
      rc = ot_error(OT_ERR_MISMATCH, "%s: tensor '%s' is not part of this %s adapter", st_path, t->name,
                    ot_peft_kind_name(a->c.kind));
      break;
    }
    if (t->ndim != w[k].t.ndim || t->shape[0] != w[k].t.shape[0] ||
        (w[k].t.ndim == 2 && t->shape[1] != w[k].t.shape[1])) {
      rc = ot_error(OT_ERR_MISMATCH, "%s: tensor '%s' has the wrong shape for this model", st_path, t->name);
      break;
    }
    if (seen[k]) {
      rc = ot_error(OT_ERR_FORMAT, "%s: tensor '%s' appears twice", st_path, t->name);
      break;
    }
    seen[k] = 1;
    rc = ot_st_read_f32(st, t, (float *)a->t[k].data, w[k].t.numel);
  }
  for (int k = 0; k < nw && rc == OT_OK; k++)
    if (!seen[k]) rc = ot_error(OT_ERR_MISMATCH, "%s: tensor '%s' is missing", st_path, w[k].file);
  for (int k = 0; k < nw && rc == OT_OK; k++)
    for (size_t v = 0; v < w[k].t.numel; v++)
      if (!isfinite(a->t[k].data[v])) {
        rc = ot_error(OT_ERR_FORMAT, "%s: tensor '%s' holds a NaN or infinity", st_path, w[k].file);
        break;
      }
  free(seen);
  if (rc) ot_peft_adapter_free_tensors(a);
  return rc;
}

int ot_peft_load(const char *dir, const ot_model_config *cfg, const char *base_digest,
                 ot_peft_adapter **out) {
  ot_peft_adapter *a = calloc(1, sizeof *a);
  if (!a) return ot_error(OT_ERR_NOMEM, "cannot allocate");
  ot_peft_config_default(&a->c);
  char want_hex[OT_DIGEST_HEX] = "", got[OT_DIGEST_HEX], *st_path = NULL;
  int rc = read_header(dir, cfg, a, want_hex);
  if (rc == OT_OK && (!base_digest || strcmp(a->base_digest, base_digest) != 0))
    rc = ot_error(OT_ERR_MISMATCH, "%s: adapter was tuned for base model %.16s..., this model is %.16s...",
                  dir, a->base_digest, base_digest ? base_digest : "(unknown)");
  ot_peft_want *w = NULL;
  int nw = 0;
  if (rc == OT_OK) rc = ot_peft_want_list(cfg, &a->c, a->blocks, a->n_blocks, &w, &nw);
  /* a file far larger than its tensors in fp32 (or not a regular file) is refused before a
   * byte is hashed; one of a somewhat wider model gets through to the shape checks, which say
   * what does not fit */
  uint64_t max_bytes = (uint64_t)1 << 20;
  for (int k = 0; k < nw; k++) max_bytes += 16 * w[k].t.numel * sizeof(float) + 256;
  if (rc == OT_OK) rc = ot_path_join(dir, OT_PEFT_TENSOR_FILE, &st_path);
  if (rc == OT_OK) rc = ot_file_digest_max(st_path, max_bytes, got);
  if (rc == OT_OK && strcmp(got, want_hex) != 0)
    rc = ot_error(OT_ERR_MISMATCH,
                  "%s: adapter_model.safetensors does not match its recorded digest (tampered?)", st_path);
  ot_safetensors *st = NULL;
  if (rc == OT_OK) rc = ot_st_open(st_path, &st);
  if (rc == OT_OK) rc = read_tensors(st, st_path, w, nw, a);
  ot_st_close(st);
  free(st_path);
  free(w);
  if (rc) {
    ot_peft_free(a);
    return rc;
  }
  *out = a;
  return OT_OK;
}

int ot_peft_reseal(const char *prev_dir, const char *new_dir) {
  char *st_path = NULL, digest[OT_DIGEST_HEX];
  int rc = ot_path_join(new_dir, OT_PEFT_TENSOR_FILE, &st_path);
  if (rc == OT_OK) rc = ot_file_digest(st_path, digest);
  free(st_path);
  /* PEFT's config first, offtune's last (its presence marks a complete directory) */
  const char *names[2] = {OT_PEFT_CONFIG_FILE, OT_PEFT_META_FILE};
  for (int i = 0; i < 2 && rc == OT_OK; i++) {
    if (!file_in(prev_dir, names[i])) continue;
    cJSON *j = NULL;
    rc = ot_json_read(prev_dir, names[i], &j);
    if (rc == OT_OK && cJSON_GetObjectItemCaseSensitive(j, "adapter_digest")) {
      cJSON_DeleteItemFromObjectCaseSensitive(j, "adapter_digest");
      cJSON_AddStringToObject(j, "adapter_digest", digest);
    }
    if (rc == OT_OK) rc = ot_json_write(new_dir, names[i], j);
    cJSON_Delete(j);
  }
  return rc;
}

/* ---- importing a PEFT LoRA ------------------------------------------------------------------- */

/* Blocks that carry LoRA tensors in a PEFT file (layers_to_transform null = wherever they are). */
static int blocks_in_file(const ot_safetensors *st, int *blocks, int *n) {
  *n = 0;
  for (size_t i = 0; i < ot_st_count(st); i++) {
    const char *name = ot_st_at(st, i)->name;
    if (strncmp(name, OT_PEFT_KEY_PREFIX, strlen(OT_PEFT_KEY_PREFIX)) != 0) continue;
    int f;
    const char *rest;
    if (!ot_block_tensor_split(name + strlen(OT_PEFT_KEY_PREFIX), &f, &rest) || f < 0 ||
        f >= OT_PEFT_MAX_LAYERS)
      continue;
    int k = 0;
    while (k < *n && blocks[k] != f) k++;
    if (k == *n) blocks[(*n)++] = f;
  }
  for (int i = 1; i < *n; i++) /* ascending, as PEFT lists them */
    for (int k = i; k > 0 && blocks[k - 1] > blocks[k]; k--) {
      int t = blocks[k];
      blocks[k] = blocks[k - 1];
      blocks[k - 1] = t;
    }
  return *n ? OT_OK : ot_error(OT_ERR_FORMAT, "no LoRA tensor names a block of this architecture");
}

int ot_peft_import(const char *peft_dir, const ot_model_config *cfg, const char *base_digest,
                   const char *base_name, const char *out_dir, ot_peft_import_info *info) {
  if (!ot_json_hex_digest_ok(base_digest))
    return ot_error(OT_ERR_INVALID, "import needs the base model's digest");
  if (file_in(peft_dir, "adapter_model.bin") && !file_in(peft_dir, OT_PEFT_TENSOR_FILE))
    return ot_error(OT_ERR_UNSUPPORTED,
                    "%s: adapter_model.bin is a pickle; save it with safe_serialization=True "
                    "(adapter_model.safetensors)",
                    peft_dir);
  ot_peft_adapter a = {.arch = cfg->arch};
  ot_peft_config_default(&a.c);
  a.c.kind = OT_PEFT_LORA;
  cJSON *j = NULL;
  int rc = ot_json_read(peft_dir, OT_PEFT_CONFIG_FILE, &j);
  if (rc == OT_OK) rc = ot_peft_parse_lora_config(j, cfg, &a.c, a.blocks, &a.n_blocks);
  if (rc) rc = in_dir(rc, peft_dir);
  cJSON_Delete(j);
  if (rc) return rc;
  char *st_path = NULL;
  ot_safetensors *st = NULL;
  rc = ot_path_join(peft_dir, OT_PEFT_TENSOR_FILE, &st_path);
  if (rc == OT_OK) rc = ot_st_open(st_path, &st);
  if (rc == OT_OK && a.n_blocks < 0) rc = blocks_in_file(st, a.blocks, &a.n_blocks);
  for (int i = 0; rc == OT_OK && i < a.n_blocks; i++)
    if (a.blocks[i] >= cfg->n_layer)
      rc = ot_error(OT_ERR_MISMATCH, "%s: block %d, the model has %d", peft_dir, a.blocks[i], cfg->n_layer);
  ot_peft_want *w = NULL;
  int nw = 0;
  if (rc == OT_OK) rc = ot_peft_want_list(cfg, &a.c, a.blocks, a.n_blocks, &w, &nw);
  if (rc == OT_OK) rc = read_tensors(st, st_path, w, nw, &a);
  snprintf(a.base_digest, sizeof a.base_digest, "%s", base_digest);
  snprintf(a.base_name, sizeof a.base_name, "%s", base_name ? base_name : "");
  if (rc == OT_OK) rc = ot_peft_write(&a, w, out_dir);
  if (rc == OT_OK && info)
    *info =
        (ot_peft_import_info){a.c.lora_r, a.n_blocks, nw, a.c.lora_alpha, a.c.lora_sites, a.c.lora_rslora};
  ot_peft_adapter_free_tensors(&a);
  free(w);
  ot_st_close(st);
  free(st_path);
  return rc;
}

#include "ot_model_config.h"

#include "ot_error.h"
#include "ot_fileio.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CFG_MAX_FILE ((size_t)16 * 1024 * 1024)
#define CFG_MAX_LAYER 1024
#define CFG_MAX_EMBD 65536
#define CFG_MAX_VOCAB (4 * 1024 * 1024)
#define CFG_MAX_POSITIONS (1024 * 1024)

static const char *const arch_names[OT_ARCH_COUNT] = {"gpt2", "llama", "qwen2", "mistral"};

const char *ot_arch_name(ot_arch a) { return a >= 0 && a < OT_ARCH_COUNT ? arch_names[a] : "unknown"; }

int ot_arch_parse(const char *name, ot_arch *out) {
  for (int a = 0; name && a < OT_ARCH_COUNT; a++)
    if (strcmp(name, arch_names[a]) == 0) {
      *out = (ot_arch)a;
      return OT_OK;
    }
  return ot_error(OT_ERR_INVALID, "architecture '%s': expected gpt2, llama, mistral or qwen2",
                  name ? name : "");
}

/* GPT-2's derived sizes always follow n_embd and n_head (a copied config with another width
 * stays consistent); the LLaMA family's are free and only default. */
static void fill_defaults(ot_model_config *cfg) {
  if (cfg->arch == OT_ARCH_GPT2) {
    cfg->n_kv_head = cfg->n_head;
    cfg->head_dim = cfg->n_head > 0 ? cfg->n_embd / cfg->n_head : 0;
    /* out-of-range widths are refused by validate; no overflow on the way there */
    cfg->n_ff = cfg->n_embd > 0 && cfg->n_embd <= CFG_MAX_EMBD ? 4 * cfg->n_embd : 0;
    cfg->tie_embeddings = 1;
    cfg->attn_bias = cfg->o_bias = 0; /* GPT-2's biases are part of its table */
    return;
  }
  if (cfg->n_head > 0 && cfg->n_kv_head == 0) cfg->n_kv_head = cfg->n_head;
  if (cfg->n_head > 0 && cfg->head_dim == 0) cfg->head_dim = cfg->n_embd / cfg->n_head;
  /* SwiGLU's usual width, 8/3 of the model's, rounded up to a multiple of 16 */
  if (cfg->n_ff == 0 && cfg->n_embd > 0 && cfg->n_embd <= CFG_MAX_EMBD)
    cfg->n_ff = (8 * cfg->n_embd / 3 + 15) / 16 * 16;
  if (cfg->rope_theta == 0.0f) {
    cfg->rope_theta = 10000.0f;
  }
}

int ot_model_config_equal(const ot_model_config *a, const ot_model_config *b) {
  ot_model_config x = *a, y = *b; /* 4-byte fields only: no padding for memcmp to see */
  fill_defaults(&x);
  fill_defaults(&y);
  return memcmp(&x, &y, sizeof x) == 0;
}

int ot_model_config_complete(ot_model_config *cfg) {
  if (!cfg) return ot_error(OT_ERR_INVALID, "ot_model_config_complete: NULL config");
  fill_defaults(cfg);
  return ot_model_config_validate(cfg);
}

int ot_model_config_validate(const ot_model_config *cfg_in) {
  if (!cfg_in) return ot_error(OT_ERR_INVALID, "ot_model_config_validate: NULL config");
  ot_model_config full = *cfg_in, *cfg = &full; /* a short (GPT-2 style) config is checked as completed */
  fill_defaults(cfg);
  if ((int)cfg->arch < 0 || cfg->arch >= OT_ARCH_COUNT)
    return ot_error(OT_ERR_INVALID, "config: unknown architecture %d", (int)cfg->arch);
  static const struct {
    const char *name;
    size_t off;
    int max;
  } f[] = {
      {"n_layer", offsetof(ot_model_config, n_layer), CFG_MAX_LAYER},
      {"n_head", offsetof(ot_model_config, n_head), CFG_MAX_EMBD},
      {"n_embd", offsetof(ot_model_config, n_embd), CFG_MAX_EMBD},
      {"vocab_size", offsetof(ot_model_config, vocab_size), CFG_MAX_VOCAB},
      {"n_positions", offsetof(ot_model_config, n_positions), CFG_MAX_POSITIONS},
      {"n_kv_head", offsetof(ot_model_config, n_kv_head), CFG_MAX_EMBD},
      {"head_dim", offsetof(ot_model_config, head_dim), CFG_MAX_EMBD},
      {"n_ff", offsetof(ot_model_config, n_ff), 4 * CFG_MAX_EMBD},
  };
  if (cfg->arch == OT_ARCH_GPT2 && cfg->n_head > 0 && cfg->n_embd % cfg->n_head != 0)
    return ot_error(OT_ERR_INVALID, "config: n_embd = %d is not divisible by n_head = %d", cfg->n_embd,
                    cfg->n_head);
  for (size_t i = 0; i < sizeof f / sizeof f[0]; i++) {
    int v;
    memcpy(&v, (const char *)cfg + f[i].off, sizeof v);
    if (v < 1 || v > f[i].max)
      return ot_error(OT_ERR_RANGE, "config: %s = %d is outside [1, %d]", f[i].name, v, f[i].max);
  }
  if (cfg->n_head % cfg->n_kv_head != 0)
    return ot_error(OT_ERR_INVALID, "config: n_head = %d is not a multiple of the %d key/value heads",
                    cfg->n_head, cfg->n_kv_head);
  if ((size_t)cfg->n_head * cfg->head_dim > 4 * (size_t)CFG_MAX_EMBD)
    return ot_error(OT_ERR_RANGE, "config: %d heads of %d are too wide", cfg->n_head, cfg->head_dim);
  if (!(cfg->layer_norm_epsilon > 0.0f && cfg->layer_norm_epsilon < 1.0f))
    return ot_error(OT_ERR_RANGE, "config: the norm epsilon %g is outside (0, 1)",
                    (double)cfg->layer_norm_epsilon);
  if (cfg->arch == OT_ARCH_GPT2) return OT_OK;
  if (cfg->head_dim % 2)
    return ot_error(OT_ERR_INVALID, "config: head_dim = %d must be even for rotary embeddings",
                    cfg->head_dim);
  if (!(cfg->rope_theta > 1.0f) || !isfinite(cfg->rope_theta))
    return ot_error(OT_ERR_RANGE, "config: rope_theta = %g must be > 1", (double)cfg->rope_theta);
  if (cfg->rope_factor != 0.0f &&
      (!(cfg->rope_factor >= 1.0f) || !(cfg->rope_high_freq_factor > cfg->rope_low_freq_factor) ||
       !(cfg->rope_low_freq_factor > 0.0f) || cfg->rope_original_ctx < 1 || !isfinite(cfg->rope_factor) ||
       !isfinite(cfg->rope_high_freq_factor)))
    return ot_error(OT_ERR_RANGE, "config: llama3 rope_scaling needs factor >= 1, 0 < low_freq_factor < "
                                  "high_freq_factor and original_max_position_embeddings >= 1");
  return OT_OK;
}

/* The member `key` of the top-level object, NULL if absent. cJSON keeps duplicate
 * keys and returns the first while Python's json takes the last: refuse the ambiguity. */
static int get_member(const cJSON *root, const char *key, const cJSON **out) {
  const cJSON *found = NULL;
  for (const cJSON *c = root->child; c; c = c->next) {
    if (strcmp(c->string, key) != 0) continue;
    if (found) return ot_error(OT_ERR_FORMAT, "config: key '%s' appears twice", key);
    found = c;
  }
  *out = found;
  return OT_OK;
}

/* Reads an integer member; *present says whether it was there (required ones fail if not). */
static int get_int(const cJSON *root, const char *key, int required, int *out, int *present) {
  const cJSON *v = NULL;
  int rc = get_member(root, key, &v);
  if (rc != OT_OK) return rc;
  if (present) *present = v != NULL;
  if (!v) return required ? ot_error(OT_ERR_FORMAT, "config: missing '%s'", key) : OT_OK;
  if (!cJSON_IsNumber(v)) return ot_error(OT_ERR_FORMAT, "config: '%s' is not a number", key);
  double d = v->valuedouble;
  if (!isfinite(d) || d != floor(d)) return ot_error(OT_ERR_FORMAT, "config: '%s' is not an integer", key);
  /* Range-check the double before converting: out-of-range conversion is undefined. */
  if (d < -2147483648.0 || d > 2147483647.0)
    return ot_error(OT_ERR_RANGE, "config: '%s' = %.0f does not fit an int", key, d);
  *out = (int)d;
  return OT_OK;
}

/* An optional string member must be one of `allowed` (NULL-terminated). */
static int check_string(const cJSON *root, const char *key, const char *const *allowed) {
  const cJSON *v = NULL;
  int rc = get_member(root, key, &v);
  if (rc != OT_OK || !v) return rc;
  if (!cJSON_IsString(v)) return ot_error(OT_ERR_FORMAT, "config: '%s' is not a string", key);
  for (const char *const *a = allowed; *a; a++)
    if (strcmp(v->valuestring, *a) == 0) return OT_OK;
  return ot_error(OT_ERR_UNSUPPORTED, "config: %s '%.64s' is not supported (expected '%s')", key,
                  v->valuestring, allowed[0]);
}

/* An optional boolean member must have the value GPT-2 uses. */
static int check_bool(const cJSON *root, const char *key, int want) {
  const cJSON *v = NULL;
  int rc = get_member(root, key, &v);
  if (rc != OT_OK || !v) return rc;
  if (!cJSON_IsBool(v)) return ot_error(OT_ERR_FORMAT, "config: '%s' is not a boolean", key);
  if (cJSON_IsTrue(v) != want)
    return ot_error(OT_ERR_UNSUPPORTED, "config: %s = %s is not supported", key, want ? "false" : "true");
  return OT_OK;
}

/* Reads an optional number member into *out (left alone when absent). */
static int get_float(const cJSON *root, const char *key, float *out) {
  const cJSON *v = NULL;
  int rc = get_member(root, key, &v);
  if (rc != OT_OK || !v) return rc;
  if (!cJSON_IsNumber(v) || !isfinite(v->valuedouble) || fabs(v->valuedouble) > 3.0e38)
    return ot_error(OT_ERR_FORMAT, "config: '%s' is not a finite number", key);
  *out = (float)v->valuedouble;
  return OT_OK;
}

/* An optional number that must be 0 (dropout we do not implement). */
static int check_zero(const cJSON *root, const char *key) {
  float v = 0.0f;
  int rc = get_float(root, key, &v);
  if (rc == OT_OK && v != 0.0f)
    rc = ot_error(OT_ERR_UNSUPPORTED, "config: %s = %g is not supported (only 0)", key, (double)v);
  return rc;
}

static int parse_llama(const cJSON *root, ot_arch arch, ot_model_config *cfg) {
  static const char *const acts[] = {"silu", NULL};
  cfg->arch = arch;
  int rc = check_string(root, "hidden_act", acts);
  if (rc == OT_OK) rc = get_int(root, "num_hidden_layers", 1, &cfg->n_layer, NULL);
  if (rc == OT_OK) rc = get_int(root, "num_attention_heads", 1, &cfg->n_head, NULL);
  if (rc == OT_OK) rc = get_int(root, "hidden_size", 1, &cfg->n_embd, NULL);
  if (rc == OT_OK) rc = get_int(root, "intermediate_size", 1, &cfg->n_ff, NULL);
  if (rc == OT_OK) rc = get_int(root, "vocab_size", 1, &cfg->vocab_size, NULL);
  if (rc == OT_OK) rc = get_int(root, "max_position_embeddings", 1, &cfg->n_positions, NULL);
  if (rc == OT_OK) rc = get_int(root, "num_key_value_heads", 0, &cfg->n_kv_head, NULL);
  const cJSON *hd = NULL;
  if (rc == OT_OK) rc = get_member(root, "head_dim", &hd);
  if (rc == OT_OK && hd && !cJSON_IsNull(hd)) rc = get_int(root, "head_dim", 1, &cfg->head_dim, NULL);
  cfg->layer_norm_epsilon = 1e-6f;
  if (rc == OT_OK) rc = get_float(root, "rms_norm_eps", &cfg->layer_norm_epsilon);
  cfg->rope_theta = 10000.0f;
  if (rc == OT_OK) rc = get_float(root, "rope_theta", &cfg->rope_theta);
  const cJSON *tie = NULL;
  if (rc == OT_OK) rc = get_member(root, "tie_word_embeddings", &tie);
  if (rc == OT_OK && tie && !cJSON_IsBool(tie))
    rc = ot_error(OT_ERR_FORMAT, "config: 'tie_word_embeddings' is not a boolean");
  cfg->tie_embeddings = tie && cJSON_IsTrue(tie);
  const cJSON *ab = NULL;
  if (rc == OT_OK) rc = get_member(root, "attention_bias", &ab);
  if (rc == OT_OK && ab && !cJSON_IsBool(ab))
    rc = ot_error(OT_ERR_FORMAT, "config: 'attention_bias' is not a boolean");
  if (rc == OT_OK && arch == OT_ARCH_QWEN2) {
    cfg->attn_bias = 1; /* Qwen2 always has q/k/v biases and none on o_proj */
  } else if (rc == OT_OK && ab && cJSON_IsTrue(ab)) {
    cfg->attn_bias = cfg->o_bias = 1;
  }
  if (rc == OT_OK) rc = check_bool(root, "mlp_bias", 0);
  if (rc == OT_OK) rc = check_zero(root, "attention_dropout");
  if (rc == OT_OK && arch == OT_ARCH_QWEN2) rc = check_bool(root, "use_sliding_window", 0);
  const cJSON *sw = NULL;
  if (rc == OT_OK && arch == OT_ARCH_MISTRAL) rc = get_member(root, "sliding_window", &sw);
  if (rc == OT_OK && sw && !cJSON_IsNull(sw)) {
    int w = 0;
    rc = get_int(root, "sliding_window", 1, &w, NULL);
    if (rc == OT_OK && w < cfg->n_positions)
      rc = ot_error(OT_ERR_UNSUPPORTED,
                    "config: sliding_window = %d is shorter than the context (%d); sliding-window attention "
                    "is not implemented",
                    w, cfg->n_positions);
  }
  const cJSON *rs = NULL;
  if (rc == OT_OK) rc = get_member(root, "rope_scaling", &rs);
  if (rc == OT_OK && rs && !cJSON_IsNull(rs)) {
    if (!cJSON_IsObject(rs)) return ot_error(OT_ERR_FORMAT, "config: 'rope_scaling' is not an object");
    const cJSON *t = NULL;
    rc = get_member(rs, "rope_type", &t);
    if (rc == OT_OK && !t) rc = get_member(rs, "type", &t);
    if (rc == OT_OK && cJSON_IsString(t) && strcmp(t->valuestring, "default") == 0)
      return ot_model_config_complete(cfg);
    if (rc == OT_OK && !(cJSON_IsString(t) && strcmp(t->valuestring, "llama3") == 0))
      return ot_error(OT_ERR_UNSUPPORTED, "config: rope_scaling type '%.32s' is not supported (only llama3)",
                      cJSON_IsString(t) ? t->valuestring : "?");
    cfg->rope_factor = 0.0f;
    if (rc == OT_OK) rc = get_float(rs, "factor", &cfg->rope_factor);
    if (rc == OT_OK) rc = get_float(rs, "low_freq_factor", &cfg->rope_low_freq_factor);
    if (rc == OT_OK) rc = get_float(rs, "high_freq_factor", &cfg->rope_high_freq_factor);
    if (rc == OT_OK) rc = get_int(rs, "original_max_position_embeddings", 1, &cfg->rope_original_ctx, NULL);
    if (rc == OT_OK && cfg->rope_factor == 0.0f)
      rc = ot_error(OT_ERR_FORMAT, "config: rope_scaling has no factor");
  }
  if (rc != OT_OK) return rc;
  return ot_model_config_complete(cfg);
}

static int parse_root(const cJSON *root, ot_model_config *cfg) {
  if (!cJSON_IsObject(root)) return ot_error(OT_ERR_FORMAT, "config: top level is not a JSON object");
  const cJSON *mt = NULL;
  int rc = get_member(root, "model_type", &mt);
  if (rc != OT_OK) return rc;
  if (mt && !cJSON_IsString(mt)) return ot_error(OT_ERR_FORMAT, "config: 'model_type' is not a string");
  for (int a = 1; mt && a < OT_ARCH_COUNT; a++)
    if (strcmp(mt->valuestring, arch_names[a]) == 0) return parse_llama(root, (ot_arch)a, cfg);
  static const char *const model_types[] = {"gpt2", NULL};
  static const char *const activations[] = {"gelu_new", "gelu_pytorch_tanh", NULL};
  rc = check_string(root, "model_type", model_types);
  if (rc == OT_ERR_UNSUPPORTED)
    return ot_error(rc, "config: model_type '%.64s' is not supported (gpt2, llama, mistral, qwen2)",
                    mt->valuestring);
  if (rc == OT_OK) rc = check_string(root, "activation_function", activations);
  if (rc == OT_OK) rc = check_bool(root, "tie_word_embeddings", 1);
  /* These change the attention math or add weights we do not have. */
  if (rc == OT_OK) rc = check_bool(root, "scale_attn_weights", 1);
  if (rc == OT_OK) rc = check_bool(root, "scale_attn_by_inverse_layer_idx", 0);
  if (rc == OT_OK) rc = check_bool(root, "add_cross_attention", 0);
  if (rc == OT_OK) rc = get_int(root, "n_layer", 1, &cfg->n_layer, NULL);
  if (rc == OT_OK) rc = get_int(root, "n_head", 1, &cfg->n_head, NULL);
  if (rc == OT_OK) rc = get_int(root, "n_embd", 1, &cfg->n_embd, NULL);
  if (rc == OT_OK) rc = get_int(root, "vocab_size", 1, &cfg->vocab_size, NULL);
  int has_pos = 0;
  if (rc == OT_OK) rc = get_int(root, "n_positions", 0, &cfg->n_positions, &has_pos);
  /* Old configs name the context length n_ctx; like transformers, n_positions wins when both exist. */
  if (rc == OT_OK && !has_pos) {
    rc = get_int(root, "n_ctx", 0, &cfg->n_positions, &has_pos);
    if (rc == OT_OK && !has_pos) rc = ot_error(OT_ERR_FORMAT, "config: missing 'n_positions' (or 'n_ctx')");
  }
  if (rc != OT_OK) return rc;

  const cJSON *eps;
  rc = get_member(root, "layer_norm_epsilon", &eps);
  if (rc != OT_OK) return rc;
  cfg->layer_norm_epsilon = 1e-5f;
  if (eps) {
    if (!cJSON_IsNumber(eps)) return ot_error(OT_ERR_FORMAT, "config: 'layer_norm_epsilon' is not a number");
    if (!(eps->valuedouble > 0 && eps->valuedouble < 1))
      return ot_error(OT_ERR_RANGE, "config: layer_norm_epsilon = %g is outside (0, 1)", eps->valuedouble);
    cfg->layer_norm_epsilon = (float)eps->valuedouble;
  }

  /* GPT-2's derived fields stay 0: the short form a positional initialiser gives */
  cfg->arch = OT_ARCH_GPT2;
  rc = ot_model_config_validate(cfg);
  if (rc != OT_OK) return rc;

  const cJSON *inner;
  rc = get_member(root, "n_inner", &inner);
  if (rc != OT_OK) return rc;
  if (inner && !cJSON_IsNull(inner)) {
    int v;
    rc = get_int(root, "n_inner", 1, &v, NULL);
    if (rc != OT_OK) return rc;
    if (v != 4 * cfg->n_embd)
      return ot_error(OT_ERR_UNSUPPORTED, "config: n_inner = %d is not supported (only 4 * n_embd = %d)", v,
                      4 * cfg->n_embd);
  }
  return OT_OK;
}

int ot_model_config_parse(const char *json, size_t len, ot_model_config *out) {
  if (!json || !out) return ot_error(OT_ERR_INVALID, "ot_model_config_parse: NULL argument");
  const char *end = NULL;
  cJSON *root = cJSON_ParseWithLengthOpts(json, len, &end, 0);
  if (!root) return ot_error(OT_ERR_FORMAT, "config: not valid JSON");
  /* Only whitespace (or the NUL of a C string) may follow the object. */
  for (const char *p = end; p < json + len; p++) {
    if (*p != ' ' && *p != '\t' && *p != '\n' && *p != '\r' && !(*p == '\0' && p + 1 == json + len)) {
      cJSON_Delete(root);
      return ot_error(OT_ERR_FORMAT, "config: junk after the JSON object at byte %td", p - json);
    }
  }
  ot_model_config cfg;
  memset(&cfg, 0, sizeof cfg);
  int rc = parse_root(root, &cfg);
  cJSON_Delete(root);
  if (rc == OT_OK) *out = cfg;
  return rc;
}

int ot_model_config_load(const char *path, ot_model_config *out) {
  if (!path || !out) return ot_error(OT_ERR_INVALID, "ot_model_config_load: NULL argument");
  char *text = NULL;
  size_t len = 0;
  int rc = ot_file_read_all(path, CFG_MAX_FILE, &text, &len);
  if (rc != OT_OK) return rc;
  rc = ot_model_config_parse(text, len, out);
  free(text);
  if (rc != OT_OK) {
    /* Prefix the file name so the user knows which config.json is wrong. */
    char detail[512];
    snprintf(detail, sizeof detail, "%s", ot_error_detail());
    return ot_error(rc, "%s: %s", path, detail);
  }
  return OT_OK;
}

/* Shortest decimal that reads back as the same float, so 1e-5f is written "1e-05",
 * not the double expansion 9.99999974737875e-06. */
static void format_float(float f, char *buf, size_t n) {
  for (int prec = 1; prec <= 9; prec++) {
    snprintf(buf, n, "%.*g", prec, (double)f);
    if (strtof(buf, NULL) == f) return;
  }
}

static int add_gpt2(cJSON *root, const ot_model_config *cfg, const char *eps) {
  int ok = cJSON_AddStringToObject(root, "activation_function", "gelu_new") != NULL;
  ok = ok && cJSON_AddNumberToObject(root, "n_layer", cfg->n_layer);
  ok = ok && cJSON_AddNumberToObject(root, "n_head", cfg->n_head);
  ok = ok && cJSON_AddNumberToObject(root, "n_embd", cfg->n_embd);
  ok = ok && cJSON_AddNumberToObject(root, "vocab_size", cfg->vocab_size);
  ok = ok && cJSON_AddNumberToObject(root, "n_positions", cfg->n_positions);
  ok = ok && cJSON_AddNumberToObject(root, "n_ctx", cfg->n_positions);
  ok = ok && cJSON_AddNullToObject(root, "n_inner");
  ok = ok && cJSON_AddRawToObject(root, "layer_norm_epsilon", eps);
  ok = ok && cJSON_AddBoolToObject(root, "tie_word_embeddings", 1);
  ok = ok && cJSON_AddNumberToObject(root, "resid_pdrop", 0);
  ok = ok && cJSON_AddNumberToObject(root, "embd_pdrop", 0);
  ok = ok && cJSON_AddNumberToObject(root, "attn_pdrop", 0);
  return ok;
}

static int add_llama(cJSON *root, const ot_model_config *cfg, const char *eps) {
  char theta[32];
  format_float(cfg->rope_theta, theta, sizeof theta);
  int ok = cJSON_AddStringToObject(root, "hidden_act", "silu") != NULL;
  ok = ok && cJSON_AddNumberToObject(root, "num_hidden_layers", cfg->n_layer);
  ok = ok && cJSON_AddNumberToObject(root, "num_attention_heads", cfg->n_head);
  ok = ok && cJSON_AddNumberToObject(root, "num_key_value_heads", cfg->n_kv_head);
  ok = ok && cJSON_AddNumberToObject(root, "hidden_size", cfg->n_embd);
  ok = ok && cJSON_AddNumberToObject(root, "head_dim", cfg->head_dim);
  ok = ok && cJSON_AddNumberToObject(root, "intermediate_size", cfg->n_ff);
  ok = ok && cJSON_AddNumberToObject(root, "vocab_size", cfg->vocab_size);
  ok = ok && cJSON_AddNumberToObject(root, "max_position_embeddings", cfg->n_positions);
  ok = ok && cJSON_AddRawToObject(root, "rms_norm_eps", eps);
  ok = ok && cJSON_AddRawToObject(root, "rope_theta", theta);
  ok = ok && cJSON_AddBoolToObject(root, "tie_word_embeddings", cfg->tie_embeddings);
  if (cfg->arch != OT_ARCH_QWEN2) ok = ok && cJSON_AddBoolToObject(root, "attention_bias", cfg->attn_bias);
  if (cfg->arch == OT_ARCH_LLAMA) ok = ok && cJSON_AddBoolToObject(root, "mlp_bias", 0);
  if (cfg->arch == OT_ARCH_QWEN2) ok = ok && cJSON_AddBoolToObject(root, "use_sliding_window", 0);
  if (cfg->arch == OT_ARCH_MISTRAL) ok = ok && cJSON_AddNullToObject(root, "sliding_window");
  ok = ok && cJSON_AddNumberToObject(root, "attention_dropout", 0);
  if (ok && cfg->rope_factor != 0.0f) {
    cJSON *rs = cJSON_AddObjectToObject(root, "rope_scaling");
    ok = rs && cJSON_AddStringToObject(rs, "rope_type", "llama3");
    char v[32];
    format_float(cfg->rope_factor, v, sizeof v);
    ok = ok && cJSON_AddRawToObject(rs, "factor", v);
    format_float(cfg->rope_low_freq_factor, v, sizeof v);
    ok = ok && cJSON_AddRawToObject(rs, "low_freq_factor", v);
    format_float(cfg->rope_high_freq_factor, v, sizeof v);
    ok = ok && cJSON_AddRawToObject(rs, "high_freq_factor", v);
    ok = ok && cJSON_AddNumberToObject(rs, "original_max_position_embeddings", cfg->rope_original_ctx);
  } else {
    ok = ok && cJSON_AddNullToObject(root, "rope_scaling");
  }
  return ok;
}

int ot_model_config_save(const char *path, const ot_model_config *cfg_in) {
  if (!path || !cfg_in) return ot_error(OT_ERR_INVALID, "ot_model_config_save: NULL argument");
  ot_model_config full = *cfg_in, *cfg = &full;
  int rc = ot_model_config_complete(cfg);
  if (rc != OT_OK) return rc;
  static const char *const classes[OT_ARCH_COUNT] = {"GPT2LMHeadModel", "LlamaForCausalLM",
                                                     "Qwen2ForCausalLM", "MistralForCausalLM"};
  char eps[32];
  format_float(cfg->layer_norm_epsilon, eps, sizeof eps);

  cJSON *root = cJSON_CreateObject();
  cJSON *arch = cJSON_CreateArray();
  int ok = root && arch && cJSON_AddItemToObject(root, "architectures", arch);
  if (!ok) cJSON_Delete(arch);
  ok = ok && cJSON_AddItemToArray(arch, cJSON_CreateString(classes[cfg->arch]));
  ok = ok && cJSON_AddStringToObject(root, "model_type", arch_names[cfg->arch]);
  ok = ok && (cfg->arch == OT_ARCH_GPT2 ? add_gpt2(root, cfg, eps) : add_llama(root, cfg, eps));
  char *text = ok ? cJSON_Print(root) : NULL;
  cJSON_Delete(root);
  if (!text) return ot_error(OT_ERR_NOMEM, "%s: cannot build config JSON", path);
  size_t len = strlen(text);
  char *buf = malloc(len + 2);
  if (!buf) {
    cJSON_free(text);
    return ot_error(OT_ERR_NOMEM, "%s: cannot build config JSON", path);
  }
  memcpy(buf, text, len);
  buf[len] = '\n';
  buf[len + 1] = '\0';
  cJSON_free(text);
  rc = ot_file_write_atomic(path, buf, len + 1);
  free(buf);
  return rc;
}

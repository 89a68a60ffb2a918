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

int ot_model_config_validate(const ot_model_config *cfg) {
  if (!cfg) return ot_error(OT_ERR_INVALID, "ot_model_config_validate: NULL config");
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
  };
  for (size_t i = 0; i < sizeof f / sizeof f[0]; i++) {
    int v;
    memcpy(&v, (const char *)cfg + f[i].off, sizeof v);
    if (v < 1 || v > f[i].max)
      return ot_error(OT_ERR_RANGE, "config: %s = %d is outside [1, %d]", f[i].name, v, f[i].max);
  }
  if (cfg->n_embd % cfg->n_head != 0)
    return ot_error(OT_ERR_INVALID, "config: n_embd = %d is not divisible by n_head = %d", cfg->n_embd,
                    cfg->n_head);
  if (!(cfg->layer_norm_epsilon > 0.0f && cfg->layer_norm_epsilon < 1.0f))
    return ot_error(OT_ERR_RANGE, "config: layer_norm_epsilon = %g is outside (0, 1)",
                    (double)cfg->layer_norm_epsilon);
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

static int parse_root(const cJSON *root, ot_model_config *cfg) {
  if (!cJSON_IsObject(root)) return ot_error(OT_ERR_FORMAT, "config: top level is not a JSON object");
  static const char *const model_types[] = {"gpt2", NULL};
  static const char *const activations[] = {"gelu_new", "gelu_pytorch_tanh", NULL};
  int rc = check_string(root, "model_type", model_types);
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

int ot_model_config_save(const char *path, const ot_model_config *cfg) {
  if (!path || !cfg) return ot_error(OT_ERR_INVALID, "ot_model_config_save: NULL argument");
  int rc = ot_model_config_validate(cfg);
  if (rc != OT_OK) return rc;
  char eps[32];
  format_float(cfg->layer_norm_epsilon, eps, sizeof eps);

  cJSON *root = cJSON_CreateObject();
  cJSON *arch = cJSON_CreateArray();
  int ok = root && arch && cJSON_AddItemToObject(root, "architectures", arch);
  if (!ok) cJSON_Delete(arch);
  ok = ok && cJSON_AddItemToArray(arch, cJSON_CreateString("GPT2LMHeadModel"));
  ok = ok && cJSON_AddStringToObject(root, "model_type", "gpt2");
  ok = ok && cJSON_AddStringToObject(root, "activation_function", "gelu_new");
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

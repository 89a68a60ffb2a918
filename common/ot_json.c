#include "ot_json.h"

#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ot_error.h"
#include "ot_fileio.h"

/* The range comes first: converting 1e10 to int is undefined (fuzz_adapter_config found it
 * with "format_version": -2.1e10). */
int ot_json_is_int(const cJSON *v) {
  return cJSON_IsNumber(v) && v->valuedouble >= INT_MIN && v->valuedouble <= INT_MAX &&
         v->valuedouble == (double)(int)v->valuedouble;
}

int ot_json_int(const cJSON *obj, const char *key, int *out) {
  const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, key);
  if (!ot_json_is_int(v)) return ot_error(OT_ERR_FORMAT, "'%s' must be an integer", key);
  *out = (int)v->valuedouble;
  return OT_OK;
}

int ot_json_int_array(const cJSON *obj, const char *key, int *v, int n, int cap, int *count) {
  const cJSON *a = cJSON_GetObjectItemCaseSensitive(obj, key);
  if (!cJSON_IsArray(a)) return ot_error(OT_ERR_FORMAT, "'%s' must be an array", key);
  int len = cJSON_GetArraySize(a);
  if ((n >= 0 && len != n) || len > cap) return ot_error(OT_ERR_FORMAT, "'%s' has %d entries", key, len);
  int i = 0;
  const cJSON *e;
  cJSON_ArrayForEach(e, a) {
    if (!ot_json_is_int(e)) return ot_error(OT_ERR_FORMAT, "'%s' must hold integers", key);
    v[i++] = (int)e->valuedouble;
  }
  if (count) *count = len;
  return OT_OK;
}

int ot_json_float_in(const cJSON *obj, const char *key, double lo, double hi, float *out) {
  const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, key);
  if (!cJSON_IsNumber(v) || !(v->valuedouble >= lo && v->valuedouble < hi))
    return ot_error(OT_ERR_FORMAT, "'%s' must be a number in [%g, %g)", key, lo, hi);
  *out = (float)v->valuedouble;
  return OT_OK;
}

cJSON *ot_json_new_int_array(const int *v, int n) {
  cJSON *a = cJSON_CreateArray();
  for (int i = 0; a && i < n; i++) cJSON_AddItemToArray(a, cJSON_CreateNumber(v[i]));
  return a;
}

cJSON *ot_json_new_float(float v) {
  char b[32];
  snprintf(b, sizeof b, "%.7g", v);
  return cJSON_CreateNumber(strtod(b, NULL));
}

int ot_json_read(const char *dir, const char *name, cJSON **out) {
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

int ot_json_write(const char *dir, const char *name, const cJSON *j) {
  char *path = NULL, *text = j ? cJSON_Print(j) : NULL;
  int rc = text ? ot_path_join(dir, name, &path) : ot_error(OT_ERR_NOMEM, "cannot format %s", name);
  if (rc == OT_OK) rc = ot_file_write_atomic(path, text, strlen(text));
  free(path);
  free(text);
  return rc;
}

int ot_json_hex_digest_ok(const char *s) {
  if (!s || strlen(s) != 64) return 0;
  for (int i = 0; i < 64; i++)
    if (!((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f'))) return 0;
  return 1;
}

/* Small JSON helpers over cJSON for the project's metadata files (emulator.json, adapter
 * configs): integers checked to be integers, whole files read with a size cap and written
 * atomically. Errors go through ot_error with the key named. */
#ifndef OT_JSON_H
#define OT_JSON_H

#include <cjson/cJSON.h>

/* A JSON number inside int range with no fraction. */
int ot_json_is_int(const cJSON *v);
/* An integer member: a JSON number inside int range with no fraction. */
int ot_json_int(const cJSON *obj, const char *key, int *out);
/* An integer array member of exactly n entries (n < 0: any length up to cap); *count its
 * length (may be NULL). */
int ot_json_int_array(const cJSON *obj, const char *key, int *v, int n, int cap, int *count);
/* A number member in [lo, hi). */
int ot_json_float_in(const cJSON *obj, const char *key, double lo, double hi, float *out);
cJSON *ot_json_new_int_array(const int *v, int n);
/* A float as JSON shows it in decimal (0.05, not 0.05000000074505806). */
cJSON *ot_json_new_float(float v);
/* Reads and parses dir/name (at most 1 MiB). */
int ot_json_read(const char *dir, const char *name, cJSON **out);
/* Writes j to dir/name atomically (pretty-printed). */
int ot_json_write(const char *dir, const char *name, const cJSON *j);
/* 1 if s is a lowercase 64-digit hex string (a BLAKE2b-256 digest). */
int ot_json_hex_digest_ok(const char *s);

#endif

/* Helpers shared by ot_emulator.c and ot_adapter.c (not a public interface). */
#ifndef OT_EMU_INTERNAL_H
#define OT_EMU_INTERNAL_H

#include <cjson/cJSON.h>

#include "ot_emulator.h"

cJSON *ot_emu_int_array(const int *v, int n);
/* Writes j as dir/name atomically. */
int ot_emu_write_json(const char *dir, const char *name, cJSON *j);
int ot_emu_read_json(const char *dir, const char *name, cJSON **out);
int ot_emu_json_int(const cJSON *j, const char *key, int *out);
/* An integer array of exactly n entries (n < 0: any length up to cap). */
int ot_emu_json_int_array(const cJSON *j, const char *key, int *v, int n, int cap, int *count);
int ot_emu_hex_digest_ok(const char *s);
/* Local block of full block f: itself on the full model (plan NULL), the adapter block that
 * came from it on an emulator; -1 if none. */
int ot_emu_local_block(const ot_emu_plan *plan, int n_layer, int f);

#endif

/* libFuzzer harness: the operator socket's requests ({"cmd": ...} JSON, ot_daemon_ctl_request)
 * through the real dispatcher, registry and session checks (fuzz_daemon.h: a fresh in-memory
 * registry per input with a model, a device and two running sessions).
 *
 * Input: up to 8 requests, one per line, run in order (so a session.create can be followed by
 * a session.show of it). Every request gets a JSON reply {"ok": true, ...} or {"ok": false,
 * "error": "..."}; a session that session.create accepted is stored with settings that read back
 * and validate again; the sessions the fixture made survive whatever the operator sends. */
#include "fuzz_daemon.h"

#include "ot_error.h"

#include <cjson/cJSON.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static fz_daemon *fz;

int LLVMFuzzerInitialize(int *argc, char ***argv) {
  (void)argc;
  (void)argv;
  fz = fz_daemon_init();
  return 0;
}

/* The stored settings of a session read back: what the scheduler and the devices get later. */
static void check_stored(const char *name) {
  ot_session_row row;
  if (ot_reg_session_get(fz->d->reg, name, &row) != OT_OK || strcmp(row.cfg.name, name) != 0) abort();
  cJSON *j = ot_session_cfg_to_json(&row.cfg);
  ot_session_cfg back;
  if (!j || ot_session_cfg_from_json(j, &back) != OT_OK) abort();
  cJSON_Delete(j);
}

static void request(const char *line, size_t len) {
  char *text = ot_daemon_ctl_request(fz->d, line, len, 1);
  if (!text) abort();
  cJSON *reply = cJSON_Parse(text);
  free(text);
  const cJSON *ok = cJSON_GetObjectItemCaseSensitive(reply, "ok");
  if (!cJSON_IsBool(ok)) abort();
  if (cJSON_IsFalse(ok)) {
    const char *e = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(reply, "error"));
    if (!e || !*e) abort(); /* a refusal says why */
  } else {
    cJSON *req = cJSON_ParseWithLength(line, len);
    const char *cmd = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(req, "cmd"));
    const char *made = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(reply, "session"));
    if (cmd && strcmp(cmd, "session.create") == 0) {
      if (!made) abort();
      check_stored(made);
    }
    cJSON_Delete(req);
  }
  cJSON_Delete(reply);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  fz_daemon_reset(fz);
  const char *p = (const char *)data, *end = p + size;
  for (int n = 0; n < 8 && p < end; n++) {
    const char *nl = memchr(p, '\n', (size_t)(end - p));
    size_t len = nl ? (size_t)(nl - p) : (size_t)(end - p);
    request(p, len);
    p += len + (nl ? 1 : 0);
  }
  /* no operator command removes a session */
  check_stored("s");
  check_stored("q");
  ot_error_clear();
  return 0;
}

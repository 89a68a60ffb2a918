/* The operator socket: nng REQ/REP on ipc://STATE/control.sock, one JSON request
 * {"cmd": "...", ...} -> one JSON reply {"ok": true, ...} or {"ok": false, "error": "..."}.
 * Security: the socket file is created 0600 inside the 0700 state directory, so only
 * the daemon's user (and root) can connect; it is never exposed on the network. */
#include <nng/nng.h>
#include <nng/protocol/reqrep0/rep.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "ot_daemon.h"
#include "ot_dp.h"
#include "ot_model_config.h"
#include "ot_error.h"
#include "ot_fileio.h"

static cJSON *ok_reply(void) {
  cJSON *r = cJSON_CreateObject();
  cJSON_AddBoolToObject(r, "ok", 1);
  return r;
}

static const char *str_arg(const cJSON *req, const char *key) {
  return cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(req, key));
}

static int add_list(ot_daemon *d, cJSON *reply, const char *key, const char *what, const char *arg) {
  cJSON *arr = NULL;
  int rc = ot_reg_list_json(d->reg, what, arg, &arr);
  if (rc == OT_OK) cJSON_AddItemToObject(reply, key, arr);
  return rc;
}

/* Settings that the model decides are checked now, not when the emulator is distilled;
 * sequence lengths of 0 become the model's context (so the token cap of an update is
 * exact). */
static int check_against_model(const char *dir, ot_session_cfg *c) {
  char path[1100];
  ot_model_config mc;
  snprintf(path, sizeof path, "%s/config.json", dir);
  int rc = ot_model_config_load(path, &mc);
  int keep = c->keep;
  ot_emu_plan plan;
  if (rc == OT_OK && !keep) rc = ot_emu_keep_for_ratio(mc.n_layer, c->bottom, c->top, 0.5f, &keep);
  if (rc == OT_OK) rc = ot_emu_plan_make(mc.n_layer, c->bottom, c->top, keep, &plan);
  if (rc == OT_OK && (c->seq_len > mc.n_positions || c->distill_seq > mc.n_positions))
    rc = ot_error(OT_ERR_INVALID, "sequence length over the model's context of %d", mc.n_positions);
  if (rc == OT_OK && c->distill_data[0] && !ot_file_exists(c->distill_data))
    rc = ot_error(OT_ERR_NOTFOUND, "distillation text %s: no such file", c->distill_data);
  if (rc == OT_OK && c->eval_data[0] && !ot_file_exists(c->eval_data))
    rc = ot_error(OT_ERR_NOTFOUND, "held-out text %s: no such file", c->eval_data);
  if (rc == OT_OK && !c->seq_len) c->seq_len = mc.n_positions;
  if (rc == OT_OK && !c->distill_seq) c->distill_seq = mc.n_positions;
  return rc;
}

/* The DP accountant's epsilon after each finished round (deterministic from the settings). */
static int add_dp(cJSON *reply, const ot_session_row *s) {
  const ot_session_cfg *c = &s->cfg;
  int done = s->state == OT_SS_DONE ? s->round : s->round - 1;
  double z = 0;
  int rc = ot_session_dp_noise(c, &z);
  if (rc) return rc;
  cJSON *dp = cJSON_AddObjectToObject(reply, "dp"), *eps = cJSON_AddArrayToObject(dp, "epsilon");
  cJSON_AddNumberToObject(dp, "budget", c->dp_epsilon);
  cJSON_AddNumberToObject(dp, "delta", c->dp_delta);
  cJSON_AddNumberToObject(dp, "clip", c->dp_clip);
  cJSON_AddNumberToObject(dp, "noise", z);
  ot_dp_accountant a;
  ot_dp_accountant_init(&a);
  double e = 0;
  for (int k = 1; rc == OT_OK && k <= done; k++) {
    rc = ot_dp_accountant_step(&a, 1.0, z, 1);
    if (rc == OT_OK) rc = ot_dp_epsilon(&a, c->dp_delta, &e, NULL);
    if (rc == OT_OK) cJSON_AddItemToArray(eps, cJSON_CreateNumber(e));
  }
  cJSON_AddNumberToObject(dp, "epsilon_spent", e);
  return rc;
}

static int handle(ot_daemon *d, const cJSON *req, cJSON *reply) {
  const char *cmd = str_arg(req, "cmd");
  if (!cmd) return ot_error(OT_ERR_FORMAT, "request without \"cmd\"");
  if (strcmp(cmd, "session.create") == 0) {
    const cJSON *cfgj = cJSON_GetObjectItemCaseSensitive(req, "config");
    ot_session_cfg cfg;
    int rc = ot_session_cfg_from_json(cfgj, &cfg);
    char dir[1024], digest[OT_DIGEST_HEX];
    if (rc == OT_OK) rc = ot_reg_model_get(d->reg, cfg.model, dir, digest);
    if (rc == OT_OK) rc = check_against_model(dir, &cfg);
    int64_t id;
    if (rc == OT_OK) rc = ot_reg_session_create(d->reg, &cfg, &id);
    if (rc) return rc;
    ot_daemon_log(d, "session '%s' created (model %s, %s adapter, %d rounds, %d..%d devices, %s)", cfg.name,
                  cfg.model, ot_peft_kind_name(cfg.adapter.kind), cfg.rounds, cfg.min_devices,
                  cfg.max_devices, ot_agg_name(cfg.agg));
    ot_daemon_kick(d);
    cJSON_AddStringToObject(reply, "session", cfg.name);
    return OT_OK;
  }
  if (strcmp(cmd, "session.list") == 0) return add_list(d, reply, "sessions", "sessions", NULL);
  if (strcmp(cmd, "session.show") == 0) {
    const char *name = str_arg(req, "name");
    cJSON *arr = NULL;
    int rc = name ? ot_reg_list_json(d->reg, "session", name, &arr)
                  : ot_error(OT_ERR_INVALID, "session.show needs \"name\"");
    if (rc == OT_OK && cJSON_GetArraySize(arr) != 1)
      rc = ot_error(OT_ERR_NOTFOUND, "no session named '%s'", name);
    if (rc == OT_OK) cJSON_AddItemToObject(reply, "session", cJSON_DetachItemFromArray(arr, 0));
    cJSON_Delete(arr);
    ot_session_row row;
    if (rc == OT_OK && ot_reg_session_get(d->reg, name, &row) == OT_OK && row.cfg.dp_epsilon > 0)
      rc = add_dp(reply, &row);
    if (rc == OT_OK) rc = add_list(d, reply, "rounds", "rounds", name);
    if (rc == OT_OK) rc = add_list(d, reply, "updates", "updates", name);
    if (rc == OT_OK) rc = add_list(d, reply, "metrics", "round_stats", name);
    return rc;
  }
  if (strcmp(cmd, "device.list") == 0) return add_list(d, reply, "devices", "devices", NULL);
  if (strcmp(cmd, "device.revoke") == 0) {
    const char *who = str_arg(req, "device");
    char fp[OT_FINGERPRINT_LEN];
    int rc = who ? ot_reg_device_revoke(d->reg, who, fp)
                 : ot_error(OT_ERR_INVALID, "device.revoke needs \"device\"");
    if (rc == OT_OK) {
      ot_daemon_log(d, "device %s revoked", fp);
      cJSON_AddStringToObject(reply, "device", fp);
    }
    return rc;
  }
  if (strcmp(cmd, "token.issue") == 0) {
    char token[OT_TOKEN_CHARS + 1];
    const char *label = str_arg(req, "label");
    int rc = ot_reg_token_issue(d->reg, label, token);
    if (rc == OT_OK) {
      ot_daemon_log(d, "issued an enrolment token%s%s", label ? " for " : "", label ? label : "");
      cJSON_AddStringToObject(reply, "token", token);
    }
    return rc;
  }
  if (strcmp(cmd, "adapter.list") == 0) return add_list(d, reply, "adapters", "adapters", NULL);
  if (strcmp(cmd, "adapter.publish") == 0 || strcmp(cmd, "adapter.unpublish") == 0) {
    const char *name = str_arg(req, "name");
    if (!name) return ot_error(OT_ERR_INVALID, "%s needs \"name\"", cmd);
    return ot_reg_adapter_publish(d->reg, name, strcmp(cmd, "adapter.publish") == 0);
  }
  if (strcmp(cmd, "adapter.delete") == 0) {
    const char *name = str_arg(req, "name");
    return name ? ot_reg_adapter_delete(d->reg, name)
                : ot_error(OT_ERR_INVALID, "adapter.delete needs \"name\"");
  }
  if (strcmp(cmd, "model.list") == 0) return add_list(d, reply, "models", "models", NULL);
  if (strcmp(cmd, "audit.list") == 0) return add_list(d, reply, "audit", "audit", NULL);
  return ot_error(OT_ERR_INVALID, "unknown command '%s'", cmd);
}

char *ot_daemon_ctl_request(ot_daemon *d, const char *body, size_t len, int peer_ok) {
  cJSON *req = cJSON_ParseWithLength(body, len);
  cJSON *reply = ok_reply();
  int rc = !peer_ok ? ot_error(OT_ERR_INVALID, "operator commands are for the daemon's own user")
           : req    ? handle(d, req, reply)
                    : ot_error(OT_ERR_FORMAT, "request is not JSON");
  if (rc) {
    cJSON_Delete(reply);
    reply = cJSON_CreateObject();
    cJSON_AddBoolToObject(reply, "ok", 0);
    cJSON_AddStringToObject(reply, "error", ot_error_detail());
  }
  const char *cmd = req ? str_arg(req, "cmd") : NULL;
  if (cmd && strcmp(cmd, "session.list") != 0 && strstr(cmd, ".list") == NULL && strcmp(cmd, "session.show"))
    ot_daemon_log(d, "operator: %s: %s", cmd, rc ? ot_error_detail() : "ok");
  cJSON_Delete(req);
  char *text = cJSON_PrintUnformatted(reply);
  cJSON_Delete(reply);
  return text;
}

void *ot_daemon_ctl_main(void *arg) {
  ot_daemon *d = arg;
  char url[2700], path[2600];
  nng_socket s;
  nng_listener l;
  int rv = nng_rep0_open(&s);
  if (ot_daemon_path(d, path, sizeof path, "control.sock") != OT_OK) rv = NNG_EINVAL;
  snprintf(url, sizeof url, "ipc://%s", path);
  if (!rv) rv = nng_socket_set_ms(s, NNG_OPT_RECVTIMEO, 200);
  if (!rv) rv = nng_socket_set_size(s, NNG_OPT_RECVMAXSZ, 1 << 20);
  if (!rv) rv = nng_listener_create(&l, s, url);
  if (!rv) rv = nng_listener_set_int(l, NNG_OPT_IPC_PERMISSIONS, 0600);
  if (!rv) rv = nng_listener_start(l, 0);
  if (rv) {
    ot_daemon_log(d, "operator socket %s: %s (operator commands unavailable)", url, nng_strerror(rv));
    return NULL;
  }
  ot_daemon_log(d, "operator socket %s (0600)", url);
  for (;;) {
    pthread_mutex_lock(&d->mu);
    int stop = d->stop;
    pthread_mutex_unlock(&d->mu);
    if (stop) break;
    nng_msg *msg = NULL;
    rv = nng_recvmsg(s, &msg, 0);
    if (rv == NNG_ETIMEDOUT) continue;
    if (rv) {
      ot_daemon_log(d, "operator socket: %s (operator commands unavailable)", nng_strerror(rv));
      break;
    }
    /* the file mode already keeps other users out; the peer's uid says so again */
    uint64_t uid = UINT64_MAX;
    int peer_ok = nng_pipe_get_uint64(nng_msg_get_pipe(msg), NNG_OPT_IPC_PEER_UID, &uid) == 0 &&
                  (uid == (uint64_t)getuid() || uid == 0);
    char *text = ot_daemon_ctl_request(d, nng_msg_body(msg), nng_msg_len(msg), peer_ok);
    nng_msg_free(msg);
    if (text) {
      rv = nng_send(s, text, strlen(text), 0);
      if (rv) ot_daemon_log(d, "operator socket: reply not sent: %s", nng_strerror(rv));
    }
    free(text);
  }
  nng_close(s);
  unlink(path);
  return NULL;
}

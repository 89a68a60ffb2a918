/* The cloud daemon's registry: one database, SQLite (STATE/registry.db, WAL, foreign
 * keys, busy timeout) or PostgreSQL (--registry postgresql://...: several daemons share it),
 * behind ot_regdb.h; schema_version + migrations holding models, emulators, devices,
 * enrolment tokens, sessions, rounds, updates, adapters, the serving API's keys and an audit log. Tensors are
 * files under STATE/objects/, written (temp, fsync, rename) before the row that names
 * them commits (docs/daemon.md).
 *
 * One connection behind a mutex: every call is one transaction and thread-safe.
 * ot_reg_open takes a file path (SQLite) or a PostgreSQL URI / conninfo (ot_regdb_is_pg). */
#ifndef OT_REGISTRY_H
#define OT_REGISTRY_H

#include <cjson/cJSON.h>
#include <stddef.h>
#include <stdint.h>

#include "ot_access.h"
#include "ot_digest.h"
#include "ot_session.h"

#define OT_REG_SCHEMA_VERSION 5

typedef struct ot_registry ot_registry;

int ot_reg_open(const char *path, ot_registry **out);
void ot_reg_close(ot_registry *r);
int ot_reg_schema_version(ot_registry *r, int *out);

/* Audit log: one row per state change and per refusal worth keeping. */
int ot_reg_audit(ot_registry *r, const char *actor, const char *event, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

/* ---- access control: devices and one-time tokens --------------------------------- */
extern const ot_access_ops ot_reg_access_ops; /* self = the ot_registry */
int ot_reg_token_issue(ot_registry *r, const char *label, char token[OT_TOKEN_CHARS + 1]);
/* Revokes the device whose fingerprint or 64-hex key is given; at once for every request. */
int ot_reg_device_revoke(ot_registry *r, const char *who, char fp[OT_FINGERPRINT_LEN]);
/* Row id of an enrolled, unrevoked device. */
int ot_reg_device_id(ot_registry *r, const uint8_t pk[OT_PK_BYTES], int64_t *id);
int ot_reg_device_set_name(ot_registry *r, int64_t id, const char *name);

/* ---- models and emulators ---------------------------------------------------------- */
/* Registers (or updates the directory of) a model under name. */
int ot_reg_model_put(ot_registry *r, const char *name, const char *dir, const char *digest);
int ot_reg_model_get(ot_registry *r, const char *name, char dir[1024], char digest[OT_DIGEST_HEX]);
int ot_reg_emulator_get(ot_registry *r, const char *model_digest, const char *key, int64_t *id,
                        char dir[1024], char digest[OT_DIGEST_HEX]);
int ot_reg_emulator_put(ot_registry *r, const char *model_digest, const char *key, const char *dir,
                        const char *digest, int64_t *id);
int ot_reg_emulator_dir(ot_registry *r, int64_t id, char dir[1024], char digest[OT_DIGEST_HEX]);
/* The emulator's gap to its full model, as its distillation ended: the KD term (the
 * normalised squared distance of the middle's output to the full model's) and the CE. */
int ot_reg_emulator_set_gap(ot_registry *r, int64_t id, double kd, double ce);
/* The gap it gives away, measured on held-out public text: a JSON object (emulator.json's
 * measured_gap plus the keep and steps shipped), shown by session show and the listings. */
int ot_reg_emulator_set_measured_gap(ot_registry *r, int64_t id, const char *json);

/* ---- sessions and rounds ----------------------------------------------------------- */
typedef enum { OT_SS_PREPARING = 0, OT_SS_RUNNING, OT_SS_DONE, OT_SS_FAILED } ot_session_state;
typedef enum { OT_RS_OPEN = 0, OT_RS_AGGREGATING, OT_RS_DONE } ot_round_state;
const char *ot_session_state_name(ot_session_state s);

typedef struct {
  int64_t id;
  ot_session_cfg cfg;
  ot_session_state state;
  int round; /* current round (1-based); 0 while preparing */
  int64_t emulator_id;
  char adapter[OT_DIGEST_HEX];   /* current global adapter (objects/adapters/<digest>) */
  char opt_state[OT_DIGEST_HEX]; /* FedAdam moments (objects/state/<digest>.safetensors) or "" */
  /* the current round */
  ot_round_state round_state;
  int64_t deadline;
  int attempts;
  int n_updates;
} ot_session_row;

int ot_reg_session_create(ot_registry *r, const ot_session_cfg *cfg, int64_t *id);
/* By name, or the oldest unfinished session when name is NULL or "". */
int ot_reg_session_get(ot_registry *r, const char *name, ot_session_row *out);
int ot_reg_session_get_id(ot_registry *r, int64_t id, ot_session_row *out);
/* Ids of unfinished sessions, oldest first (up to cap). */
int ot_reg_sessions_active(ot_registry *r, int64_t *ids, int cap, int *n);
/* Preparing -> running: emulator and initial adapter in place, round 1 opens. */
int ot_reg_session_start(ot_registry *r, int64_t id, int64_t emulator_id, const char *adapter_digest,
                         int64_t deadline);
int ot_reg_session_fail(ot_registry *r, int64_t id, const char *why);
/* The round's deadline passed with too few updates: another attempt with a new deadline. */
int ot_reg_round_retry(ot_registry *r, int64_t id, int round, int64_t deadline);
/* Open -> aggregating: from now on the round accepts no update. */
int ot_reg_round_close(ot_registry *r, int64_t id, int round);

typedef struct {
  int64_t device_id;
  uint64_t tokens;
  float loss;
  char digest[OT_DIGEST_HEX]; /* objects/updates/<digest>.safetensors */
} ot_update_row;
/* The accepted updates of a round, by device id (malloc'd array). */
int ot_reg_round_updates(ot_registry *r, int64_t id, int round, ot_update_row **out, int *n);
/* The daemon's record of a finished round (round_stats; docs/report.md). */
typedef struct {
  int participants; /* devices in the result */
  int dropped;      /* refused at aggregation (plain) or left the masking (secure aggregation) */
  double tokens;    /* tokens trained by the devices in the result (NAN: unknown: secure aggregation) */
  double agg_seconds;
  double dp_epsilon; /* after this round (NAN: no DP) */
  int secagg;
  double heldout_loss; /* the full model with the round's adapter on the session's eval_data (NAN: none) */
} ot_round_stats;
/* Round 0's record: the held-out loss of the session's initial adapter (nothing else). */
int ot_reg_round_baseline(ot_registry *r, int64_t session_id, double heldout_loss);
/* One transaction: round done with its result and its record (stats, may be NULL; the mean
 * of the losses devices reported and the emulator's gap are read here from the registry), the
 * session's adapter (and FedAdam state) replaced, the next round opened, or the session done
 * and the adapter published under the session's name. */
int ot_reg_round_finish(ot_registry *r, int64_t id, int round, const char *adapter_digest,
                        const char *opt_state, int64_t next_deadline, const char *adapter_dir,
                        const ot_round_stats *stats);

/* A finished round's participant count when no update rows record it (secure aggregation). */
int ot_reg_round_set_participants(ot_registry *r, int64_t id, int round, int n);

/* An update: refused (OT_ERR_MISMATCH with the reason) unless the session runs, round is
 * its open round and the device has none there yet. */
int ot_reg_update_add(ot_registry *r, int64_t session_id, int round, int64_t device_id, uint64_t tokens,
                      float loss, const char *digest);
/* digest (may be NULL) gets the stored update's digest when it exists. */
int ot_reg_update_exists(ot_registry *r, int64_t session_id, int round, int64_t device_id, int *exists,
                         char digest[OT_DIGEST_HEX]);

/* ---- per-round records (issue 19) ---------------------------------------------------- */
/* What a device said about a round outside an update row: "loss" (its mean training loss,
 * secure aggregation's SecAggJoin) or "late" (an upload or message for a round that was
 * already closed: a straggler). One row per (session, round, device, kind); the last wins. */
int ot_reg_round_event(ot_registry *r, int64_t session_id, int round, int64_t device_id, const char *kind,
                       double value);

/* ---- leadership among daemons sharing the registry (issue 18) ----------------------------- */
/* The lease of a session's scheduling (a row: owner, expiry on the database's clock): taken
 * when free, expired or already the owner's (then it is a renewal). *held = 1 when owner holds
 * it for ttl_s more seconds; 0 while another daemon does. */
int ot_reg_lease_take(ot_registry *r, int64_t session_id, const char *owner, int ttl_s, int *held);
/* Extends every unexpired lease of owner on an unfinished session by ttl_s from now (the
 * daemon's keeper thread: a session stays led while its leader lives, however long one step
 * takes); removes owner's leases of finished sessions. */
int ot_reg_lease_renew(ot_registry *r, const char *owner, int ttl_s);
/* The owner of session_id's unexpired lease into owner ("" when none holds it now). */
int ot_reg_lease_owner(ot_registry *r, int64_t session_id, char *owner, size_t cap);
/* Gives up every lease of owner (a daemon stopping cleanly: the others take over at once). */
int ot_reg_lease_drop(ot_registry *r, const char *owner);

/* 1 if digest is the current adapter of a running session (devices may fetch it). */
int ot_reg_adapter_served(ot_registry *r, const char *digest, int *served);

/* ---- adapters ------------------------------------------------------------------------ */
int ot_reg_adapter_publish(ot_registry *r, const char *name, int published);
int ot_reg_adapter_delete(ot_registry *r, const char *name);
/* Published adapters of sessions on the model with this digest (what the daemon serves):
 * fn(user, name, dir) for the one named `name`, or for every one when name is NULL.
 * *found (may be NULL) counts the calls. */
int ot_reg_adapters_published(ot_registry *r, const char *model_digest, const char *name,
                              void (*fn)(void *user, const char *name, const char *dir), void *user,
                              int *found);

/* ---- API keys of the serving HTTP API ------------------------------------------------ */
/* A key ("otk-" + 32 random bytes, base64url) belongs to a tenant: it sees and uses the base
 * models listed (comma-separated names, or "*") and the adapters named "TENANT/..."; an admin
 * key sees every adapter and /metrics, and manages adapters. Only the key's hash is stored; the
 * key is shown once, at creation. */
#define OT_API_KEY_CHARS 47
#define OT_API_KEY_ID_CHARS 16 /* "key-" + 12 hex of the hash */
#define OT_API_TENANT_MAX 64
typedef struct {
  char id[OT_API_KEY_ID_CHARS + 1];
  char tenant[OT_API_TENANT_MAX];
  char models[1024];
  int admin;
  int64_t revoked_at; /* 0 = active */
} ot_api_key_row;
/* 1 if t is a valid tenant name (1-63 of A-Z a-z 0-9 _ - ., not starting with '.' or '-'). */
int ot_api_tenant_ok(const char *t);
int ot_api_tenant_ok_n(const char *t, size_t n); /* the first n bytes of t */
int ot_reg_api_key_create(ot_registry *r, const char *tenant, const char *models, int admin,
                          const char *label, char key[OT_API_KEY_CHARS + 1],
                          char id[OT_API_KEY_ID_CHARS + 1]);
/* Revokes the key with this id (OT_ERR_NOTFOUND if none is active); every later request fails. */
int ot_reg_api_key_revoke(ot_registry *r, const char *id);
/* The key's row (revoked ones too: revoked_at says); OT_ERR_NOTFOUND for an unknown key. */
int ot_reg_api_key_check(ot_registry *r, const char *key, ot_api_key_row *out);
/* 1 if the key may use the base model named base. */
int ot_api_key_allows_model(const ot_api_key_row *k, const char *base);

/* ---- listings for the operator (JSON arrays of row objects) ------------------------- */
int ot_reg_list_json(ot_registry *r, const char *what, const char *arg, cJSON **out);

#endif

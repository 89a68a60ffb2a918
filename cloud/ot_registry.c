#include "ot_registry.h"

#include <pthread.h>
#include <sodium.h>
#include <ctype.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ot_error.h"
#include "ot_regdb.h"

struct ot_registry {
  ot_regdb *db;
  pthread_mutex_t mu;
};

/* Migrations: migrations[v] brings schema version v to v+1. */
static const char *const migrations[] = {
    "CREATE TABLE models(id INTEGER PRIMARY KEY, name TEXT UNIQUE NOT NULL, dir TEXT NOT NULL,"
    "  digest TEXT NOT NULL, added_at INTEGER NOT NULL);"
    "CREATE TABLE emulators(id INTEGER PRIMARY KEY, model_digest TEXT NOT NULL, settings TEXT NOT NULL,"
    "  dir TEXT NOT NULL, digest TEXT NOT NULL, created_at INTEGER NOT NULL,"
    "  UNIQUE(model_digest, settings));"
    "CREATE TABLE devices(id INTEGER PRIMARY KEY, pk BLOB UNIQUE NOT NULL, fingerprint TEXT NOT NULL,"
    "  name TEXT, enrolled_at INTEGER NOT NULL, revoked_at INTEGER);"
    "CREATE TABLE tokens(hash BLOB PRIMARY KEY, label TEXT, issued_at INTEGER NOT NULL,"
    "  used_by INTEGER REFERENCES devices(id), used_at INTEGER);"
    "CREATE TABLE sessions(id INTEGER PRIMARY KEY, name TEXT UNIQUE NOT NULL, config TEXT NOT NULL,"
    "  state TEXT NOT NULL CHECK(state IN ('preparing','running','done','failed')),"
    "  round INTEGER NOT NULL DEFAULT 0, emulator_id INTEGER REFERENCES emulators(id),"
    "  adapter TEXT, opt_state TEXT, error TEXT, created_at INTEGER NOT NULL, updated_at INTEGER NOT NULL);"
    "CREATE TABLE rounds(session_id INTEGER NOT NULL REFERENCES sessions(id), round INTEGER NOT NULL,"
    "  state TEXT NOT NULL CHECK(state IN ('open','aggregating','done')), started_at INTEGER NOT NULL,"
    "  deadline INTEGER NOT NULL, attempts INTEGER NOT NULL DEFAULT 1, participants INTEGER NOT NULL DEFAULT "
    "0,"
    "  input TEXT NOT NULL, result TEXT, finished_at INTEGER, PRIMARY KEY(session_id, round));"
    "CREATE TABLE updates(id INTEGER PRIMARY KEY, session_id INTEGER NOT NULL, round INTEGER NOT NULL,"
    "  device_id INTEGER NOT NULL REFERENCES devices(id), tokens INTEGER NOT NULL CHECK(tokens > 0),"
    "  loss REAL, digest TEXT NOT NULL, received_at INTEGER NOT NULL,"
    "  UNIQUE(session_id, round, device_id),"
    "  FOREIGN KEY(session_id, round) REFERENCES rounds(session_id, round));"
    "CREATE TABLE adapters(id INTEGER PRIMARY KEY, name TEXT UNIQUE NOT NULL,"
    "  session_id INTEGER REFERENCES sessions(id), dir TEXT NOT NULL, digest TEXT NOT NULL,"
    "  published INTEGER NOT NULL DEFAULT 0, created_at INTEGER NOT NULL);"
    "CREATE TABLE audit(id INTEGER PRIMARY KEY, at INTEGER NOT NULL, actor TEXT NOT NULL,"
    "  event TEXT NOT NULL, detail TEXT);",
    /* 1 -> 2: API keys of the serving HTTP API (issue 13) */
    "CREATE TABLE api_keys(hash BLOB PRIMARY KEY, id TEXT UNIQUE NOT NULL, tenant TEXT NOT NULL,"
    "  models TEXT NOT NULL, admin INTEGER NOT NULL DEFAULT 0, label TEXT, created_at INTEGER NOT NULL,"
    "  revoked_at INTEGER);",
    /* 2 -> 3 (issue 19): the round's record, devices' reports, the emulator's gap */
    "CREATE TABLE round_stats(session_id INTEGER NOT NULL REFERENCES sessions(id), round INTEGER NOT NULL,"
    "  participants INTEGER NOT NULL, dropped INTEGER NOT NULL, tokens REAL, mean_loss REAL,"
    "  losses_reported INTEGER NOT NULL, agg_seconds REAL, emulator_gap REAL, dp_epsilon REAL, heldout_loss "
    "REAL,"
    "  secagg INTEGER NOT NULL, recorded_at INTEGER NOT NULL, PRIMARY KEY(session_id, round));"
    "CREATE TABLE round_events(session_id INTEGER NOT NULL REFERENCES sessions(id), round INTEGER NOT NULL,"
    "  device_id INTEGER NOT NULL REFERENCES devices(id), kind TEXT NOT NULL CHECK(kind IN ('loss','late')),"
    "  value REAL, at INTEGER NOT NULL, PRIMARY KEY(session_id, round, device_id, kind));"
    "ALTER TABLE emulators ADD COLUMN kd REAL;"
    "ALTER TABLE emulators ADD COLUMN ce REAL;",
    /* 3 -> 4 (issue 18): which daemon drives a session's rounds, until when (several daemons
     * on one database) */
    "CREATE TABLE leases(session_id INTEGER NOT NULL PRIMARY KEY REFERENCES sessions(id), owner TEXT NOT "
    "NULL,"
    "  expires_at INTEGER NOT NULL, taken_at INTEGER NOT NULL);"
    "CREATE INDEX leases_owner ON leases(owner);",
    /* 4 -> 5 (issue 15): the gap the emulator gives away, measured on held-out public text (JSON:
     * gap, full_perplexity, emulator_perplexity, tokens, text, keep, steps, target) */
    "ALTER TABLE emulators ADD COLUMN measured_gap TEXT;",
};
#define N_MIGRATIONS ((int)(sizeof migrations / sizeof migrations[0]))
_Static_assert(sizeof migrations / sizeof migrations[0] == OT_REG_SCHEMA_VERSION,
               "one migration per version");

static int64_t now_s(void) { return (int64_t)time(NULL); }

static int pg(const ot_registry *r) { return ot_regdb_dialect_of(r->db) == OT_DB_PG; }
/* The query text of this registry's dialect: sqlite's, or pgsql's where they differ. */
#define DIALECT(r, sqlite, pgsql) (pg(r) ? (pgsql) : (sqlite))

static int exec(ot_registry *r, const char *sql) { return ot_regdb_exec(r->db, sql); }

/* Statement helper: "?" parameters bound from a format of i (int64), t (text, NULL ok),
 * b (32-byte blob), d (double). */
static int prep(ot_registry *r, ot_regdb_stmt **st, const char *sql, const char *fmt, ...) {
  int rc = ot_regdb_prepare(r->db, sql, st);
  if (rc) return rc;
  va_list ap;
  va_start(ap, fmt);
  for (int i = 0; fmt && fmt[i] && rc == OT_OK; i++) {
    switch (fmt[i]) {
    case 'i': rc = ot_regdb_bind_int64(*st, i + 1, va_arg(ap, int64_t)); break;
    case 't': rc = ot_regdb_bind_text(*st, i + 1, va_arg(ap, const char *)); break;
    case 'b': rc = ot_regdb_bind_blob(*st, i + 1, va_arg(ap, const uint8_t *), 32); break;
    case 'd': rc = ot_regdb_bind_double(*st, i + 1, va_arg(ap, double)); break;
    }
  }
  va_end(ap);
  if (rc) ot_regdb_finalize(*st);
  return rc;
}

/* Runs a statement that returns no rows (or ignores them); finalizes it. */
static int run(ot_regdb_stmt *st) {
  int s = ot_regdb_step(st);
  while (s == 1) s = ot_regdb_step(st);
  ot_regdb_finalize(st);
  return s < 0 ? s : OT_OK;
}

/* Runs a statement whose first row's first column is an id (INSERT ... RETURNING id). */
static int run_id(ot_regdb_stmt *st, int64_t *id) {
  int s = ot_regdb_step(st);
  if (s == 1) *id = ot_regdb_column_int64(st, 0);
  while (s == 1) s = ot_regdb_step(st);
  ot_regdb_finalize(st);
  return s < 0 ? s : OT_OK;
}

#define RUNQ(sql, fmt, ...)                                                                                  \
  do {                                                                                                       \
    ot_regdb_stmt *st_;                                                                                      \
    if (rc == OT_OK) rc = prep(r, &st_, sql, fmt, __VA_ARGS__);                                              \
    if (rc == OT_OK) rc = run(st_);                                                                          \
  } while (0)

static void lock(ot_registry *r) { pthread_mutex_lock(&r->mu); }
static void unlock(ot_registry *r) { pthread_mutex_unlock(&r->mu); }
/* SQLite: the write lock at once (no upgrade deadlock). PostgreSQL: READ COMMITTED, with the
 * row locks each check-then-write takes (ot_reg_update_add) or a conditional UPDATE whose
 * changed-row count decides (round_finish, token use). */
static int begin(ot_registry *r) { return exec(r, DIALECT(r, "BEGIN IMMEDIATE", "BEGIN")); }
/* Commits on success, rolls back otherwise; returns rc (or the commit's error). */
static int end(ot_registry *r, int rc) {
  if (rc == OT_OK) {
    rc = exec(r, "COMMIT");
    if (rc == OT_OK) return OT_OK;
  }
  char keep[1024];
  snprintf(keep, sizeof keep, "%s", ot_error_detail());
  exec(r, "ROLLBACK");
  ot_error(rc, "%s", keep);
  return rc;
}

static void copy_col(ot_regdb_stmt *st, int col, char *dst, size_t n) {
  const char *t = ot_regdb_column_text(st, col);
  snprintf(dst, n, "%s", t ? t : "");
}

/* The schema in PostgreSQL's types: INTEGER PRIMARY KEY -> BIGSERIAL PRIMARY KEY (SQLite's
 * rowid), INTEGER -> BIGINT (times and counts are 64-bit in SQLite), REAL -> DOUBLE PRECISION,
 * BLOB -> BYTEA. Words only, never inside quotes. malloc'd. */
static char *schema_pg(const char *sql) {
  static const struct {
    const char *from, *to;
  } w[] = {{"INTEGER PRIMARY KEY", "BIGSERIAL PRIMARY KEY"},
           {"INTEGER", "BIGINT"},
           {"REAL", "DOUBLE PRECISION"},
           {"BLOB", "BYTEA"}};
  size_t len = strlen(sql);
  char *out = malloc(len * 4 + 1), *o = out; /* "REAL" grows most: 4 -> 16 */
  if (!out) return NULL;
  char quote = 0;
  for (const char *p = sql; *p;) {
    if (quote || *p == '\'') {
      if (quote && *p == quote)
        quote = 0;
      else if (!quote)
        quote = *p;
      *o++ = *p++;
      continue;
    }
    int word_start = p == sql || !(isalnum((unsigned char)p[-1]) || p[-1] == '_');
    size_t i = 0, n = 0;
    for (; word_start && i < sizeof w / sizeof w[0]; i++) {
      n = strlen(w[i].from);
      if (strncmp(p, w[i].from, n) == 0 && !(isalnum((unsigned char)p[n]) || p[n] == '_')) break;
    }
    if (word_start && i < sizeof w / sizeof w[0]) {
      o += sprintf(o, "%s", w[i].to);
      p += n;
    } else {
      *o++ = *p++;
    }
  }
  *o = '\0';
  return out;
}

static int migrate(ot_registry *r, int v) {
  if (!pg(r)) return exec(r, migrations[v]);
  char *t = schema_pg(migrations[v]);
  if (!t) return ot_error(OT_ERR_NOMEM, "cannot allocate");
  int rc = exec(r, t);
  free(t);
  return rc;
}

int ot_reg_open(const char *path, ot_registry **out) {
  ot_registry *r = calloc(1, sizeof *r);
  if (!r) return ot_error(OT_ERR_NOMEM, "cannot allocate");
  pthread_mutex_init(&r->mu, NULL);
  int rc = ot_regdb_open(path, &r->db);
  /* One migration per transaction, each re-reading the version under the lock: SQLite's
   * write lock, PostgreSQL's advisory lock (daemons starting together on one database migrate
   * it once). */
  for (int v = 0; rc == OT_OK;) {
    rc = begin(r);
    if (rc == OT_OK && pg(r)) rc = exec(r, "SELECT pg_advisory_xact_lock(7450001)");
    if (rc == OT_OK) rc = exec(r, "CREATE TABLE IF NOT EXISTS schema_version(version INTEGER NOT NULL)");
    if (rc == OT_OK) rc = ot_reg_schema_version(r, &v);
    if (rc == OT_OK && v > OT_REG_SCHEMA_VERSION)
      rc = ot_error(OT_ERR_UNSUPPORTED, "registry %s has schema version %d; this build knows up to %d",
                    pg(r) ? "(PostgreSQL)" : path, v, OT_REG_SCHEMA_VERSION);
    int more = rc == OT_OK && v < N_MIGRATIONS;
    if (more) rc = migrate(r, v);
    if (more) RUNQ("DELETE FROM schema_version", NULL, 0);
    if (more) RUNQ("INSERT INTO schema_version(version) VALUES(?)", "i", (int64_t)(v + 1));
    rc = end(r, rc);
    if (!more) break;
  }
  if (rc) {
    ot_reg_close(r);
    return rc;
  }
  *out = r;
  return OT_OK;
}

void ot_reg_close(ot_registry *r) {
  if (!r) return;
  ot_regdb_close(r->db);
  pthread_mutex_destroy(&r->mu);
  free(r);
}

int ot_reg_schema_version(ot_registry *r, int *out) {
  ot_regdb_stmt *st;
  int rc = prep(r, &st, "SELECT MAX(version) FROM schema_version", NULL);
  if (rc) return rc;
  int v = 0, s = ot_regdb_step(st);
  if (s == 1) v = (int)ot_regdb_column_int64(st, 0);
  ot_regdb_finalize(st);
  if (s < 0) return s;
  *out = v;
  return OT_OK;
}

static int audit_locked(ot_registry *r, const char *actor, const char *event, const char *detail) {
  int rc = OT_OK;
  RUNQ("INSERT INTO audit(at, actor, event, detail) VALUES(?,?,?,?)", "ittt", now_s(), actor, event, detail);
  return rc;
}

int ot_reg_audit(ot_registry *r, const char *actor, const char *event, const char *fmt, ...) {
  char detail[1024];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(detail, sizeof detail, fmt, ap);
  va_end(ap);
  lock(r);
  int rc = audit_locked(r, actor, event, detail);
  unlock(r);
  return rc;
}

/* ---- access control -------------------------------------------------------------------- */

/* 1 allowed, 0 unknown, -1 revoked */
static int device_status(ot_registry *r, const uint8_t pk[32], int64_t *id) {
  ot_regdb_stmt *st;
  if (prep(r, &st, "SELECT id, revoked_at FROM devices WHERE pk = ?", "b", pk)) return 0;
  int s = 0;
  if (ot_regdb_step(st) == 1) {
    s = ot_regdb_column_type(st, 1) == OT_COL_NULL ? 1 : -1;
    if (id) *id = ot_regdb_column_int64(st, 0);
  }
  ot_regdb_finalize(st);
  return s;
}

static int reg_admit(void *self, const uint8_t pk[32], const char *token, int *enrolled) {
  ot_registry *r = self;
  char fp[OT_FINGERPRINT_LEN];
  ot_fingerprint(pk, fp);
  lock(r);
  int rc = OT_OK, enr = 0, s = device_status(r, pk, NULL);
  if (s < 0) {
    rc = ot_error(OT_ERR_INVALID, "device %s is revoked", fp);
  } else if (s == 0) {
    if (!token || !*token) {
      rc = ot_error(OT_ERR_NOTFOUND, "device %s is not enrolled (no token given)", fp);
    } else {
      uint8_t h[32];
      ot_token_hash(token, h);
      rc = begin(r);
      ot_regdb_stmt *st;
      int found = 0;
      if (rc == OT_OK) rc = prep(r, &st, "SELECT 1 FROM tokens WHERE hash = ? AND used_by IS NULL", "b", h);
      if (rc == OT_OK) {
        found = ot_regdb_step(st) == 1;
        ot_regdb_finalize(st);
        if (!found) rc = ot_error(OT_ERR_NOTFOUND, "device %s: enrolment token unknown or already used", fp);
      }
      int64_t dev = 0;
      if (rc == OT_OK)
        rc = prep(r, &st, "INSERT INTO devices(pk, fingerprint, enrolled_at) VALUES(?,?,?) RETURNING id",
                  "bti", pk, fp, now_s());
      if (rc == OT_OK) rc = run_id(st, &dev);
      /* "unused" is checked again by the write: of two daemons spending one token at once,
       * the second changes no row and its enrolment rolls back */
      RUNQ("UPDATE tokens SET used_by = ?, used_at = ? WHERE hash = ? AND used_by IS NULL", "iib", dev,
           now_s(), h);
      if (rc == OT_OK && ot_regdb_changes(r->db) != 1)
        rc = ot_error(OT_ERR_NOTFOUND, "device %s: enrolment token unknown or already used", fp);
      if (rc == OT_OK) rc = audit_locked(r, fp, "device.enrol", "enrolled with a one-time token");
      rc = end(r, rc);
      enr = rc == OT_OK;
    }
  }
  unlock(r);
  if (rc == OT_OK && enrolled) *enrolled = enr;
  return rc;
}

static int reg_check(void *self, const uint8_t pk[32]) {
  ot_registry *r = self;
  lock(r);
  int s = device_status(r, pk, NULL);
  unlock(r);
  if (s == 1) return OT_OK;
  char fp[OT_FINGERPRINT_LEN];
  ot_fingerprint(pk, fp);
  return ot_error(s < 0 ? OT_ERR_INVALID : OT_ERR_NOTFOUND, "device %s is %s", fp,
                  s < 0 ? "revoked" : "not enrolled");
}

const ot_access_ops ot_reg_access_ops = {reg_admit, reg_check};

int ot_reg_token_issue(ot_registry *r, const char *label, char token[OT_TOKEN_CHARS + 1]) {
  uint8_t h[32];
  char tmp[OT_TOKEN_CHARS + 1];
  ot_token_new(tmp, h);
  lock(r);
  int rc = begin(r);
  RUNQ("INSERT INTO tokens(hash, label, issued_at) VALUES(?,?,?)", "bti", h, label, now_s());
  if (rc == OT_OK) rc = audit_locked(r, "operator", "token.issue", label ? label : "");
  rc = end(r, rc);
  unlock(r);
  if (rc == OT_OK) memcpy(token, tmp, sizeof tmp);
  sodium_memzero(tmp, sizeof tmp);
  return rc;
}

int ot_reg_device_revoke(ot_registry *r, const char *who, char fp[OT_FINGERPRINT_LEN]) {
  uint8_t pk[32];
  int by_key = ot_pubkey_parse(who, pk) == OT_OK;
  ot_error_clear();
  lock(r);
  int rc = begin(r);
  ot_regdb_stmt *st;
  int found = 0;
  if (rc == OT_OK)
    rc = by_key ? prep(r, &st, "SELECT pk FROM devices WHERE pk = ?", "b", pk)
                : prep(r, &st, "SELECT pk FROM devices WHERE fingerprint = lower(?)", "t", who);
  if (rc == OT_OK) {
    size_t n = 0;
    const void *b = ot_regdb_step(st) == 1 ? ot_regdb_column_blob(st, 0, &n) : NULL;
    if (b && n == 32) {
      memcpy(pk, b, 32);
      found = 1;
    }
    ot_regdb_finalize(st);
    if (!found) rc = ot_error(OT_ERR_NOTFOUND, "no enrolled device %s", who);
  }
  RUNQ("UPDATE devices SET revoked_at = ? WHERE pk = ? AND revoked_at IS NULL", "ib", now_s(), pk);
  char f[OT_FINGERPRINT_LEN];
  if (rc == OT_OK) {
    ot_fingerprint(pk, f);
    rc = audit_locked(r, "operator", "device.revoke", f);
  }
  rc = end(r, rc);
  unlock(r);
  if (rc == OT_OK) memcpy(fp, f, sizeof f);
  return rc;
}

int ot_reg_device_id(ot_registry *r, const uint8_t pk[32], int64_t *id) {
  int64_t v = 0;
  lock(r);
  int s = device_status(r, pk, &v);
  unlock(r);
  if (s != 1) return ot_error(OT_ERR_NOTFOUND, "device is not enrolled or revoked");
  *id = v;
  return OT_OK;
}

int ot_reg_device_set_name(ot_registry *r, int64_t id, const char *name) {
  int rc = OT_OK;
  lock(r);
  RUNQ("UPDATE devices SET name = ? WHERE id = ? AND (name IS NULL OR name != ?)", "tit", name, id, name);
  unlock(r);
  return rc;
}

/* ---- models and emulators ------------------------------------------------------------- */

int ot_reg_model_put(ot_registry *r, const char *name, const char *dir, const char *digest) {
  lock(r);
  int rc = begin(r);
  RUNQ("INSERT INTO models(name, dir, digest, added_at) VALUES(?,?,?,?) ON CONFLICT(name) DO UPDATE SET "
       "dir = excluded.dir, digest = excluded.digest",
       "ttti", name, dir, digest, now_s());
  if (rc == OT_OK) rc = audit_locked(r, "daemon", "model.register", name);
  rc = end(r, rc);
  unlock(r);
  return rc;
}

int ot_reg_model_get(ot_registry *r, const char *name, char dir[1024], char digest[OT_DIGEST_HEX]) {
  ot_regdb_stmt *st;
  lock(r);
  int rc = prep(r, &st, "SELECT dir, digest FROM models WHERE name = ?", "t", name);
  if (rc == OT_OK) {
    if (ot_regdb_step(st) == 1) {
      copy_col(st, 0, dir, 1024);
      copy_col(st, 1, digest, OT_DIGEST_HEX);
    } else {
      rc = ot_error(OT_ERR_NOTFOUND, "no model named '%s' (start serve with --model DIR)", name);
    }
    ot_regdb_finalize(st);
  }
  unlock(r);
  return rc;
}

int ot_reg_emulator_get(ot_registry *r, const char *model_digest, const char *key, int64_t *id,
                        char dir[1024], char digest[OT_DIGEST_HEX]) {
  ot_regdb_stmt *st;
  lock(r);
  int rc = prep(r, &st, "SELECT id, dir, digest FROM emulators WHERE model_digest = ? AND settings = ?", "tt",
                model_digest, key);
  if (rc == OT_OK) {
    if (ot_regdb_step(st) == 1) {
      *id = ot_regdb_column_int64(st, 0);
      copy_col(st, 1, dir, 1024);
      copy_col(st, 2, digest, OT_DIGEST_HEX);
    } else {
      rc = OT_ERR_NOTFOUND;
    }
    ot_regdb_finalize(st);
  }
  unlock(r);
  return rc;
}

int ot_reg_emulator_put(ot_registry *r, const char *model_digest, const char *key, const char *dir,
                        const char *digest, int64_t *id) {
  lock(r);
  int rc = begin(r);
  ot_regdb_stmt *st;
  int64_t v = 0;
  if (rc == OT_OK)
    rc = prep(r, &st,
              "INSERT INTO emulators(model_digest, settings, dir, digest, created_at) VALUES(?,?,?,?,?) "
              "RETURNING id",
              "tttti", model_digest, key, dir, digest, now_s());
  if (rc == OT_OK) rc = run_id(st, &v);
  if (rc == OT_OK) rc = audit_locked(r, "daemon", "emulator.distilled", key);
  rc = end(r, rc);
  unlock(r);
  if (rc == OT_OK) *id = v;
  return rc;
}

int ot_reg_emulator_dir(ot_registry *r, int64_t id, char dir[1024], char digest[OT_DIGEST_HEX]) {
  ot_regdb_stmt *st;
  lock(r);
  int rc = prep(r, &st, "SELECT dir, digest FROM emulators WHERE id = ?", "i", id);
  if (rc == OT_OK) {
    if (ot_regdb_step(st) == 1) {
      copy_col(st, 0, dir, 1024);
      copy_col(st, 1, digest, OT_DIGEST_HEX);
    } else {
      rc = ot_error(OT_ERR_NOTFOUND, "no emulator %lld", (long long)id);
    }
    ot_regdb_finalize(st);
  }
  unlock(r);
  return rc;
}

int ot_reg_emulator_set_gap(ot_registry *r, int64_t id, double kd, double ce) {
  lock(r);
  int rc = OT_OK;
  RUNQ("UPDATE emulators SET kd = ?, ce = ? WHERE id = ?", "ddi", kd, ce, id);
  unlock(r);
  return rc;
}

int ot_reg_emulator_set_measured_gap(ot_registry *r, int64_t id, const char *json) {
  lock(r);
  int rc = OT_OK;
  RUNQ("UPDATE emulators SET measured_gap = ? WHERE id = ?", "ti", json, id);
  unlock(r);
  return rc;
}

/* ---- sessions and rounds -------------------------------------------------------------- */

static const char *ss_names[] = {"preparing", "running", "done", "failed"};
static const char *rs_names[] = {"open", "aggregating", "done"};
const char *ot_session_state_name(ot_session_state s) { return (unsigned)s < 4 ? ss_names[s] : "?"; }

static int state_index(const char *const *names, int n, const char *s) {
  for (int i = 0; s && i < n; i++)
    if (strcmp(names[i], s) == 0) return i;
  return 0;
}

int ot_reg_session_create(ot_registry *r, const ot_session_cfg *cfg, int64_t *id) {
  cJSON *j = ot_session_cfg_to_json(cfg);
  char *text = j ? cJSON_PrintUnformatted(j) : NULL;
  cJSON_Delete(j);
  if (!text) return ot_error(OT_ERR_NOMEM, "cannot allocate");
  lock(r);
  int rc = begin(r);
  ot_regdb_stmt *st;
  if (rc == OT_OK && prep(r, &st, "SELECT 1 FROM sessions WHERE name = ?", "t", cfg->name) == OT_OK) {
    if (ot_regdb_step(st) == 1) rc = ot_error(OT_ERR_INVALID, "a session '%s' exists", cfg->name);
    ot_regdb_finalize(st);
  }
  int64_t v = 0;
  if (rc == OT_OK)
    rc = prep(r, &st,
              "INSERT INTO sessions(name, config, state, created_at, updated_at) VALUES(?,?,'preparing',?,?) "
              "RETURNING id",
              "ttii", cfg->name, text, now_s(), now_s());
  if (rc == OT_OK) rc = run_id(st, &v);
  if (rc == OT_OK) rc = audit_locked(r, "operator", "session.create", text);
  rc = end(r, rc);
  unlock(r);
  free(text);
  if (rc == OT_OK) *id = v;
  return rc;
}

#define SESSION_COLS                                                                                         \
  "SELECT s.id, s.config, s.state, s.round, s.emulator_id, s.adapter, s.opt_state, r.state, r.deadline, "    \
  "r.attempts, (SELECT COUNT(*) FROM updates u WHERE u.session_id = s.id AND u.round = s.round) "            \
  "FROM sessions s LEFT JOIN rounds r ON r.session_id = s.id AND r.round = s.round "

static int session_read(ot_regdb_stmt *st, ot_session_row *out) {
  int s = ot_regdb_step(st);
  if (s != 1) {
    ot_regdb_finalize(st);
    return s == 0 ? OT_ERR_NOTFOUND : s;
  }
  ot_session_row row;
  memset(&row, 0, sizeof row);
  row.id = ot_regdb_column_int64(st, 0);
  cJSON *j = cJSON_Parse(ot_regdb_column_text(st, 1));
  int rc = ot_session_cfg_from_json(j, &row.cfg);
  cJSON_Delete(j);
  row.state = (ot_session_state)state_index(ss_names, 4, ot_regdb_column_text(st, 2));
  row.round = (int)ot_regdb_column_int64(st, 3);
  row.emulator_id = ot_regdb_column_int64(st, 4);
  copy_col(st, 5, row.adapter, sizeof row.adapter);
  copy_col(st, 6, row.opt_state, sizeof row.opt_state);
  row.round_state = (ot_round_state)state_index(rs_names, 3, ot_regdb_column_text(st, 7));
  row.deadline = ot_regdb_column_int64(st, 8);
  row.attempts = (int)ot_regdb_column_int64(st, 9);
  row.n_updates = (int)ot_regdb_column_int64(st, 10);
  ot_regdb_finalize(st);
  if (rc == OT_OK) *out = row;
  return rc;
}

int ot_reg_session_get(ot_registry *r, const char *name, ot_session_row *out) {
  ot_regdb_stmt *st;
  lock(r);
  int rc =
      name && *name
          ? prep(r, &st, SESSION_COLS "WHERE s.name = ?", "t", name)
          : prep(r, &st, SESSION_COLS "WHERE s.state IN ('preparing','running') ORDER BY s.id LIMIT 1", NULL);
  if (rc == OT_OK) rc = session_read(st, out);
  unlock(r);
  if (rc == OT_ERR_NOTFOUND)
    rc = name && *name ? ot_error(rc, "no session named '%s'", name) : ot_error(rc, "no unfinished session");
  return rc;
}

int ot_reg_session_get_id(ot_registry *r, int64_t id, ot_session_row *out) {
  ot_regdb_stmt *st;
  lock(r);
  int rc = prep(r, &st, SESSION_COLS "WHERE s.id = ?", "i", id);
  if (rc == OT_OK) rc = session_read(st, out);
  unlock(r);
  if (rc == OT_ERR_NOTFOUND) rc = ot_error(rc, "no session %lld", (long long)id);
  return rc;
}

int ot_reg_sessions_active(ot_registry *r, int64_t *ids, int cap, int *n) {
  ot_regdb_stmt *st;
  lock(r);
  int rc = prep(r, &st, "SELECT id FROM sessions WHERE state IN ('preparing','running') ORDER BY id", NULL);
  int k = 0;
  if (rc == OT_OK) {
    while (k < cap && ot_regdb_step(st) == 1) ids[k++] = ot_regdb_column_int64(st, 0);
    ot_regdb_finalize(st);
  }
  unlock(r);
  if (rc == OT_OK) *n = k;
  return rc;
}

int ot_reg_session_start(ot_registry *r, int64_t id, int64_t emulator_id, const char *adapter_digest,
                         int64_t deadline) {
  lock(r);
  int rc = begin(r);
  RUNQ("UPDATE sessions SET state = 'running', round = 1, emulator_id = ?, adapter = ?, updated_at = ? "
       "WHERE id = ? AND state = 'preparing'",
       "itii", emulator_id, adapter_digest, now_s(), id);
  if (rc == OT_OK && ot_regdb_changes(r->db) != 1) rc = ot_error(OT_ERR_INTERNAL, "session is not preparing");
  RUNQ("INSERT INTO rounds(session_id, round, state, started_at, deadline, input) VALUES(?,1,'open',?,?,?)",
       "iiit", id, now_s(), deadline, adapter_digest);
  if (rc == OT_OK) rc = audit_locked(r, "daemon", "round.open", "round 1");
  rc = end(r, rc);
  unlock(r);
  return rc;
}

int ot_reg_session_fail(ot_registry *r, int64_t id, const char *why) {
  lock(r);
  int rc = begin(r);
  RUNQ("UPDATE sessions SET state = 'failed', error = ?, updated_at = ? WHERE id = ?", "tii", why, now_s(),
       id);
  if (rc == OT_OK) rc = audit_locked(r, "daemon", "session.failed", why);
  rc = end(r, rc);
  unlock(r);
  return rc;
}

int ot_reg_round_retry(ot_registry *r, int64_t id, int round, int64_t deadline) {
  lock(r);
  int rc = begin(r);
  RUNQ("UPDATE rounds SET deadline = ?, attempts = attempts + 1 WHERE session_id = ? AND round = ? AND "
       "state = 'open'",
       "iii", deadline, id, (int64_t)round);
  char d[64];
  snprintf(d, sizeof d, "round %d: too few updates at the deadline; retried", round);
  if (rc == OT_OK) rc = audit_locked(r, "daemon", "round.retry", d);
  rc = end(r, rc);
  unlock(r);
  return rc;
}

int ot_reg_round_close(ot_registry *r, int64_t id, int round) {
  lock(r);
  int rc = begin(r);
  RUNQ("UPDATE rounds SET state = 'aggregating' WHERE session_id = ? AND round = ? AND state = 'open'", "ii",
       id, (int64_t)round);
  rc = end(r, rc);
  unlock(r);
  return rc;
}

int ot_reg_round_updates(ot_registry *r, int64_t id, int round, ot_update_row **out, int *n) {
  ot_regdb_stmt *st = NULL;
  lock(r);
  int rc = prep(r, &st,
                "SELECT device_id, tokens, loss, digest FROM updates WHERE session_id = ? AND round = ? "
                "ORDER BY device_id",
                "ii", id, (int64_t)round);
  ot_update_row *v = NULL;
  int k = 0, cap = 0;
  while (rc == OT_OK && ot_regdb_step(st) == 1) {
    if (k == cap) {
      cap = cap ? 2 * cap : 8;
      ot_update_row *nv = realloc(v, (size_t)cap * sizeof *v);
      if (!nv) {
        rc = ot_error(OT_ERR_NOMEM, "cannot allocate");
        break;
      }
      v = nv;
    }
    v[k].device_id = ot_regdb_column_int64(st, 0);
    v[k].tokens = (uint64_t)ot_regdb_column_int64(st, 1);
    v[k].loss = (float)ot_regdb_column_double(st, 2);
    copy_col(st, 3, v[k].digest, sizeof v[k].digest);
    k++;
  }
  if (st) ot_regdb_finalize(st);
  unlock(r);
  if (rc) {
    free(v);
    return rc;
  }
  *out = v;
  *n = k;
  return OT_OK;
}

/* A round's record replaces an earlier one (a round redone after a crash): every column,
 * as INSERT OR REPLACE did, in the upsert both dialects share. */
#define STATS_UPSERT                                                                                         \
  " ON CONFLICT(session_id, round) DO UPDATE SET participants = excluded.participants, dropped = "           \
  "excluded.dropped, tokens = excluded.tokens, mean_loss = excluded.mean_loss, losses_reported = "           \
  "excluded.losses_reported, agg_seconds = excluded.agg_seconds, emulator_gap = excluded.emulator_gap, "     \
  "dp_epsilon = excluded.dp_epsilon, heldout_loss = excluded.heldout_loss, secagg = excluded.secagg, "       \
  "recorded_at = excluded.recorded_at"

/* Inside round_finish's transaction (the lock held). */
static int stats_put_locked(ot_registry *r, int64_t session_id, int round, const ot_round_stats *st) {
  int rc = OT_OK;
  /* the mean over what devices reported: the update rows' losses (plain rounds) or the
   * "loss" reports (secure aggregation); SQLite stores a NaN as NULL, which AVG skips */
  RUNQ("INSERT INTO round_stats(session_id, round, participants, dropped, tokens, mean_loss, "
       "losses_reported, agg_seconds, emulator_gap, dp_epsilon, heldout_loss, secagg, recorded_at) "
       "VALUES(?1,?2,?3,?4,?5,"
       "(SELECT AVG(l) FROM (SELECT loss AS l FROM updates WHERE session_id = ?1 AND round = ?2 AND ?9 = 0 "
       "UNION ALL SELECT value FROM round_events WHERE session_id = ?1 AND round = ?2 AND kind = 'loss' AND "
       "?9 = 1) AS x),"
       "(SELECT COUNT(l) FROM (SELECT loss AS l FROM updates WHERE session_id = ?1 AND round = ?2 AND ?9 = 0 "
       "UNION ALL SELECT value FROM round_events WHERE session_id = ?1 AND round = ?2 AND kind = 'loss' AND "
       "?9 = 1) AS x),"
       "?6, (SELECT e.kd FROM sessions s JOIN emulators e ON e.id = s.emulator_id WHERE s.id = ?1), ?7, ?10, "
       "?9, ?8)" STATS_UPSERT,
       "iiiidddiid", session_id, (int64_t)round, (int64_t)st->participants, (int64_t)st->dropped, st->tokens,
       st->agg_seconds, st->dp_epsilon, now_s(), (int64_t)(st->secagg != 0), st->heldout_loss);
  return rc;
}

int ot_reg_round_baseline(ot_registry *r, int64_t session_id, double heldout_loss) {
  lock(r);
  int rc = OT_OK;
  RUNQ("INSERT INTO round_stats(session_id, round, participants, dropped, losses_reported, "
       "heldout_loss, secagg, recorded_at) VALUES(?,0,0,0,0,?,0,?)" STATS_UPSERT,
       "idi", session_id, heldout_loss, now_s());
  unlock(r);
  return rc;
}

int ot_reg_round_finish(ot_registry *r, int64_t id, int round, const char *adapter_digest,
                        const char *opt_state, int64_t next_deadline, const char *adapter_dir,
                        const ot_round_stats *stats) {
  ot_session_row s;
  int rc = ot_reg_session_get_id(r, id, &s);
  if (rc) return rc;
  lock(r);
  rc = begin(r);
  RUNQ("UPDATE rounds SET state = 'done', result = ?, finished_at = ?, participants = (SELECT COUNT(*) FROM "
       "updates WHERE session_id = ? AND round = ?) WHERE session_id = ? AND round = ? AND state != 'done'",
       "tiiiii", adapter_digest, now_s(), id, (int64_t)round, id, (int64_t)round);
  if (rc == OT_OK && ot_regdb_changes(r->db) != 1)
    rc = ot_error(OT_ERR_INTERNAL, "round %d is already done", round);
  if (rc == OT_OK && stats) rc = stats_put_locked(r, id, round, stats);
  int last = round >= s.cfg.rounds;
  RUNQ("UPDATE sessions SET adapter = ?, opt_state = ?, state = ?, round = ?, updated_at = ? WHERE id = ?",
       "tttiii", adapter_digest, opt_state && *opt_state ? opt_state : NULL, last ? "done" : "running",
       (int64_t)(last ? round : round + 1), now_s(), id);
  if (!last)
    RUNQ("INSERT INTO rounds(session_id, round, state, started_at, deadline, input) VALUES(?,?,'open',?,?,?)",
         "iiiit", id, (int64_t)(round + 1), now_s(), next_deadline, adapter_digest);
  else
    RUNQ("INSERT INTO adapters(name, session_id, dir, digest, published, created_at) VALUES(?,?,?,?,1,?) "
         "ON CONFLICT(name) DO UPDATE SET session_id = excluded.session_id, dir = excluded.dir, "
         "digest = excluded.digest, published = 1, created_at = excluded.created_at",
         "titti", s.cfg.name, id, adapter_dir, adapter_digest, now_s());
  char d[160];
  snprintf(d, sizeof d, "%s round %d: adapter %.16s", s.cfg.name, round, adapter_digest);
  if (rc == OT_OK) rc = audit_locked(r, "daemon", "round.done", d);
  if (rc == OT_OK && last) rc = audit_locked(r, "daemon", "adapter.publish", s.cfg.name);
  rc = end(r, rc);
  unlock(r);
  return rc;
}

int ot_reg_round_set_participants(ot_registry *r, int64_t id, int round, int n) {
  lock(r);
  int rc = begin(r);
  RUNQ("UPDATE rounds SET participants = ? WHERE session_id = ? AND round = ?", "iii", (int64_t)n, id,
       (int64_t)round);
  rc = end(r, rc);
  unlock(r);
  return rc;
}

int ot_reg_update_add(ot_registry *r, int64_t session_id, int round, int64_t device_id, uint64_t tokens,
                      float loss, const char *digest) {
  lock(r);
  int rc = begin(r);
  /* PostgreSQL: the round's row is share-locked until this commits, so another daemon's
   * round_close waits for it: an update is either in the closed round or refused, never
   * stored after the aggregator read the round (SQLite's write lock does this by itself) */
  if (pg(r))
    RUNQ("SELECT 1 FROM rounds WHERE session_id = ? AND round = ? FOR SHARE", "ii", session_id,
         (int64_t)round);
  ot_regdb_stmt *st;
  if (rc == OT_OK)
    rc = prep(
        r, &st,
        "SELECT s.state, s.round, r.state, (SELECT COUNT(*) FROM updates u WHERE u.session_id = s.id AND "
        "u.round = ? AND u.device_id = ?) FROM sessions s LEFT JOIN rounds r ON r.session_id = s.id AND "
        "r.round = s.round WHERE s.id = ?",
        "iii", (int64_t)round, device_id, session_id);
  if (rc == OT_OK) {
    if (ot_regdb_step(st) != 1) {
      rc = ot_error(OT_ERR_NOTFOUND, "no such session");
    } else {
      const char *ss = ot_regdb_column_text(st, 0);
      int cur = (int)ot_regdb_column_int64(st, 1);
      const char *rs = ot_regdb_column_text(st, 2);
      if (!ss || strcmp(ss, "running") != 0)
        rc = ot_error(OT_ERR_MISMATCH, "the session is %s", ss ? ss : "?");
      else if (round != cur)
        rc = ot_error(OT_ERR_MISMATCH, "stale round %d (the current round is %d)", round, cur);
      else if (!rs || strcmp(rs, "open") != 0)
        rc = ot_error(OT_ERR_MISMATCH, "round %d is closed (%s)", round, rs ? rs : "?");
      else if ((int)ot_regdb_column_int64(st, 3) > 0)
        rc = ot_error(OT_ERR_MISMATCH, "duplicate: this device already has an update in round %d", round);
    }
    ot_regdb_finalize(st);
  }
  RUNQ("INSERT INTO updates(session_id, round, device_id, tokens, loss, digest, received_at) "
       "VALUES(?,?,?,?,?,?,?)",
       "iiiidti", session_id, (int64_t)round, device_id, (int64_t)tokens, (double)loss, digest, now_s());
  rc = end(r, rc);
  unlock(r);
  return rc;
}

int ot_reg_update_exists(ot_registry *r, int64_t session_id, int round, int64_t device_id, int *exists,
                         char digest[OT_DIGEST_HEX]) {
  ot_regdb_stmt *st;
  lock(r);
  int rc = prep(r, &st, "SELECT digest FROM updates WHERE session_id = ? AND round = ? AND device_id = ?",
                "iii", session_id, (int64_t)round, device_id);
  if (rc == OT_OK) {
    *exists = ot_regdb_step(st) == 1;
    const char *h = *exists ? ot_regdb_column_text(st, 0) : NULL;
    if (digest) snprintf(digest, OT_DIGEST_HEX, "%s", h ? h : "");
    ot_regdb_finalize(st);
  }
  unlock(r);
  return rc;
}

int ot_reg_round_event(ot_registry *r, int64_t session_id, int round, int64_t device_id, const char *kind,
                       double value) {
  lock(r);
  int rc = OT_OK;
  RUNQ("INSERT INTO round_events(session_id, round, device_id, kind, value, at) VALUES(?,?,?,?,?,?) "
       "ON CONFLICT(session_id, round, device_id, kind) DO UPDATE SET value = excluded.value, at = "
       "excluded.at",
       "iiitdi", session_id, (int64_t)round, device_id, kind, value, now_s());
  unlock(r);
  return rc;
}

int ot_reg_adapter_served(ot_registry *r, const char *digest, int *served) {
  ot_regdb_stmt *st;
  lock(r);
  int rc = prep(r, &st, "SELECT 1 FROM sessions WHERE state = 'running' AND adapter = ?", "t", digest);
  if (rc == OT_OK) {
    *served = ot_regdb_step(st) == 1;
    ot_regdb_finalize(st);
  }
  unlock(r);
  return rc;
}

/* ---- leases ---------------------------------------------------------------------------- */

/* The database's clock in seconds: every daemon compares expiries on one clock. */
#define DB_NOW(r)                                                                                            \
  DIALECT(r, "CAST(strftime('%s','now') AS INTEGER)", "CAST(extract(epoch FROM clock_timestamp()) AS BIGINT)")

int ot_reg_lease_take(ot_registry *r, int64_t session_id, const char *owner, int ttl_s, int *held) {
  if (!owner || !*owner || ttl_s < 1) return ot_error(OT_ERR_INVALID, "lease: owner and ttl > 0 needed");
  char sql[1024];
  /* one statement: taken when there is no row, the row is ours (a renewal), or it expired;
   * a held row changes nothing and counts 0 rows (PostgreSQL re-checks the WHERE on the row
   * it waited for, so of two daemons taking at once one gets it) */
  snprintf(
      sql, sizeof sql,
      "INSERT INTO leases(session_id, owner, expires_at, taken_at) VALUES(?1, ?2, %s + ?3, %s) "
      "ON CONFLICT(session_id) DO UPDATE SET owner = excluded.owner, expires_at = excluded.expires_at, "
      "taken_at = CASE WHEN leases.owner = excluded.owner THEN leases.taken_at ELSE excluded.taken_at END "
      "WHERE leases.owner = excluded.owner OR leases.expires_at <= %s",
      DB_NOW(r), DB_NOW(r), DB_NOW(r));
  lock(r);
  int rc = OT_OK;
  RUNQ(sql, "iti", session_id, owner, (int64_t)ttl_s);
  int64_t n = rc == OT_OK ? ot_regdb_changes(r->db) : 0;
  unlock(r);
  if (rc == OT_OK) *held = n == 1;
  return rc;
}

int ot_reg_lease_renew(ot_registry *r, const char *owner, int ttl_s) {
  char sql[512];
  snprintf(sql, sizeof sql,
           "UPDATE leases SET expires_at = %s + ? WHERE owner = ? AND expires_at > %s AND session_id IN "
           "(SELECT id FROM sessions WHERE state IN ('preparing','running'))",
           DB_NOW(r), DB_NOW(r));
  lock(r);
  int rc = OT_OK;
  RUNQ(sql, "it", (int64_t)ttl_s, owner);
  /* a finished session needs no leader: its row goes (the table stays as small as the work) */
  RUNQ("DELETE FROM leases WHERE owner = ? AND session_id IN (SELECT id FROM sessions WHERE state IN "
       "('done','failed'))",
       "t", owner);
  unlock(r);
  return rc;
}

int ot_reg_lease_owner(ot_registry *r, int64_t session_id, char *owner, size_t cap) {
  char sql[256];
  snprintf(sql, sizeof sql, "SELECT owner FROM leases WHERE session_id = ? AND expires_at > %s", DB_NOW(r));
  ot_regdb_stmt *st;
  lock(r);
  int rc = prep(r, &st, sql, "i", session_id);
  if (rc == OT_OK) {
    const char *o = ot_regdb_step(st) == 1 ? ot_regdb_column_text(st, 0) : NULL;
    snprintf(owner, cap, "%s", o ? o : "");
    ot_regdb_finalize(st);
  }
  unlock(r);
  return rc;
}

int ot_reg_lease_drop(ot_registry *r, const char *owner) {
  lock(r);
  int rc = OT_OK;
  RUNQ("DELETE FROM leases WHERE owner = ?", "t", owner);
  unlock(r);
  return rc;
}

/* ---- adapters -------------------------------------------------------------------------- */

int ot_reg_adapter_publish(ot_registry *r, const char *name, int published) {
  lock(r);
  int rc = begin(r);
  RUNQ("UPDATE adapters SET published = ? WHERE name = ?", "it", (int64_t)published, name);
  if (rc == OT_OK && ot_regdb_changes(r->db) != 1)
    rc = ot_error(OT_ERR_NOTFOUND, "no adapter named '%s'", name);
  if (rc == OT_OK)
    rc = audit_locked(r, "operator", published ? "adapter.publish" : "adapter.unpublish", name);
  rc = end(r, rc);
  unlock(r);
  return rc;
}

int ot_reg_adapter_delete(ot_registry *r, const char *name) {
  lock(r);
  int rc = begin(r);
  RUNQ("DELETE FROM adapters WHERE name = ?", "t", name);
  if (rc == OT_OK && ot_regdb_changes(r->db) != 1)
    rc = ot_error(OT_ERR_NOTFOUND, "no adapter named '%s'", name);
  if (rc == OT_OK) rc = audit_locked(r, "operator", "adapter.delete", name);
  rc = end(r, rc);
  unlock(r);
  return rc;
}

int ot_reg_adapters_published(ot_registry *r, const char *model_digest, const char *name,
                              void (*fn)(void *user, const char *name, const char *dir), void *user,
                              int *found) {
  ot_regdb_stmt *st;
  int n = 0;
  lock(r);
  /* the session names its model; the model row's digest is the base the adapter was trained on */
  int rc =
      prep(r, &st,
           DIALECT(r,
                   "SELECT a.name, a.dir FROM adapters a JOIN sessions s ON s.id = a.session_id "
                   "JOIN models m ON m.name = json_extract(s.config, '$.model') "
                   "WHERE a.published = 1 AND m.digest = ? AND (?2 IS NULL OR a.name = ?2) ORDER BY a.name",
                   "SELECT a.name, a.dir FROM adapters a JOIN sessions s ON s.id = a.session_id "
                   "JOIN models m ON m.name = s.config::json->>'model' "
                   "WHERE a.published = 1 AND m.digest = ? AND (?2 IS NULL OR a.name = ?2) ORDER BY a.name"),
           "tt", model_digest, name);
  if (rc == OT_OK) {
    int s;
    while ((s = ot_regdb_step(st)) == 1) {
      char nm[OT_NAME_MAX], dir[1024];
      copy_col(st, 0, nm, sizeof nm);
      copy_col(st, 1, dir, sizeof dir);
      fn(user, nm, dir);
      n++;
    }
    if (s < 0) rc = s;
    ot_regdb_finalize(st);
  }
  unlock(r);
  if (rc == OT_OK && found) *found = n;
  return rc;
}

/* ---- listings -------------------------------------------------------------------------- */

static int rows_json(ot_regdb_stmt *st, cJSON *arr) {
  int s;
  while ((s = ot_regdb_step(st)) == 1) {
    cJSON *o = cJSON_CreateObject();
    if (!o) break;
    for (int c = 0; c < ot_regdb_column_count(st); c++) {
      const char *k = ot_regdb_column_name(st, c);
      switch (ot_regdb_column_type(st, c)) {
      case OT_COL_INT: cJSON_AddNumberToObject(o, k, (double)ot_regdb_column_int64(st, c)); break;
      case OT_COL_FLOAT: cJSON_AddNumberToObject(o, k, ot_regdb_column_double(st, c)); break;
      case OT_COL_NULL: cJSON_AddNullToObject(o, k); break;
      default: {
        const char *t = ot_regdb_column_text(st, c);
        cJSON *parsed = strcmp(k, "config") == 0 || strstr(k, "measured_gap") ? cJSON_Parse(t) : NULL;
        if (parsed)
          cJSON_AddItemToObject(o, k, parsed);
        else
          cJSON_AddStringToObject(o, k, t ? t : "");
      }
      }
    }
    cJSON_AddItemToArray(arr, o);
  }
  ot_regdb_finalize(st);
  return s < 0 ? s : OT_OK;
}

int ot_reg_list_json(ot_registry *r, const char *what, const char *arg, cJSON **out) {
  /* pg: PostgreSQL's text where the dialects differ (JSON, hex), else NULL */
  static const struct {
    const char *what, *sql, *fmt, *pg;
  } q[] = {
      {"sessions",
       "SELECT s.name, s.state, s.round, json_extract(s.config, '$.rounds') AS rounds, s.adapter, s.error, "
       "(SELECT COUNT(*) FROM updates u WHERE u.session_id = s.id AND u.round = s.round) AS updates, "
       "json_extract(s.config, '$.min_devices') AS min_devices, json_extract(s.config, '$.max_devices') AS "
       "max_devices, s.created_at FROM sessions s ORDER BY s.id",
       NULL,
       "SELECT s.name, s.state, s.round, (s.config::json->>'rounds')::bigint AS rounds, s.adapter, s.error, "
       "(SELECT COUNT(*) FROM updates u WHERE u.session_id = s.id AND u.round = s.round) AS updates, "
       "(s.config::json->>'min_devices')::bigint AS min_devices, (s.config::json->>'max_devices')::bigint AS "
       "max_devices, s.created_at FROM sessions s ORDER BY s.id"},
      {"session",
       "SELECT s.name, s.state, s.round, s.config, s.adapter, s.opt_state, s.error, s.created_at, "
       "s.updated_at, e.dir AS emulator, e.digest AS emulator_digest, e.kd AS emulator_gap, e.ce AS "
       "emulator_ce, e.measured_gap AS emulator_measured_gap FROM sessions s LEFT JOIN emulators e ON "
       "e.id = s.emulator_id WHERE s.name = ?",
       "t", NULL},
      {"rounds",
       "SELECT r.round, r.state, r.started_at, r.deadline, r.attempts, r.participants, r.input, r.result, "
       "r.finished_at FROM rounds r JOIN sessions s ON s.id = r.session_id WHERE s.name = ? ORDER BY r.round",
       "t", NULL},
      {"updates",
       "SELECT u.round, d.fingerprint AS device, d.name AS device_name, u.tokens, u.loss, u.digest, "
       "u.received_at FROM updates u "
       "JOIN "
       "sessions s ON s.id = u.session_id JOIN devices d ON d.id = u.device_id WHERE s.name = ? ORDER BY "
       "u.round, u.device_id",
       "t", NULL},
      {"devices",
       "SELECT d.fingerprint, d.name, d.enrolled_at, d.revoked_at, lower(hex(d.pk)) AS public_key, "
       "(SELECT COUNT(*) FROM updates u WHERE u.device_id = d.id) AS updates FROM devices d ORDER BY d.id",
       NULL,
       "SELECT d.fingerprint, d.name, d.enrolled_at, d.revoked_at, encode(d.pk, 'hex') AS public_key, "
       "(SELECT COUNT(*) FROM updates u WHERE u.device_id = d.id) AS updates FROM devices d ORDER BY d.id"},
      {"adapters",
       "SELECT a.name, s.name AS session, a.dir, a.digest, a.published, a.created_at FROM adapters a LEFT "
       "JOIN "
       "sessions s ON s.id = a.session_id ORDER BY a.id",
       NULL, NULL},
      {"round_stats",
       "SELECT t.round, t.participants, t.dropped, (SELECT COUNT(*) FROM round_events e WHERE e.session_id = "
       "t.session_id AND e.round = t.round AND e.kind = 'late') AS stragglers, t.tokens, t.mean_loss, "
       "t.losses_reported, t.agg_seconds, t.emulator_gap, t.dp_epsilon, t.heldout_loss, t.secagg, "
       "r.attempts, r.started_at, "
       "r.finished_at, r.result FROM round_stats t JOIN sessions s ON s.id = t.session_id LEFT JOIN rounds r "
       "ON "
       "r.session_id = t.session_id AND r.round = t.round WHERE s.name = ? ORDER BY t.round",
       "t", NULL},
      {"session_audit",
       /* the session's events: details start with its name (then ' ' or ':'), or name its
        * transfers, or are its settings; substr, not LIKE, whose '_' would match any character */
       "SELECT at, actor, event, detail FROM audit WHERE detail = ?1 OR substr(detail, 1, length(?1) + 1) IN "
       "(?1 || ' ', ?1 || ':') OR instr(detail, 'update.' || ?1 || '.') = 1 OR instr(detail, 'secagg.' || ?1 "
       "|| '.') = 1 OR (event = 'session.create' AND json_valid(detail) AND json_extract(detail, '$.name') = "
       "?1) ORDER BY id",
       "t",
       /* CASE: the JSON cast is evaluated only on session.create rows (their detail is JSON) */
       "SELECT at, actor, event, detail FROM audit WHERE detail = ?1 OR substr(detail, 1, length(?1) + 1) IN "
       "(?1 || ' ', ?1 || ':') OR strpos(detail, 'update.' || ?1 || '.') = 1 OR strpos(detail, 'secagg.' || "
       "?1 "
       "|| '.') = 1 OR (CASE WHEN event = 'session.create' AND left(detail, 1) = '{' THEN "
       "detail::json->>'name' END) = ?1 ORDER BY id"},
      {"models", "SELECT name, dir, digest, added_at FROM models ORDER BY id", NULL, NULL},
      {"emulators",
       "SELECT model_digest, settings, dir, digest, created_at, kd, ce, measured_gap FROM emulators ORDER BY "
       "id",
       NULL, NULL},
      {"audit", "SELECT at, actor, event, detail FROM audit ORDER BY id", NULL, NULL},
      {"counts", /* what the daemon's /metrics shows: cheap aggregates */
       "SELECT 'devices' AS metric, CASE WHEN revoked_at IS NULL THEN 'active' ELSE 'revoked' END AS label, "
       "COUNT(*) AS value FROM devices GROUP BY label "
       "UNION ALL SELECT 'sessions', state, COUNT(*) FROM sessions GROUP BY state "
       "UNION ALL SELECT 'rounds', state, COUNT(*) FROM rounds GROUP BY state "
       "UNION ALL SELECT 'updates', 'stored', COUNT(*) FROM updates "
       "UNION ALL SELECT 'audit', event, COUNT(*) FROM audit WHERE event LIKE 'update.%' OR event LIKE "
       "'secagg.refused%' GROUP BY event",
       NULL, NULL},
      {"api_keys",
       "SELECT id, tenant, models, admin, label, created_at, revoked_at FROM api_keys ORDER BY created_at, "
       "id",
       NULL, NULL},
  };
  for (size_t i = 0; i < sizeof q / sizeof q[0]; i++) {
    if (strcmp(q[i].what, what) != 0) continue;
    cJSON *arr = cJSON_CreateArray();
    if (!arr) return ot_error(OT_ERR_NOMEM, "cannot allocate");
    ot_regdb_stmt *st;
    lock(r);
    int rc = prep(r, &st, pg(r) && q[i].pg ? q[i].pg : q[i].sql, q[i].fmt, arg);
    if (rc == OT_OK) rc = rows_json(st, arr);
    unlock(r);
    if (rc) {
      cJSON_Delete(arr);
      return rc;
    }
    *out = arr;
    return OT_OK;
  }
  return ot_error(OT_ERR_INVALID, "unknown listing '%s'", what);
}

/* ---- API keys ---------------------------------------------------------------------------- */

/* Keys are 32 random bytes, so a fast hash is enough: nothing shorter than 2^256 guesses finds a
 * key from its hash (slow password hashing is for guessable secrets). The fixed BLAKE2b key only
 * separates this use from the enrolment tokens' hashes. */
static void api_key_hash(const char *key, uint8_t h[32]) {
  crypto_generichash(h, 32, (const uint8_t *)key, strlen(key), (const uint8_t *)"offtune/1 api key", 17);
}

int ot_api_tenant_ok_n(const char *t, size_t n) {
  if (!t || n == 0 || n >= OT_API_TENANT_MAX || t[0] == '.' || t[0] == '-') return 0;
  for (size_t i = 0; i < n; i++) {
    char c = t[i];
    if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' ||
          c == '-' || c == '.'))
      return 0;
  }
  return 1;
}

int ot_api_tenant_ok(const char *t) { return t && ot_api_tenant_ok_n(t, strlen(t)); }

int ot_reg_api_key_create(ot_registry *r, const char *tenant, const char *models, int admin,
                          const char *label, char key[OT_API_KEY_CHARS + 1],
                          char id[OT_API_KEY_ID_CHARS + 1]) {
  if (!ot_api_tenant_ok(tenant))
    return ot_error(OT_ERR_INVALID, "tenant '%s': use 1-%d letters, digits, '_', '-' or '.'",
                    tenant ? tenant : "", OT_API_TENANT_MAX - 1);
  if (!models || !*models || strlen(models) > 1000)
    return ot_error(OT_ERR_INVALID, "give the base models allowed");
  uint8_t raw[32], h[32];
  char tmp[OT_API_KEY_CHARS + 1], kid[OT_API_KEY_ID_CHARS + 1];
  randombytes_buf(raw, sizeof raw);
  memcpy(tmp, "otk-", 4);
  sodium_bin2base64(tmp + 4, sizeof tmp - 4, raw, sizeof raw, sodium_base64_VARIANT_URLSAFE_NO_PADDING);
  sodium_memzero(raw, sizeof raw);
  api_key_hash(tmp, h);
  /* the id names the key in listings and revocations; it is made from the hash, never the key */
  memcpy(kid, "key-", 4);
  sodium_bin2hex(kid + 4, sizeof kid - 4, h, (sizeof kid - 5) / 2);
  lock(r);
  int rc = begin(r);
  RUNQ("INSERT INTO api_keys(hash, id, tenant, models, admin, label, created_at) VALUES(?,?,?,?,?,?,?)",
       "btttiti", h, kid, tenant, models, (int64_t)(admin != 0), label, now_s());
  char detail[1200];
  snprintf(detail, sizeof detail, "%s tenant=%s models=%s%s", kid, tenant, models, admin ? " admin" : "");
  if (rc == OT_OK) rc = audit_locked(r, "operator", "api_key.create", detail);
  rc = end(r, rc);
  unlock(r);
  if (rc == OT_OK) {
    memcpy(key, tmp, sizeof tmp);
    memcpy(id, kid, sizeof kid);
  }
  sodium_memzero(tmp, sizeof tmp);
  return rc;
}

int ot_reg_api_key_revoke(ot_registry *r, const char *id) {
  lock(r);
  int rc = begin(r), changes = 0;
  RUNQ("UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL", "it", now_s(), id);
  if (rc == OT_OK) changes = ot_regdb_changes(r->db);
  if (rc == OT_OK && !changes) rc = ot_error(OT_ERR_NOTFOUND, "no active API key '%s'", id);
  if (rc == OT_OK) rc = audit_locked(r, "operator", "api_key.revoke", id);
  rc = end(r, rc);
  unlock(r);
  return rc;
}

int ot_reg_api_key_check(ot_registry *r, const char *key, ot_api_key_row *out) {
  uint8_t h[32];
  api_key_hash(key, h);
  ot_regdb_stmt *st;
  lock(r);
  int rc = prep(r, &st, "SELECT id, tenant, models, admin, revoked_at FROM api_keys WHERE hash = ?", "b", h);
  if (rc == OT_OK) {
    int s = ot_regdb_step(st);
    if (s == 1) {
      ot_api_key_row k;
      memset(&k, 0, sizeof k);
      copy_col(st, 0, k.id, sizeof k.id);
      copy_col(st, 1, k.tenant, sizeof k.tenant);
      copy_col(st, 2, k.models, sizeof k.models);
      k.admin = (int)ot_regdb_column_int64(st, 3) != 0;
      k.revoked_at = ot_regdb_column_type(st, 4) == OT_COL_NULL ? 0 : ot_regdb_column_int64(st, 4);
      *out = k;
    } else {
      rc = s == 0 ? ot_error(OT_ERR_NOTFOUND, "unknown API key") : s;
    }
    ot_regdb_finalize(st);
  }
  unlock(r);
  return rc;
}

int ot_api_key_allows_model(const ot_api_key_row *k, const char *base) {
  size_t bl = strlen(base);
  for (const char *p = k->models; *p;) {
    const char *e = strchr(p, ',');
    size_t n = e ? (size_t)(e - p) : strlen(p);
    if ((n == 1 && *p == '*') || (n == bl && memcmp(p, base, n) == 0)) return 1;
    p += n + (e != NULL);
  }
  return 0;
}

/* The registry's SQLite backend: one file, WAL, synchronous=FULL, foreign keys, a busy
 * timeout (the registry's behaviour before the PostgreSQL backend, unchanged). */
#include <sqlite3.h>
#include <stdlib.h>

#include "ot_error.h"
#include "ot_regdb_impl.h"

typedef struct {
  ot_regdb base;
  sqlite3 *db;
} lite;

typedef struct {
  ot_regdb_stmt base;
  sqlite3_stmt *st;
} lite_stmt;

static sqlite3 *conn(ot_regdb *db) { return ((lite *)db)->db; }
static sqlite3_stmt *stmt(ot_regdb_stmt *st) { return ((lite_stmt *)st)->st; }

static int err(ot_regdb *db, const char *what) {
  return ot_error(OT_ERR_IO, "registry: %s: %s", what, sqlite3_errmsg(conn(db)));
}

static void l_close(ot_regdb *db) {
  sqlite3_close_v2(conn(db));
  free(db);
}

static int l_exec(ot_regdb *db, const char *sql) {
  char *msg = NULL;
  if (sqlite3_exec(conn(db), sql, NULL, NULL, &msg) != SQLITE_OK) {
    int rc = ot_error(OT_ERR_IO, "registry: %s", msg ? msg : sqlite3_errmsg(conn(db)));
    sqlite3_free(msg);
    return rc;
  }
  return OT_OK;
}

static int64_t l_changes(ot_regdb *db) { return sqlite3_changes(conn(db)); }

static int l_prepare(ot_regdb *db, const char *sql, ot_regdb_stmt **out) {
  lite_stmt *s = calloc(1, sizeof *s);
  if (!s) return ot_error(OT_ERR_NOMEM, "cannot allocate");
  s->base.db = db;
  if (sqlite3_prepare_v2(conn(db), sql, -1, &s->st, NULL) != SQLITE_OK) {
    free(s);
    return err(db, "prepare");
  }
  *out = &s->base;
  return OT_OK;
}

static int l_bind(ot_regdb_stmt *st, int i, ot_regdb_coltype t, int64_t iv, double dv, const void *p,
                  size_t n) {
  int ok = SQLITE_OK;
  switch (t) {
  case OT_COL_INT: ok = sqlite3_bind_int64(stmt(st), i, iv); break;
  case OT_COL_FLOAT: ok = sqlite3_bind_double(stmt(st), i, dv); break;
  case OT_COL_TEXT:
    ok = p ? sqlite3_bind_text(stmt(st), i, p, (int)n, SQLITE_TRANSIENT) : sqlite3_bind_null(stmt(st), i);
    break;
  case OT_COL_BLOB:
    ok = p ? sqlite3_bind_blob(stmt(st), i, p, (int)n, SQLITE_TRANSIENT) : sqlite3_bind_null(stmt(st), i);
    break;
  case OT_COL_NULL: ok = sqlite3_bind_null(stmt(st), i); break;
  }
  return ok == SQLITE_OK ? OT_OK : err(st->db, "bind");
}

static int l_step(ot_regdb_stmt *st) {
  int s = sqlite3_step(stmt(st));
  return s == SQLITE_ROW ? 1 : s == SQLITE_DONE ? 0 : err(st->db, "step");
}

static int l_column_count(ot_regdb_stmt *st) { return sqlite3_column_count(stmt(st)); }
static const char *l_column_name(ot_regdb_stmt *st, int c) { return sqlite3_column_name(stmt(st), c); }
static ot_regdb_coltype l_column_type(ot_regdb_stmt *st, int c) {
  switch (sqlite3_column_type(stmt(st), c)) {
  case SQLITE_INTEGER: return OT_COL_INT;
  case SQLITE_FLOAT: return OT_COL_FLOAT;
  case SQLITE_BLOB: return OT_COL_BLOB;
  case SQLITE_NULL: return OT_COL_NULL;
  default: return OT_COL_TEXT;
  }
}
static int64_t l_column_int64(ot_regdb_stmt *st, int c) { return sqlite3_column_int64(stmt(st), c); }
static double l_column_double(ot_regdb_stmt *st, int c) { return sqlite3_column_double(stmt(st), c); }
static const char *l_column_text(ot_regdb_stmt *st, int c) {
  return (const char *)sqlite3_column_text(stmt(st), c);
}
static const void *l_column_blob(ot_regdb_stmt *st, int c, size_t *n) {
  const void *p = sqlite3_column_blob(stmt(st), c);
  *n = (size_t)sqlite3_column_bytes(stmt(st), c);
  return p;
}
static void l_finalize(ot_regdb_stmt *st) {
  sqlite3_finalize(stmt(st));
  free(st);
}

static const ot_regdb_ops lite_ops = {l_close,       l_exec,         l_changes,       l_prepare,
                                      l_bind,        l_step,         l_column_count,  l_column_name,
                                      l_column_type, l_column_int64, l_column_double, l_column_text,
                                      l_column_blob, l_finalize};

int ot_regdb_sqlite_open(const char *path, ot_regdb **out) {
  lite *l = calloc(1, sizeof *l);
  if (!l) return ot_error(OT_ERR_NOMEM, "cannot allocate");
  l->base.ops = &lite_ops;
  l->base.dialect = OT_DB_SQLITE;
  int rc = OT_OK;
  if (sqlite3_open_v2(path, &l->db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_FULLMUTEX,
                      NULL) != SQLITE_OK)
    rc = ot_error(OT_ERR_IO, "registry %s: %s", path, l->db ? sqlite3_errmsg(l->db) : "cannot open");
  if (rc == OT_OK) sqlite3_busy_timeout(l->db, 5000);
  /* WAL + synchronous=FULL: a commit is durable once it returns (kill -9 or power loss). */
  if (rc == OT_OK)
    rc = l_exec(&l->base, "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; PRAGMA foreign_keys=ON;");
  if (rc) {
    l_close(&l->base);
    return rc;
  }
  *out = &l->base;
  return OT_OK;
}

/* The registry's PostgreSQL backend (libpq): one connection, statements run with
 * PQexecParams (parameters typed: int8, float8, text, bytea), results in text form.
 * Built only when CMake finds libpq (OT_HAVE_LIBPQ); otherwise opening says so. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ot_error.h"
#include "ot_regdb_impl.h"

#ifndef OT_HAVE_LIBPQ

int ot_regdb_pg_open(const char *conninfo, ot_regdb **out) {
  (void)conninfo;
  (void)out;
  return ot_error(OT_ERR_UNSUPPORTED,
                  "this offtune was built without the PostgreSQL registry backend (configure with libpq-dev "
                  "installed and OT_POSTGRES not OFF)");
}

#else

#include <libpq-fe.h>

/* type oids (catalog/pg_type_d.h, stable across releases) */
enum {
  OID_BOOL = 16,
  OID_BYTEA = 17,
  OID_INT8 = 20,
  OID_INT2 = 21,
  OID_INT4 = 23,
  OID_OID = 26,
  OID_TEXT = 25,
  OID_FLOAT4 = 700,
  OID_FLOAT8 = 701,
  OID_NUMERIC = 1700
};

typedef struct {
  ot_regdb base;
  PGconn *c;
  int64_t changes;
} pg;

typedef struct {
  ot_regdb_stmt base;
  char *sql; /* "?" rewritten to "$N" */
  int n;     /* parameters */
  Oid *types;
  char **vals;
  int *lens, *fmts;
  PGresult *res;
  int row, done;
  unsigned char *blob; /* the last unescaped bytea */
} pg_stmt;

static PGconn *conn(ot_regdb *db) { return ((pg *)db)->c; }

static void quiet(void *arg, const char *msg) { /* NOTICEs ("already exists, skipping") are not errors */
  (void)arg;
  (void)msg;
}

/* A connection lost (server restart, network) is opened again before the next statement;
 * the transaction that was open is gone with it, which the caller sees as that statement's
 * failure and rolls back. */
static void revive(ot_regdb *db) {
  if (PQstatus(conn(db)) == CONNECTION_BAD) PQreset(conn(db));
}

static int res_err(ot_regdb *db, PGresult *res, const char *what) {
  const char *state = res ? PQresultErrorField(res, PG_DIAG_SQLSTATE) : NULL;
  const char *msg = res ? PQresultErrorMessage(res) : PQerrorMessage(conn(db));
  char m[600];
  snprintf(m, sizeof m, "%s", msg && *msg ? msg : PQerrorMessage(conn(db)));
  size_t k = strlen(m);
  while (k && (m[k - 1] == '\n' || m[k - 1] == ' ')) m[--k] = '\0';
  return ot_error(OT_ERR_IO, "registry: %s: %s%s%s%s", what, m, state ? " (SQLSTATE " : "",
                  state ? state : "", state ? ")" : "");
}

static void p_close(ot_regdb *db) {
  PQfinish(conn(db));
  free(db);
}

static int64_t cmd_tuples(PGresult *res) {
  const char *t = PQcmdTuples(res);
  return t && *t ? strtoll(t, NULL, 10) : 0;
}

static int p_exec(ot_regdb *db, const char *sql) {
  revive(db);
  PGresult *res = PQexec(conn(db), sql);
  ExecStatusType s = res ? PQresultStatus(res) : PGRES_FATAL_ERROR;
  int rc = s == PGRES_COMMAND_OK || s == PGRES_TUPLES_OK ? OT_OK : res_err(db, res, "exec");
  if (rc == OT_OK) ((pg *)db)->changes = cmd_tuples(res);
  PQclear(res);
  return rc;
}

static int64_t p_changes(ot_regdb *db) { return ((pg *)db)->changes; }

/* "?" and "?N" -> "$N" outside quotes; *n = the largest parameter number. */
static char *rewrite(const char *sql, int *n) {
  size_t len = strlen(sql);
  char *out = malloc(len * 4 + 1), *o = out;
  if (!out) return NULL;
  int next = 1, max = 0;
  char quote = 0;
  for (const char *p = sql; *p; p++) {
    if (quote) {
      if (*p == quote) quote = 0;
      *o++ = *p;
    } else if (*p == '\'' || *p == '"') {
      quote = *p;
      *o++ = *p;
    } else if (*p == '?') {
      int k;
      if (p[1] >= '0' && p[1] <= '9') {
        k = (int)strtol(p + 1, (char **)&p, 10);
        p--;
      } else {
        k = next;
      }
      if (k >= next) next = k + 1;
      if (k > max) max = k;
      o += sprintf(o, "$%d", k);
    } else {
      *o++ = *p;
    }
  }
  *o = '\0';
  *n = max;
  return out;
}

static void stmt_free(pg_stmt *s) {
  for (int i = 0; i < s->n; i++) free(s->vals[i]);
  free(s->vals);
  free(s->types);
  free(s->lens);
  free(s->fmts);
  free(s->sql);
  if (s->res) PQclear(s->res);
  if (s->blob) PQfreemem(s->blob);
  free(s);
}

static int p_prepare(ot_regdb *db, const char *sql, ot_regdb_stmt **out) {
  pg_stmt *s = calloc(1, sizeof *s);
  if (!s) return ot_error(OT_ERR_NOMEM, "cannot allocate");
  s->base.db = db;
  s->sql = rewrite(sql, &s->n);
  if (s->sql && s->n) {
    s->types = calloc((size_t)s->n, sizeof *s->types);
    s->vals = calloc((size_t)s->n, sizeof *s->vals);
    s->lens = calloc((size_t)s->n, sizeof *s->lens);
    s->fmts = calloc((size_t)s->n, sizeof *s->fmts);
  }
  if (!s->sql || (s->n && (!s->types || !s->vals || !s->lens || !s->fmts))) {
    stmt_free(s);
    return ot_error(OT_ERR_NOMEM, "cannot allocate");
  }
  *out = &s->base;
  return OT_OK;
}

static int p_bind(ot_regdb_stmt *st, int i, ot_regdb_coltype t, int64_t iv, double dv, const void *p,
                  size_t n) {
  pg_stmt *s = (pg_stmt *)st;
  if (i < 1 || i > s->n) return ot_error(OT_ERR_INTERNAL, "registry: parameter %d of %d", i, s->n);
  i--;
  free(s->vals[i]);
  s->vals[i] = NULL;
  s->fmts[i] = 0;
  s->lens[i] = 0;
  char num[64];
  /* a NULL keeps its type, so the server never has to guess it ("$2 IS NULL OR name = $2") */
  static const Oid oid[] = {[OT_COL_INT] = OID_INT8,
                            [OT_COL_FLOAT] = OID_FLOAT8,
                            [OT_COL_TEXT] = OID_TEXT,
                            [OT_COL_BLOB] = OID_BYTEA,
                            [OT_COL_NULL] = 0};
  s->types[i] = oid[t];
  if (t == OT_COL_NULL || ((t == OT_COL_TEXT || t == OT_COL_BLOB) && !p) || (t == OT_COL_FLOAT && dv != dv))
    return OT_OK;
  switch (t) {
  case OT_COL_INT:
    snprintf(num, sizeof num, "%lld", (long long)iv);
    s->vals[i] = strdup(num);
    break;
  case OT_COL_FLOAT:
    if (dv > 1.7976931348623157e308 || dv < -1.7976931348623157e308)
      snprintf(num, sizeof num, "%sInfinity", dv < 0 ? "-" : "");
    else
      snprintf(num, sizeof num, "%.17g", dv);
    s->vals[i] = strdup(num);
    break;
  case OT_COL_TEXT: s->vals[i] = strndup(p, n); break;
  case OT_COL_BLOB:
    s->vals[i] = malloc(n ? n : 1);
    if (s->vals[i]) memcpy(s->vals[i], p, n);
    s->lens[i] = (int)n;
    s->fmts[i] = 1; /* binary: the bytes as they are */
    break;
  case OT_COL_NULL: break;
  }
  return s->vals[i] ? OT_OK : ot_error(OT_ERR_NOMEM, "cannot allocate");
}

static int p_step(ot_regdb_stmt *st) {
  pg_stmt *s = (pg_stmt *)st;
  if (!s->res) {
    revive(st->db);
    s->res =
        PQexecParams(conn(st->db), s->sql, s->n, s->types, (const char *const *)s->vals, s->lens, s->fmts, 0);
    ExecStatusType t = s->res ? PQresultStatus(s->res) : PGRES_FATAL_ERROR;
    if (t != PGRES_COMMAND_OK && t != PGRES_TUPLES_OK) {
      int rc = res_err(st->db, s->res, "step");
      PQclear(s->res);
      s->res = NULL;
      return rc;
    }
    ((pg *)st->db)->changes = cmd_tuples(s->res);
    s->row = -1;
  }
  if (s->blob) {
    PQfreemem(s->blob);
    s->blob = NULL;
  }
  if (s->row + 1 >= PQntuples(s->res)) {
    s->row = PQntuples(s->res);
    return 0;
  }
  s->row++;
  return 1;
}

static PGresult *res_of(ot_regdb_stmt *st) { return ((pg_stmt *)st)->res; }
static int row_of(ot_regdb_stmt *st) { return ((pg_stmt *)st)->row; }
static int p_column_count(ot_regdb_stmt *st) { return res_of(st) ? PQnfields(res_of(st)) : 0; }
static const char *p_column_name(ot_regdb_stmt *st, int c) { return PQfname(res_of(st), c); }
static int is_null(ot_regdb_stmt *st, int c) {
  PGresult *r = res_of(st);
  return !r || row_of(st) < 0 || row_of(st) >= PQntuples(r) || c >= PQnfields(r) ||
         PQgetisnull(r, row_of(st), c);
}
static ot_regdb_coltype p_column_type(ot_regdb_stmt *st, int c) {
  if (is_null(st, c)) return OT_COL_NULL;
  switch ((int)PQftype(res_of(st), c)) {
  case OID_INT8:
  case OID_INT2:
  case OID_INT4:
  case OID_OID: return OT_COL_INT;
  case OID_FLOAT4:
  case OID_FLOAT8:
  case OID_NUMERIC: return OT_COL_FLOAT;
  case OID_BYTEA: return OT_COL_BLOB;
  default: return OT_COL_TEXT;
  }
}
static const char *p_column_text(ot_regdb_stmt *st, int c) {
  return is_null(st, c) ? NULL : PQgetvalue(res_of(st), row_of(st), c);
}
static int64_t p_column_int64(ot_regdb_stmt *st, int c) {
  const char *t = p_column_text(st, c);
  if (!t) return 0;
  if ((int)PQftype(res_of(st), c) == OID_BOOL) return *t == 't';
  return strtoll(t, NULL, 10);
}
static double p_column_double(ot_regdb_stmt *st, int c) {
  const char *t = p_column_text(st, c);
  return t ? strtod(t, NULL) : 0.0; /* strtod reads "NaN" and "Infinity" */
}
static const void *p_column_blob(ot_regdb_stmt *st, int c, size_t *n) {
  pg_stmt *s = (pg_stmt *)st;
  const char *t = p_column_text(st, c);
  *n = 0;
  if (!t) return NULL;
  if (s->blob) PQfreemem(s->blob);
  s->blob = PQunescapeBytea((const unsigned char *)t, n);
  return s->blob;
}
static void p_finalize(ot_regdb_stmt *st) { stmt_free((pg_stmt *)st); }

static const ot_regdb_ops pg_ops = {p_close,       p_exec,         p_changes,       p_prepare,
                                    p_bind,        p_step,         p_column_count,  p_column_name,
                                    p_column_type, p_column_int64, p_column_double, p_column_text,
                                    p_column_blob, p_finalize};

int ot_regdb_pg_open(const char *conninfo, ot_regdb **out) {
  pg *p = calloc(1, sizeof *p);
  if (!p) return ot_error(OT_ERR_NOMEM, "cannot allocate");
  p->base.ops = &pg_ops;
  p->base.dialect = OT_DB_PG;
  p->c = PQconnectdb(conninfo);
  if (!p->c || PQstatus(p->c) != CONNECTION_OK) {
    /* libpq's message names the server, never the password */
    char m[600];
    snprintf(m, sizeof m, "%s", p->c ? PQerrorMessage(p->c) : "out of memory");
    size_t k = strlen(m);
    while (k && (m[k - 1] == '\n' || m[k - 1] == ' ')) m[--k] = '\0';
    p_close(&p->base);
    return ot_error(OT_ERR_IO, "registry: cannot connect to PostgreSQL: %s", m);
  }
  PQsetNoticeProcessor(p->c, quiet, NULL);
  *out = &p->base;
  return OT_OK;
}

#endif

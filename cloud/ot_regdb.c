/* The registry's database interface: picks the backend and dispatches to it. */
#include "ot_regdb_impl.h"

#include <ctype.h>
#include <string.h>

#include "ot_error.h"

int ot_regdb_is_pg(const char *t) {
  if (!t) return 0;
  if (strncmp(t, "postgresql://", 13) == 0 || strncmp(t, "postgres://", 11) == 0) return 1;
  /* a conninfo starts with keyword= (host=, dbname=, service=...) */
  while (isspace((unsigned char)*t)) t++;
  const char *k = t;
  while (*t == '_' || (*t >= 'a' && *t <= 'z')) t++;
  while (isspace((unsigned char)*t)) t++;
  return t > k && *t == '=';
}

int ot_regdb_open(const char *target, ot_regdb **out) {
  if (!target || !*target) return ot_error(OT_ERR_INVALID, "registry: no database given");
  return ot_regdb_is_pg(target) ? ot_regdb_pg_open(target, out) : ot_regdb_sqlite_open(target, out);
}

void ot_regdb_close(ot_regdb *db) {
  if (db) db->ops->close(db);
}
ot_regdb_dialect ot_regdb_dialect_of(const ot_regdb *db) { return db->dialect; }
int ot_regdb_exec(ot_regdb *db, const char *sql) { return db->ops->exec(db, sql); }
int64_t ot_regdb_changes(ot_regdb *db) { return db->ops->changes(db); }
int ot_regdb_prepare(ot_regdb *db, const char *sql, ot_regdb_stmt **out) {
  return db->ops->prepare(db, sql, out);
}

int ot_regdb_bind_int64(ot_regdb_stmt *st, int i, int64_t v) {
  return st->db->ops->bind(st, i, OT_COL_INT, v, 0, NULL, 0);
}
int ot_regdb_bind_double(ot_regdb_stmt *st, int i, double v) {
  /* both backends store a NaN as NULL (SQLite does so itself; AVG and COUNT then skip it) */
  return st->db->ops->bind(st, i, OT_COL_FLOAT, 0, v, NULL, 0);
}
int ot_regdb_bind_text(ot_regdb_stmt *st, int i, const char *v) {
  return st->db->ops->bind(st, i, OT_COL_TEXT, 0, 0, v, v ? strlen(v) : 0);
}
int ot_regdb_bind_blob(ot_regdb_stmt *st, int i, const void *v, size_t n) {
  return st->db->ops->bind(st, i, OT_COL_BLOB, 0, 0, v, n);
}
int ot_regdb_step(ot_regdb_stmt *st) { return st->db->ops->step(st); }
int ot_regdb_column_count(ot_regdb_stmt *st) { return st->db->ops->column_count(st); }
const char *ot_regdb_column_name(ot_regdb_stmt *st, int c) { return st->db->ops->column_name(st, c); }
ot_regdb_coltype ot_regdb_column_type(ot_regdb_stmt *st, int c) { return st->db->ops->column_type(st, c); }
int64_t ot_regdb_column_int64(ot_regdb_stmt *st, int c) { return st->db->ops->column_int64(st, c); }
double ot_regdb_column_double(ot_regdb_stmt *st, int c) { return st->db->ops->column_double(st, c); }
const char *ot_regdb_column_text(ot_regdb_stmt *st, int c) { return st->db->ops->column_text(st, c); }
const void *ot_regdb_column_blob(ot_regdb_stmt *st, int c, size_t *n) {
  return st->db->ops->column_blob(st, c, n);
}
void ot_regdb_finalize(ot_regdb_stmt *st) {
  if (st) st->db->ops->finalize(st);
}

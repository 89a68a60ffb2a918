/* Inside ot_regdb: what a backend provides (ot_regdb_sqlite.c, ot_regdb_pg.c). A backend's
 * connection and statement structs start with these headers. */
#ifndef OT_REGDB_IMPL_H
#define OT_REGDB_IMPL_H

#include "ot_regdb.h"

typedef struct {
  void (*close)(ot_regdb *db);
  int (*exec)(ot_regdb *db, const char *sql);
  int64_t (*changes)(ot_regdb *db);
  int (*prepare)(ot_regdb *db, const char *sql, ot_regdb_stmt **out);
  /* t: OT_COL_INT (iv), OT_COL_FLOAT (dv; NaN binds NULL), OT_COL_TEXT (p, NUL-terminated) or
   * OT_COL_BLOB (p, n); p NULL binds a NULL of that type */
  int (*bind)(ot_regdb_stmt *st, int i, ot_regdb_coltype t, int64_t iv, double dv, const void *p, size_t n);
  int (*step)(ot_regdb_stmt *st);
  int (*column_count)(ot_regdb_stmt *st);
  const char *(*column_name)(ot_regdb_stmt *st, int c);
  ot_regdb_coltype (*column_type)(ot_regdb_stmt *st, int c);
  int64_t (*column_int64)(ot_regdb_stmt *st, int c);
  double (*column_double)(ot_regdb_stmt *st, int c);
  const char *(*column_text)(ot_regdb_stmt *st, int c);
  const void *(*column_blob)(ot_regdb_stmt *st, int c, size_t *n);
  void (*finalize)(ot_regdb_stmt *st);
} ot_regdb_ops;

struct ot_regdb {
  const ot_regdb_ops *ops;
  ot_regdb_dialect dialect;
};

struct ot_regdb_stmt {
  ot_regdb *db;
};

int ot_regdb_sqlite_open(const char *path, ot_regdb **out);
/* OT_ERR_UNSUPPORTED when built without libpq. */
int ot_regdb_pg_open(const char *conninfo, ot_regdb **out);

#endif

/* The registry's database connection, behind one interface with two backends: SQLite (a
 * file; the default) and PostgreSQL through libpq (several daemons on one database;
 * docs/deploy.md). ot_registry.c holds every query and is written once against this.
 *
 * SQL is written in the dialect both share; parameters are "?" or "?N" (the PostgreSQL
 * backend rewrites them to "$N"). Where the dialects differ, the caller asks
 * ot_regdb_dialect and picks its text. Not thread-safe: the registry holds its lock around
 * every use. */
#ifndef OT_REGDB_H
#define OT_REGDB_H

#include <stddef.h>
#include <stdint.h>

typedef enum { OT_DB_SQLITE = 0, OT_DB_PG } ot_regdb_dialect;
typedef enum { OT_COL_NULL = 0, OT_COL_INT, OT_COL_FLOAT, OT_COL_TEXT, OT_COL_BLOB } ot_regdb_coltype;

typedef struct ot_regdb ot_regdb;
typedef struct ot_regdb_stmt ot_regdb_stmt;

/* 1 if target names a PostgreSQL database: a postgresql:// or postgres:// URI, or a libpq
 * conninfo ("host=/run/pg dbname=offtune": it starts with keyword=). Otherwise it is a
 * SQLite file (or ":memory:"). */
int ot_regdb_is_pg(const char *target);
/* Opens (SQLite: creates) the database. The error detail never shows a password. */
int ot_regdb_open(const char *target, ot_regdb **out);
void ot_regdb_close(ot_regdb *db);
ot_regdb_dialect ot_regdb_dialect_of(const ot_regdb *db);

/* One or more statements without parameters or rows (schema, BEGIN, COMMIT). */
int ot_regdb_exec(ot_regdb *db, const char *sql);
/* Rows changed by the last statement run (UPDATE, DELETE, INSERT). */
int64_t ot_regdb_changes(ot_regdb *db);

int ot_regdb_prepare(ot_regdb *db, const char *sql, ot_regdb_stmt **out);
/* Parameters are numbered from 1. A NaN double is stored as NULL (what SQLite does). */
int ot_regdb_bind_int64(ot_regdb_stmt *st, int i, int64_t v);
int ot_regdb_bind_double(ot_regdb_stmt *st, int i, double v);
int ot_regdb_bind_text(ot_regdb_stmt *st, int i, const char *v); /* NULL binds NULL */
int ot_regdb_bind_blob(ot_regdb_stmt *st, int i, const void *v, size_t n);
/* 1: a row is ready; 0: no more rows; < 0: an error (OT_ERR_*, detail set). */
int ot_regdb_step(ot_regdb_stmt *st);
int ot_regdb_column_count(ot_regdb_stmt *st);
const char *ot_regdb_column_name(ot_regdb_stmt *st, int c);
ot_regdb_coltype ot_regdb_column_type(ot_regdb_stmt *st, int c);
int64_t ot_regdb_column_int64(ot_regdb_stmt *st, int c);
double ot_regdb_column_double(ot_regdb_stmt *st, int c);
const char *ot_regdb_column_text(ot_regdb_stmt *st, int c); /* NULL for NULL; valid until the next step */
/* A blob column's bytes (*n its length); NULL for NULL. Valid until the next step. */
const void *ot_regdb_column_blob(ot_regdb_stmt *st, int c, size_t *n);
void ot_regdb_finalize(ot_regdb_stmt *st);

#endif

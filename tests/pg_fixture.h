/* A throw-away PostgreSQL server for a test process (tests/pg_cluster.sh): initdb in a temp
 * directory, unix socket there, stopped at pg_fixture_stop or, should the test die, by the
 * script's watchdog. Include after the cmocka prelude. */
#ifndef PG_FIXTURE_H
#define PG_FIXTURE_H

#include <stddef.h>

/* Starts the server with databases dbs[0..n); conninfo gets "host=DIR user=U" (add
 * "dbname=X"). Returns 0, or 77 with the reason in why when PostgreSQL cannot be used here (no
 * libpq in this build, no server programs installed); exits the process on other failures. */
int pg_fixture_start(const char *const *dbs, int n, char *conninfo, size_t cap, char *why, size_t why_cap);
void pg_fixture_stop(void);
/* The first column of the first row of a query (psql -At), into out; fails the test on error. */
void pg_fixture_query(const char *conninfo, char *out, size_t cap, const char *sql);
int pg_fixture_int(const char *conninfo, const char *sql);

#endif

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "ot_test_util.h"
#include "pg_fixture.h"

static char pg_dir[4096];

int pg_fixture_start(const char *const *dbs, int n, char *conninfo, size_t cap, char *why, size_t why_cap) {
#ifndef OT_HAVE_LIBPQ
  (void)dbs, (void)n, (void)conninfo, (void)cap;
  snprintf(why, why_cap, "this build has no libpq (install libpq-dev and configure again)");
  return 77;
#else
  char cmd[4096], out[4096] = "";
  int k = snprintf(cmd, sizeof cmd, "'%s/tests/pg_cluster.sh' start %d", ot_test_source_dir(), (int)getpid());
  for (int i = 0; i < n && k < (int)sizeof cmd; i++)
    k += snprintf(cmd + k, sizeof cmd - (size_t)k, " %s", dbs[i]);
  if (k >= (int)sizeof cmd - 8) {
    fprintf(stderr, "pg_fixture: command too long\n");
    exit(1);
  }
  snprintf(cmd + k, sizeof cmd - (size_t)k, " 2>&1");
  FILE *p = popen(cmd, "r");
  size_t got = p ? fread(out, 1, sizeof out - 1, p) : 0;
  out[got] = '\0';
  int st = p ? pclose(p) : -1;
  int code = st >= 0 && WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  if (code == 77) {
    snprintf(why, why_cap, "%s", out);
    size_t l = strlen(why);
    while (l && why[l - 1] == '\n') why[--l] = '\0';
    return 77;
  }
  /* the result is the last line: DIR<TAB>CONNINFO (warnings may come before it) */
  char *tab = strrchr(out, '\t'), *nl = tab ? strchr(tab, '\n') : NULL;
  char *line = tab;
  while (line && line > out && line[-1] != '\n') line--;
  if (code != 0 || !tab || !nl) {
    fprintf(stderr, "tests/pg_cluster.sh failed (%d):\n%s\n", code, out);
    exit(1);
  }
  *tab = *nl = '\0';
  snprintf(pg_dir, sizeof pg_dir, "%s", line);
  snprintf(conninfo, cap, "%s", tab + 1);
  return 0;
#endif
}

void pg_fixture_stop(void) {
  if (pg_dir[0]) ot_test_system("'%s/tests/pg_cluster.sh' stop '%s'", ot_test_source_dir(), pg_dir);
  pg_dir[0] = '\0';
}

void pg_fixture_query(const char *conninfo, char *out, size_t cap, const char *sql) {
  int rc = ot_test_run(out, cap, "psql -X -At -v ON_ERROR_STOP=1 \"%s\" -c \"%s\"", conninfo, sql);
  if (rc != 0) fail_msg("psql: %s: %s", sql, out);
  char *nl = strchr(out, '\n');
  if (nl) *nl = '\0';
}

int pg_fixture_int(const char *conninfo, const char *sql) {
  char out[4096];
  pg_fixture_query(conninfo, out, sizeof out, sql);
  return atoi(out);
}

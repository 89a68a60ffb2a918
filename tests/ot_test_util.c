#include "ot_test_util.h"

#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>

static const char *env_or_fail(const char *name) {
  const char *v = getenv(name);
  if (!v || !*v) fail_msg("environment variable %s is not set: run the tests through ctest", name);
  return v;
}

const char *ot_test_source_dir(void) { return env_or_fail("OT_SOURCE_DIR"); }
const char *ot_test_binary_dir(void) { return env_or_fail("OT_BINARY_DIR"); }
const char *ot_test_npm_dir(void) { return env_or_fail("OT_NPM_DIR"); }

char *ot_test_tmpdir(const char *name) {
  char *path = NULL;
  if (asprintf(&path, "%s/tests/tmp/%s", ot_test_binary_dir(), name) < 0) fail_msg("asprintf");
  if (ot_test_system("rm -rf '%s' && mkdir -p '%s'", path, path) != 0) fail_msg("cannot make %s", path);
  return path;
}

int ot_test_system(const char *fmt, ...) {
  char *cmd = NULL;
  va_list ap;
  va_start(ap, fmt);
  int r = vasprintf(&cmd, fmt, ap);
  va_end(ap);
  if (r < 0) return -1;
  int st = system(cmd);
  free(cmd);
  if (st == -1 || !WIFEXITED(st)) return -1;
  return WEXITSTATUS(st);
}

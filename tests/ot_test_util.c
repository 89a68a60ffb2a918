#include "ot_test_util.h"

#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
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

int ot_test_run(char *out, size_t cap, const char *fmt, ...) {
  char *cmd = NULL, *full = NULL;
  va_list ap;
  va_start(ap, fmt);
  assert_true(vasprintf(&cmd, fmt, ap) >= 0);
  va_end(ap);
  assert_true(asprintf(&full, "%s 2>&1", cmd) >= 0);
  FILE *p = popen(full, "r");
  assert_non_null(p);
  if (out && cap) {
    size_t n = fread(out, 1, cap - 1, p);
    out[n] = '\0';
  }
  char sink[4096];
  while (fread(sink, 1, sizeof sink, p) > 0) {
  }
  int st = pclose(p);
  free(cmd);
  free(full);
  return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

double ot_test_json_number(const char *json, const char *key) {
  char pat[64];
  snprintf(pat, sizeof pat, "\"%s\":", key);
  const char *p = strstr(json, pat);
  if (!p) fail_msg("no %s in %s", key, json);
  return strtod(p + strlen(pat), NULL);
}

double ot_test_rel_err(const float *a, const float *b, size_t n) {
  double num = 0, den = 0;
  for (size_t i = 0; i < n; i++) {
    double d = (double)a[i] - b[i];
    num += d * d;
    den += (double)b[i] * b[i];
  }
  return den > 0 ? sqrt(num / den) : sqrt(num);
}

float *ot_test_st_f32(ot_safetensors *st, const char *name, size_t *n) {
  const ot_st_tensor *t = ot_st_find(st, name);
  if (!t) fail_msg("reference tensor %s missing", name);
  float *buf = malloc(t->numel * sizeof(float));
  assert_non_null(buf);
  assert_int_equal(ot_st_read_f32(st, t, buf, t->numel), 0);
  if (n) *n = t->numel;
  return buf;
}

void ot_test_eval_json(const char *out, const char *what, double *loss, double *tokens) {
  const char *j = strstr(out, "{\"loss\"");
  if (!j) fail_msg("%s: no JSON in\n%s", what, out);
  *loss = ot_test_json_number(j, "loss");
  *tokens = ot_test_json_number(j, "tokens");
  double ppl = ot_test_json_number(j, "perplexity");
  printf("%-28s loss %.4f | perplexity %.2f | %.0f tokens\n", what, *loss, ppl, *tokens);
  assert_true(isfinite(*loss) && *loss > 0 && fabs(ppl - exp(*loss)) < 1e-3 * ppl);
}

int ot_test_ref(const char *script, const char *out_dir) {
  const char *py = getenv("OT_PYTHON");
  int rc = ot_test_system("%s '%s/tests/ref/%s' '%s'", py ? py : "/usr/bin/python3", ot_test_source_dir(),
                          script, out_dir);
  if (rc != 0)
    fprintf(stderr,
            "reference generator %s failed (exit %d): is python3-torch installed (scripts/setup.sh)?\n",
            script, rc);
  return rc;
}

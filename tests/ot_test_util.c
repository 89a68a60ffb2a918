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

#include "ot_error.h"

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

static int run_v(char *out, size_t cap, const char *fmt, va_list ap) {
  char *cmd = NULL, *full = NULL;
  assert_true(vasprintf(&cmd, fmt, ap) >= 0);
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

int ot_test_run(char *out, size_t cap, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  int rc = run_v(out, cap, fmt, ap);
  va_end(ap);
  return rc;
}

/* ot_test_run that fails the test with the output unless the command exits 0. */
static void run_ok(char *out, size_t cap, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void run_ok(char *out, size_t cap, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  int rc = run_v(out, cap, fmt, ap);
  va_end(ap);
  if (rc != 0) fail_msg("exit %d:\n%s", rc, out);
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

int ot_test_cli_paths(const char *name, char **dir, char **cloud, char **device) {
  *dir = ot_test_tmpdir(name);
  if (asprintf(cloud, "%s/cloud/offtune-cloud", ot_test_binary_dir()) < 0) return -1;
  if (asprintf(device, "%s/device/offtune-device", ot_test_binary_dir()) < 0) return -1;
  return 0;
}

void ot_test_cli_base(const char *cloud, const char *dir, int private_bytes, char *out, size_t cap) {
  /* the cloud's public corpus and one device's private text */
  run_ok(out, cap, "%s corpus --genres public --out %s/public.txt", cloud, dir);
  run_ok(out, cap, "%s corpus --genres romance --out %s/romance.txt", cloud, dir);
  /* a slice keeps the tests quick */
  assert_int_equal(ot_test_system("head -c %d '%s/romance.txt' > '%s/private.txt'", private_bytes, dir, dir),
                   0);
  run_ok(out, cap,
         "%s pretrain --tokenizer byte --layers 4 --embd 16 --heads 2 --ctx 32 --steps 20 --batch 4 --text "
         "%s/public.txt --out %s/full",
         cloud, dir, dir);
}

void ot_test_st_batch(ot_safetensors *st, int *B, int *T, int32_t **in, int32_t **tg) {
  const ot_st_tensor *i = ot_st_find(st, "inputs"), *t = ot_st_find(st, "targets");
  assert_non_null(i);
  assert_non_null(t);
  *B = (int)i->shape[0];
  *T = (int)i->shape[1];
  *in = malloc(i->nbytes);
  *tg = malloc(i->nbytes);
  assert_non_null(*in);
  assert_non_null(*tg);
  memcpy(*in, ot_st_data(st, i), i->nbytes);
  memcpy(*tg, ot_st_data(st, t), i->nbytes);
}

void ot_test_case_open(ot_test_case *c, const char *model_dir, const char *case_dir) {
  memset(c, 0, sizeof *c);
  char path[1024];
  assert_int_equal(ot_backend_cpu_create(2, &c->be), 0);
  if (ot_model_load_dir(model_dir, c->be, &c->m)) fail_msg("load %s: %s", model_dir, ot_error_detail());
  snprintf(path, sizeof path, "%s/ref.safetensors", case_dir);
  assert_int_equal(ot_st_open(path, &c->ref), 0);
  ot_test_st_batch(c->ref, &c->B, &c->T, &c->in, &c->tg);
}

int ot_test_finite_differences(ot_model *m, const int32_t *in, const int32_t *tg, int B, int T) {
  float loss;
  assert_int_equal(ot_model_forward(m, in, tg, B, T, &loss), 0);
  assert_int_equal(ot_model_backward(m), 0);
  int checked = 0;
  for (int i = 0; i < ot_model_param_count(m); i++) {
    ot_param *p = ot_model_param(m, i);
    for (size_t j = 0; j < p->numel; j += 1 + p->numel / 3) {
      float orig = p->data[j], h = 4e-3f, lp, lm;
      p->data[j] = orig + h;
      assert_int_equal(ot_model_forward(m, in, tg, B, T, &lp), 0);
      p->data[j] = orig - h;
      assert_int_equal(ot_model_forward(m, in, tg, B, T, &lm), 0);
      p->data[j] = orig;
      double fd = ((double)lp - lm) / (2.0 * h), an = p->grad[j];
      if (!(fabs(fd - an) <= 1e-4 + 3e-2 * fabs(an)))
        fail_msg("%s[%zu]: analytic %.6g, finite difference %.6g", p->name, j, an, fd);
      checked++;
    }
  }
  return checked;
}

void ot_test_case_close(ot_test_case *c) {
  ot_model_free(c->m);
  ot_backend_free(c->be);
  ot_st_close(c->ref);
  free(c->in);
  free(c->tg);
}

/* Option parsing, usage text and progress output. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include "ot_cli.h"
#include "ot_error.h"
#include "ot_test_util.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
  const char *out;
  int steps;
  float lr;
  int verbose;
} args;

static int parse(args *a, int argc, const char **argv) {
  const ot_opt opts[] = {
      {"out", OT_OPT_STR, &a->out, "DIR", "where to write the checkpoint"},
      {"steps", OT_OPT_INT, &a->steps, "N", "number of optimizer steps"},
      {"lr", OT_OPT_FLOAT, &a->lr, "LR", "peak learning rate"},
      {"verbose", OT_OPT_FLAG, &a->verbose, NULL, "print more"},
  };
  return ot_cli_parse(argc, (char **)argv, opts, (int)(sizeof opts / sizeof opts[0]));
}

static void test_parse_good(void **state) {
  (void)state;
  args a = {"default", 5, 1.0f, 0};
  const char *argv[] = {"--steps", "10", "--lr=3e-4", "--out", "runs/x", "--verbose"};
  assert_int_equal(parse(&a, 6, argv), OT_OK);
  assert_string_equal(a.out, "runs/x");
  assert_int_equal(a.steps, 10);
  assert_float_equal(a.lr, 3e-4f, 1e-10f);
  assert_int_equal(a.verbose, 1);

  /* Options not given keep their defaults; negative values and "=" forms work; the last one wins. */
  args b = {"default", 5, 1.0f, 0};
  const char *argv2[] = {"--steps=-3", "--lr", "-0.5", "--out=", "--steps", "7"};
  assert_int_equal(parse(&b, 6, argv2), OT_OK);
  assert_int_equal(b.steps, 7);
  assert_float_equal(b.lr, -0.5f, 0);
  assert_string_equal(b.out, "");
  assert_int_equal(b.verbose, 0);

  args c = {"default", 5, 1.0f, 0};
  assert_int_equal(parse(&c, 0, NULL), OT_OK);
  assert_int_equal(c.steps, 5);
}

/* A failed parse is OT_ERR_INVALID, names the culprit and changes nothing. */
static void expect_bad(int argc, const char **argv, const char *needle) {
  args a = {"default", 5, 1.0f, 0};
  int rc = parse(&a, argc, argv);
  if (rc != OT_ERR_INVALID) fail_msg("%s...: got %d, want OT_ERR_INVALID", argv[0], rc);
  if (!strstr(ot_error_detail(), needle)) fail_msg("detail \"%s\" lacks \"%s\"", ot_error_detail(), needle);
  assert_string_equal(a.out, "default");
  assert_int_equal(a.steps, 5);
  assert_float_equal(a.lr, 1.0f, 0);
  assert_int_equal(a.verbose, 0);
}

static void test_parse_bad(void **state) {
  (void)state;
  const char *a1[] = {"--verbose", "--steps", "12abc"};
  expect_bad(3, a1, "steps");
  const char *a2[] = {"--steps=99999999999"};
  expect_bad(1, a2, "steps");
  const char *a3[] = {"--steps"};
  expect_bad(1, a3, "steps");
  const char *a4[] = {"--nope", "1"};
  expect_bad(2, a4, "nope");
  const char *a5[] = {"--steps", "3", "stray"};
  expect_bad(3, a5, "stray");
  const char *a6[] = {"--verbose=1"};
  expect_bad(1, a6, "verbose");
  const char *a7[] = {"--lr", "1e400"};
  expect_bad(2, a7, "lr");
  const char *a8[] = {"--lr", "abc"};
  expect_bad(2, a8, "lr");
  const char *a9[] = {"--lr="};
  expect_bad(1, a9, "lr");
  const char *a10[] = {"--out", "--steps", "3"};
  expect_bad(3, a10, "out");
  const char *a11[] = {"-x"};
  expect_bad(1, a11, "-x");
  const char *a12[] = {"--steps", " 4"};
  expect_bad(2, a12, "steps");
  const char *a13[] = {"--lr", "nan"};
  expect_bad(2, a13, "lr");
  const char *a14[] = {"--ste", "4"};
  expect_bad(2, a14, "ste");
}

static void test_parse_help(void **state) {
  (void)state;
  args a = {"default", 5, 1.0f, 0};
  const char *h1[] = {"--steps", "9", "--help"};
  assert_int_equal(parse(&a, 3, h1), 1);
  const char *h2[] = {"-h"};
  assert_int_equal(parse(&a, 1, h2), 1);
  assert_int_equal(a.steps, 5);
}

static char *slurp(FILE *f) {
  fflush(f);
  long n = ftell(f);
  assert_true(n >= 0);
  char *buf = calloc((size_t)n + 1, 1);
  assert_non_null(buf);
  rewind(f);
  assert_int_equal(fread(buf, 1, (size_t)n, f), (size_t)n);
  return buf;
}

static void test_usage(void **state) {
  (void)state;
  args a = {0};
  const ot_opt opts[] = {
      {"out", OT_OPT_STR, &a.out, "DIR", "where to write the checkpoint"},
      {"steps", OT_OPT_INT, &a.steps, "N", "number of optimizer steps"},
      {"verbose", OT_OPT_FLAG, &a.verbose, NULL, "print more"},
      {"lr", OT_OPT_FLOAT, &a.lr, "LR",
       "peak learning rate of the cosine schedule; warmup rises linearly to it and the decay ends at one "
       "tenth "
       "of it, which is what the Offsite-Tuning paper used for its emulator distillation runs"},
  };
  FILE *f = tmpfile();
  assert_non_null(f);
  ot_cli_usage(f, "offtune-device train [options]", "Trains the adapter on local data.", opts, 4);
  char *text = slurp(f);
  fclose(f);
  assert_true(strncmp(text, "usage: offtune-device train [options]\n", 38) == 0);
  assert_non_null(strstr(text, "Trains the adapter on local data."));
  const char *names[] = {"--out DIR", "--steps N", "--verbose", "--lr LR", "--help"};
  for (int i = 0; i < 5; i++)
    if (!strstr(text, names[i])) fail_msg("usage lacks %s:\n%s", names[i], text);
  /* Help texts start in one column, and no line runs past 80 characters. */
  const char *h1 = strstr(text, "where to write"), *h2 = strstr(text, "number of optimizer");
  const char *l1 = h1, *l2 = h2;
  while (l1[-1] != '\n') l1--;
  while (l2[-1] != '\n') l2--;
  assert_int_equal(h1 - l1, h2 - l2);
  size_t col = 0;
  for (const char *p = text; *p; p++) {
    col = *p == '\n' ? 0 : col + 1;
    if (col > 80) fail_msg("usage line longer than 80 columns:\n%s", text);
  }
  assert_non_null(strstr(text, "distillation runs"));
  free(text);
}

static int count_lines(const char *s) {
  int n = 0;
  for (; *s; s++) n += *s == '\n';
  return n;
}

static void test_progress_log(void **state) {
  (void)state;
  FILE *f = tmpfile();
  assert_non_null(f);
  ot_progress p;
  ot_progress_start(&p, f, "train", 100);
  assert_int_equal(p.tty, 0);
  /* Quick updates in a log: nothing until 10 s and 5% have passed. */
  for (int i = 1; i <= 10; i++) ot_progress_update(&p, i, "loss 3.00");
  char *text = slurp(f);
  assert_string_equal(text, "");
  free(text);
  fseek(f, 0, SEEK_END);
  /* Pretend 20 s went by: 50% now prints a line. */
  p.t_start -= 20;
  p.t_last -= 20;
  ot_progress_update(&p, 50, "loss 2.31 | 1234 tok/s");
  /* 1% later is too soon, even after another 20 s. */
  p.t_last -= 20;
  ot_progress_update(&p, 51, "loss 2.30");
  ot_progress_finish(&p, "loss 2.00");
  text = slurp(f);
  fclose(f);
  assert_int_equal(count_lines(text), 2);
  assert_null(strchr(text, '\r'));
  assert_null(strchr(text, '\033'));
  assert_non_null(strstr(text, "train"));
  assert_non_null(strstr(text, "50/100"));
  assert_non_null(strstr(text, "50.0%"));
  assert_non_null(strstr(text, "loss 2.31 | 1234 tok/s"));
  assert_non_null(strstr(text, "100/100"));
  assert_non_null(strstr(text, "loss 2.00"));
  assert_null(strstr(text, "loss 2.30"));
  free(text);

  /* Unknown total: count only, the finish line reports the last count. */
  f = tmpfile();
  assert_non_null(f);
  ot_progress_start(&p, f, "scan", 0);
  ot_progress_update(&p, 17, NULL);
  ot_progress_finish(&p, NULL);
  text = slurp(f);
  fclose(f);
  assert_int_equal(count_lines(text), 1);
  assert_non_null(strstr(text, "scan: 17"));
  free(text);
}

static void test_now(void **state) {
  (void)state;
  double a = ot_now(), b = ot_now();
  assert_true(a > 0);
  assert_true(b >= a);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_parse_good),   cmocka_unit_test(test_parse_bad),
      cmocka_unit_test(test_parse_help),   cmocka_unit_test(test_usage),
      cmocka_unit_test(test_progress_log), cmocka_unit_test(test_now),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}

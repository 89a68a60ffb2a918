/* Token files, the sequential / shuffled batcher contract and evaluation windows. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include "ot_data.h"
#include "ot_error.h"
#include "ot_test_util.h"
#include "ot_tokenizer.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* dir + "/" + name in a malloc'd string. */
static char *join(const char *dir, const char *name) {
  size_t n = strlen(dir) + strlen(name) + 2;
  char *p = malloc(n);
  assert_non_null(p);
  snprintf(p, n, "%s/%s", dir, name);
  return p;
}

/* ids[i] = 100 + i, so a value tells its position and positions are not mistaken for values. */
static ot_tokens make_stream(size_t n) {
  ot_tokens t = {malloc(n * sizeof(int32_t)), n, NULL};
  assert_non_null(t.ids);
  for (size_t i = 0; i < n; i++) t.ids[i] = (int32_t)(100 + i);
  return t;
}

/* Checks that row r of a batch is inputs p..p+T-1 and targets p+1..p+T. */
static void assert_row(const int32_t *in, const int32_t *tg, int T, int r, size_t p) {
  for (int j = 0; j < T; j++) {
    assert_int_equal(in[r * T + j], (int32_t)(100 + p + (size_t)j));
    assert_int_equal(tg[r * T + j], (int32_t)(100 + p + (size_t)j + 1));
  }
}

static void test_batcher_sequential(void **state) {
  (void)state;
  enum { B = 2, T = 4 };
  int32_t in[B * T], tg[B * T];
  /* n = 25: steps at p = 0, 8, 16 (16 + 9 = 25 tokens exactly), then 24 has 1 left -> 0. */
  ot_tokens t = make_stream(25);
  ot_batcher b;
  assert_int_equal(ot_batcher_init(&b, &t, B, T, 0, 0), OT_OK);
  const size_t expect[] = {0, 8, 16, 0, 8, 16, 0};
  for (size_t s = 0; s < sizeof expect / sizeof expect[0]; s++) {
    ot_batcher_next(&b, in, tg);
    for (int r = 0; r < B; r++) assert_row(in, tg, T, r, expect[s] + (size_t)r * T);
  }
  ot_tokens_free(&t);

  /* n = 24: p = 16 has only 8 left (< B*T+1 = 9), so the third step wraps to 0. */
  t = make_stream(24);
  assert_int_equal(ot_batcher_init(&b, &t, B, T, 0, 0), OT_OK);
  const size_t expect2[] = {0, 8, 0, 8, 0};
  for (size_t s = 0; s < sizeof expect2 / sizeof expect2[0]; s++) {
    ot_batcher_next(&b, in, tg);
    for (int r = 0; r < B; r++) assert_row(in, tg, T, r, expect2[s] + (size_t)r * T);
  }
  ot_tokens_free(&t);

  /* Exactly B*T+1 tokens: every step is the same batch. */
  t = make_stream(B * T + 1);
  assert_int_equal(ot_batcher_init(&b, &t, B, T, 0, 0), OT_OK);
  for (int s = 0; s < 3; s++) {
    ot_batcher_next(&b, in, tg);
    for (int r = 0; r < B; r++) assert_row(in, tg, T, r, (size_t)r * T);
  }
  ot_tokens_free(&t);
}

static void test_batcher_init_errors(void **state) {
  (void)state;
  ot_tokens t = make_stream(8);
  ot_batcher b, before;
  memset(&b, 0x5a, sizeof b);
  before = b;
  /* 8 tokens < B*T+1 = 9. */
  assert_int_equal(ot_batcher_init(&b, &t, 2, 4, 0, 1), OT_ERR_RANGE);
  assert_non_null(strstr(ot_error_detail(), "9"));
  assert_int_equal(ot_batcher_init(&b, &t, 2, 4, 1, 1), OT_ERR_RANGE);
  assert_int_equal(ot_batcher_init(&b, &t, 0, 4, 0, 1), OT_ERR_INVALID);
  assert_int_equal(ot_batcher_init(&b, &t, 2, -1, 0, 1), OT_ERR_INVALID);
  assert_memory_equal(&b, &before, sizeof b);
  ot_tokens_free(&t);
}

static void test_batcher_shuffle(void **state) {
  (void)state;
  enum { B = 4, T = 5, N = 12, STEPS = 400 };
  ot_tokens t = make_stream(B * T + 1 + N);
  ot_batcher a, b, c;
  assert_int_equal(ot_batcher_init(&a, &t, B, T, 1, 42), OT_OK);
  assert_int_equal(ot_batcher_init(&b, &t, B, T, 1, 42), OT_OK);
  assert_int_equal(ot_batcher_init(&c, &t, B, T, 1, 43), OT_OK);
  int32_t ia[B * T], ta[B * T], ib[B * T], tb[B * T], ic[B * T], tc[B * T];
  size_t max_start = t.n - T - 1;
  int seen_first = 0, seen_last = 0, differs = 0;
  for (int s = 0; s < STEPS; s++) {
    ot_batcher_next(&a, ia, ta);
    ot_batcher_next(&b, ib, tb);
    ot_batcher_next(&c, ic, tc);
    /* Same seed, same batches. */
    assert_memory_equal(ia, ib, sizeof ia);
    assert_memory_equal(ta, tb, sizeof ta);
    if (memcmp(ia, ic, sizeof ia) != 0) differs = 1;
    for (int r = 0; r < B; r++) {
      size_t start = (size_t)(ia[r * T] - 100);
      assert_true(start <= max_start);
      assert_row(ia, ta, T, r, start);
      if (start == 0) seen_first = 1;
      if (start == max_start) seen_last = 1;
    }
  }
  assert_true(differs);
  /* 1600 draws over 28 starts: both ends of [0, n-T-1] come up. */
  assert_true(seen_first);
  assert_true(seen_last);
  ot_tokens_free(&t);
}

static void test_eval_windows(void **state) {
  (void)state;
  assert_int_equal(ot_eval_window_count(0, 4), 0);
  assert_int_equal(ot_eval_window_count(1, 4), 0);
  assert_int_equal(ot_eval_window_count(2, 4), 1);
  assert_int_equal(ot_eval_window_len(2, 4, 0), 1);
  /* n = 10, T = 4: 9 targets -> windows of 4, 4, 1. */
  assert_int_equal(ot_eval_window_count(10, 4), 3);
  assert_int_equal(ot_eval_window_len(10, 4, 0), 4);
  assert_int_equal(ot_eval_window_len(10, 4, 1), 4);
  assert_int_equal(ot_eval_window_len(10, 4, 2), 1);
  assert_int_equal(ot_eval_window_len(10, 4, 3), 0);
  /* n = 9, T = 4: 8 targets -> exactly two full windows. */
  assert_int_equal(ot_eval_window_count(9, 4), 2);
  assert_int_equal(ot_eval_window_len(9, 4, 1), 4);
  assert_int_equal(ot_eval_window_count(100, 0), 0);
  /* Windows cover every target exactly once. */
  for (size_t n = 0; n < 40; n++)
    for (int T = 1; T < 9; T++) {
      size_t total = 0;
      for (size_t k = 0; k < ot_eval_window_count(n, T); k++) {
        int len = ot_eval_window_len(n, T, k);
        assert_true(len >= 1 && len <= T);
        total += (size_t)len;
      }
      assert_int_equal(total, n < 2 ? 0 : n - 1);
    }
}

static char *write_file(const char *dir, const char *name, const char *content) {
  char *path = join(dir, name);
  FILE *f = fopen(path, "wb");
  assert_non_null(f);
  fputs(content, f);
  fclose(f);
  return path;
}

/* Expects ot_tokens_read to fail with `status` and a detail containing `needle`,
 * leaving the output alone. */
static void expect_bad(const char *dir, const char *content, int vocab, int status, const char *needle) {
  char *path = write_file(dir, "bad.txt", content);
  ot_tokens t = {(int32_t *)(uintptr_t)1, 77, NULL};
  int rc = ot_tokens_read(path, vocab, &t);
  if (rc != status) fail_msg("content \"%s\": got %d (%s), want %d", content, rc, ot_error_detail(), status);
  if (needle && !strstr(ot_error_detail(), needle))
    fail_msg("detail \"%s\" lacks \"%s\"", ot_error_detail(), needle);
  assert_true(t.ids == (int32_t *)(uintptr_t)1 && t.n == 77);
  free(path);
}

static void test_token_files(void **state) {
  (void)state;
  char *dir = ot_test_tmpdir("test_data");
  char *good = write_file(dir, "good.txt", "  1 2\t3\r\n\n4\n5 2147483647");
  ot_tokens t = {0};
  assert_int_equal(ot_tokens_read(good, 0, &t), OT_OK);
  assert_int_equal(t.n, 6);
  const int32_t want[] = {1, 2, 3, 4, 5, INT32_MAX};
  assert_memory_equal(t.ids, want, sizeof want);

  /* Round trip through the writer. */
  char *path2 = join(dir, "round.txt");
  assert_int_equal(ot_tokens_write(path2, &t), OT_OK);
  ot_tokens u = {0};
  assert_int_equal(ot_tokens_read(path2, 0, &u), OT_OK);
  assert_int_equal(u.n, t.n);
  assert_memory_equal(u.ids, t.ids, sizeof want);
  ot_tokens_free(&u);
  ot_tokens_free(&t);
  assert_null(t.ids);

  /* Larger stream (crosses the writer's chunk boundary). */
  ot_tokens big = make_stream(50000);
  assert_int_equal(ot_tokens_write(path2, &big), OT_OK);
  assert_int_equal(ot_tokens_read(path2, 50100, &u), OT_OK);
  assert_int_equal(u.n, big.n);
  assert_memory_equal(u.ids, big.ids, big.n * sizeof(int32_t));
  ot_tokens_free(&u);
  /* 50099 is the largest id: vocab 50099 rejects it. */
  assert_int_equal(ot_tokens_read(path2, 50099, &u), OT_ERR_RANGE);
  ot_tokens_free(&big);
  ot_tokens empty = {0};
  assert_int_equal(ot_tokens_write(path2, &empty), OT_ERR_INVALID);
  int32_t neg = -1;
  ot_tokens negt = {&neg, 1, NULL};
  assert_int_equal(ot_tokens_write(path2, &negt), OT_ERR_RANGE);

  expect_bad(dir, "", 0, OT_ERR_FORMAT, "empty");
  expect_bad(dir, " \n\t\n", 0, OT_ERR_FORMAT, "empty");
  expect_bad(dir, "1 2 x\n", 0, OT_ERR_FORMAT, ":1:");
  expect_bad(dir, "1\n2\n-3\n", 0, OT_ERR_FORMAT, ":3:");
  expect_bad(dir, "1\n2a\n", 0, OT_ERR_FORMAT, ":2:");
  expect_bad(dir, "1,2\n", 0, OT_ERR_FORMAT, ":1:");
  expect_bad(dir, "1 +2\n", 0, OT_ERR_FORMAT, ":1:");
  expect_bad(dir, "1 2.5\n", 0, OT_ERR_FORMAT, ":1:");
  expect_bad(dir, "0 1\n2 10\n", 10, OT_ERR_RANGE, ":2:");
  expect_bad(dir, "\n\n2147483648\n", 0, OT_ERR_RANGE, ":3:");
  expect_bad(dir, "99999999999999999999999\n", 0, OT_ERR_RANGE, ":1:");

  char *missing = join(dir, "missing.txt");
  assert_int_not_equal(ot_tokens_read(missing, 0, &t), OT_OK);
  free(missing);
  free(path2);
  free(good);
  free(dir);
}

static void test_tokens_from_text(void **state) {
  (void)state;
  char *dir = ot_test_tmpdir("test_data_text");
  char *path = write_file(dir, "t.txt", "hi\n");
  ot_tokenizer *tok = NULL;
  assert_int_equal(ot_tokenizer_byte_new(&tok), OT_OK);
  ot_tokens t = {0};
  assert_int_equal(ot_tokens_from_text(tok, path, &t), OT_OK);
  assert_int_equal(t.n, 3);
  assert_int_equal(t.ids[0], 'h');
  assert_int_equal(t.ids[1], 'i');
  assert_int_equal(t.ids[2], '\n');
  ot_tokens_free(&t);
  free(path);
  path = write_file(dir, "empty.txt", "");
  assert_int_equal(ot_tokens_from_text(tok, path, &t), OT_ERR_FORMAT);
  assert_null(t.ids);
  ot_tokenizer_free(tok);
  free(path);
  free(dir);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_batcher_sequential), cmocka_unit_test(test_batcher_init_errors),
      cmocka_unit_test(test_batcher_shuffle),    cmocka_unit_test(test_eval_windows),
      cmocka_unit_test(test_token_files),        cmocka_unit_test(test_tokens_from_text),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}

/* Supervised examples and task evaluation (issue 16): the JSONL readers and their errors, the
 * packing of examples into rows with completion-only targets, and `eval --task` and the
 * examples' completion loss against an independent PyTorch scoring (tests/ref/task_ref.py). */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <cjson/cJSON.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "ot_data.h"
#include "ot_error.h"
#include "ot_examples.h"
#include "ot_task.h"
#include "ot_test_util.h"
#include "ot_tokenizer.h"

static char *tmp, *ref_dir;
static ot_tokenizer *byte_tok;
static char cloud[600], device[600];

static const char *write_tmp(const char *name, const char *text) {
  static char path[700];
  snprintf(path, sizeof path, "%s/%s", tmp, name);
  FILE *f = fopen(path, "w");
  assert_non_null(f);
  fputs(text, f);
  fclose(f);
  return path;
}

static int setup(void **state) {
  (void)state;
  tmp = ot_test_tmpdir("task");
  ref_dir = ot_test_tmpdir("task_ref");
  if (ot_tokenizer_byte_new(&byte_tok) != OT_OK) return -1;
  snprintf(cloud, sizeof cloud, "%s/cloud/offtune-cloud", ot_test_binary_dir());
  snprintf(device, sizeof device, "%s/device/offtune-device", ot_test_binary_dir());
  if (ot_test_ref("task_ref.py", ref_dir) != 0) return -1;
  /* the device scores the same way on an emulator: one whose kept middle block is the full
   * model's (a step at lr 1e-30 leaves it unchanged) is the full model */
  char text[4096] = "";
  for (int i = 0; i < 40; i++) strcat(text, "the river stone quiet bright seven garden under paper wind. ");
  write_tmp("pub.txt", text);
  return ot_test_system(
             "%s distill --model %s/model --data %s/pub.txt --out %s/emu --bottom 1 --top 1 --keep 1 "
             "--steps 1 --lr 1e-30 --batch 2 --seq-len 16 >/dev/null 2>&1",
             cloud, ref_dir, tmp, tmp) == 0
             ? 0
             : -1;
}

static int teardown(void **state) {
  (void)state;
  ot_tokenizer_free(byte_tok);
  free(tmp);
  free(ref_dir);
  return 0;
}

/* The stream of one file: ids are bytes; mask as documented. */
static void test_examples_stream(void **state) {
  (void)state;
  const char *p = write_tmp("ok.jsonl", "{\"prompt\": \"ab\", \"completion\": \"cd\"}\n"
                                        "\n"
                                        "  {\"text\": \"xy\"}  \r\n"
                                        "{\"messages\": [{\"role\": \"user\", \"content\": \"u\"}, "
                                        "{\"role\": \"assistant\", \"content\": \"a\"}]}\n");
  assert_true(ot_examples_is_jsonl(p));
  assert_false(ot_examples_is_jsonl("x.json"));
  ot_tokens t = {NULL, 0, NULL};
  if (ot_examples_read(p, byte_tok, NULL, &t)) fail_msg("%s", ot_error_detail());
  const char *want = "abcd"
                     "xy"
                     "User: u\nAssistant: a\n";
  /* T = target, S = start of an example, . = context */
  const char *flags = "S.TT"
                      "ST"
                      "S........" /* "User: u\n" then "Assistant:" */
                      "........."
                      "TTT";
  assert_int_equal(t.n, strlen(want));
  assert_int_equal(strlen(flags), t.n);
  for (size_t i = 0; i < t.n; i++) {
    assert_int_equal(t.ids[i], (unsigned char)want[i]);
    int f = t.mask[i];
    if (flags[i] == 'S') assert_true(f & OT_TOK_START);
    if (flags[i] == 'T') assert_int_equal(f, OT_TOK_TARGET);
    if (flags[i] == '.') assert_int_equal(f, 0);
  }
  /* the text example's first token is a start and a target; packing never scores it */
  assert_int_equal(t.mask[4], OT_TOK_START | OT_TOK_TARGET);
  ot_tokens_free(&t);
}

/* A malformed line is a format error naming the file and the line. */
static void test_examples_errors(void **state) {
  (void)state;
  static const struct {
    const char *text, *want;
  } cases[] = {
      {"{\"prompt\": \"a\", \"completion\": \"b\"}\n\n{\"prompt\": \"a\", \"completion\": \n",
       ":3: not valid JSON"},
      {"[1, 2]\n", ":1: a line must be one JSON object"},
      {"{\"prompt\": \"a\", \"completion\": \"b\"} x\n", ":1: text after the JSON object"},
      {"{\"prompt\": \"a\"}\n", ":1: \"prompt\" and \"completion\" must both be strings"},
      {"{\"prompt\": \"a\", \"completion\": 3}\n", ":1: \"prompt\" and \"completion\""},
      {"{\"prompt\": \"a\", \"completion\": \"b\", \"messages\": []}\n", ":1: an example has exactly one of"},
      {"{}\n", ":1: an example has exactly one of"},
      {"{\"text\": 5}\n", ":1: \"text\" must be a string"},
      {"{\"messages\": []}\n", ":1: \"messages\" must be a non-empty array"},
      {"{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}\n", ":1: no assistant message"},
      {"{\"messages\": [{\"role\": \"bot\", \"content\": \"hi\"}]}\n", ":1: messages[0].role \"bot\""},
      {"{\"text\": \"a\"}\n{\"messages\": [{\"role\": \"assistant\"}]}\n", ":2: messages[0] needs string"},
      {"{\"text\": \"\"}\n", ":1: the example encodes to no tokens"},
      {"\n\n", "no examples (empty file)"},
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    const char *p = write_tmp("bad.jsonl", cases[i].text);
    ot_tokens t = {NULL, 0, NULL};
    int rc = ot_examples_read(p, byte_tok, NULL, &t);
    if (rc != OT_ERR_FORMAT || !strstr(ot_error_detail(), cases[i].want))
      fail_msg("case %zu: rc %d, detail '%s', want '%s'", i, rc, ot_error_detail(), cases[i].want);
    assert_null(t.ids);
  }
  ot_tokens t = {NULL, 0, NULL};
  assert_int_equal(ot_examples_read(write_tmp("x.jsonl", "{\"text\": \"a\"}\n"), NULL, NULL, &t),
                   OT_ERR_INVALID);
}

/* Rows: whole examples packed in order, targets only on marked tokens past an example's
 * first, long examples keep their end; the batcher serves exactly these rows. */
static void test_pack_rows(void **state) {
  (void)state;
  /* examples (id: flag): [10 11 12t] [20t 21t] [30 31 32 33 34 35t 36t] [40 41t] */
  int32_t ids[] = {10, 11, 12, 20, 21, 30, 31, 32, 33, 34, 35, 36, 40, 41};
  uint8_t S = OT_TOK_START, G = OT_TOK_TARGET;
  uint8_t mask[] = {S, 0, G, S | G, G, S, 0, 0, 0, 0, G, G, S, G};
  ot_tokens t = {ids, 14, mask};
  int32_t *in = NULL, *tg = NULL;
  size_t rows = 0, trunc = 0;
  assert_int_equal(ot_pack_rows(&t, 4, &in, &tg, &rows, &trunc), OT_OK);
  /* rows of T+1 = 5: [10 11 12 20 21] [32 33 34 35 36] (truncated to its last 5) [40 41 pad] */
  assert_int_equal(rows, 3);
  assert_int_equal(trunc, 1);
  int32_t want_in[] = {10, 11, 12, 20, 32, 33, 34, 35, 40, 41, 0, 0};
  int32_t want_tg[] = {-1, 12, -1, 21, -1, -1, 35, 36, 41, -1, -1, -1};
  assert_memory_equal(in, want_in, sizeof want_in);
  assert_memory_equal(tg, want_tg, sizeof want_tg);

  ot_batcher b = {0};
  assert_int_equal(ot_batcher_init(&b, &t, 2, 4, 0, 0), OT_OK);
  int32_t bi[8], bt[8];
  ot_batcher_next(&b, bi, bt); /* rows 0, 1 */
  assert_memory_equal(bi, in, 8 * sizeof(int32_t));
  assert_memory_equal(bt, tg, 8 * sizeof(int32_t));
  ot_batcher_next(&b, bi, bt); /* rows 2, 0: wraps */
  assert_memory_equal(bi, in + 8, 4 * sizeof(int32_t));
  assert_memory_equal(bi + 4, in, 4 * sizeof(int32_t));
  ot_batcher_free(&b);
  assert_int_equal(ot_batcher_init(&b, &t, 2, 4, 0, 0), OT_OK);
  ot_batcher_skip(&b, 1); /* as after one step: starts at row 2 */
  ot_batcher_next(&b, bi, bt);
  assert_memory_equal(bi, in + 8, 4 * sizeof(int32_t));
  ot_batcher_free(&b);
  /* shuffled rows: each is one of the packed rows, the same for the same seed */
  ot_batcher s1 = {0}, s2 = {0};
  assert_int_equal(ot_batcher_init(&s1, &t, 2, 4, 1, 7), OT_OK);
  assert_int_equal(ot_batcher_init(&s2, &t, 2, 4, 1, 7), OT_OK);
  for (int k = 0; k < 5; k++) {
    int32_t ci[8], ct[8];
    ot_batcher_next(&s1, bi, bt);
    ot_batcher_next(&s2, ci, ct);
    assert_memory_equal(bi, ci, sizeof bi);
    for (int r = 0; r < 2; r++) {
      int found = 0;
      for (size_t q = 0; q < rows; q++)
        found |= !memcmp(bi + 4 * r, in + 4 * q, 16) && !memcmp(bt + 4 * r, tg + 4 * q, 16);
      assert_true(found);
    }
  }
  ot_batcher_free(&s1);
  ot_batcher_free(&s2);

  /* the held-out split moves forward to an example start */
  ot_tokens h, l;
  assert_int_equal(ot_tokens_split(&t, 6, &h, &l), OT_OK); /* 14 - 6 = 8 is inside [30..36] */
  assert_int_equal(h.n, 12);
  assert_int_equal(l.n, 2);
  assert_int_equal(l.ids[0], 40);
  assert_true(l.mask[0] & OT_TOK_START);
  assert_int_equal(ot_tokens_split(&t, 1, &h, &l), OT_ERR_INVALID); /* inside the last example */
  /* no targets at all is refused */
  uint8_t none[] = {S, 0, 0, S, 0, S, 0, 0, 0, 0, 0, 0, S, 0};
  ot_tokens z = {ids, 14, none};
  free(in);
  free(tg);
  in = tg = NULL;
  assert_int_equal(ot_pack_rows(&z, 4, &in, &tg, &rows, NULL), OT_ERR_INVALID);
  free(in);
  free(tg);
}

static void test_task_errors(void **state) {
  (void)state;
  static const struct {
    const char *text, *want;
  } cases[] = {
      {"{\"context\": \"a\"}\n", ":1: \"type\" must be"},
      {"{\"type\": \"mc\", \"context\": \"a\"}\n", ":1: unknown \"type\" \"mc\""},
      {"\n{\"type\": \"cloze\", \"context\": \"  \", \"target\": \"b\"}\n", ":2: \"context\" is empty"},
      {"{\"type\": \"cloze\", \"context\": 1, \"target\": \"b\"}\n", ":1: \"context\" must be a string"},
      {"{\"type\": \"multiple_choice\", \"context\": \"a\", \"choices\": [\"b\"], \"label\": 0}\n",
       ":1: \"choices\" must be an array of 2"},
      {"{\"type\": \"multiple_choice\", \"context\": \"a\", \"choices\": [\"b\", \"c\"], \"label\": 2}\n",
       ":1: \"label\" must be an integer index"},
      {"{\"type\": \"multiple_choice\", \"context\": \"a\", \"choices\": [\"b\", \"c\"], \"label\": 0.5}\n",
       ":1: \"label\" must be an integer index"},
      /* found by fuzz_jsonl: a huge label was converted to int before the range check (UB) */
      {"{\"type\": \"multiple_choice\", \"context\": \"a\", \"choices\": [\"b\", \"c\"], \"label\": 1e111}\n",
       ":1: \"label\" must be an integer index"},
      {"{\"type\": \"multiple_choice\", \"context\": \"a\", \"choices\": [\"b\", \"\"], \"label\": 0}\n",
       ":1: choices[1] must be a non-empty string"},
      {"{\"type\": \"cloze\", \"context\": \"a\"}\n", ":1: \"target\" must be a non-empty string"},
      {"{\"type\": \"generate\", \"context\": \"a\", \"target\": \"b\", \"max_tokens\": 0}\n",
       ":1: \"max_tokens\" must be an integer"},
      {"{\"type\": \"generate\", \"context\": \"a\", \"target\": \"b\", \"stop\": \"x\"}\n",
       ":1: \"stop\" must be an array"},
      {"{\"type\": \"cloze\", \"context\": \"a\", \"target\": \"b\"}\n{\"type\": ", ":2: not valid JSON"},
      {"", "no items (empty file)"},
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    const char *p = write_tmp("bad_task.jsonl", cases[i].text);
    ot_task *t = NULL;
    int rc = ot_task_read(p, byte_tok, &t);
    if (rc != OT_ERR_FORMAT || !strstr(ot_error_detail(), cases[i].want))
      fail_msg("case %zu: rc %d, detail '%s', want '%s'", i, rc, ot_error_detail(), cases[i].want);
    assert_null(t);
  }
}

static cJSON *read_json(const char *path) {
  FILE *f = fopen(path, "r");
  if (!f) fail_msg("cannot open %s", path);
  static char buf[1 << 17];
  size_t n = fread(buf, 1, sizeof buf - 1, f);
  fclose(f);
  buf[n] = '\0';
  cJSON *j = cJSON_Parse(buf);
  if (!j) fail_msg("%s is not JSON", path);
  return j;
}

static double num(const cJSON *o, const char *k) {
  const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, k);
  if (!cJSON_IsNumber(v)) fail_msg("no number \"%s\"", k);
  return v->valuedouble;
}

static double worst_rel; /* largest relative log-likelihood error seen, for the record */

static void close_to(double got, double want, double rel, const char *what, int i) {
  if (want != 0 && fabs(got - want) / fabs(want) > worst_rel) worst_rel = fabs(got - want) / fabs(want);
  if (!(fabs(got - want) <= rel * fabs(want) + 1e-6))
    fail_msg("item %d %s: %.9g, PyTorch %.9g", i, what, got, want);
}

/* Per item (details) and in total (the command's JSON) against PyTorch. */
static void check_task_output(const char *out, const char *details_path) {
  cJSON *ref = read_json(strcat(strcpy((char[700]){0}, ref_dir), "/task_ref.json"));
  const cJSON *items = cJSON_GetObjectItemCaseSensitive(ref, "items"),
              *sum = cJSON_GetObjectItemCaseSensitive(ref, "summary");
  FILE *f = fopen(details_path, "r");
  assert_non_null(f);
  char line[4096];
  int i = 0, compared_preds = 0;
  while (fgets(line, sizeof line, f)) {
    cJSON *d = cJSON_Parse(line), *r = cJSON_GetArrayItem(items, i);
    assert_non_null(d);
    assert_non_null(r);
    assert_int_equal((int)num(d, "i"), i);
    const char *type = cJSON_GetObjectItemCaseSensitive(r, "type")->valuestring;
    assert_string_equal(cJSON_GetObjectItemCaseSensitive(d, "type")->valuestring, type);
    /* a prediction is compared where PyTorch's top two are apart by more than fp32 noise */
    int decided = num(r, "margin") > 1e-3;
    if (strcmp(type, "multiple_choice") == 0) {
      const cJSON *a = cJSON_GetObjectItemCaseSensitive(d, "loglik"),
                  *b = cJSON_GetObjectItemCaseSensitive(r, "loglik");
      assert_int_equal(cJSON_GetArraySize(a), cJSON_GetArraySize(b));
      for (int c = 0; c < cJSON_GetArraySize(a); c++)
        close_to(cJSON_GetArrayItem(a, c)->valuedouble, cJSON_GetArrayItem(b, c)->valuedouble, 1e-4, "loglik",
                 i);
      if (decided) {
        assert_int_equal((int)num(d, "pred"), (int)num(r, "pred"));
        assert_int_equal((int)num(d, "pred_norm"), (int)num(r, "pred_norm"));
        compared_preds++;
      }
    } else if (strcmp(type, "cloze") == 0) {
      close_to(num(d, "loglik"), num(r, "loglik"), 1e-4, "loglik", i);
      if (decided) {
        assert_int_equal(cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(d, "greedy")),
                         cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(r, "greedy")));
        compared_preds++;
      }
    } else if (decided) {
      assert_string_equal(cJSON_GetObjectItemCaseSensitive(d, "output")->valuestring,
                          cJSON_GetObjectItemCaseSensitive(r, "output")->valuestring);
      compared_preds++;
    }
    cJSON_Delete(d);
    i++;
  }
  fclose(f);
  assert_int_equal(i, cJSON_GetArraySize(items));
  assert_true(compared_preds >= i - 2); /* the reference picks items with clear margins */
  /* the totals: only when every prediction was compared are they certain to agree */
  const char *js = strstr(out, "{\"n\": ");
  assert_non_null(js);
  cJSON *o = cJSON_Parse(js);
  assert_non_null(o);
  assert_int_equal((int)num(o, "n"), (int)num(sum, "n"));
  if (compared_preds == i) {
    const cJSON *mc = cJSON_GetObjectItemCaseSensitive(o, "multiple_choice"),
                *cz = cJSON_GetObjectItemCaseSensitive(o, "cloze"),
                *g = cJSON_GetObjectItemCaseSensitive(o, "generate");
    close_to(num(mc, "acc"), num(sum, "acc"), 1e-5, "acc", -1);
    close_to(num(mc, "acc_stderr"), num(sum, "acc_stderr"), 1e-5, "acc_stderr", -1);
    close_to(num(mc, "acc_norm"), num(sum, "acc_norm"), 1e-5, "acc_norm", -1);
    close_to(num(mc, "acc_norm_stderr"), num(sum, "acc_norm_stderr"), 1e-5, "acc_norm_stderr", -1);
    close_to(num(cz, "acc"), num(sum, "cloze_acc"), 1e-5, "cloze acc", -1);
    close_to(num(cz, "acc_stderr"), num(sum, "cloze_acc_stderr"), 1e-5, "cloze stderr", -1);
    close_to(num(g, "exact_match"), num(sum, "exact_match"), 1e-5, "exact match", -1);
    close_to(num(g, "exact_match_stderr"), num(sum, "exact_match_stderr"), 1e-5, "exact match stderr", -1);
    /* the reference's items have both outcomes, so these are not trivial */
    assert_true(num(mc, "acc") > 0 && num(mc, "acc") < 1);
    assert_true(num(cz, "acc") > 0 && num(cz, "acc") < 1);
    assert_true(num(g, "exact_match") > 0 && num(g, "exact_match") < 1);
  }
  printf("eval --task: %d items, %d predictions compared with PyTorch; largest relative error %.2g\n", i,
         compared_preds, worst_rel);
  cJSON_Delete(o);
  cJSON_Delete(ref);
}

static void test_task_vs_pytorch(void **state) {
  (void)state;
  static char out[1 << 16];
  char details[700];
  snprintf(details, sizeof details, "%s/details.jsonl", tmp);
  OT_TEST_RUN_OK(out, "%s eval --model %s/model --task %s/task.jsonl --json --details %s 2>/dev/null", cloud,
                 ref_dir, ref_dir, details);
  check_task_output(out, details);
  char dev_details[700];
  snprintf(dev_details, sizeof dev_details, "%s/details_device.jsonl", tmp);
  OT_TEST_RUN_OK(out, "%s eval --emulator %s/emu --task %s/task.jsonl --json --details %s 2>/dev/null",
                 device, tmp, ref_dir, dev_details);
  check_task_output(out, dev_details);
  /* usage */
  assert_int_equal(ot_test_run(out, sizeof out, "%s eval --model %s/model --task a --text b", cloud, ref_dir),
                   2);
  assert_non_null(strstr(out, "exactly one of --text, --tokens or --task"));
  assert_int_equal(
      ot_test_run(out, sizeof out, "%s eval --model %s/model --text a --details b", cloud, ref_dir), 2);
  assert_int_equal(
      ot_test_run(out, sizeof out, "%s eval --model %s/model --task %s/nope.jsonl", cloud, ref_dir, tmp), 1);
}

/* The examples' completion-only loss: eval --text FILE.jsonl packs rows as training does. */
static void test_examples_loss_vs_pytorch(void **state) {
  (void)state;
  static char out[1 << 16];
  cJSON *ref = read_json(strcat(strcpy((char[700]){0}, ref_dir), "/examples_ref.json"));
  OT_TEST_RUN_OK(out, "%s eval --model %s/model --text %s/examples.jsonl --seq-len %d --json 2>/dev/null",
                 cloud, ref_dir, ref_dir, (int)num(ref, "T"));
  double loss, tokens;
  ot_test_eval_json(out, "examples", &loss, &tokens);
  assert_int_equal((int)tokens, (int)num(ref, "tokens"));
  close_to(loss, num(ref, "loss"), 1e-5, "completion loss", -1);
  OT_TEST_RUN_OK(out, "%s eval --emulator %s/emu --text %s/examples.jsonl --seq-len %d --json 2>/dev/null",
                 device, tmp, ref_dir, (int)num(ref, "T"));
  ot_test_eval_json(out, "examples (device)", &loss, &tokens);
  close_to(loss, num(ref, "loss"), 1e-5, "completion loss (device)", -1);
  cJSON_Delete(ref);
}

/* Every training path takes examples: finetune (a resumed run is bitwise the uninterrupted
 * one, so the row position is saved), distill, and the device's tune with its held-out split. */
static void test_examples_train(void **state) {
  (void)state;
  static char out[1 << 16];
  char ex[8192] = "";
  for (int i = 0; i < 24; i++) {
    char line[200];
    snprintf(line, sizeof line, "{\"prompt\": \"item %d is\", \"completion\": \" %s\"}\n", i,
             i % 3 ? "odd" : "even");
    strcat(ex, line);
  }
  write_tmp("train.jsonl", ex);
  const char *common = "--batch 4 --seq-len 32 --lr 1e-3 --threads 1";
  OT_TEST_RUN_OK(out,
                 "rm -rf %s/fta %s/ftb && %s finetune --model %s/model --text %s/train.jsonl --out %s/fta "
                 "--steps 10 %s 2>&1",
                 tmp, tmp, cloud, ref_dir, tmp, tmp, common);
  assert_non_null(strstr(out, "supervised examples: 12 rows of 32")); /* two of 13-14 tokens a row */
  OT_TEST_RUN_OK(out, "%s finetune --model %s/model --text %s/train.jsonl --out %s/ftb --steps 5 %s 2>&1",
                 cloud, ref_dir, tmp, tmp, common);
  OT_TEST_RUN_OK(
      out, "%s finetune --model %s/model --text %s/train.jsonl --out %s/ftb --steps 10 --resume %s 2>&1",
      cloud, ref_dir, tmp, tmp, common);
  assert_non_null(strstr(out, "resuming"));
  assert_int_equal(ot_test_system("cmp -s %s/fta/model.safetensors %s/ftb/model.safetensors", tmp, tmp), 0);
  OT_TEST_RUN_OK(out,
                 "%s distill --model %s/model --data %s/train.jsonl --out %s/emu_ex --bottom 1 --top 1 "
                 "--keep 1 --steps 3 "
                 "--batch 4 --seq-len 32 --threads 1 2>&1",
                 cloud, ref_dir, tmp, tmp);
  OT_TEST_RUN_OK(
      out,
      "%s tune --emulator %s/emu --text %s/train.jsonl --out %s/tuned_ex --steps 6 --eval-every 3 %s 2>&1",
      device, tmp, tmp, tmp, common);
  assert_non_null(strstr(out, "held-out loss"));
}

/* A task adapter tuned on the device from supervised examples gives the expected label
 * through the serving API: eight words, each labelled " A" or " B" by a fixed rule the base
 * model cannot know; the adapter, served by `offtune-cloud serve-model`, completes each
 * prompt with its label (greedy), and the base model does not. */
static void test_served_labels(void **state) {
  (void)state;
  static char out[1 << 16];
  static const char *words[] = {"river", "stone", "quiet", "bright", "seven", "garden", "under", "paper"};
  static const char *labels[] = {" A", " B", " B", " A", " A", " B", " A", " B"};
  enum { N_WORDS = 8 };
  char ex[4096] = "", path[700];
  for (int rep = 0; rep < 4; rep++)
    for (int i = 0; i < N_WORDS; i++) {
      char line[200];
      snprintf(line, sizeof line, "{\"prompt\": \"word: %s\\nlabel:\", \"completion\": \"%s\"}\n", words[i],
               labels[i]);
      strcat(ex, line);
    }
  write_tmp("labels.jsonl", ex);
  OT_TEST_RUN_OK(
      out,
      "%s tune --emulator %s/emu --text %s/labels.jsonl --out %s/label_adapter --steps 100 --batch 8 "
      "--seq-len 32 --lr 3e-3 --threads 1 2>&1",
      device, tmp, tmp, tmp);
  /* one example per row, none cut: a cut one would sit at other positions than when served */
  assert_non_null(strstr(out, "supervised examples: 32 rows of 32 (loss on completions only), 0 truncated"));
  snprintf(path, sizeof path, "%s/serve.log", tmp);
  pid_t pid = fork();
  assert_true(pid >= 0);
  if (pid == 0) {
    char model[700], adapter[700];
    snprintf(model, sizeof model, "%s/model", ref_dir);
    snprintf(adapter, sizeof adapter, "labels=%s/label_adapter", tmp);
    if (!freopen(path, "w", stderr)) _exit(99);
    execl(cloud, cloud, "serve-model", "--model", model, "--adapter", adapter, "--http", "127.0.0.1:0",
          "--threads", "1", (char *)NULL);
    _exit(98);
  }
  int port = 0;
  for (int i = 0; i < 400 && !port; i++) {
    usleep(50000);
    FILE *f = fopen(path, "r");
    char line[1024];
    while (f && fgets(line, sizeof line, f)) {
      char *at = strstr(line, ", port ");
      if (at) port = atoi(at + 7);
    }
    if (f) fclose(f);
  }
  int right = 0, base_right = 0;
  for (int i = 0; i < N_WORDS && port; i++)
    for (int with = 0; with < 2; with++) {
      int rc = ot_test_run(
          out, sizeof out,
          "curl -sf http://127.0.0.1:%d/v1/completions -H 'Content-Type: application/json' -d "
          "'{\"model\": \"%s\", \"prompt\": \"word: %s\\nlabel:\", \"max_tokens\": 2, "
          "\"temperature\": 0}'",
          port, with ? "labels" : "model", words[i]); /* the base model is served as its directory's name */
      cJSON *j = rc == 0 ? cJSON_Parse(out) : NULL;
      const cJSON *c = cJSON_GetArrayItem(cJSON_GetObjectItemCaseSensitive(j, "choices"), 0);
      const cJSON *text = cJSON_GetObjectItemCaseSensitive(c, "text");
      if (!cJSON_IsString(text)) {
        kill(pid, SIGTERM);
        waitpid(pid, NULL, 0);
        fail_msg("no completion (exit %d): %s", rc, out);
      }
      if (with) {
        printf("  served 'word: %s' -> \"%s\" (label \"%s\")\n", words[i], text->valuestring, labels[i]);
        right += strcmp(text->valuestring, labels[i]) == 0;
      } else {
        base_right += strcmp(text->valuestring, labels[i]) == 0;
      }
      cJSON_Delete(j);
    }
  kill(pid, SIGTERM);
  int st = 0;
  assert_int_equal(waitpid(pid, &st, 0), pid);
  if (!port) fail_msg("serve-model did not report its port");
  printf("served labels: adapter %d of %d right, base model %d\n", right, N_WORDS, base_right);
  assert_int_equal(right, N_WORDS);
  assert_true(base_right <= N_WORDS / 2); /* the labels are not what the base model says anyway */
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_examples_stream), cmocka_unit_test(test_examples_errors),
      cmocka_unit_test(test_pack_rows),       cmocka_unit_test(test_task_errors),
      cmocka_unit_test(test_task_vs_pytorch), cmocka_unit_test(test_examples_loss_vs_pytorch),
      cmocka_unit_test(test_examples_train),  cmocka_unit_test(test_served_labels),
  };
  return cmocka_run_group_tests(tests, setup, teardown);
}

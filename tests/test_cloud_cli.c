/* offtune-cloud end to end, as a user runs it: the eval window and finetune batch
 * contracts against PyTorch (tests/ref/cli_ref.py), resume equal to an uninterrupted
 * run, and bad input (malformed checkpoints, bad options) giving clear errors and
 * meaningful exit codes without touching existing outputs. */
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

#include "ot_test_util.h"

static char *dir;   /* scratch for this test */
static char *cloud; /* path of offtune-cloud */

static int setup(void **state) {
  (void)state;
  dir = ot_test_tmpdir("cloud_cli");
  if (asprintf(&cloud, "%s/cloud/offtune-cloud", ot_test_binary_dir()) < 0) return -1;
  return ot_test_ref("cli_ref.py", dir) ? -1 : 0;
}

static int teardown(void **state) {
  (void)state;
  free(dir);
  free(cloud);
  return 0;
}

static char ref[1024];

static void load_ref(void) {
  char path[600];
  snprintf(path, sizeof path, "%s/ref.json", dir);
  FILE *f = fopen(path, "r");
  assert_non_null(f);
  size_t n = fread(ref, 1, sizeof ref - 1, f);
  ref[n] = '\0';
  fclose(f);
}

static void test_eval_matches_pytorch_windows(void **state) {
  (void)state;
  load_ref();
  char out[4096];
  int rc = ot_test_run(out, sizeof out, "%s eval --model %s/model --tokens %s/tokens.txt --seq-len %d --json",
                       cloud, dir, dir, (int)ot_test_json_number(ref, "eval_T"));
  if (rc != 0) fail_msg("eval failed (%d): %s", rc, out);
  const char *j = strchr(out, '{');
  assert_non_null(j);
  double loss = ot_test_json_number(j, "loss"), want = ot_test_json_number(ref, "eval_loss");
  if (fabs(loss - want) > 1e-4 * want) fail_msg("eval loss %.7f, PyTorch %.7f", loss, want);
  assert_int_equal((int)ot_test_json_number(j, "tokens"), (int)ot_test_json_number(ref, "eval_tokens"));
  assert_true(fabs(ot_test_json_number(j, "perplexity") - exp(loss)) < 1e-3 * exp(loss));
  /* human form carries the same numbers */
  rc = ot_test_run(out, sizeof out, "%s eval --model %s/model --tokens %s/tokens.txt --seq-len 24", cloud,
                   dir, dir);
  assert_int_equal(rc, 0);
  assert_non_null(strstr(out, "perplexity"));
}

/* Sequential batches with wrap-around: 40 tokens, B=2, T=8 -> positions 0, 16, then back to 0. */
static void test_finetune_batch_order_matches_pytorch(void **state) {
  (void)state;
  load_ref();
  char out[8192];
  int rc = ot_test_run(
      out, sizeof out,
      "%s finetune --model %s/model --tokens %s/ft_tokens.txt --out %s/ft --steps %d --batch %d --seq-len %d "
      "--lr %g --optimizer sgd --threads 1",
      cloud, dir, dir, dir, (int)ot_test_json_number(ref, "ft_steps"), (int)ot_test_json_number(ref, "ft_B"),
      (int)ot_test_json_number(ref, "ft_T"), ot_test_json_number(ref, "ft_lr"));
  if (rc != 0) fail_msg("finetune failed (%d): %s", rc, out);
  rc = ot_test_run(out, sizeof out, "%s eval --model %s/ft --tokens %s/tokens.txt --seq-len 24 --json", cloud,
                   dir, dir);
  assert_int_equal(rc, 0);
  double loss = ot_test_json_number(strchr(out, '{'), "loss"),
         want = ot_test_json_number(ref, "ft_eval_loss");
  if (fabs(loss - want) > 1e-4 * want) fail_msg("fine-tuned eval loss %.7f, PyTorch %.7f", loss, want);
}

static int files_equal(const char *a, const char *b) { return ot_test_system("cmp -s '%s' '%s'", a, b) == 0; }

/* A run stopped after 2 steps and resumed to 6 ends bitwise equal to a straight 6-step run. */
static void test_pretrain_resume_is_exact(void **state) {
  (void)state;
  char out[8192], a[700], b[700];
  ot_test_system("head -c 20000 '%s/README.md' > '%s/text.txt'", ot_test_source_dir(), dir);
  const char *common = "--layers 2 --heads 2 --embd 16 --ctx 32 --batch 2 --seq-len 16 --lr 3e-3 --warmup 2 "
                       "--threads 1 --seed 5 --shuffle --tokenizer byte";
  int rc = ot_test_run(out, sizeof out, "%s pretrain --text %s/text.txt --out %s/straight --steps 6 %s",
                       cloud, dir, dir, common);
  if (rc) fail_msg("pretrain failed: %s", out);
  rc = ot_test_run(out, sizeof out, "%s pretrain --text %s/text.txt --out %s/resumed --steps 2 %s", cloud,
                   dir, dir, common);
  assert_int_equal(rc, 0);
  rc = ot_test_run(out, sizeof out, "%s pretrain --text %s/text.txt --out %s/resumed --steps 6 --resume %s",
                   cloud, dir, dir, common);
  if (rc) fail_msg("resume failed: %s", out);
  assert_non_null(strstr(out, "resuming"));
  snprintf(a, sizeof a, "%s/straight/model.safetensors", dir);
  snprintf(b, sizeof b, "%s/resumed/model.safetensors", dir);
  assert_true(files_equal(a, b));
  snprintf(a, sizeof a, "%s/straight/train_state/optimizer.safetensors", dir);
  snprintf(b, sizeof b, "%s/resumed/train_state/optimizer.safetensors", dir);
  assert_true(files_equal(a, b));
  /* the result is a checkpoint the other commands load */
  rc = ot_test_run(out, sizeof out, "%s generate --model %s/resumed --prompt offtune --max-tokens 8 --seed 3",
                   cloud, dir);
  assert_int_equal(rc, 0);
  assert_true(strncmp(out, "offtune", 7) == 0);
}

static void test_usage_errors_exit_2(void **state) {
  (void)state;
  char out[8192];
  assert_int_equal(ot_test_run(out, sizeof out, "%s", cloud), 2);
  assert_int_equal(ot_test_run(out, sizeof out, "%s frobnicate", cloud), 2);
  assert_non_null(strstr(out, "unknown command"));
  assert_int_equal(ot_test_run(out, sizeof out, "%s eval --tokens x", cloud), 2);
  assert_non_null(strstr(out, "--model"));
  assert_int_equal(ot_test_run(out, sizeof out, "%s eval --model m --tokens t --seq-len abc", cloud), 2);
  assert_int_equal(ot_test_run(out, sizeof out,
                               "%s finetune --model m --tokens t --out o --steps 0 --batch 1 --seq-len 4 "
                               "--lr 1",
                               cloud),
                   2);
  const char *cmds[] = {"pretrain", "finetune", "eval", "generate", "tokenize", "corpus"};
  for (size_t i = 0; i < sizeof cmds / sizeof cmds[0]; i++) {
    assert_int_equal(ot_test_run(out, sizeof out, "%s %s --help", cloud, cmds[i]), 0);
    assert_non_null(strstr(out, "usage:"));
  }
  assert_int_equal(ot_test_run(out, sizeof out, "%s --help", cloud), 0);
}

/* Broken inputs fail with exit 1 and a message naming the problem; the output dir of an
 * earlier good run is left as it was. */
static void test_bad_inputs_exit_1(void **state) {
  (void)state;
  char out[8192];
  ot_test_system("rm -rf '%s/bad' && cp -r '%s/model' '%s/bad'", dir, dir, dir);
  /* truncated weights */
  ot_test_system("truncate -s 1000 '%s/bad/model.safetensors'", dir);
  assert_int_equal(
      ot_test_run(out, sizeof out, "%s eval --model %s/bad --tokens %s/tokens.txt", cloud, dir, dir), 1);
  assert_non_null(strstr(out, "model.safetensors"));
  /* a config that does not match the weights */
  ot_test_system("cp '%s/model/model.safetensors' '%s/bad/' && sed -i 's/\"n_embd\": 32/\"n_embd\": 64/' "
                 "'%s/bad/config.json'",
                 dir, dir, dir);
  assert_int_equal(
      ot_test_run(out, sizeof out, "%s eval --model %s/bad --tokens %s/tokens.txt", cloud, dir, dir), 1);
  assert_non_null(strstr(out, "shape"));
  /* token ids outside the vocabulary, and a non-numeric token file */
  ot_test_system("echo '1 2 999' > '%s/oov.txt' && echo '1 2 x' > '%s/junk.txt'", dir, dir);
  assert_int_equal(
      ot_test_run(out, sizeof out, "%s eval --model %s/model --tokens %s/oov.txt", cloud, dir, dir), 1);
  assert_int_equal(
      ot_test_run(out, sizeof out, "%s eval --model %s/model --tokens %s/junk.txt", cloud, dir, dir), 1);
  assert_non_null(strstr(out, "junk.txt"));
  /* missing directory */
  assert_int_equal(
      ot_test_run(out, sizeof out, "%s eval --model %s/nope --tokens %s/tokens.txt", cloud, dir, dir), 1);
  /* a failing finetune (too little data) leaves an existing output untouched */
  char before[700], after[700];
  snprintf(before, sizeof before, "%s/ft/model.safetensors", dir);
  snprintf(after, sizeof after, "%s/ft.keep", dir);
  ot_test_system("cp '%s' '%s'", before, after);
  ot_test_system("echo '1 2 3' > '%s/tiny.txt'", dir);
  assert_int_equal(
      ot_test_run(
          out, sizeof out,
          "%s finetune --model %s/model --tokens %s/tiny.txt --out %s/ft --steps 1 --batch 2 --seq-len 8 "
          "--lr 0.1",
          cloud, dir, dir, dir),
      1);
  assert_true(files_equal(before, after));
}

/* kill -9 in the middle of a run that checkpoints every step: every checkpoint on disk
 * is whole (atomic writes), and --resume ends bitwise equal to an uninterrupted run. */
static void test_pretrain_survives_kill_9(void **state) {
  (void)state;
  char out[8192], a[700], b[700];
  const char *common = "--layers 2 --heads 2 --embd 16 --ctx 32 --batch 2 --seq-len 16 --lr 3e-3 --threads 1 "
                       "--seed 9 --tokenizer byte --steps 400";
  int rc = ot_test_run(out, sizeof out, "%s pretrain --text %s/text.txt --out %s/k_straight %s", cloud, dir,
                       dir, common);
  if (rc) fail_msg("pretrain failed: %s", out);
  /* start, wait for the first checkpoints, kill without warning */
  rc = ot_test_system(
      "%s pretrain --text %s/text.txt --out %s/k_killed --ckpt-every 1 %s >/dev/null 2>&1 & pid=$!; "
      "for i in $(seq 200); do [ -f %s/k_killed/train_state/state.json ] && break; sleep 0.02; done; "
      "sleep 0.2; kill -9 $pid; wait $pid; exit 0",
      cloud, dir, dir, common, dir);
  assert_int_equal(rc, 0);
  rc = ot_test_run(out, sizeof out,
                   "%s pretrain --text %s/text.txt --out %s/k_killed --ckpt-every 50 --resume %s", cloud, dir,
                   dir, common);
  if (rc) fail_msg("resume after kill -9 failed: %s", out);
  if (!strstr(out, "resuming"))
    fail_msg("the killed run had finished before the kill; nothing was tested: %s", out);
  snprintf(a, sizeof a, "%s/k_straight/model.safetensors", dir);
  snprintf(b, sizeof b, "%s/k_killed/model.safetensors", dir);
  assert_true(files_equal(a, b));
}

/* A full disk (here: a file-size limit) fails the command with a clear error and leaves
 * the previous checkpoint loadable and unchanged. */
static void test_full_disk_keeps_old_checkpoint(void **state) {
  (void)state;
  char out[8192], before[700], keep[700];
  snprintf(before, sizeof before, "%s/ft/model.safetensors", dir);
  snprintf(keep, sizeof keep, "%s/ft.disk", dir);
  ot_test_system("cp '%s' '%s'", before, keep);
  int rc = ot_test_run(
      out, sizeof out,
      "sh -c 'ulimit -f 40; exec %s finetune --model %s/model --tokens %s/ft_tokens.txt --out %s/ft "
      "--steps 2 "
      "--batch 2 --seq-len 8 --lr 0.05'",
      cloud, dir, dir, dir);
  assert_int_equal(rc, 1);
  assert_non_null(strstr(out, "offtune-cloud:"));
  assert_true(files_equal(before, keep));
  rc = ot_test_run(out, sizeof out, "%s eval --model %s/ft --tokens %s/tokens.txt --json", cloud, dir, dir);
  assert_int_equal(rc, 0);
}

static void test_tokenize_bytes(void **state) {
  (void)state;
  char out[4096];
  ot_test_system("printf 'Hi!' > '%s/hi.txt'", dir);
  assert_int_equal(
      ot_test_run(out, sizeof out, "%s tokenize --model %s/model --text %s/hi.txt", cloud, dir, dir), 0);
  assert_string_equal(out, "72 105 33\n");
}

/* The JSON object of an `eval --json` run of a checkpoint on tokens.txt (fails the test on error). */
static void eval_json(const char *model, char *json, size_t cap) {
  char out[8192];
  int rc = ot_test_run(out, sizeof out, "%s eval --model %s --tokens %s/tokens.txt --seq-len 24 --json",
                       cloud, model, dir);
  if (rc != 0) fail_msg("eval of %s failed (%d): %s", model, rc, out);
  const char *j = strchr(out, '{'), *e = j ? strchr(j, '}') : NULL;
  assert_non_null(e);
  snprintf(json, cap, "%.*s", (int)(e - j + 1), j);
}

/* A checkpoint saved as Hugging Face's save_pretrained saves a model (config.json and
 * model.safetensors, no tokenizer files) does token-id work with the very same numbers;
 * what needs text names the missing files; tokenizer files that are there but broken still
 * fail; a checkpoint fine-tuned from it has no tokenizer files and loads back. */
static void test_checkpoint_without_tokenizer(void **state) {
  (void)state;
  char out[8192], with[512], without[512], m[600], a[700], b[700];
  assert_int_equal(ot_test_system("rm -rf '%s/notok' && cp -r '%s/model' '%s/notok' && cd '%s/notok' && "
                                  "rm -f tokenizer_config.json vocab.json merges.txt tokenizer.json",
                                  dir, dir, dir, dir),
                   0);
  snprintf(m, sizeof m, "%s/model", dir);
  eval_json(m, with, sizeof with);
  snprintf(m, sizeof m, "%s/notok", dir);
  eval_json(m, without, sizeof without);
  assert_string_equal(with, without);

  const char *ft =
      "--tokens ft_tokens.txt --steps 2 --batch 2 --seq-len 8 --lr 0.05 --optimizer sgd --threads 1";
  int rc =
      ot_test_run(out, sizeof out, "cd '%s' && rm -rf ft_tok && %s finetune --model model --out ft_tok %s",
                  dir, cloud, ft);
  if (rc) fail_msg("finetune with a tokenizer failed: %s", out);
  rc = ot_test_run(out, sizeof out,
                   "cd '%s' && rm -rf ft_notok && %s finetune --model notok --out ft_notok %s", dir, cloud,
                   ft);
  if (rc) fail_msg("finetune without a tokenizer failed: %s", out);
  snprintf(a, sizeof a, "%s/ft_tok/model.safetensors", dir);
  snprintf(b, sizeof b, "%s/ft_notok/model.safetensors", dir);
  assert_true(files_equal(a, b));
  /* the saved checkpoint has no tokenizer files either, and loads back */
  assert_int_equal(ot_test_system("ls '%s/ft_notok' | grep -q -E 'tokenizer|vocab|merges'", dir), 1);
  snprintf(m, sizeof m, "%s/ft_tok", dir);
  eval_json(m, with, sizeof with);
  snprintf(m, sizeof m, "%s/ft_notok", dir);
  eval_json(m, without, sizeof without);
  assert_string_equal(with, without);

  /* text needs a tokenizer: exit 1 naming the directory and the files it lacks */
  ot_test_system("printf 'Hi!' > '%s/hi.txt'", dir);
  char cmds[4][1200];
  snprintf(cmds[0], sizeof cmds[0], "%s eval --model %s/notok --text %s/hi.txt", cloud, dir, dir);
  snprintf(cmds[1], sizeof cmds[1], "%s tokenize --model %s/notok --text %s/hi.txt", cloud, dir, dir);
  snprintf(cmds[2], sizeof cmds[2],
           "%s finetune --model %s/notok --text %s/hi.txt --out %s/x --steps 1 --batch 1 --seq-len 2 --lr 1",
           cloud, dir, dir, dir);
  snprintf(cmds[3], sizeof cmds[3], "%s generate --model %s/notok --prompt Hi --max-tokens 2", cloud, dir);
  snprintf(m, sizeof m, "%s/notok has no tokenizer", dir);
  for (int i = 0; i < 4; i++) {
    rc = ot_test_run(out, sizeof out, "%s", cmds[i]);
    if (rc != 1) fail_msg("%s: exit %d, want 1: %s", cmds[i], rc, out);
    if (!strstr(out, m) || !strstr(out, "vocab.json + merges.txt"))
      fail_msg("%s: unclear error: %s", cmds[i], out);
  }
  assert_int_equal(ot_test_run(out, sizeof out, "%s", cmds[0]), 1);
  assert_non_null(strstr(out, "--tokens")); /* what to do instead */

  /* tokenizer files that are present but malformed or incomplete still fail loudly */
  ot_test_system("printf '{\"model\": ' > '%s/notok/tokenizer.json'", dir);
  rc = ot_test_run(out, sizeof out, "%s eval --model %s/notok --tokens %s/tokens.txt", cloud, dir, dir);
  if (rc != 1 || !strstr(out, "tokenizer.json")) fail_msg("malformed tokenizer.json: exit %d: %s", rc, out);
  ot_test_system("rm '%s/notok/tokenizer.json' && echo '{\"a\": 0}' > '%s/notok/vocab.json'", dir, dir);
  rc = ot_test_run(out, sizeof out, "%s eval --model %s/notok --tokens %s/tokens.txt", cloud, dir, dir);
  if (rc != 1 || !strstr(out, "merges.txt")) fail_msg("vocab.json alone: exit %d: %s", rc, out);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_eval_matches_pytorch_windows),
      cmocka_unit_test(test_finetune_batch_order_matches_pytorch),
      cmocka_unit_test(test_pretrain_resume_is_exact),
      cmocka_unit_test(test_usage_errors_exit_2),
      cmocka_unit_test(test_bad_inputs_exit_1),
      cmocka_unit_test(test_tokenize_bytes),
      cmocka_unit_test(test_checkpoint_without_tokenizer),
      cmocka_unit_test(test_pretrain_survives_kill_9),
      cmocka_unit_test(test_full_disk_keeps_old_checkpoint),
  };
  return cmocka_run_group_tests(tests, setup, teardown);
}

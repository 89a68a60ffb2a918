/* Offsite-Tuning end to end, as users run it: tiny pretrain -> offtune-cloud distill ->
 * offtune-device tune -> offtune-device eval and offtune-cloud eval --adapter; resume of
 * distillation; tail averaging of the adapter; refused adapters (another base, tampered) with
 * exit code 1; the measured gap and the cloud's --target-gap control. */
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

#include "cli_fixture.h"
#include "ot_error.h"
#include "ot_safetensors.h"

static int setup(void **state) {
  (void)state;
  return cli_fixture_setup("emulator_cli");
}

static void test_offsite_flow(void **state) {
  (void)state;
  ot_test_cli_base(cloud, dir, 40000, out, sizeof out);
  /* defaults (bottom 2, top 2) leave no middle in 4 blocks: a clear error */
  assert_int_equal(ot_test_run(out, sizeof out,
                               "%s distill --model %s/full --data %s/public.txt --out %s/bad --keep 1", cloud,
                               dir, dir, dir),
                   1);
  assert_non_null(strstr(out, "no middle"));

  RUN_OK("%s distill --model %s/full --data %s/public.txt --out %s/emu --bottom 1 --top 1 --keep 1 --steps 6 "
         "--batch 4 --seq-len 32 --ckpt-every 3",
         cloud, dir, dir, dir);
  assert_non_null(strstr(out, "KD"));
  assert_non_null(strstr(out, "CE"));
  /* resume continues from the saved step */
  RUN_OK("%s distill --model %s/full --data %s/public.txt --out %s/emu --bottom 1 --top 1 --keep 1 --steps 9 "
         "--batch 4 --seq-len 32 --ckpt-every 3 --resume",
         cloud, dir, dir, dir);
  assert_non_null(strstr(out, "resuming"));
  char path[700];
  snprintf(path, sizeof path, "%s/emu/emulator.json", dir);
  assert_int_equal(
      ot_test_system("grep -q '\"kept_middle\"' '%s' && grep -q '\"block_source\"' '%s'", path, path), 0);
  /* the package holds 3 blocks (0, kept 1, 3): nothing of a 4th */
  assert_int_equal(ot_test_system("grep -q 'h\\.3\\.' '%s/emu/model.safetensors'", dir), 1);
  assert_int_equal(ot_test_system("grep -q '\"n_layer\":[[:space:]]*3' '%s/emu/config.json'", dir), 0);

  RUN_OK("%s tune --emulator %s/emu --text %s/private.txt --out %s/adapter --steps 8 --batch 4 --seq-len 32 "
         "--eval-every 4 --patience 2",
         device, dir, dir, dir);
  assert_non_null(strstr(out, "held-out loss"));
  snprintf(path, sizeof path, "%s/adapter/offtune_adapter.json", dir);
  assert_int_equal(ot_test_system("grep -q '\"offsite\"' '%s' && grep -q '\"blocks\":' '%s'", path, path), 0);

  double l_emu, l_emu_ad, l_full, l_plug, t1, t2, t3, t4;
  RUN_OK("%s eval --emulator %s/emu --text %s/private.txt --seq-len 32 --json", device, dir, dir);
  ot_test_eval_json(out, "emulator zero-shot", &l_emu, &t1);
  RUN_OK("%s eval --emulator %s/emu --adapter %s/adapter --text %s/private.txt --seq-len 32 --json", device,
         dir, dir, dir);
  ot_test_eval_json(out, "emulator + adapter", &l_emu_ad, &t2);
  RUN_OK("%s eval --model %s/full --text %s/private.txt --seq-len 32 --json", cloud, dir, dir);
  ot_test_eval_json(out, "full model zero-shot", &l_full, &t3);
  RUN_OK("%s eval --model %s/full --adapter %s/adapter --text %s/private.txt --seq-len 32 --json", cloud, dir,
         dir, dir);
  ot_test_eval_json(out, "plug-in", &l_plug, &t4);
  /* same windows on both sides */
  assert_true(t1 == t2 && t2 == t3 && t3 == t4);
  assert_true(l_emu_ad < l_emu); /* tuning on the private text helps on it */

  /* another base model: refused */
  RUN_OK("%s pretrain --tokenizer byte --layers 4 --embd 16 --heads 2 --ctx 32 --steps 3 --batch 4 --seed 7 "
         "--text %s/private.txt --out %s/other",
         cloud, dir, dir);
  assert_int_equal(ot_test_run(out, sizeof out,
                               "%s eval --model %s/other --adapter %s/adapter --text %s/private.txt", cloud,
                               dir, dir, dir),
                   1);
  assert_non_null(strstr(out, "base model"));
  /* tampered adapter: refused */
  assert_int_equal(ot_test_system("cp -r '%s/adapter' '%s/tampered' && printf 'x' | dd of='%s/tampered/"
                                  "adapter_model.safetensors' bs=1 seek=200 conv=notrunc status=none",
                                  dir, dir, dir),
                   0);
  assert_int_equal(ot_test_run(out, sizeof out,
                               "%s eval --model %s/full --adapter %s/tampered --text %s/private.txt", cloud,
                               dir, dir, dir),
                   1);
  assert_non_null(strstr(out, "tampered"));
  assert_int_equal(ot_test_run(out, sizeof out,
                               "%s eval --emulator %s/emu --adapter %s/tampered --text %s/private.txt",
                               device, dir, dir, dir),
                   1);
  /* usage errors */
  assert_int_equal(ot_test_run(out, sizeof out, "%s tune --emulator %s/emu --out %s/x", device, dir, dir), 2);
  assert_int_equal(ot_test_run(out, sizeof out, "%s nonsense", device), 2);
}

static int files_equal(const char *a, const char *b) { return ot_test_system("cmp -s '%s' '%s'", a, b) == 0; }

/* Distillation and device tuning stopped after 2 steps and resumed to 5 end bitwise equal
 * to straight 5-step runs (uses the files of test_offsite_flow). */
static void test_resume_is_exact(void **state) {
  (void)state;
  const char *d_common = "--bottom 1 --top 1 --keep 1 --batch 2 --seq-len 16 --warmup 2 --threads 1";
  RUN_OK("%s distill --model %s/full --data %s/public.txt --out %s/d_straight --steps 5 %s", cloud, dir, dir,
         dir, d_common);
  RUN_OK("%s distill --model %s/full --data %s/public.txt --out %s/d_resumed --steps 2 %s", cloud, dir, dir,
         dir, d_common);
  RUN_OK("%s distill --model %s/full --data %s/public.txt --out %s/d_resumed --steps 5 --resume %s", cloud,
         dir, dir, dir, d_common);
  assert_non_null(strstr(out, "resuming"));
  char a[700], b[700];
  snprintf(a, sizeof a, "%s/d_straight/model.safetensors", dir);
  snprintf(b, sizeof b, "%s/d_resumed/model.safetensors", dir);
  assert_true(files_equal(a, b));

  const char *t_common = "--batch 2 --seq-len 16 --threads 1 --lr 3e-3";
  RUN_OK("%s tune --emulator %s/d_straight --text %s/private.txt --out %s/t_straight --steps 5 %s", device,
         dir, dir, dir, t_common);
  RUN_OK("%s tune --emulator %s/d_straight --text %s/private.txt --out %s/t_resumed --steps 2 %s", device,
         dir, dir, dir, t_common);
  RUN_OK("%s tune --emulator %s/d_straight --text %s/private.txt --out %s/t_resumed --steps 5 --resume %s",
         device, dir, dir, dir, t_common);
  assert_non_null(strstr(out, "resuming"));
  snprintf(a, sizeof a, "%s/t_straight/adapter_model.safetensors", dir);
  snprintf(b, sizeof b, "%s/t_resumed/adapter_model.safetensors", dir);
  assert_true(files_equal(a, b));
  /* the same with a moving middle and a decaying lr (warm-up to the stop: both schedules agree
   * there): a step's noise depends on the step only */
  const char *n_common =
      "--batch 2 --seq-len 16 --threads 1 --lr 3e-3 --middle-noise 1 --schedule cosine --warmup 2";
  RUN_OK("%s tune --emulator %s/d_straight --text %s/private.txt --out %s/n_straight --steps 5 %s", device,
         dir, dir, dir, n_common);
  assert_non_null(strstr(out, "middle noise: 4 matrices"));
  RUN_OK("%s tune --emulator %s/d_straight --text %s/private.txt --out %s/n_resumed --steps 2 %s", device,
         dir, dir, dir, n_common);
  RUN_OK("%s tune --emulator %s/d_straight --text %s/private.txt --out %s/n_resumed --steps 5 --resume %s",
         device, dir, dir, dir, n_common);
  char c[700];
  snprintf(a, sizeof a, "%s/n_straight/adapter_model.safetensors", dir);
  snprintf(b, sizeof b, "%s/n_resumed/adapter_model.safetensors", dir);
  snprintf(c, sizeof c, "%s/t_straight/adapter_model.safetensors", dir);
  assert_true(files_equal(a, b));
  assert_false(files_equal(a, c)); /* the noise and the schedule change the training */
  /* resuming with other batch settings is refused */
  assert_int_equal(ot_test_run(out, sizeof out,
                               "%s tune --emulator %s/d_straight --text %s/private.txt --out %s/t_resumed "
                               "--steps 6 --resume --batch 3 --seq-len 16",
                               device, dir, dir, dir),
                   1);
  assert_non_null(strstr(out, "resume with the same"));
}

/* The largest difference between adapter file `got` and the mean of files `in[0..n)`, relative
 * to 1 + |mean| (every tensor of `got`, found by name in the others). */
static double mean_error(const char *got, const char *const *in, int n) {
  ot_safetensors *g = NULL, *f[4] = {0};
  assert_int_equal(ot_st_open(got, &g), OT_OK);
  for (int k = 0; k < n; k++) assert_int_equal(ot_st_open(in[k], &f[k]), OT_OK);
  double worst = 0;
  for (size_t i = 0; i < ot_st_count(g); i++) {
    const ot_st_tensor *t = ot_st_at(g, i);
    float *v = malloc(t->numel * sizeof(float)), *w = malloc(t->numel * sizeof(float));
    double *sum = calloc(t->numel, sizeof(double));
    assert_true(v && w && sum);
    assert_int_equal(ot_st_read_f32(g, t, v, t->numel), OT_OK);
    for (int k = 0; k < n; k++) {
      const ot_st_tensor *u = ot_st_find(f[k], t->name);
      assert_non_null(u);
      assert_int_equal(ot_st_read_f32(f[k], u, w, t->numel), OT_OK);
      for (uint64_t j = 0; j < t->numel; j++) sum[j] += w[j];
    }
    for (uint64_t j = 0; j < t->numel; j++) {
      double e = fabs(v[j] - sum[j] / n) / (1 + fabs(sum[j] / n));
      if (e > worst) worst = e;
    }
    free(v);
    free(w);
    free(sum);
  }
  ot_st_close(g);
  for (int k = 0; k < n; k++) ot_st_close(f[k]);
  return worst;
}

/* --average-last N: the adapter written is the mean of the weights after each of the last N
 * steps (against straight runs of 3, 4 and 5 steps averaged here in double); a run stopped
 * inside the window and extended to it ends byte-identical to a straight one; a resume with
 * another window is refused (uses the files of test_resume_is_exact). */
static void test_tail_average(void **state) {
  (void)state;
  const char *t_common = "--emulator %s/d_straight --text %s/private.txt --batch 2 --seq-len 16 --threads 1 "
                         "--lr 3e-3";
  char common[700], a[700], b[700];
  snprintf(common, sizeof common, t_common, dir, dir);
  for (int k = 3; k <= 5; k++) RUN_OK("%s tune %s --out %s/s%d --steps %d", device, common, dir, k, k);
  RUN_OK("%s tune %s --out %s/avg --steps 5 --average-last 3", device, common, dir);
  assert_non_null(strstr(out, "mean of the weights after steps 3..5"));
  char s3[700], s4[700], s5[700];
  snprintf(s3, sizeof s3, "%s/s3/adapter_model.safetensors", dir);
  snprintf(s4, sizeof s4, "%s/s4/adapter_model.safetensors", dir);
  snprintf(s5, sizeof s5, "%s/s5/adapter_model.safetensors", dir);
  snprintf(a, sizeof a, "%s/avg/adapter_model.safetensors", dir);
  const char *three[3] = {s3, s4, s5};
  assert_true(mean_error(a, three, 3) < 1e-6);
  assert_true(mean_error(a, three + 2, 1) > 1e-4); /* not the last weights */
  /* stopped after step 4 (its own window 3..4) and extended to 5 with the window 3..5 */
  RUN_OK("%s tune %s --out %s/avg_r --steps 4 --average-last 2", device, common, dir);
  snprintf(b, sizeof b, "%s/avg_r/adapter_model.safetensors", dir);
  assert_true(mean_error(b, three, 2) < 1e-6);
  RUN_OK("%s tune %s --out %s/avg_r --steps 5 --average-last 3 --resume", device, common, dir);
  assert_true(files_equal(a, b));
  /* a window that would have begun elsewhere is refused, and so is early stopping with it */
  RUN_OK("%s tune %s --out %s/avg_x --steps 4 --average-last 2", device, common, dir);
  assert_int_equal(ot_test_run(out, sizeof out,
                               "%s tune %s --out %s/avg_x --steps 5 --average-last 2 --resume", device,
                               common, dir),
                   1);
  assert_non_null(strstr(out, "resume with the same --steps and --average-last"));
  assert_int_equal(ot_test_run(out, sizeof out,
                               "%s tune %s --out %s/avg_y --steps 5 --average-last 3 --eval-every 2", device,
                               common, dir),
                   2);
  assert_non_null(strstr(out, "not with --eval-every"));
}

/* The held-out loss of --eval-every sees the middle as loaded, whatever noise the steps saw:
 * at an lr too small to move the adapter, a middle drowned in noise (100 x its rms) scores
 * the same as no noise (uses the files of test_resume_is_exact). */
static void test_noise_spares_evaluation(void **state) {
  (void)state;
  double loss[2];
  for (int k = 0; k < 2; k++) {
    RUN_OK("%s tune --emulator %s/d_straight --text %s/private.txt --out %s/ev%d --batch 2 --seq-len 16 "
           "--threads 1 --lr 1e-9 --steps 2 --eval-every 1 --patience 5 --middle-noise %d",
           device, dir, dir, dir, k, k ? 100 : 0);
    const char *h = strstr(out, "| held-out loss ");
    assert_non_null(h);
    loss[k] = atof(h + strlen("| held-out loss "));
  }
  assert_true(loss[0] > 1 && fabs(loss[0] - loss[1]) < 1e-3);
}

/* A full model without tokenizer files (Hugging Face save_pretrained of a model alone):
 * distillation on token ids builds an emulator package without tokenizer files, the device
 * tunes and scores it on token ids with the same numbers as the text path, and text on it
 * fails naming the package (uses the files of test_offsite_flow). */
static void test_no_tokenizer_flow(void **state) {
  (void)state;
  assert_int_equal(ot_test_system("cd '%s' && rm -rf full_nt && cp -r full full_nt && rm -f "
                                  "full_nt/tokenizer_config.json full_nt/vocab.json full_nt/merges.txt && "
                                  "head -c 6000 public.txt > pub_small.txt && head -c 6000 private.txt > "
                                  "priv_small.txt && %s tokenize --model full --text pub_small.txt > "
                                  "pub_small.tok && %s tokenize --model full --text priv_small.txt > "
                                  "priv_small.tok",
                                  dir, cloud, cloud),
                   0);
  const char *d_common = "--bottom 1 --top 1 --keep 1 --batch 2 --seq-len 16 --steps 2 --threads 1";
  RUN_OK("cd '%s' && rm -rf emu_t emu_nt && %s distill --model full --data pub_small.txt --out emu_t %s", dir,
         cloud, d_common);
  RUN_OK("cd '%s' && %s distill --model full_nt --tokens pub_small.tok --out emu_nt %s", dir, cloud,
         d_common);
  char a[700], b[700];
  snprintf(a, sizeof a, "%s/emu_t/model.safetensors", dir);
  snprintf(b, sizeof b, "%s/emu_nt/model.safetensors", dir);
  assert_true(files_equal(a, b));
  assert_int_equal(ot_test_system("ls '%s/emu_nt' | grep -q -E 'tokenizer|vocab|merges'", dir), 1);

  const char *t_common = "--batch 2 --seq-len 16 --steps 2 --threads 1";
  RUN_OK("cd '%s' && rm -rf ad_t ad_nt && %s tune --emulator emu_t --text priv_small.txt --out ad_t %s", dir,
         device, t_common);
  RUN_OK("cd '%s' && %s tune --emulator emu_nt --tokens priv_small.tok --out ad_nt %s", dir, device,
         t_common);
  snprintf(a, sizeof a, "%s/ad_t/adapter_model.safetensors", dir);
  snprintf(b, sizeof b, "%s/ad_nt/adapter_model.safetensors", dir);
  assert_true(files_equal(a, b));
  char with[512], without[512];
  RUN_OK("cd '%s' && %s eval --emulator emu_t --adapter ad_t --text priv_small.txt --seq-len 16 --json", dir,
         device);
  snprintf(with, sizeof with, "%.*s", (int)strcspn(strchr(out, '{'), "}") + 1, strchr(out, '{'));
  RUN_OK("cd '%s' && %s eval --emulator emu_nt --adapter ad_nt --tokens priv_small.tok --seq-len 16 --json",
         dir, device);
  snprintf(without, sizeof without, "%.*s", (int)strcspn(strchr(out, '{'), "}") + 1, strchr(out, '{'));
  assert_string_equal(with, without);
  /* the adapter plugs into the tokenizer-less full model too */
  RUN_OK("cd '%s' && %s eval --model full_nt --adapter ad_nt --tokens priv_small.tok --seq-len 16 --json",
         dir, cloud);

  /* text on a package or model without a tokenizer: exit 1, naming it */
  assert_int_equal(
      ot_test_run(out, sizeof out, "%s eval --emulator %s/emu_nt --text %s/priv_small.txt", device, dir, dir),
      1);
  char want[700];
  snprintf(want, sizeof want, "%s/emu_nt has no tokenizer", dir);
  if (!strstr(out, want) || !strstr(out, "--tokens")) fail_msg("unclear error: %s", out);
  assert_int_equal(ot_test_run(out, sizeof out,
                               "%s tune --emulator %s/emu_nt --text %s/priv_small.txt --out %s/x", device,
                               dir, dir, dir),
                   1);
  assert_non_null(strstr(out, want));
  assert_int_equal(
      ot_test_run(out, sizeof out,
                  "%s distill --model %s/full_nt --data %s/pub_small.txt --out %s/x --bottom 1 --top 1",
                  cloud, dir, dir, dir),
      1);
  snprintf(want, sizeof want, "%s/full_nt has no tokenizer", dir);
  assert_non_null(strstr(out, want));
}

/* A number of emulator.json's measured_gap (the file's one object of that name). */
static double gap_field(const char *emu, const char *key) {
  char path[700], cmd[1400];
  snprintf(path, sizeof path, "%s/%s/emulator.json", dir, emu);
  snprintf(cmd, sizeof cmd,
           "python3 -c 'import json,sys; "
           "print(repr(json.load(open(sys.argv[1]))[\"measured_gap\"][sys.argv[2]]))' '%s' %s",
           path, key);
  char buf[256];
  if (ot_test_run(buf, sizeof buf, "%s", cmd) != 0) fail_msg("no measured_gap.%s in %s: %s", key, path, buf);
  return atof(buf);
}

static int kept_count(const char *emu) {
  char buf[256];
  if (ot_test_run(buf, sizeof buf,
                  "python3 -c 'import json,sys; print(len(json.load(open(sys.argv[1]))[\"kept_middle\"]))' "
                  "'%s/%s/emulator.json'",
                  dir, emu) != 0)
    fail_msg("%s", buf);
  return atoi(buf);
}

/* The gap the cloud measures and ships: emulator.json's perplexities are those eval gives
 * the full model and the package on the same text; with --target-gap the cloud keeps the most
 * middle blocks whose emulator is still that much worse and stops distilling before it gets
 * better than that; an unreachable target fails, saying so (uses test_offsite_flow's files). */
static void test_target_gap(void **state) {
  (void)state;
  const char *common = "--bottom 1 --top 1 --batch 2 --seq-len 16 --threads 1";
  assert_int_equal(ot_test_system("cd '%s' && head -c 3000 private.txt > gap.txt", dir), 0);
  RUN_OK("cd '%s' && rm -rf g0 && %s distill --model full --data public.txt --out g0 --keep 1 --steps 4 %s "
         "--gap-data gap.txt",
         dir, cloud, common);
  assert_non_null(strstr(out, "emulator gap on gap.txt"));
  double lf, le, tf, te;
  RUN_OK("cd '%s' && %s eval --model full --text gap.txt --seq-len 16 --json", dir, cloud);
  ot_test_eval_json(out, "full model on the gap text", &lf, &tf);
  RUN_OK("cd '%s' && %s eval --emulator g0 --text gap.txt --seq-len 16 --json", dir, device);
  ot_test_eval_json(out, "emulator on the gap text", &le, &te);
  double fp = gap_field("g0", "full_perplexity"), ep = gap_field("g0", "emulator_perplexity");
  printf("gap text: full %.6f (eval %.6f), emulator %.6f (eval %.6f), recorded gap %.6f\n", fp, exp(lf), ep,
         exp(le), gap_field("g0", "gap"));
  assert_true(fabs(fp / exp(lf) - 1) < 1e-5 && fabs(ep / exp(le) - 1) < 1e-5);
  assert_true(fabs(gap_field("g0", "tokens") - tf) < 0.5);
  assert_true(fabs(gap_field("g0", "gap") - (exp(le) / exp(lf) - 1)) < 1e-5);

  /* keep 2 of 2 is the full model (gap 0): the cloud must drop to keep 1 for any target */
  RUN_OK("cd '%s' && rm -rf g1 && %s distill --model full --data public.txt --out g1 --keep 2 --steps 6 %s "
         "--gap-data gap.txt --target-gap 0.001%%",
         dir, cloud, common);
  assert_non_null(strstr(out, "keep 2: gap 0.00% before distillation"));
  assert_int_equal(kept_count("g1"), 1);
  const char *p0 = strstr(out, "keep 1: gap ");
  assert_non_null(p0);
  double undistilled = atof(p0 + strlen("keep 1: gap ")) / 100.0;
  assert_true(undistilled > 0);
  /* half the undistilled gap: whatever the package shipped, it is still at least that far */
  char target[64];
  snprintf(target, sizeof target, "%.4f%%", 50 * undistilled);
  RUN_OK("cd '%s' && rm -rf g2 && %s distill --model full --data public.txt --out g2 --keep 1 --steps 40 %s "
         "--gap-data gap.txt --target-gap %s",
         dir, cloud, common, target);
  RUN_OK("cd '%s' && %s eval --emulator g2 --text gap.txt --seq-len 16 --json", dir, device);
  ot_test_eval_json(out, "chosen emulator on the gap text", &le, &te);
  printf("target %s: shipped gap %.4f%% (undistilled %.4f%%)\n", target, 100 * (exp(le - lf) - 1),
         100 * undistilled);
  assert_true(exp(le - lf) - 1 >= 0.5 * undistilled * (1 - 1e-4));
  assert_true(fabs(gap_field("g2", "target") - 0.5 * undistilled) < 1e-5);
  /* unreachable: refused, naming what is reachable */
  assert_int_equal(
      ot_test_run(out, sizeof out,
                  "cd '%s' && %s distill --model full --data public.txt --out g3 --keep 1 --steps 2 "
                  "%s --gap-data gap.txt --target-gap 900%%",
                  dir, cloud, common),
      1);
  assert_non_null(strstr(out, "no emulator of 1 middle blocks or fewer is 900.0% worse"));
  assert_int_equal(
      ot_test_run(out, sizeof out,
                  "cd '%s' && %s distill --model full --data public.txt --out g3 --target-gap 10%%", dir,
                  cloud),
      2);
  assert_non_null(strstr(out, "--gap-data"));
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_offsite_flow),      cmocka_unit_test(test_resume_is_exact),
      cmocka_unit_test(test_tail_average),      cmocka_unit_test(test_noise_spares_evaluation),
      cmocka_unit_test(test_no_tokenizer_flow), cmocka_unit_test(test_target_gap)};
  return cmocka_run_group_tests(tests, setup, cli_fixture_teardown);
}

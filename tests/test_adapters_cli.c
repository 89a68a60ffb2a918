/* Adapters end to end, as users run them: tiny pretrain -> distill -> offtune-device tune with
 * every adapter kind -> offtune-device eval / offtune-cloud eval --adapter -> offtune-cloud
 * merge (scores like model + adapter); LoRA with dropout resumes bitwise. */
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

static int setup(void **state) {
  (void)state;
  return cli_fixture_setup("adapters_cli");
}

static double eval_loss(const char *what, const char *fmt_cmd) {
  double loss, tokens;
  RUN_OK("%s", fmt_cmd);
  ot_test_eval_json(out, what, &loss, &tokens);
  return loss;
}

static void test_adapter_flow(void **state) {
  (void)state;
  char cmd[2048];
  ot_test_cli_base(cloud, dir, 30000, out, sizeof out);
  RUN_OK("%s distill --model %s/full --data %s/public.txt --out %s/emu --bottom 1 --top 1 --keep 1 --steps 4 "
         "--batch 4 --seq-len 32",
         cloud, dir, dir, dir);
  snprintf(cmd, sizeof cmd, "%s eval --emulator %s/emu --text %s/private.txt --seq-len 32 --json", device,
           dir, dir);
  double emu0 = eval_loss("emulator", cmd);
  const char *kinds[] = {"offsite", "lora", "bottleneck", "bitfit"};
  const char *extra[] = {"", "--lora-r 4 --lora-alpha 8 --lora-dropout 0.1 --lora-targets c_attn,c_proj",
                         "--bottleneck-dim 8", ""};
  for (int k = 0; k < 4; k++) {
    RUN_OK(
        "%s tune --emulator %s/emu --text %s/private.txt --out %s/ad_%s --adapter %s %s --steps 8 --batch 4 "
        "--seq-len 32 --lr 1e-2",
        device, dir, dir, dir, kinds[k], kinds[k], extra[k]);
    snprintf(cmd, sizeof cmd,
             "%s eval --emulator %s/emu --adapter %s/ad_%s --text %s/private.txt --seq-len 32 --json", device,
             dir, dir, kinds[k], dir);
    double tuned = eval_loss(kinds[k], cmd);
    assert_true(tuned < emu0); /* the adapter learned something about the private text */
    snprintf(cmd, sizeof cmd,
             "%s eval --model %s/full --adapter %s/ad_%s --text %s/private.txt --seq-len 32 --json", cloud,
             dir, dir, kinds[k], dir);
    eval_loss("full model + adapter", cmd);
  }
  /* the LoRA adapter is PEFT's layout */
  assert_int_equal(ot_test_system("grep -q '\"peft_type\":.*\"LORA\"' '%s/ad_lora/adapter_config.json'", dir),
                   0);

  /* merge: a plain checkpoint that scores like model + adapter */
  RUN_OK("%s merge --model %s/full --adapter %s/ad_lora --out %s/merged", cloud, dir, dir, dir);
  snprintf(cmd, sizeof cmd, "%s eval --model %s/merged --text %s/private.txt --seq-len 32 --json", cloud, dir,
           dir);
  double merged = eval_loss("merged", cmd);
  snprintf(cmd, sizeof cmd,
           "%s eval --model %s/full --adapter %s/ad_lora --text %s/private.txt --seq-len 32 --json", cloud,
           dir, dir, dir);
  double applied = eval_loss("full + LoRA", cmd);
  assert_true(fabs(merged - applied) <= 1e-5 * applied);
  assert_int_equal(ot_test_run(out, sizeof out,
                               "%s merge --model %s/full --adapter %s/ad_bottleneck --out %s/m2", cloud, dir,
                               dir, dir),
                   1);
  assert_non_null(strstr(out, "only LoRA"));
  /* merged weights are not the base the adapter was tuned for */
  assert_int_equal(ot_test_run(out, sizeof out,
                               "%s eval --model %s/merged --adapter %s/ad_lora --text %s/private.txt", cloud,
                               dir, dir, dir),
                   1);
  assert_non_null(strstr(out, "tuned for base model"));
  assert_int_equal(ot_test_run(out, sizeof out,
                               "%s tune --emulator %s/emu --text %s/private.txt --out %s/x --adapter prefix",
                               device, dir, dir, dir),
                   2);

  /* LoRA with dropout resumes bitwise: the masks follow the step, not the process */
  RUN_OK(
      "%s tune --emulator %s/emu --text %s/private.txt --out %s/straight --adapter lora --lora-dropout 0.2 "
      "--steps 6 --batch 4 --seq-len 32",
      device, dir, dir, dir);
  RUN_OK("%s tune --emulator %s/emu --text %s/private.txt --out %s/resumed --adapter lora --lora-dropout 0.2 "
         "--steps 3 --batch 4 --seq-len 32",
         device, dir, dir, dir);
  RUN_OK("%s tune --emulator %s/emu --text %s/private.txt --out %s/resumed --adapter lora --lora-dropout 0.2 "
         "--steps 6 --batch 4 --seq-len 32 --resume",
         device, dir, dir, dir);
  assert_int_equal(
      ot_test_system("cmp '%s/straight/adapter_model.safetensors' '%s/resumed/adapter_model.safetensors'",
                     dir, dir),
      0);
}

int main(void) {
  const struct CMUnitTest tests[] = {cmocka_unit_test(test_adapter_flow)};
  return cmocka_run_group_tests(tests, setup, cli_fixture_teardown);
}

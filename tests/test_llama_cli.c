/* The LLaMA family end to end, as users run it: pretrain a tiny grouped-query LLaMA -> distill its
 * emulator -> offtune-device tune with LoRA on q/k/v/o/gate/up/down, offsite blocks and a
 * bottleneck -> eval on the emulator and plugged into the full model -> merge (scores like model +
 * adapter) -> serve the base and the adapter over HTTP. BitFit is refused by name (no biases). */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cli_fixture.h"

static int setup(void **state) {
  (void)state;
  return cli_fixture_setup("llama_cli");
}

static double eval_loss(const char *what, const char *fmt_cmd) {
  double loss, tokens;
  RUN_OK("%s", fmt_cmd);
  ot_test_eval_json(out, what, &loss, &tokens);
  return loss;
}

static void test_llama_flow(void **state) {
  (void)state;
  char cmd[2048];
  RUN_OK("%s corpus --genres public --out %s/public.txt", cloud, dir);
  RUN_OK("%s corpus --genres romance --out %s/romance.txt", cloud, dir);
  assert_int_equal(ot_test_system("head -c 30000 '%s/romance.txt' > '%s/private.txt'", dir, dir), 0);
  RUN_OK("%s pretrain --arch llama --tokenizer byte --layers 4 --embd 32 --heads 4 --kv-heads 2 --ctx 32 "
         "--steps 20 --batch 4 --text %s/public.txt --out %s/full",
         cloud, dir, dir);
  assert_int_equal(ot_test_system("grep -q '\"model_type\":.*\"llama\"' '%s/full/config.json' && grep -q "
                                  "'\"num_key_value_heads\":.*2' '%s/full/config.json'",
                                  dir, dir),
                   0);
  RUN_OK("%s distill --model %s/full --data %s/public.txt --out %s/emu --bottom 1 --top 1 --keep 1 --steps 4 "
         "--batch 4 --seq-len 32",
         cloud, dir, dir, dir);
  snprintf(cmd, sizeof cmd, "%s eval --emulator %s/emu --text %s/private.txt --seq-len 32 --json", device,
           dir, dir);
  double emu0 = eval_loss("emulator", cmd);
  const char *kinds[] = {"lora", "offsite", "bottleneck"};
  const char *extra[] = {
      "--lora-r 4 --lora-alpha 8 --lora-targets q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,"
      "down_proj",
      "", "--bottleneck-dim 8"};
  for (int k = 0; k < 3; k++) {
    RUN_OK(
        "%s tune --emulator %s/emu --text %s/private.txt --out %s/ad_%s --adapter %s %s --steps 8 --batch 4 "
        "--seq-len 32 --lr 1e-2",
        device, dir, dir, dir, kinds[k], kinds[k], extra[k]);
    snprintf(cmd, sizeof cmd,
             "%s eval --emulator %s/emu --adapter %s/ad_%s --text %s/private.txt --seq-len 32 --json", device,
             dir, dir, kinds[k], dir);
    assert_true(eval_loss(kinds[k], cmd) < emu0); /* it learned something about the private text */
    snprintf(cmd, sizeof cmd,
             "%s eval --model %s/full --adapter %s/ad_%s --text %s/private.txt --seq-len 32 --json", cloud,
             dir, dir, kinds[k], dir);
    eval_loss("full model + adapter", cmd);
  }
  /* the same LoRA with the emulator's frozen weights kept in bf16 or int8: it learns as much */
  snprintf(cmd, sizeof cmd,
           "%s eval --emulator %s/emu --adapter %s/ad_lora --text %s/private.txt --seq-len 32 --json", device,
           dir, dir, dir);
  double l32 = eval_loss("lora (fp32 frozen weights)", cmd);
  const char *lowp[2] = {"bf16", "int8"};
  for (int k = 0; k < 2; k++) {
    RUN_OK("%s tune --emulator %s/emu --text %s/private.txt --out %s/ad_lora_%s --adapter lora %s --steps 8 "
           "--batch 4 --seq-len 32 --lr 1e-2 --frozen %s --middle-noise 1",
           device, dir, dir, dir, lowp[k], extra[0], lowp[k]);
    char note[64];
    snprintf(note, sizeof note, "frozen weights kept in %s", lowp[k]);
    assert_non_null(strstr(out, note));
    /* a session's middle noise needs the middle in fp32: the device trains without it, and says so */
    assert_non_null(strstr(out, "--middle-noise 1 ignored"));
    snprintf(cmd, sizeof cmd,
             "%s eval --emulator %s/emu --adapter %s/ad_lora_%s --text %s/private.txt --seq-len 32 --json",
             device, dir, dir, lowp[k], dir);
    snprintf(note, sizeof note, "lora (%s frozen weights)", lowp[k]);
    double l = eval_loss(note, cmd);
    assert_true(fabs(l - l32) < 0.01 * l32);
  }
  /* PEFT's layout with LLaMA names: nn.Linear weights, so fan_in_fan_out is false */
  /* base_model_name_or_path: the base's directory name, carried by the emulator package */
  assert_int_equal(
      ot_test_system("grep -q '\"base_model_name_or_path\":.*\"full\"' '%s/ad_lora/adapter_config.json'",
                     dir),
      0);
  assert_int_equal(ot_test_system("grep -q 'self_attn.q_proj' '%s/ad_lora/adapter_config.json' && "
                                  "grep -q '\"fan_in_fan_out\":.*false' '%s/ad_lora/adapter_config.json' && "
                                  "grep -q 'base_model.model.model.layers.0.mlp.gate_proj.lora_A.weight' "
                                  "'%s/ad_lora/adapter_model.safetensors'",
                                  dir, dir, dir),
                   0);
  /* BitFit has nothing to train on a model without biases: refused by name */
  assert_int_equal(
      ot_test_run(out, sizeof out,
                  "%s tune --emulator %s/emu --text %s/private.txt --out %s/bf --adapter bitfit --steps 2",
                  device, dir, dir, dir),
      1);
  assert_non_null(strstr(out, "without biases"));
  /* a GPT-2 module name on a LLaMA model is refused, not ignored */
  assert_int_equal(ot_test_run(out, sizeof out,
                               "%s tune --emulator %s/emu --text %s/private.txt --out %s/x --adapter lora "
                               "--lora-targets c_attn --steps 2",
                               device, dir, dir, dir),
                   1);

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

  /* serving: the base and the LoRA adapter over HTTP, batched by the same block code */
  int port = 20000 + (int)(getpid() % 20000);
  assert_int_equal(
      ot_test_system("cd '%s' && (%s serve-model --model full --adapter lo=ad_lora --http 127.0.0.1:%d "
                     "--max-batch 4 > serve.log 2>&1 & echo $! > serve.pid)",
                     dir, cloud, port),
      0);
  const char *models[] = {"full", "lo"};
  for (int i = 0; i < 2; i++) {
    int rc =
        ot_test_system("curl -sf --retry 50 --retry-delay 0 --retry-connrefused --max-time 120 "
                       "http://127.0.0.1:%d/v1/completions -H 'Content-Type: application/json' "
                       "-d '{\"model\":\"%s\",\"prompt\":\"She said\",\"max_tokens\":8,\"temperature\":0}' "
                       "> '%s/completion_%d.json'",
                       port, models[i], dir, i);
    if (rc != 0) ot_test_system("cat '%s/serve.log'", dir);
    assert_int_equal(rc, 0);
    assert_int_equal(ot_test_system("grep -q '\"completion_tokens\":8' '%s/completion_%d.json'", dir, i), 0);
  }
  ot_test_system("kill $(cat '%s/serve.pid')", dir);
}

int main(void) {
  const struct CMUnitTest tests[] = {cmocka_unit_test(test_llama_flow)};
  return cmocka_run_group_tests(tests, setup, cli_fixture_teardown);
}

/* offtune-cloud merge: folds a LoRA adapter into the base weights and writes a normal
 * checkpoint (serving without the adapter branch). */
#include <stdio.h>
#include <stdlib.h>

#include "ot_peft.h"
#include "ot_cli.h"
#include "ot_cloud_cmd.h"
#include "ot_error.h"

#define N_OPTS(o) ((int)(sizeof(o) / sizeof((o)[0])))

int ot_cmd_merge(int argc, char **argv) {
  const char *model = NULL, *adapter = NULL, *out = NULL;
  const ot_opt opts[] = {
      {"model", OT_OPT_STR, &model, "DIR", "the full model the adapter was tuned for (required)"},
      {"adapter", OT_OPT_STR, &adapter, "DIR", "LoRA adapter from offtune-device tune (required)"},
      {"out", OT_OPT_STR, &out, "DIR", "checkpoint directory to write (required)"},
  };
  const char *syn = "offtune-cloud merge --model DIR --adapter LORA_DIR --out DIR";
  const char *desc = "Adds scale * (B A)^T of every LoRA site to its Conv1D weight [in, out]\n"
                     "and writes config.json, model.safetensors and the tokenizer: a plain\n"
                     "model that scores like model + adapter up to float32 rounding.";
  int rc = ot_cli_parse(argc, argv, opts, N_OPTS(opts));
  if (rc == 1) {
    ot_cli_usage(stdout, syn, desc, opts, N_OPTS(opts));
    return OT_EXIT_OK;
  }
  if (rc == OT_OK && (!model || !adapter || !out))
    rc = ot_error(OT_ERR_INVALID, "--model, --adapter and --out are required");
  if (rc) {
    fprintf(stderr, "offtune-cloud merge: %s\n", ot_error_detail());
    ot_cli_usage(stderr, syn, NULL, opts, N_OPTS(opts));
    return OT_EXIT_USAGE;
  }
  ot_backend *be;
  ot_model *m;
  ot_tokenizer *tok;
  rc = ot_cmd_load_model(model, "cpu", 0, &be, &m, &tok);
  if (rc) return ot_cmd_fail("loading the model", rc);
  char digest[OT_DIGEST_HEX];
  const char *what = "merging the adapter";
  rc = ot_model_dir_digest(model, digest);
  if (rc == OT_OK) rc = ot_peft_merge(m, digest, adapter);
  if (rc == OT_OK) {
    what = "writing the merged model";
    rc = ot_model_save_dir(m, out);
  }
  if (rc == OT_OK) rc = ot_tokenizer_save_dir(tok, out);
  ot_tokenizer_free(tok);
  ot_model_free(m);
  ot_backend_free(be);
  if (rc) return ot_cmd_fail(what, rc);
  printf("merged %s into %s: %s\n", adapter, model, out);
  return OT_EXIT_OK;
}

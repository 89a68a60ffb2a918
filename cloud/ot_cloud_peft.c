/* offtune-cloud import-peft: a LoRA trained elsewhere with Hugging Face PEFT becomes an offtune
 * adapter bound to one base checkpoint by its digest (peft/ does the checks). */
#include <libgen.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ot_cli.h"
#include "ot_cloud_cmd.h"
#include "ot_error.h"
#include "ot_fileio.h"
#include "ot_peft.h"

#define N_OPTS(o) ((int)(sizeof(o) / sizeof((o)[0])))

int ot_cmd_import_peft(int argc, char **argv) {
  const char *model = NULL, *peft = NULL, *out = NULL, *name = NULL;
  const ot_opt opts[] = {
      {"model", OT_OPT_STR, &model, "DIR", "the base checkpoint the LoRA was trained on (required)"},
      {"peft", OT_OPT_STR, &peft, "DIR", "PEFT's adapter_config.json + adapter_model.safetensors (required)"},
      {"out", OT_OPT_STR, &out, "DIR", "offtune adapter directory to write (required)"},
      {"base-name", OT_OPT_STR, &name, "NAME",
       "base_model_name_or_path written for PEFT (default: the --model directory's name)"},
  };
  const char *syn = "offtune-cloud import-peft --model DIR --peft DIR --out DIR";
  const char *desc = "Checks every key of PEFT's adapter_config.json (use_rslora is honoured; DoRA,\n"
                     "rank_pattern, alpha_pattern, modules_to_save and other flags that change the\n"
                     "maths are refused by name), every tensor name and shape against the model, and\n"
                     "writes an adapter bound to the model's digest: eval --adapter, merge, serving.";
  int rc = ot_cli_parse(argc, argv, opts, N_OPTS(opts));
  if (rc == 1) {
    ot_cli_usage(stdout, syn, desc, opts, N_OPTS(opts));
    return OT_EXIT_OK;
  }
  if (rc == OT_OK && (!model || !peft || !out))
    rc = ot_error(OT_ERR_INVALID, "--model, --peft and --out are required");
  if (rc) {
    fprintf(stderr, "offtune-cloud import-peft: %s\n", ot_error_detail());
    ot_cli_usage(stderr, syn, NULL, opts, N_OPTS(opts));
    return OT_EXIT_USAGE;
  }
  char digest[OT_DIGEST_HEX], *cfg_path = NULL, base[256];
  ot_model_config cfg;
  ot_peft_import_info info;
  snprintf(base, sizeof base, "%s", model);
  const char *what = "reading the base model";
  rc = ot_path_join(model, "config.json", &cfg_path);
  if (rc == OT_OK) rc = ot_model_config_load(cfg_path, &cfg);
  if (rc == OT_OK) rc = ot_model_dir_digest(model, digest);
  if (rc == OT_OK) {
    what = "importing the PEFT adapter";
    rc = ot_peft_import(peft, &cfg, digest, name ? name : basename(base), out, &info);
  }
  free(cfg_path);
  if (rc) return ot_cmd_fail(what, rc);
  char targets[256] = "";
  ot_lora_format_targets(info.sites, targets, sizeof targets);
  printf("imported a LoRA of rank %d (alpha %g, %s scale %g) on %s of %d blocks (%d tensors)\n"
         "bound to base %.16s... (%s): %s\n",
         info.r, info.alpha, info.rslora ? "rsLoRA" : "LoRA",
         info.rslora ? info.alpha / sqrt((double)info.r) : info.alpha / info.r, targets, info.n_blocks,
         info.n_tensors, digest, model, out);
  return OT_EXIT_OK;
}

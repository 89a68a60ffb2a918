/* offtune-device tune and eval: offsite adapter tuning on the emulator (the trainer
 * itself is ot_device_train.c, shared with `run`) and scoring. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ot_cli.h"
#include "ot_data.h"
#include "ot_device_cmd.h"
#include "ot_device_train.h"
#include "ot_emulator.h"
#include "ot_error.h"
#include "ot_eval.h"
#include "ot_task.h"
#include "ot_fileio.h"
#include "ot_snapshot.h"
#include "ot_train.h"

#define N_OPTS(o) ((int)(sizeof(o) / sizeof((o)[0])))

int ot_dev_tune(int argc, char **argv) {
  const char *emu_dir = NULL, *text = NULL, *tokens = NULL, *out = NULL, *adapter = "offsite",
             *backend = "cpu";
  int steps = 100, batch = 8, seq_len = 0, eval_every = 0, patience = 3, ckpt_every = 0, resume = 0,
      threads = 0, warmup = 0, json = 0, average_last = 0;
  float lr = 1e-3f, weight_decay = 0.0f, grad_clip = 1.0f, prox_mu = 0.0f, middle_noise = 0.0f;
  const char *init_adapter = NULL, *frozen = "fp32", *schedule = "constant";
  float min_lr_ratio = 0.0f;
  ot_lr_decay decay = OT_LR_CONSTANT;
  int frozen_kind = 0;
  ot_peft_config acfg;
  ot_peft_config_default(&acfg);
  const char *targets = "all";
  const ot_opt opts[] = {
      {"emulator", OT_OPT_STR, &emu_dir, "DIR", "emulator package from offtune-cloud distill (required)"},
      {"text", OT_OPT_STR, &text, "FILE",
       "private training text, or supervised examples (.jsonl, docs/data.md)"},
      {"tokens", OT_OPT_STR, &tokens, "FILE", "private training token ids"},
      {"out", OT_OPT_STR, &out, "DIR", "adapter directory to write (required)"},
      {"adapter", OT_OPT_STR, &adapter, "KIND",
       "offsite (default: the whole bottom and top blocks), lora, bottleneck or bitfit (their biases)"},
      {"lora-r", OT_OPT_INT, &acfg.lora_r, "R", "LoRA rank (default 8)"},
      {"lora-alpha", OT_OPT_FLOAT, &acfg.lora_alpha, "A",
       "LoRA alpha; scale = alpha / r, or alpha / sqrt(r) with --lora-rslora (default 16)"},
      {"lora-dropout", OT_OPT_FLOAT, &acfg.lora_dropout, "P", "dropout on the LoRA input (default 0.05)"},
      {"lora-rslora", OT_OPT_FLAG, &acfg.lora_rslora, NULL,
       "rank-stabilised LoRA: scale alpha/sqrt(r) (PEFT use_rslora)"},
      {"lora-targets", OT_OPT_STR, &targets, "LIST",
       "PEFT target modules, e.g. c_attn,c_proj or q_proj,v_proj (default all: every linear layer)"},
      {"bottleneck-dim", OT_OPT_INT, &acfg.bottleneck_dim, "M", "bottleneck adapter size (default 16)"},
      {"steps", OT_OPT_INT, &steps, "N", "optimizer steps (default 100)"},
      {"batch", OT_OPT_INT, &batch, "B", "sequences per step (default 8)"},
      {"seq-len", OT_OPT_INT, &seq_len, "T", "tokens per sequence (default: n_positions)"},
      {"lr", OT_OPT_FLOAT, &lr, "LR", "AdamW learning rate (default 1e-3, constant)"},
      {"warmup", OT_OPT_INT, &warmup, "N", "linear warm-up steps (default 0)"},
      {"schedule", OT_OPT_STR, &schedule, "NAME", "constant (default), linear or cosine decay after warm-up"},
      {"min-lr-ratio", OT_OPT_FLOAT, &min_lr_ratio, "R",
       "floor of the decay, a fraction of --lr (default 0)"},
      {"weight-decay", OT_OPT_FLOAT, &weight_decay, "W", "AdamW weight decay of 2-D weights (default 0)"},
      {"grad-clip", OT_OPT_FLOAT, &grad_clip, "NORM", "clip the global gradient norm (default 1; 0 = off)"},
      {"eval-every", OT_OPT_INT, &eval_every, "N",
       "score the held-out split (last 10% of the tokens) every N steps (default 0: no split)"},
      {"patience", OT_OPT_INT, &patience, "P", "stop after P evaluations without improvement (default 3)"},
      {"ckpt-every", OT_OPT_INT, &ckpt_every, "N", "save every N steps (default: at the end)"},
      {"resume", OT_OPT_FLAG, &resume, NULL, "continue from --out's train_state if there is one"},
      {"init-adapter", OT_OPT_STR, &init_adapter, "DIR",
       "start from this adapter (same kind and settings), e.g. a session round's, to see offline what `run` "
       "would send"},
      {"prox-mu", OT_OPT_FLOAT, &prox_mu, "MU",
       "FedProx: add (MU/2) ||w - w_start||^2 to the loss (default 0: off)"},
      {"middle-noise", OT_OPT_FLOAT, &middle_noise, "S",
       "each step sees the emulator's middle plus fresh Gaussian noise of S x each matrix's rms: the adapter "
       "cannot fit the emulator's own middle, so the emulator fine-tuned stays behind the plug-in (2.5: "
       "docs/emulator.md; a session sends its own; default 0: off)"},
      {"average-last", OT_OPT_INT, &average_last, "N",
       "the adapter written at the end is the mean of its weights after each of the last N steps (tail "
       "averaging; not with --eval-every; default 0: the last weights)"},
      {"backend", OT_OPT_STR, &backend, "NAME", "cpu (default) or cuda"},
      {"threads", OT_OPT_INT, &threads, "N", "CPU threads (default: all cores)"},
      {"frozen", OT_OPT_STR, &frozen, "DTYPE",
       "fp32 (default), bf16 or int8: the emulator's frozen weights kept at a half or a quarter of their "
       "memory (CPU)"},
      {"json", OT_OPT_FLAG, &json, NULL,
       "progress and summary as JSON lines on stdout (the records of OUT/metrics.jsonl)"},
  };
  const char *syn = "offtune-device tune --emulator DIR (--text|--tokens FILE) --out DIR [options]";
  const char *desc = "Trains only the adapter on the emulator's bottom and top blocks (the\n"
                     "blocks themselves, LoRA, bottleneck adapters or their biases); everything\n"
                     "else is frozen. Batches as in offtune-cloud finetune (sequential). With\n"
                     "--eval-every, the last 10% of the tokens are held out, and the best adapter\n"
                     "on them is kept (early stopping after --patience).";
  int rc = ot_cli_parse(argc, argv, opts, N_OPTS(opts));
  if (rc == 1) {
    ot_cli_usage(stdout, syn, desc, opts, N_OPTS(opts));
    return OT_EXIT_OK;
  }
  if (rc == OT_OK && (!emu_dir || !out)) rc = ot_error(OT_ERR_INVALID, "--emulator and --out are required");
  if (rc == OT_OK && !!text == !!tokens)
    rc = ot_error(OT_ERR_INVALID, "give exactly one of --text or --tokens");
  if (rc == OT_OK) rc = ot_peft_parse_kind(adapter, &acfg.kind);
  if (rc == OT_OK) rc = ot_dev_parse_frozen(frozen, &frozen_kind);
  if (rc == OT_OK) rc = ot_lr_parse_decay(schedule, &decay);
  if (rc == OT_OK && !(min_lr_ratio >= 0 && min_lr_ratio <= 1))
    rc = ot_error(OT_ERR_INVALID, "--min-lr-ratio %g: expected 0..1", min_lr_ratio);
  if (rc == OT_OK) rc = ot_lora_parse_targets(targets, &acfg.lora_sites);
  if (rc == OT_OK && (acfg.lora_r < 1 || !(acfg.lora_alpha > 0) ||
                      !(acfg.lora_dropout >= 0 && acfg.lora_dropout < 1) || acfg.bottleneck_dim < 1))
    rc = ot_error(OT_ERR_INVALID,
                  "need --lora-r >= 1, --lora-alpha > 0, 0 <= --lora-dropout < 1, --bottleneck-dim >= 1");
  if (rc == OT_OK && (steps < 1 || batch < 1 || seq_len < 0 || !(lr > 0) || eval_every < 0 || patience < 1 ||
                      ckpt_every < 0 || warmup < 0 || grad_clip < 0 || !(prox_mu >= 0) ||
                      !(middle_noise >= 0 && middle_noise <= 100)))
    rc = ot_error(
        OT_ERR_INVALID,
        "need --steps, --batch, --patience >= 1, --lr > 0, 0 <= --middle-noise <= 100, other counts >= 0");
  if (rc == OT_OK) rc = ot_dev_check_average(average_last, steps, eval_every);
  if (rc) {
    fprintf(stderr, "offtune-device tune: %s\n", ot_error_detail());
    ot_cli_usage(stderr, syn, NULL, opts, N_OPTS(opts));
    return OT_EXIT_USAGE;
  }
  ot_dev_train_opts o;
  ot_dev_train_opts_default(&o);
  o.emulator = emu_dir;
  o.init_adapter = init_adapter;
  o.prox_mu = prox_mu;
  o.middle_noise = middle_noise;
  o.average_last = average_last;
  o.adapter = acfg;
  o.text = text;
  o.tokens = tokens;
  o.out = out;
  o.steps = steps;
  o.batch = batch;
  o.seq_len = seq_len;
  o.lr = lr;
  o.weight_decay = weight_decay;
  o.grad_clip = grad_clip;
  o.warmup = warmup;
  o.decay = decay;
  o.min_lr_ratio = min_lr_ratio;
  o.eval_every = eval_every;
  o.patience = patience;
  o.ckpt_every = ckpt_every;
  o.resume = resume;
  o.backend = backend;
  o.threads = threads;
  o.json = json;
  o.frozen = frozen_kind;
  ot_dev_train_result res;
  rc = ot_dev_train(&o, &res);
  if (rc) return ot_dev_fail(res.what, rc);
  if (res.trained && !json) {
    printf("tuned %d steps in %.1f s, %.0f tokens/s: train loss %.4f (mean of last steps %.4f)",
           res.steps_done - res.start, res.seconds, res.tokens_per_s, res.last_loss, res.mean_loss);
    if (eval_every) printf(" | held-out loss %.4f", res.last_val);
    printf("; adapter saved to %s\n", out);
  }
  return OT_EXIT_OK;
}

int ot_dev_eval(int argc, char **argv) {
  const char *emu_dir = NULL, *adapter = NULL, *text = NULL, *tokens = NULL, *backend = "cpu", *task = NULL,
             *details = NULL;
  int seq_len = 0, batch = 8, json = 0, threads = 0;
  const ot_opt opts[] = {
      {"emulator", OT_OPT_STR, &emu_dir, "DIR", "emulator package (required)"},
      {"adapter", OT_OPT_STR, &adapter, "DIR", "adapter (any kind) to plug into the emulator"},
      {"text", OT_OPT_STR, &text, "FILE",
       "UTF-8 text to score; a .jsonl file of examples on its completions"},
      {"tokens", OT_OPT_STR, &tokens, "FILE", "whitespace-separated token ids to score"},
      {"task", OT_OPT_STR, &task, "FILE",
       "task items (JSONL: multiple_choice, cloze, generate; docs/tasks.md): accuracy instead of perplexity"},
      {"details", OT_OPT_STR, &details, "FILE", "with --task: one JSON line per item (scores, prediction)"},
      {"seq-len", OT_OPT_INT, &seq_len, "T", "window length (default: the model's n_positions)"},
      {"batch", OT_OPT_INT, &batch, "B", "windows scored at once (default 8)"},
      {"json", OT_OPT_FLAG, &json, NULL,
       "print {\"loss\", \"perplexity\", \"tokens\"} (with --task: {\"n\", per kind its metrics and "
       "standard errors}) as one JSON object"},
      {"backend", OT_OPT_STR, &backend, "NAME", "cpu (default) or cuda"},
      {"threads", OT_OPT_INT, &threads, "N", "CPU threads (default: all cores)"},
  };
  const char *syn =
      "offtune-device eval --emulator DIR [--adapter DIR] (--text FILE | --tokens FILE | --task FILE) "
      "[--seq-len T] [--json]";
  const char *desc =
      "Scores the token stream in non-overlapping windows of T exactly as offtune-cloud eval:\n"
      "window k has inputs tokens[kT : kT+T] and targets tokens[kT+1 : kT+T+1].";
  int rc = ot_cli_parse(argc, argv, opts, N_OPTS(opts));
  if (rc == 1) {
    ot_cli_usage(stdout, syn, desc, opts, N_OPTS(opts));
    return OT_EXIT_OK;
  }
  if (rc == OT_OK && !emu_dir) rc = ot_error(OT_ERR_INVALID, "--emulator is required");
  if (rc == OT_OK && (batch < 1 || seq_len < 0))
    rc = ot_error(OT_ERR_INVALID, "--batch and --seq-len must be >= 1");
  if (rc == OT_OK && !!text + !!tokens + !!task != 1)
    rc = ot_error(OT_ERR_INVALID, "give exactly one of --text, --tokens or --task");
  if (rc == OT_OK && details && !task) rc = ot_error(OT_ERR_INVALID, "--details goes with --task");
  if (rc) {
    fprintf(stderr, "offtune-device eval: %s\n", ot_error_detail());
    ot_cli_usage(stderr, syn, NULL, opts, N_OPTS(opts));
    return OT_EXIT_USAGE;
  }
  ot_backend *be;
  ot_model *m;
  ot_tokenizer *tok;
  ot_emu_plan plan;
  rc = ot_dev_load_emulator(emu_dir, backend, threads, &be, &m, &tok, &plan);
  if (rc) return ot_dev_fail("loading the emulator", rc);
  const char *what = "plugging in the adapter";
  ot_peft_map map;
  ot_emu_peft_map(&plan, &map);
  if (adapter) rc = ot_peft_apply_dir(m, &map, adapter);
  ot_tokens toks = {NULL, 0, NULL};
  ot_eval_result res;
  int T = seq_len ? seq_len : ot_model_cfg(m)->n_positions;
  if (rc == OT_OK && task) {
    ot_task_result tr;
    rc = ot_task_eval_file(m, tok, emu_dir, task, details, batch, stderr, &tr, &what);
    ot_tokenizer_free(tok);
    ot_model_free(m);
    ot_backend_free(be);
    if (rc) return ot_dev_fail(what, rc);
    ot_task_print(stdout, &tr, json);
    return OT_EXIT_OK;
  }
  if (rc == OT_OK) {
    what = "reading the input";
    rc = text ? ot_tokenizer_require(tok, emu_dir, "give token ids with --tokens FILE") : OT_OK;
    if (rc == OT_OK) rc = ot_tokens_load_input(text, tokens, tok, ot_model_cfg(m)->vocab_size, &toks);
  }
  if (rc == OT_OK) {
    what = "scoring";
    rc = ot_eval_input(m, &toks, T, batch, stderr, &res);
  }
  ot_tokens_free(&toks);
  ot_tokenizer_free(tok);
  ot_model_free(m);
  ot_backend_free(be);
  if (rc) return ot_dev_fail(what, rc);
  ot_eval_print(stdout, &res, json);
  return OT_EXIT_OK;
}

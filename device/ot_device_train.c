/* The device's local trainer (ot_device_train.h): offsite adapter tuning on the emulator.
 *
 * Only the adapter's tensors train; the emulator's middle, embeddings and final norm
 * stay frozen and get no gradient memory. opts->out is a loadable adapter at every
 * checkpoint, plus train_state/ for resume. */
#include "ot_device_train.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ot_data.h"
#include "ot_error.h"
#include "ot_eval.h"
#include "ot_fileio.h"
#include "ot_snapshot.h"
#include "ot_train.h"

int ot_dev_parse_frozen(const char *name, int *frozen) {
  static const char *names[3] = {"fp32", "bf16", "int8"}; /* 0, 1 + OT_LOWP_BF16, 1 + OT_LOWP_INT8 */
  for (int i = 0; name && i < 3; i++)
    if (strcmp(name, names[i]) == 0) {
      *frozen = i;
      return OT_OK;
    }
  return ot_error(OT_ERR_INVALID, "--frozen '%s': expected fp32, bf16 or int8", name ? name : "");
}

int ot_dev_check_average(int average_last, int steps, int eval_every) {
  if (average_last >= 0 && average_last <= steps && !(average_last && eval_every)) return OT_OK;
  return ot_error(OT_ERR_INVALID, "--average-last %d: expected 0..%d (--steps), and not with --eval-every",
                  average_last, steps);
}

int ot_dev_load_emulator(const char *dir, const char *backend, int threads, ot_backend **be, ot_model **m,
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
  ot_model *m;
  float *host;
  size_t n;
} weights_copy;

static int adapter_copy(weights_copy *w, int upload) {
  ot_backend *be = ot_model_backend(w->m);
  float *h = w->host;
  int rc = OT_OK;
  for (int i = 0; i < ot_model_param_count(w->m) && rc == OT_OK; i++) {
    ot_param *p = ot_model_param(w->m, i);
    if (!p->trainable) continue;
    rc = upload ? be->ops->upload(be, p->data, h, p->numel * sizeof(float))
                : be->ops->download(be, h, p->data, p->numel * sizeof(float));
    h += p->numel;
  }
  return rc;
}

typedef struct {
  const char *out;
  ot_model *m;
  const ot_peft_map *map;
  const ot_peft_config *acfg;
  ot_optimizer *opt;
  ot_batcher *data;
  int B, T, steps, eval_every, patience;
  ot_tokens val;
  double best;
  int bad, have_best;
  weights_copy best_w;
  double last_val;
  /* FedProx */
  float prox_mu;
  weights_copy init_w;
  float *host_w, *host_g; /* staging for one tensor */
  ot_emu_noise *noise;    /* --middle-noise */
  int avg_from;           /* --average-last: the first step whose weights enter the mean; 0 = off */
  float *avg;             /* the running mean */
  weights_copy cur;       /* staging of the current weights */
  int64_t step;           /* the step loss_step computes */
  ot_metrics *mx;
} tune_ctx;

/* The adapter in --out (usable at every checkpoint; after the last step of tail averaging, the
 * mean), then the resumable snapshot of the running weights, the mean and early-stopping state
 * (train_state/) as one unit. */
static int save_state(void *vctx, int step) {
  tune_ctx *c = vctx;
  ot_snapshot_state st = {step,   c->data->pos, c->data->rng, c->B, c->T, c->have_best ? c->best : -1.0,
                          c->bad, c->avg,       c->avg_from};
  int mean = c->avg_from && step == c->steps; /* cur holds the weights after this step */
  weights_copy w = {c->m, c->avg, c->cur.n};
  int rc = mean ? adapter_copy(&w, 1) : OT_OK;
  if (rc == OT_OK) rc = ot_peft_save(c->m, c->map, c->acfg, c->out);
  if (mean) {
    int r2 = adapter_copy(&c->cur, 1);
    if (rc == OT_OK) rc = r2;
  }
  if (rc == OT_OK) rc = ot_snapshot_save(c->out, c->m, c->opt, &st);
  return rc;
}

static int held_out(tune_ctx *c, double *loss) {
  ot_eval_result er;
  /* the loaded middle: a step leaves its noise in place (the next step overwrites it) */
  int rc = c->noise ? ot_emu_noise_restore(c->noise) : OT_OK;
  ot_model_set_dropout(c->m, 0); /* evaluation sees the adapter without dropout */
  if (rc == OT_OK) rc = ot_eval_data(c->m, &c->val, c->T, c->B, NULL, &er);
  ot_model_set_dropout(c->m, 1);
  if (rc == OT_OK) *loss = er.loss;
  return rc;
}

/* Tail averaging: the weights after `step` join the running mean (left in cur). */
static int average_step(tune_ctx *c, int step) {
  int rc = adapter_copy(&c->cur, 0);
  float k = (float)(step - c->avg_from + 1); /* weights in the mean, these included */
  for (size_t i = 0; rc == OT_OK && i < c->cur.n; i++) c->avg[i] += (c->cur.host[i] - c->avg[i]) / k;
  return rc;
}

/* After each step: tail averaging; early stopping: evaluate every eval_every steps, keep the
 * best adapter weights, stop after `patience` evaluations without improvement and restore
 * the best. */
static int on_step(void *vctx, int step, float loss, int *stop) {
  tune_ctx *c = vctx;
  (void)loss;
  if (c->avg_from && step >= c->avg_from) return average_step(c, step);
  if (!c->eval_every || (step % c->eval_every != 0 && step != c->steps)) return OT_OK;
  double v;
  int rc = held_out(c, &v);
  if (rc) return rc;
  c->last_val = v;
  static const char *const keys[] = {"step", "heldout_loss"};
  const double rec[] = {step, v};
  rc = ot_metrics_record(c->mx, "eval", 2, keys, rec);
  if (rc) return rc;
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

/* One step's gradients when plain forward + backward is not all: with --middle-noise the step
 * runs on a freshly perturbed middle (held_out writes the loaded one back: nothing else reads
 * the middle); with FedProx the proximal term's gradient mu (w - w_init) joins each adapter
 * tensor's. */
static int tune_loss_step(void *vctx, const int32_t *inputs, const int32_t *targets, float *loss) {
  tune_ctx *c = vctx;
  int rc = c->noise ? ot_emu_noise_apply(c->noise, c->step) : OT_OK;
  c->step++;
  if (rc == OT_OK) rc = ot_model_forward(c->m, inputs, targets, c->B, c->T, loss);
  if (rc == OT_OK) rc = ot_model_backward(c->m);
  if (rc || !(c->prox_mu > 0)) return rc;
  ot_backend *be = ot_model_backend(c->m);
  const float *w0 = c->init_w.host;
  double sq = 0;
  for (int i = 0; i < ot_model_param_count(c->m) && rc == OT_OK; i++) {
    ot_param *p = ot_model_param(c->m, i);
    if (!p->trainable) continue;
    size_t bytes = p->numel * sizeof(float);
    rc = be->ops->download(be, c->host_w, p->data, bytes);
    if (rc == OT_OK) rc = be->ops->download(be, c->host_g, p->grad, bytes);
    for (size_t k = 0; rc == OT_OK && k < p->numel; k++) {
      float diff = c->host_w[k] - w0[k];
      c->host_g[k] += c->prox_mu * diff;
      sq += (double)diff * diff;
    }
    if (rc == OT_OK) rc = be->ops->upload(be, p->grad, c->host_g, bytes);
    w0 += p->numel;
  }
  if (rc == OT_OK) *loss += (float)(0.5 * c->prox_mu * sq);
  return rc;
}

void ot_dev_train_opts_default(ot_dev_train_opts *o) {
  memset(o, 0, sizeof *o);
  ot_peft_config_default(&o->adapter);
  o->steps = 100;
  o->batch = 8;
  o->lr = 1e-3f;
  o->grad_clip = 1.0f;
  o->patience = 3;
  o->backend = "cpu";
}

int ot_dev_train(const ot_dev_train_opts *o, ot_dev_train_result *out) {
  ot_dev_train_result res;
  memset(&res, 0, sizeof res);
  ot_backend *be;
  ot_model *m;
  ot_tokenizer *tok;
  ot_emu_plan plan;
  ot_peft_map map;
  res.what = "loading the emulator";
  int rc = ot_dev_load_emulator(o->emulator, o->backend, o->threads, &be, &m, &tok, &plan);
  if (rc) {
    out->what = res.what;
    return rc;
  }
  ot_emu_peft_map(&plan, &map);
  res.what = "reading the data";
  int batch = o->batch, steps = o->steps;
  int T = o->seq_len ? o->seq_len : ot_model_cfg(m)->n_positions;
  ot_tokens toks = {NULL, 0, NULL};
  ot_optimizer *opt = NULL;
  tune_ctx c = {.out = o->out,
                .m = m,
                .map = &map,
                .acfg = &o->adapter,
                .B = batch,
                .T = T,
                .steps = steps,
                .eval_every = o->eval_every,
                .patience = o->patience,
                .prox_mu = o->prox_mu};
  if (T > ot_model_cfg(m)->n_positions) rc = ot_error(OT_ERR_INVALID, "--seq-len %d exceeds n_positions", T);
  if (rc == OT_OK) rc = ot_dev_check_average(o->average_last, steps, o->eval_every);
  c.avg_from = o->average_last ? steps - o->average_last + 1 : 0;
  if (rc == OT_OK && o->text)
    rc = ot_tokenizer_require(tok, o->emulator, "give token ids with --tokens FILE");
  if (rc == OT_OK) rc = ot_tokens_load_input(o->text, o->tokens, tok, ot_model_cfg(m)->vocab_size, &toks);
  /* the held-out split: the last 10% of the tokens (of the examples, cut between two) */
  ot_tokens train = toks;
  if (rc == OT_OK && o->eval_every) {
    rc = ot_tokens_split(&toks, toks.n / 10, &train, &c.val);
    if (rc || c.val.n < 2) rc = ot_error(OT_ERR_INVALID, "%zu tokens leave no held-out split", toks.n);
  }
  size_t n_train = train.n;
  if (rc == OT_OK && !train.mask && n_train < (size_t)batch * T + 1)
    rc = ot_error(OT_ERR_INVALID, "%zu training tokens, a step needs %d", n_train, batch * T + 1);
  ot_batcher bt = {0};
  c.data = &bt;
  if (rc == OT_OK) {
    res.what = "preparing";
    rc = ot_batcher_init(&bt, &train, batch, T, 0, 0);
  }
  if (rc == OT_OK) ot_batcher_skip(&bt, o->data_offset_steps);
  if (rc == OT_OK) rc = ot_peft_attach(m, &map, &o->adapter);
  if (rc == OT_OK && o->init_adapter) {
    res.what = "loading the round's adapter";
    rc = ot_peft_apply_dir(m, &map, o->init_adapter);
  }
  size_t saved = 0;
  if (rc == OT_OK && o->frozen) {
    ot_lowp kind = o->frozen == 1 ? OT_LOWP_BF16 : OT_LOWP_INT8;
    res.what = "keeping the frozen weights in low precision";
    rc = ot_model_freeze_lowp(m, kind, &saved);
    if (rc == OT_OK)
      fprintf(stderr, "[tune] frozen weights kept in %s: %.1f MiB saved\n",
              kind == OT_LOWP_BF16 ? "bf16" : "int8", saved / 1048576.0);
  }
  if (rc == OT_OK && o->middle_noise > 0 && o->frozen) {
    /* a session asks for the noise; a device short of memory still takes part, without it */
    fprintf(stderr,
            "[tune] warning: --frozen keeps the middle in low precision, so it is not perturbed "
            "(--middle-noise %g ignored)\n",
            o->middle_noise);
  } else if (rc == OT_OK && o->middle_noise > 0) {
    res.what = "copying the middle for --middle-noise";
    rc = ot_emu_noise_create(m, &plan, o->middle_noise, o->adapter.seed, &c.noise);
  }
  if (rc == OT_OK) rc = ot_model_prepare(m, batch, T, 1);
  ot_optim_config oc;
  ot_optim_config_default(&oc, OT_OPTIM_ADAMW);
  oc.weight_decay = o->weight_decay;
  oc.grad_clip = o->grad_clip;
  if (rc == OT_OK) rc = ot_optimizer_create(&oc, be, ot_model_param(m, 0), ot_model_param_count(m), &opt);
  c.opt = opt;
  c.best_w.m = m;
  c.init_w.m = m;
  size_t largest = 1;
  for (int i = 0; i < ot_model_param_count(m); i++)
    if (ot_model_param(m, i)->trainable) {
      c.best_w.n += ot_model_param(m, i)->numel;
      if (ot_model_param(m, i)->numel > largest) largest = ot_model_param(m, i)->numel;
    }
  c.init_w.n = c.best_w.n;
  if (rc == OT_OK && !(c.best_w.host = malloc(c.best_w.n * sizeof(float))))
    rc = ot_error(OT_ERR_NOMEM, "cannot allocate");
  c.cur = (weights_copy){m, NULL, c.best_w.n};
  if (rc == OT_OK && c.avg_from &&
      (!(c.avg = calloc(c.cur.n, sizeof(float))) || !(c.cur.host = malloc(c.cur.n * sizeof(float)))))
    rc = ot_error(OT_ERR_NOMEM, "cannot allocate");
  if (rc == OT_OK && o->prox_mu > 0) {
    c.init_w.host = malloc(c.init_w.n * sizeof(float));
    c.host_w = malloc(largest * sizeof(float));
    c.host_g = malloc(largest * sizeof(float));
    if (!c.init_w.host || !c.host_w || !c.host_g) rc = ot_error(OT_ERR_NOMEM, "cannot allocate");
    if (rc == OT_OK) rc = adapter_copy(&c.init_w, 0); /* w_init: the adapter before any step */
  }
  int start = 0;
  if (rc == OT_OK && o->resume && ot_snapshot_exists(o->out)) {
    res.what = "resuming";
    ot_snapshot_state st = {.batch = batch, .seq_len = T, .avg = c.avg, .avg_from = c.avg_from};
    rc = ot_snapshot_load(o->out, m, opt, n_train, &st);
    if (rc == OT_OK) {
      start = st.step;
      c.data->pos = st.pos;
      c.have_best = st.best >= 0;
      c.best = st.best;
      c.bad = st.bad;
    }
    if (rc == OT_OK && c.have_best)
      rc = adapter_copy(&c.best_w, 0); /* best not kept on disk: resume from current */
    if (rc == OT_OK) fprintf(stderr, "[tune] resuming %s at step %d of %d\n", o->out, start, steps);
  }
  c.step = start + (int64_t)o->data_offset_steps; /* a later round draws new noise */
  res.start = start;
  res.n_train = n_train;
  res.n_val = c.val.n;
  if (rc == OT_OK) {
    res.what = "tuning";
    size_t trainable = c.best_w.n;
    fprintf(stderr, "[tune] %s adapter; emulator %d blocks, adapter blocks",
            ot_peft_kind_name(o->adapter.kind), ot_emu_n_layer(&plan));
    for (int i = 0; i < ot_emu_n_layer(&plan); i++)
      if (ot_emu_is_adapter(&plan, i)) fprintf(stderr, " %d", plan.src[i]);
    fprintf(
        stderr,
        " (full-model indices): %zu of %zu parameters train; %zu training tokens, %zu held out; %.1f MiB\n",
        trainable, ot_model_num_params(m), n_train, c.val.n, ot_model_memory_bytes(m) / 1048576.0);
    if (bt.rows_in)
      fprintf(stderr,
              "[tune] supervised examples: %zu rows of %d (loss on completions only), %zu truncated\n",
              bt.n_rows, T, bt.n_truncated);
    if (o->prox_mu > 0) fprintf(stderr, "[tune] FedProx: + (%g/2) ||w - w_round||^2\n", o->prox_mu);
    if (c.noise) {
      int nt;
      size_t ns;
      ot_emu_noise_size(c.noise, &nt, &ns);
      fprintf(stderr,
              "[tune] middle noise: %d matrices (%zu weights) perturbed afresh each step by %g x their rms\n",
              nt, ns, o->middle_noise);
    }
    if (c.avg_from)
      fprintf(stderr, "[tune] the adapter written at the end is the mean of the weights after steps %d..%d\n",
              c.avg_from, steps);
    ot_lr_schedule sched = {o->lr, o->warmup, steps, o->decay, o->min_lr_ratio};
    rc = ot_metrics_open_dir(o->out, o->json ? stdout : NULL, o->metrics_label ? o->metrics_label : "tune",
                             &c.mx);
    ot_train_config tc = {steps,
                          batch,
                          T,
                          sched,
                          o->ckpt_every,
                          save_state,
                          &c,
                          o->json ? NULL : stderr,
                          o->label ? o->label : "tune",
                          on_step,
                          o->prox_mu > 0 || c.noise ? tune_loss_step : NULL,
                          c.mx};
    ot_train_result tr;
    if (rc == OT_OK && start >= steps) {
      fprintf(stderr, "[tune] %s already has %d steps; nothing to do\n", o->out, start);
      res.steps_done = start;
    } else if (rc == OT_OK) {
      rc = ot_train(m, opt, &bt, &tc, start, &tr);
      if (rc == OT_OK) {
        res.trained = 1;
        res.steps_done = tr.steps_done;
        res.last_loss = tr.last_loss;
        res.mean_loss = tr.mean_loss;
        res.tokens_per_s = tr.tokens_per_s;
        res.seconds = tr.seconds;
        res.last_val = c.last_val;
        res.tokens = (uint64_t)(tr.steps_done - start) * (uint64_t)batch * (uint64_t)T;
        static const char *const keys[] = {"steps_done", "steps",        "last_loss", "mean_loss",
                                           "tokens",     "tokens_per_s", "seconds",   "heldout_loss"};
        const double v[] = {
            tr.steps_done,      steps,           tr.last_loss, tr.mean_loss,
            (double)res.tokens, tr.tokens_per_s, tr.seconds,   o->eval_every ? c.last_val : NAN};
        rc = ot_metrics_record(c.mx, "summary", 8, keys, v);
      }
    }
  }
  ot_metrics_close(c.mx);
  free(c.best_w.host);
  free(c.init_w.host);
  free(c.avg);
  free(c.cur.host);
  free(c.host_w);
  free(c.host_g);
  ot_emu_noise_free(c.noise);
  ot_optimizer_free(opt);
  ot_batcher_free(&bt);
  ot_tokens_free(&toks);
  ot_tokenizer_free(tok);
  ot_model_free(m);
  ot_backend_free(be);
  if (rc) {
    out->what = res.what;
    return rc;
  }
  *out = res;
  return OT_OK;
}

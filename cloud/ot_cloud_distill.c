/* offtune-cloud distill: builds the Offsite-Tuning emulator of a full model (layer drop
 * of the middle) and distills its kept middle blocks from the full model on the cloud's
 * public corpus. --out is a loadable emulator package at every checkpoint, plus
 * train_state/ for --resume. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ot_cli.h"
#include "ot_cloud_cmd.h"
#include "ot_data.h"
#include "ot_emulator.h"
#include "ot_error.h"
#include "ot_fileio.h"
#include "ot_eval.h"
#include "ot_snapshot.h"
#include "ot_train.h"

#define N_OPTS(o) ((int)(sizeof(o) / sizeof((o)[0])))

typedef struct {
  const char *out;
  ot_model *full, *student;
  ot_emu_plan *plan;
  const ot_tokenizer *tok;
  ot_optimizer *opt;
  ot_batcher *data;
  ot_distill *d;
  int B, T, steps;
  FILE *log;
  ot_metrics *mx;
  const ot_tokens *gap_toks; /* NULL: no gap measured */
  float target;              /* > 0: stop before the gap falls below it */
  int check_every, saved_step, below;
} distill_ctx;

/* Zero-shot perplexity of m on the gap text, B x T windows (m prepared for them). */
static int gap_ppl(ot_model *m, const distill_ctx *c, double *ppl, int *tokens) {
  ot_eval_result r;
  int rc = ot_eval_data(m, c->gap_toks, c->T, c->B, NULL, &r);
  if (rc == OT_OK) *ppl = r.perplexity, *tokens = (int)r.tokens;
  return rc;
}

/* The emulator package in --out (loadable at every checkpoint) with its measured gap, then
 * the resumable snapshot of the kept middle blocks (train_state/) as one unit. */
static int save_package(distill_ctx *c, int step, int measure) {
  ot_snapshot_state st = {step, c->data->pos, c->data->rng, c->B, c->T, -1.0, 0, NULL, 0};
  int rc = ot_emu_save(c->student, c->plan, c->tok, c->out);
  if (rc == OT_OK) rc = ot_snapshot_save(c->out, c->student, c->opt, &st);
  /* measured once the package is on disk: one that cannot be written costs no evaluation */
  if (rc == OT_OK && measure && c->gap_toks) {
    ot_emu_gap g = c->plan->gap;
    int n;
    if (!(g.full_ppl > 0)) rc = gap_ppl(c->full, c, &g.full_ppl, &n);
    if (rc == OT_OK) rc = gap_ppl(c->student, c, &g.emu_ppl, &g.tokens);
    if (rc == OT_OK) c->plan->gap = g;
    if (rc == OT_OK) rc = ot_emu_write_plan(c->plan, c->out);
  }
  if (rc == OT_OK) c->saved_step = step;
  return rc;
}

static int save_state(void *vctx, int step) {
  distill_ctx *c = vctx;
  /* with a target the package is saved only by check_gap, while its gap still holds */
  return c->target > 0 ? OT_OK : save_package(c, step, step >= c->steps);
}

/* With a target: every check_every steps and at the end, the package is saved while the gap
 * is still >= target; the first check below it stops the run (the last package stays). */
static int check_gap(distill_ctx *c, int step, int *stop) {
  if (step % c->check_every != 0 && step != c->steps) return OT_OK;
  ot_emu_gap g = c->plan->gap;
  int rc = gap_ppl(c->student, c, &g.emu_ppl, &g.tokens);
  if (rc) return rc;
  if (c->log)
    fprintf(c->log, "\n[distill] step %d: gap %.1f%% (target %.1f%%)\n", step, 100 * ot_emu_gap_value(&g),
            100 * c->target);
  if (ot_emu_gap_value(&g) < c->target) {
    c->below = 1;
    *stop = 1;
    return OT_OK;
  }
  c->plan->gap = g;
  return save_package(c, step, 0);
}

static int loss_step(void *vctx, const int32_t *inputs, const int32_t *targets, float *loss) {
  return ot_distill_step(((distill_ctx *)vctx)->d, inputs, targets, loss);
}

static int report_step(void *vctx, int step, float loss, int *stop) {
  distill_ctx *c = vctx;
  float ce, kd;
  ot_distill_last(c->d, &ce, &kd);
  static const char *const keys[] = {"step", "ce", "kd"};
  const double v[] = {step, ce, kd};
  int rc = ot_metrics_record(c->mx, "distill", 3, keys, v);
  if (rc) return rc;
  /* a plain line now and then; the progress bar shows the combined loss */
  if (c->log && (step == 1 || step == c->steps || step % 50 == 0))
    fprintf(c->log, "\n[distill] step %d: loss %.4f = CE %.4f + %.0f x KD %.5f\n", step, loss, ce,
            OT_EMU_KD_WEIGHT, kd);
  return c->target > 0 ? check_gap(c, step, stop) : OT_OK;
}

int ot_cmd_distill(int argc, char **argv) {
  ot_cloud_distill_job j;
  ot_cloud_distill_job_default(&j);
  const char *target = NULL;
  const ot_opt opts[] = {
      {"model", OT_OPT_STR, &j.model, "DIR", "full model checkpoint (the teacher; required)"},
      {"data", OT_OPT_STR, &j.data, "FILE",
       "public text to distill on (offtune-cloud corpus --genres public), or examples (.jsonl)"},
      {"tokens", OT_OPT_STR, &j.tokens, "FILE",
       "public token ids to distill on instead (a model without a tokenizer)"},
      {"out", OT_OPT_STR, &j.out, "DIR", "emulator package to write (required)"},
      {"bottom", OT_OPT_INT, &j.bottom, "A", "bottom adapter blocks (default 2)"},
      {"top", OT_OPT_INT, &j.top, "B", "top adapter blocks (default 2)"},
      {"keep", OT_OPT_INT, &j.keep, "K", "middle blocks kept by the uniform layer drop"},
      {"int8", OT_OPT_FLAG, &j.int8, NULL,
       "store the frozen middle blocks' weights in int8 (one scale per output column): ~4x smaller package"},
      {"drop-ratio", OT_OPT_FLOAT, &j.drop_ratio, "R",
       "fraction of middle blocks dropped (instead of --keep; default 0.5)"},
      {"steps", OT_OPT_INT, &j.steps, "N", "optimizer steps (default 200)"},
      {"batch", OT_OPT_INT, &j.batch, "B", "sequences per step (default 8)"},
      {"seq-len", OT_OPT_INT, &j.seq_len, "T", "tokens per sequence (default: n_positions)"},
      {"lr", OT_OPT_FLOAT, &j.lr, "LR", "AdamW learning rate (default 1e-3, cosine decay)"},
      {"warmup", OT_OPT_INT, &j.warmup, "N", "linear warm-up steps (default 0)"},
      {"ckpt-every", OT_OPT_INT, &j.ckpt_every, "N", "save every N steps (default: at the end)"},
      {"resume", OT_OPT_FLAG, &j.resume, NULL, "continue from --out's train_state if there is one"},
      {"backend", OT_OPT_STR, &j.backend, "NAME", "cpu (default) or cuda"},
      {"threads", OT_OPT_INT, &j.threads, "N", "CPU threads (default: all cores)"},
      {"json", OT_OPT_FLAG, &j.json, NULL,
       "progress and summary as JSON lines on stdout (the records of OUT/metrics.jsonl)"},
      {"gap-data", OT_OPT_STR, &j.gap_data, "FILE",
       "held-out public text (neither model trained on it): the emulator's gap to the full model is\n"
       "measured on it and recorded in emulator.json (offtune-cloud corpus --genres pretrain --part "
       "heldout)"},
      {"target-gap", OT_OPT_STR, &target, "PCT",
       "the gap wanted (e.g. 15%): the most middle blocks (at most --keep, else half) and the most\n"
       "steps (at most --steps) whose emulator is still that much worse on --gap-data"},
  };
  const char *syn =
      "offtune-cloud distill --model DIR (--data FILE | --tokens FILE) --out EMU_DIR "
      "[--bottom A --top B --keep K | --drop-ratio R] [--gap-data FILE [--target-gap PCT]] [options]";
  const char *desc =
      "Builds the emulator: bottom A and top B blocks copied as adapters, the L-A-B middle blocks\n"
      "reduced to K by uniform layer drop, then only the kept middle blocks distilled from the full\n"
      "model: loss = CE + 30 x mean(((h_full - h_emu) / rms(h_full))^2) at the top of the middle.\n"
      "Dropped blocks never reach the package.";
  int rc = ot_cli_parse(argc, argv, opts, N_OPTS(opts));
  if (rc == 1) {
    ot_cli_usage(stdout, syn, desc, opts, N_OPTS(opts));
    return OT_EXIT_OK;
  }
  if (rc == OT_OK && (!j.model || !j.out)) rc = ot_error(OT_ERR_INVALID, "--model and --out are required");
  if (rc == OT_OK && !!j.data == !!j.tokens)
    rc = ot_error(OT_ERR_INVALID, "give exactly one of --data or --tokens");
  if (rc == OT_OK && j.keep && j.drop_ratio >= 0)
    rc = ot_error(OT_ERR_INVALID, "give --keep or --drop-ratio, not both");
  if (rc == OT_OK && target) rc = ot_cmd_parse_gap(target, &j.target_gap);
  if (rc == OT_OK && j.target_gap > 0 && (!j.gap_data || j.resume))
    rc = ot_error(OT_ERR_INVALID, "--target-gap needs --gap-data, and does not resume");
  if (rc == OT_OK &&
      (j.steps < 1 || j.batch < 1 || j.seq_len < 0 || !(j.lr > 0) || j.ckpt_every < 0 || j.warmup < 0))
    rc = ot_error(OT_ERR_INVALID,
                  "need --steps, --batch >= 1, --lr > 0, --seq-len, --ckpt-every, --warmup >= 0");
  if (rc) {
    fprintf(stderr, "offtune-cloud distill: %s\n", ot_error_detail());
    ot_cli_usage(stderr, syn, NULL, opts, N_OPTS(opts));
    return OT_EXIT_USAGE;
  }
  ot_cloud_distill_result res;
  const char *what = NULL;
  rc = ot_cloud_distill(&j, &res, &what);
  if (rc) return ot_cmd_fail(what, rc);
  if (res.steps_done > 0 && !j.json)
    printf("distilled %d steps in %.1f s: CE %.4f | KD %.6f | loss %.4f; emulator saved to %s\n",
           res.steps_done, res.seconds, res.ce, res.kd, res.loss, j.out);
  if (res.gap.tokens > 0 && !j.json)
    printf("emulator gap on %s: %.2f%% (perplexity %.3f vs full %.3f, %d tokens); keep %d, %d distillation "
           "steps%s\n",
           res.gap.text, 100 * ot_emu_gap_value(&res.gap), res.gap.emu_ppl, res.gap.full_ppl, res.gap.tokens,
           res.keep, j.target_gap > 0 ? res.steps_kept : j.steps,
           j.target_gap > 0 ? " (chosen for the target)" : "");
  return OT_EXIT_OK;
}

int ot_cmd_parse_gap(const char *s, float *out) {
  char *end = NULL;
  double v = s ? strtod(s, &end) : 0.0;
  if (end && *end == '%') end++;
  if (!s || end == s || *end || !(v > 0) || !(v < 1000))
    return ot_error(OT_ERR_INVALID, "a gap is a percentage above 0, like 15 or 15%%, not '%s'", s ? s : "");
  *out = (float)(v / 100.0);
  return OT_OK;
}

void ot_cloud_distill_job_default(ot_cloud_distill_job *j) {
  memset(j, 0, sizeof *j);
  j->backend = "cpu";
  j->bottom = j->top = 2;
  j->steps = 200;
  j->batch = 8;
  j->drop_ratio = -1.0f;
  j->lr = 1e-3f;
  j->log = stderr;
}

/* Builds (or, resuming, loads) the emulator of plan, distils it and saves it per the ctx's
 * rules. With a target, *reached = 0 when even the undistilled emulator is within the target
 * (nothing is saved then). */
static int distill_plan(const ot_cloud_distill_job *j, ot_backend *be, ot_model *full,
                        const ot_tokenizer *tok, const ot_tokens *toks, const ot_tokens *gtoks, int T,
                        ot_emu_plan *plan, ot_cloud_distill_result *r, int *reached, const char **what) {
  ot_model *emu = NULL;
  ot_tokenizer *etok = NULL;
  ot_optimizer *opt = NULL;
  ot_distill *d = NULL;
  ot_batcher bt = {0};
  int rc = OT_OK, start = 0, resuming = 0, batch = j->batch, steps = j->steps;
  const char *out = j->out;
  *reached = 1;
  if (j->resume && ot_snapshot_exists(out)) {
    *what = "resuming";
    ot_emu_plan saved;
    rc = ot_emu_load(out, be, &emu, &etok, &saved);
    if (rc == OT_OK && (memcmp(saved.src, plan->src, sizeof plan->src) != 0 || saved.keep != plan->keep ||
                        strcmp(saved.base_digest, plan->base_digest) != 0))
      rc = ot_error(OT_ERR_MISMATCH, "%s holds an emulator of another model or layer plan", out);
    resuming = rc == OT_OK;
  } else {
    *what = "building the emulator";
    rc = ot_emu_build(full, plan, &emu);
  }
  if (rc == OT_OK) rc = ot_batcher_init(&bt, toks, batch, T, 0, 0);
  if (rc == OT_OK) rc = ot_distill_create(full, emu, plan, batch, T, OT_EMU_KD_WEIGHT, &d);
  ot_optim_config oc;
  ot_optim_config_default(&oc, OT_OPTIM_ADAMW);
  oc.grad_clip = 1.0f;
  if (rc == OT_OK) rc = ot_optimizer_create(&oc, be, ot_model_param(emu, 0), ot_model_param_count(emu), &opt);
  if (rc == OT_OK && resuming) {
    /* the snapshot, not the package, holds the state of the last completed step */
    ot_snapshot_state st = {.batch = batch, .seq_len = T};
    rc = ot_snapshot_load(out, emu, opt, toks->n, &st);
    start = st.step;
    bt.pos = st.pos;
    if (rc == OT_OK) fprintf(j->log, "[distill] resuming %s at step %d of %d\n", out, start, steps);
  }
  ot_metrics *mx = NULL;
  distill_ctx ctx = {out,   full,  emu,           plan,
                     tok,   opt,   &bt,           d,
                     batch, T,     steps,         j->json ? NULL : j->log,
                     NULL,  gtoks, j->target_gap, steps / 20 > 0 ? steps / 20 : 1,
                     -1,    0};
  int n_full;
  if (rc == OT_OK && gtoks && j->target_gap > 0 && !(plan->gap.full_ppl > 0)) {
    *what = "measuring the full model on the gap text";
    rc = gap_ppl(full, &ctx, &plan->gap.full_ppl, &n_full);
  }
  if (rc == OT_OK && j->target_gap > 0) { /* the layer-dropped emulator must already be far enough */
    *what = "measuring the emulator's gap";
    rc = gap_ppl(emu, &ctx, &plan->gap.emu_ppl, &plan->gap.tokens);
    if (rc == OT_OK)
      fprintf(j->log, "[distill] keep %d: gap %.2f%% before distillation (target %.2f%%)\n", plan->keep,
              100 * ot_emu_gap_value(&plan->gap), 100 * j->target_gap);
    if (rc == OT_OK && ot_emu_gap_value(&plan->gap) < j->target_gap)
      *reached = 0;
    else if (rc == OT_OK)
      rc = save_package(&ctx, 0, 0);
  }
  if (rc == OT_OK && *reached) {
    *what = "distilling";
    fprintf(j->log, "[distill] %d blocks -> emulator of %d: bottom 0..%d, middle keeps", plan->full_layers,
            ot_emu_n_layer(plan), plan->bottom - 1);
    for (int i = 0; i < plan->keep; i++) fprintf(j->log, " %d", plan->src[plan->bottom + i]);
    fprintf(j->log, " of %d..%d, top %d..%d; %zu tokens, %d steps of %d x %d\n", plan->bottom,
            plan->full_layers - plan->top - 1, plan->full_layers - plan->top, plan->full_layers - 1, toks->n,
            steps, batch, T);
    rc = ot_metrics_open_dir(out, j->json ? stdout : NULL, "distill", &mx);
    ctx.mx = mx;
    ot_lr_schedule sched = {j->lr, j->warmup, steps, OT_LR_COSINE, 0.1f};
    ot_train_config tc = {steps,         batch,       T,         sched,
                          j->ckpt_every, save_state,  &ctx,      j->json ? NULL : j->log,
                          "distill",     report_step, loss_step, mx};
    ot_train_result tr;
    if (rc == OT_OK && start >= steps) {
      fprintf(j->log, "[distill] %s already has %d steps; nothing to do\n", out, start);
      if (gtoks) rc = save_package(&ctx, start, 1); /* the gap, measured now */
    } else if (rc == OT_OK) {
      rc = ot_train(emu, opt, &bt, &tc, start, &tr);
      if (rc == OT_OK) {
        r->steps_done = tr.steps_done - start;
        r->seconds = tr.seconds;
        r->loss = tr.last_loss;
        ot_distill_last(d, &r->ce, &r->kd);
        r->steps_kept = ctx.saved_step;
        static const char *const keys[] = {"steps_done",   "steps",   "loss", "ce",  "kd",
                                           "tokens_per_s", "seconds", "keep", "gap", "steps_kept"};
        const double v[] = {
            tr.steps_done, steps,      r->loss,
            r->ce,         r->kd,      tr.tokens_per_s,
            r->seconds,    plan->keep, plan->gap.tokens > 0 ? ot_emu_gap_value(&plan->gap) : -1.0,
            ctx.saved_step};
        rc = ot_metrics_record(mx, "summary", 10, keys, v);
      }
    }
    ot_metrics_close(mx);
  }
  r->keep = plan->keep;
  r->gap = plan->gap;
  ot_optimizer_free(opt);
  ot_batcher_free(&bt);
  ot_distill_free(d);
  ot_model_free(emu);
  ot_tokenizer_free(etok);
  return rc;
}

int ot_cloud_distill(const ot_cloud_distill_job *j, ot_cloud_distill_result *res, const char **what) {
  ot_cloud_distill_result r;
  memset(&r, 0, sizeof r);
  ot_backend *be = NULL;
  ot_model *full = NULL;
  ot_tokenizer *tok = NULL;
  ot_emu_plan plan;
  ot_tokens toks = {NULL, 0, NULL}, gtoks = {NULL, 0, NULL};
  *what = "loading the model";
  if (j->target_gap > 0 && (!j->gap_data || j->resume))
    return ot_error(OT_ERR_INVALID, "a target gap needs held-out text to measure it on, and no resume");
  int rc = ot_cmd_load_model(j->model, j->backend, j->threads, &be, &full, &tok);
  if (rc) return rc;
  int keep = j->keep;
  const ot_model_config *fc = ot_model_cfg(full);
  int T = j->seq_len ? j->seq_len : fc->n_positions;
  if (T > fc->n_positions)
    rc = ot_error(OT_ERR_INVALID, "--seq-len %d exceeds n_positions %d", T, fc->n_positions);
  *what = "planning the emulator";
  if (rc == OT_OK && !keep)
    rc = ot_emu_keep_for_ratio(fc->n_layer, j->bottom, j->top, j->drop_ratio >= 0 ? j->drop_ratio : 0.5f,
                               &keep);
  if (rc == OT_OK) rc = ot_emu_plan_make(fc->n_layer, j->bottom, j->top, keep, &plan);
  char digest[OT_DIGEST_HEX] = "";
  if (rc == OT_OK) rc = ot_model_dir_digest(j->model, digest);
  if (rc == OT_OK) {
    *what = "reading the data";
    rc = j->data ? ot_tokenizer_require(tok, j->model, "give token ids with --tokens FILE") : OT_OK;
    if (rc == OT_OK) rc = ot_tokens_load_input(j->data, j->tokens, tok, fc->vocab_size, &toks);
    if (rc == OT_OK && !toks.mask && toks.n < (size_t)j->batch * T + 1)
      rc = ot_error(OT_ERR_INVALID, "%s: %zu tokens, a step needs %d", j->data ? j->data : j->tokens, toks.n,
                    j->batch * T + 1);
    if (rc == OT_OK && j->gap_data)
      rc = ot_tokenizer_require(tok, j->model, "the gap text needs a tokenizer");
    if (rc == OT_OK && j->gap_data) rc = ot_tokens_load_input(j->gap_data, NULL, tok, fc->vocab_size, &gtoks);
    if (rc == OT_OK && j->gap_data && gtoks.n < 2)
      rc = ot_error(OT_ERR_INVALID, "%s: too little text to measure a gap on", j->gap_data);
  }
  ot_emu_gap gap = {0.0, 0.0, j->target_gap, 0, ""};
  if (j->gap_data) {
    const char *base = strrchr(j->gap_data, '/');
    snprintf(gap.text, sizeof gap.text, "%s", base ? base + 1 : j->gap_data);
  }
  /* with a target, the most middle blocks first: the most faithful emulator that is still far
   * enough from the full model */
  int reached = 0;
  for (int k = keep; rc == OT_OK && k >= 1 && !reached; k--) {
    rc = ot_emu_plan_make(fc->n_layer, j->bottom, j->top, k, &plan);
    plan.int8_middle = j->int8;
    memcpy(plan.base_digest, digest, sizeof digest);
    if (ot_path_basename(j->model, plan.base_name, sizeof plan.base_name) != OT_OK)
      plan.base_name[0] = '\0'; /* adapters' base_model_name_or_path: unknown (null) rather than cut */
    plan.gap = gap;
    if (rc == OT_OK)
      rc = distill_plan(j, be, full, tok, &toks, j->gap_data ? &gtoks : NULL, T, &plan, &r, &reached, what);
    gap.full_ppl = plan.gap.full_ppl; /* measured once */
    if (j->target_gap <= 0) break;
  }
  if (rc == OT_OK && !reached)
    rc = ot_error(
        OT_ERR_INVALID,
        "no emulator of %d middle blocks or fewer is %.1f%% worse than the full model on %s (keeping "
        "1 block, undistilled: %.1f%%): ask for a smaller gap or drop fewer adapter blocks",
        keep, 100 * j->target_gap, gap.text, 100 * ot_emu_gap_value(&r.gap));
  ot_tokens_free(&gtoks);
  ot_tokens_free(&toks);
  ot_model_free(full);
  ot_tokenizer_free(tok);
  ot_backend_free(be);
  if (rc == OT_OK) *res = r;
  return rc;
}

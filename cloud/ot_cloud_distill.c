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
#include "ot_snapshot.h"
#include "ot_train.h"

#define N_OPTS(o) ((int)(sizeof(o) / sizeof((o)[0])))

typedef struct {
  const char *out;
  ot_model *student;
  const ot_emu_plan *plan;
  const ot_tokenizer *tok;
  ot_optimizer *opt;
  ot_batcher *data;
  ot_distill *d;
  int B, T, steps;
  FILE *log;
  ot_metrics *mx;
} distill_ctx;

/* The emulator package in --out (loadable at every checkpoint), then the resumable
 * snapshot of the kept middle blocks (train_state/) as one unit. */
static int save_state(void *vctx, int step) {
  distill_ctx *c = vctx;
  ot_snapshot_state st = {step, c->data->pos, c->data->rng, c->B, c->T, -1.0, 0};
  int rc = ot_emu_save(c->student, c->plan, c->tok, c->out);
  if (rc == OT_OK) rc = ot_snapshot_save(c->out, c->student, c->opt, &st);
  return rc;
}

static int loss_step(void *vctx, const int32_t *inputs, const int32_t *targets, float *loss) {
  return ot_distill_step(((distill_ctx *)vctx)->d, inputs, targets, loss);
}

static int report_step(void *vctx, int step, float loss, int *stop) {
  distill_ctx *c = vctx;
  (void)stop;
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
  return OT_OK;
}

int ot_cmd_distill(int argc, char **argv) {
  ot_cloud_distill_job j;
  ot_cloud_distill_job_default(&j);
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
  };
  const char *syn = "offtune-cloud distill --model DIR (--data FILE | --tokens FILE) --out EMU_DIR "
                    "[--bottom A --top B --keep K | --drop-ratio R] [options]";
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
  return OT_EXIT_OK;
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

int ot_cloud_distill(const ot_cloud_distill_job *j, ot_cloud_distill_result *res, const char **what) {
  ot_cloud_distill_result r = {0, 0.0, 0.0f, 0.0f, 0.0f};
  ot_backend *be = NULL;
  ot_model *full = NULL, *emu = NULL;
  ot_tokenizer *tok = NULL, *etok = NULL;
  ot_emu_plan plan;
  ot_tokens toks = {NULL, 0, NULL};
  ot_optimizer *opt = NULL;
  ot_distill *d = NULL;
  *what = "loading the model";
  int rc = ot_cmd_load_model(j->model, j->backend, j->threads, &be, &full, &tok);
  if (rc) return rc;
  int keep = j->keep, batch = j->batch, steps = j->steps;
  const char *out = j->out;
  const ot_model_config *fc = ot_model_cfg(full);
  int T = j->seq_len ? j->seq_len : fc->n_positions;
  if (T > fc->n_positions)
    rc = ot_error(OT_ERR_INVALID, "--seq-len %d exceeds n_positions %d", T, fc->n_positions);
  *what = "planning the emulator";
  if (rc == OT_OK && !keep)
    rc = ot_emu_keep_for_ratio(fc->n_layer, j->bottom, j->top, j->drop_ratio >= 0 ? j->drop_ratio : 0.5f,
                               &keep);
  if (rc == OT_OK) rc = ot_emu_plan_make(fc->n_layer, j->bottom, j->top, keep, &plan);
  plan.int8_middle = j->int8;
  if (rc == OT_OK) rc = ot_model_dir_digest(j->model, plan.base_digest);
  if (rc == OT_OK && ot_path_basename(j->model, plan.base_name, sizeof plan.base_name) != OT_OK)
    plan.base_name[0] = '\0'; /* adapters' base_model_name_or_path: unknown (null) rather than cut */
  int start = 0;
  if (rc == OT_OK) {
    *what = "reading the data";
    rc = j->data ? ot_tokenizer_require(tok, j->model, "give token ids with --tokens FILE") : OT_OK;
    if (rc == OT_OK) rc = ot_tokens_load_input(j->data, j->tokens, tok, fc->vocab_size, &toks);
    if (rc == OT_OK && !toks.mask && toks.n < (size_t)batch * T + 1)
      rc = ot_error(OT_ERR_INVALID, "%s: %zu tokens, a step needs %d", j->data ? j->data : j->tokens, toks.n,
                    batch * T + 1);
  }
  int resuming = 0;
  if (rc == OT_OK && j->resume && ot_snapshot_exists(out)) {
    *what = "resuming";
    ot_emu_plan saved;
    rc = ot_emu_load(out, be, &emu, &etok, &saved);
    if (rc == OT_OK && (memcmp(saved.src, plan.src, sizeof plan.src) != 0 || saved.keep != plan.keep ||
                        strcmp(saved.base_digest, plan.base_digest) != 0))
      rc = ot_error(OT_ERR_MISMATCH, "%s holds an emulator of another model or layer plan", out);
    resuming = rc == OT_OK;
  } else if (rc == OT_OK) {
    *what = "building the emulator";
    rc = ot_emu_build(full, &plan, &emu);
  }
  ot_batcher bt = {0};
  if (rc == OT_OK) rc = ot_batcher_init(&bt, &toks, batch, T, 0, 0);
  if (rc == OT_OK) rc = ot_distill_create(full, emu, &plan, batch, T, OT_EMU_KD_WEIGHT, &d);
  ot_optim_config oc;
  ot_optim_config_default(&oc, OT_OPTIM_ADAMW);
  oc.grad_clip = 1.0f;
  if (rc == OT_OK) rc = ot_optimizer_create(&oc, be, ot_model_param(emu, 0), ot_model_param_count(emu), &opt);
  if (rc == OT_OK && resuming) {
    /* the snapshot, not the package, holds the state of the last completed step */
    ot_snapshot_state st = {.batch = batch, .seq_len = T};
    rc = ot_snapshot_load(out, emu, opt, toks.n, &st);
    start = st.step;
    bt.pos = st.pos;
    if (rc == OT_OK) fprintf(j->log, "[distill] resuming %s at step %d of %d\n", out, start, steps);
  }
  if (rc == OT_OK) {
    *what = "distilling";
    fprintf(j->log, "[distill] %d blocks -> emulator of %d: bottom 0..%d, middle keeps", fc->n_layer,
            ot_emu_n_layer(&plan), j->bottom - 1);
    for (int i = 0; i < keep; i++) fprintf(j->log, " %d", plan.src[j->bottom + i]);
    fprintf(j->log, " of %d..%d, top %d..%d; %zu tokens, %d steps of %d x %d\n", j->bottom,
            fc->n_layer - j->top - 1, fc->n_layer - j->top, fc->n_layer - 1, toks.n, steps, batch, T);
    ot_metrics *mx = NULL;
    rc = ot_metrics_open_dir(out, j->json ? stdout : NULL, "distill", &mx);
    distill_ctx ctx = {out, emu, &plan, tok, opt, &bt, d, batch, T, steps, j->json ? NULL : j->log, mx};
    ot_lr_schedule sched = {j->lr, j->warmup, steps, OT_LR_COSINE, 0.1f};
    ot_train_config tc = {steps,         batch,       T,         sched,
                          j->ckpt_every, save_state,  &ctx,      j->json ? NULL : j->log,
                          "distill",     report_step, loss_step, mx};
    ot_train_result tr;
    if (rc == OT_OK && start >= steps) {
      fprintf(j->log, "[distill] %s already has %d steps; nothing to do\n", out, start);
    } else if (rc == OT_OK) {
      rc = ot_train(emu, opt, &bt, &tc, start, &tr);
      if (rc == OT_OK) {
        r.steps_done = tr.steps_done - start;
        r.seconds = tr.seconds;
        r.loss = tr.last_loss;
        ot_distill_last(d, &r.ce, &r.kd);
        static const char *const keys[] = {"steps_done", "steps",        "loss",   "ce",
                                           "kd",         "tokens_per_s", "seconds"};
        const double v[] = {tr.steps_done, steps, r.loss, r.ce, r.kd, tr.tokens_per_s, r.seconds};
        rc = ot_metrics_record(mx, "summary", 7, keys, v);
      }
    }
    ot_metrics_close(mx);
  }
  ot_optimizer_free(opt);
  ot_batcher_free(&bt);
  ot_distill_free(d);
  ot_tokens_free(&toks);
  ot_model_free(emu);
  ot_model_free(full);
  ot_tokenizer_free(etok);
  ot_tokenizer_free(tok);
  ot_backend_free(be);
  if (rc == OT_OK) *res = r;
  return rc;
}

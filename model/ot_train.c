#include "ot_train.h"

#include <stdlib.h>

#include "ot_cli.h"
#include "ot_error.h"

int ot_train(ot_model *m, ot_optimizer *opt, ot_batcher *data, const ot_train_config *cfg, int start_step,
             ot_train_result *out) {
  size_t n = (size_t)cfg->B * cfg->T;
  int32_t *in = malloc(n * sizeof(int32_t)), *tg = malloc(n * sizeof(int32_t));
  if (!in || !tg) {
    free(in);
    free(tg);
    return ot_error(OT_ERR_NOMEM, "cannot allocate batch");
  }
  enum { WINDOW = 50 };
  float recent[WINDOW];
  int n_recent = 0;
  ot_progress prog;
  if (cfg->progress) ot_progress_start(&prog, cfg->progress, cfg->label ? cfg->label : "train", cfg->steps);
  double t0 = ot_now();
  float loss = 0.0f;
  int rc = OT_OK, step;
  for (step = start_step; step < cfg->steps && rc == OT_OK; step++) {
    ot_batcher_next(data, in, tg);
    ot_model_set_step(m, (uint64_t)step); /* dropout masks follow the step, so a resumed run matches */
    /* gradients start at zero: prepare zeroes them and every optimizer step consumes them */
    if (cfg->loss_step) {
      rc = cfg->loss_step(cfg->ctx, in, tg, &loss);
    } else {
      rc = ot_model_forward(m, in, tg, cfg->B, cfg->T, &loss);
      if (rc == OT_OK) rc = ot_model_backward(m);
    }
    float lr = ot_lr_at(&cfg->sched, step), gnorm = 0.0f;
    if (rc == OT_OK) rc = ot_optimizer_step(opt, lr, &gnorm);
    if (rc) break;
    recent[n_recent++ % WINDOW] = loss;
    double dt = ot_now() - t0, tps = (double)(step + 1 - start_step) * n / (dt > 0 ? dt : 1e-9);
    if (cfg->progress) {
      char extra[128];
      snprintf(extra, sizeof extra, "loss %.4f | lr %.2e | |g| %.2f | %.0f tok/s", loss, lr, gnorm, tps);
      ot_progress_update(&prog, step + 1, extra);
    }
    ot_metrics_step rec = {step + 1, cfg->steps, loss, lr, gnorm, (double)n, tps, dt};
    if (cfg->metrics) rc = ot_metrics_write_step(cfg->metrics, &rec);
    if (rc) break;
    int stop = 0;
    if (cfg->on_step) rc = cfg->on_step(cfg->ctx, step + 1, loss, &stop);
    if (rc == OT_OK && stop) {
      step++;
      break;
    }
    if (rc == OT_OK && cfg->checkpoint && cfg->ckpt_every > 0 && (step + 1) % cfg->ckpt_every == 0 &&
        step + 1 < cfg->steps)
      rc = cfg->checkpoint(cfg->ctx, step + 1);
  }
  double dt = ot_now() - t0;
  if (rc == OT_OK && cfg->checkpoint) rc = cfg->checkpoint(cfg->ctx, step);
  if (cfg->progress) ot_progress_finish(&prog, rc == OT_OK ? "done" : "failed");
  free(in);
  free(tg);
  if (rc) return rc;
  int k = n_recent < WINDOW ? n_recent : WINDOW;
  double mean = 0.0;
  for (int i = 0; i < k; i++) mean += recent[i];
  out->steps_done = step;
  out->last_loss = loss;
  out->mean_loss = k ? mean / k : 0.0;
  out->seconds = dt;
  out->tokens_per_s = dt > 0 ? (double)(step - start_step) * n / dt : 0.0;
  return OT_OK;
}

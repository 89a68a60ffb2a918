/* The training loop shared by pre-training, full fine-tuning and (later) adapter
 * tuning: batches -> forward -> backward -> optimizer, with a schedule, a progress
 * bar and periodic checkpoints through a callback. */
#ifndef OT_TRAIN_H
#define OT_TRAIN_H

#include <stdio.h>

#include "ot_data.h"
#include "ot_metrics.h"
#include "ot_model.h"
#include "ot_optim.h"

typedef struct {
  int steps; /* the step count to reach (a resumed run starts above 0) */
  int B, T;
  ot_lr_schedule sched;
  int ckpt_every;                         /* 0: only at the end */
  int (*checkpoint)(void *ctx, int step); /* may be NULL */
  void *ctx;
  FILE *progress; /* NULL: quiet */
  const char *label;
  /* After each step s (1-based count), may be NULL: evaluation, early stopping. Setting
   * *stop ends the run after this step (the final checkpoint is still written). */
  int (*on_step)(void *ctx, int step, float loss, int *stop);
  /* May be NULL: replaces forward + zero_grad + backward for losses beyond next-token
   * cross-entropy (distillation); must leave the gradients of the step in the model. */
  int (*loss_step)(void *ctx, const int32_t *inputs, const int32_t *targets, float *loss);
  /* May be NULL: gets a "step" record after every step (ot_metrics.h): the one place the
   * training commands' metrics are written. */
  ot_metrics *metrics;
} ot_train_config;

typedef struct {
  int steps_done;
  float last_loss;
  double mean_loss; /* over the last min(50, steps) steps */
  double tokens_per_s;
  double seconds;
} ot_train_result;

/* Runs steps start_step .. cfg->steps-1. The model must be prepared for training with
 * B x T; the optimizer made on its parameters. */
int ot_train(ot_model *m, ot_optimizer *opt, ot_batcher *data, const ot_train_config *cfg, int start_step,
             ot_train_result *out);

#endif

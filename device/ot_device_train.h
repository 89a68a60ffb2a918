/* The device's local trainer, shared by `offtune-device tune` (offline) and
 * `offtune-device run` (one call per session round): only the adapter trains on the
 * emulator; the data stays in this process. */
#ifndef OT_DEVICE_TRAIN_H
#define OT_DEVICE_TRAIN_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "ot_emulator.h"
#include "ot_optim.h"

typedef struct {
  const char *emulator;     /* emulator package directory */
  const char *init_adapter; /* start from this adapter (same kind and settings); NULL: fresh */
  ot_peft_config adapter;
  const char *text, *tokens; /* exactly one: private text or token ids */
  const char *out;           /* adapter directory written (plus train_state/) */
  int steps, batch, seq_len; /* seq_len 0: n_positions */
  float lr, weight_decay, grad_clip;
  int warmup, eval_every, patience, ckpt_every, resume;
  ot_lr_decay decay; /* after warm-up: OT_LR_CONSTANT (default), linear or cosine to min_lr_ratio x lr */
  float min_lr_ratio;
  /* FedProx (Li et al. 2020): the loss gets (mu/2) ||w - w_init||^2 over the adapter's
   * tensors, w_init = the adapter the round started from; 0 = off. */
  float prox_mu;
  /* Each step sees the emulator's middle plus fresh Gaussian noise of this x each matrix's rms
   * (ot_emu_noise_create), so the adapter cannot fit the emulator's own middle; 0 = off. */
  float middle_noise;
  /* Tail averaging: the adapter written at the end is the mean of its weights after each of the
   * last N steps (1 <= N <= steps; checkpoints before the end hold the running weights, and
   * train_state/ always does, with the mean, so a resumed or extended run goes on from them);
   * 0 = off. Not with eval_every, whose early stopping keeps the best weights instead. */
  int average_last;
  uint64_t data_offset_steps; /* the batches start where this many earlier steps left off */
  const char *backend;        /* "cpu" (default) or "cuda" */
  int threads;
  int frozen;        /* the emulator's frozen linear weights: 0 fp32, 1 bf16, 2 int8 (ot_model_freeze_lowp) */
  const char *label; /* progress bar label (default "tune") */
  /* Records go to OUT/metrics.jsonl always (ot_metrics.h); json: echoed on stdout as JSON lines
   * instead of the progress bar. metrics_label: the records' label (default "tune"). */
  int json;
  const char *metrics_label;
} ot_dev_train_opts;

void ot_dev_train_opts_default(ot_dev_train_opts *o);
/* --frozen: "fp32" (0), "bf16" (1) or "int8" (2). */
int ot_dev_parse_frozen(const char *name, int *frozen);
/* average_last within 0..steps, and not with eval_every; OT_ERR_INVALID otherwise. */
int ot_dev_check_average(int average_last, int steps, int eval_every);

typedef struct {
  int start, steps_done, trained; /* trained = 0: the snapshot already had every step */
  float last_loss;
  double mean_loss, tokens_per_s, seconds;
  double last_val; /* held-out loss (eval_every) */
  uint64_t tokens; /* tokens trained on by this call: steps x batch x seq_len */
  size_t n_train, n_val;
  const char *what; /* on failure: the phase that failed ("loading the emulator", ...) */
} ot_dev_train_result;

/* Loads an emulator package on a fresh backend ("cpu" or "cuda"; threads 0 = all). */
int ot_dev_load_emulator(const char *dir, const char *backend, int threads, ot_backend **be, ot_model **m,
                         ot_tokenizer **tok, ot_emu_plan *plan);

/* Trains and writes the adapter to o->out. Progress bar and notes on stderr. */
int ot_dev_train(const ot_dev_train_opts *o, ot_dev_train_result *res);

#endif

/* Optimizers (AdamW and SGD with PyTorch semantics), global-norm gradient clipping
 * and learning-rate schedules. An optimizer updates the trainable ot_param tensors
 * it was created with; its state lives in one backend allocation. */
#ifndef OT_OPTIM_H
#define OT_OPTIM_H

#include <stddef.h>

#include "ot_backend.h"
#include "ot_model.h"

typedef enum { OT_OPTIM_ADAMW = 0, OT_OPTIM_SGD = 1 } ot_optim_kind;

typedef struct {
  ot_optim_kind kind;
  float beta1, beta2, eps; /* AdamW: 0.9, 0.999, 1e-8 */
  float momentum;          /* SGD: 0 */
  float weight_decay;      /* applied to tensors with decay set; default 0 */
  float grad_clip;         /* max global L2 norm; 0 = no clipping */
} ot_optim_config;

void ot_optim_config_default(ot_optim_config *c, ot_optim_kind kind);
int ot_optim_parse_kind(const char *name, ot_optim_kind *out);

typedef struct ot_optimizer ot_optimizer;

/* Takes every trainable tensor of params[0..n) that has a gradient. */
int ot_optimizer_create(const ot_optim_config *cfg, ot_backend *be, ot_param *params, int n,
                        ot_optimizer **out);
void ot_optimizer_free(ot_optimizer *o);
/* One update at learning rate lr; reports the gradient norm before clipping (NULL: not
 * computed unless clipping needs it). The step consumes the gradients: they are zero
 * afterwards, ready to accumulate the next backward. */
int ot_optimizer_step(ot_optimizer *o, float lr, float *grad_norm);
int ot_optimizer_steps_done(const ot_optimizer *o);
/* Optimizer state as named host copies for checkpoints: "<param>.m", "<param>.v"
 * (AdamW) or "<param>.momentum" (SGD), plus the step count. */
int ot_optimizer_save(const ot_optimizer *o, const char *path);
int ot_optimizer_load(ot_optimizer *o, const char *path);

typedef enum { OT_LR_CONSTANT = 0, OT_LR_LINEAR = 1, OT_LR_COSINE = 2 } ot_lr_decay;

typedef struct {
  float lr;         /* peak learning rate */
  int warmup_steps; /* linear warm-up from lr/warmup to lr */
  int total_steps;  /* decay ends here */
  ot_lr_decay decay;
  float min_lr_ratio; /* floor of the decay, as a fraction of lr */
} ot_lr_schedule;

int ot_lr_parse_decay(const char *name, ot_lr_decay *out);
/* Learning rate at step s (0-based). */
float ot_lr_at(const ot_lr_schedule *s, int step);

#endif

/* Offsite-Tuning emulator (Xiao, Lin, Han 2023): the full model's L blocks split into
 * a bottom adapter (a blocks), a middle (n = L-a-b) and a top adapter (b blocks); the
 * middle compressed by uniform layer drop to k blocks and distilled from the full model;
 * adapters tuned on the emulator plug back into the full model.
 *
 * Emulator package (a directory): config.json (n_layer = a+k+b), model.safetensors (the
 * emulator's own blocks 0..a+k+b-1; dropped blocks never leave the cloud), the full
 * model's tokenizer files if it has any, and emulator.json (format_version 1, base_model_digest,
 * full_n_layer, bottom, top, kept_middle, block_source, optional measured_gap {text, tokens,
 * full_perplexity, emulator_perplexity, gap, target}, optional base_model_name).
 * Adapters of every kind (offsite blocks included) are peft/'s: ot_emu_peft_map says where the
 * emulator's blocks sit in the full model. */
#ifndef OT_EMULATOR_H
#define OT_EMULATOR_H

#include <stdint.h>

#include "ot_digest.h"
#include "ot_model.h"
#include "ot_peft.h"
#include "ot_tokenizer.h"

#define OT_EMU_MAX_LAYERS 256
#define OT_EMU_KD_WEIGHT 30.0f
#define OT_EMU_KD_EPS 1e-6f /* added to rms(h_teacher); keeps an all-zero row finite */

/* Kept middle blocks as full-model block indices: of the n = L-a-b middle blocks keep
 * a + round(i*(n-1)/(k-1)), i = 0..k-1 (k = 1 keeps the first). kept has k entries.
 * Needs a, b >= 0, n >= 1, 1 <= k <= n. */
int ot_emu_layer_drop(int L, int a, int b, int k, int *kept);
/* k for a drop ratio r in [0,1): round(n*(1-r)), at least 1. */
int ot_emu_keep_for_ratio(int L, int a, int b, float r, int *k);

/* What the emulator gives away, measured by the cloud: perplexity of the full model and of the
 * emulator (zero-shot) on held-out public text that neither was trained on. gap = emulator /
 * full - 1 (0.15: the emulator is 15% worse). tokens 0: not measured. */
typedef struct {
  double full_ppl, emu_ppl;
  double target; /* the gap the operator asked for (--target-gap), 0 = none */
  int tokens;    /* targets scored */
  char text[64]; /* which text: a file's base name */
} ot_emu_gap;
static inline double ot_emu_gap_value(const ot_emu_gap *g) { return g->emu_ppl / g->full_ppl - 1.0; }

typedef struct {
  int full_layers;                 /* L */
  int bottom, top, keep;           /* a, b, k */
  int src[OT_EMU_MAX_LAYERS];      /* full block of each emulator block (a+k+b entries) */
  char base_digest[OT_DIGEST_HEX]; /* of the full model.safetensors; "" if unknown */
  char base_name[128];             /* the full model's name (adapters' base_model_name_or_path) */
  int int8_middle;                 /* package stores the frozen middle blocks' weights in int8 */
  ot_emu_gap gap;                  /* emulator.json "measured_gap" when gap.tokens > 0 */
} ot_emu_plan;

int ot_emu_plan_make(int L, int a, int b, int k, ot_emu_plan *out);
static inline int ot_emu_n_layer(const ot_emu_plan *p) { return p->bottom + p->keep + p->top; }
/* 1 if emulator block i is an adapter block (bottom or top). */
static inline int ot_emu_is_adapter(const ot_emu_plan *p, int i) {
  return i < p->bottom || i >= p->bottom + p->keep;
}

/* The emulator model: copies of the full model's blocks per plan, embeddings and ln_f. */
int ot_emu_build(ot_model *full, const ot_emu_plan *p, ot_model **out);

typedef enum { OT_EMU_TRAIN_MIDDLE = 0, OT_EMU_TRAIN_ADAPTER = 1 } ot_emu_part;
/* Freezes everything but the emulator's middle blocks (distillation) or adapter blocks
 * (device tuning). Call before ot_model_prepare. */
void ot_emu_set_trainable(ot_model *emu, const ot_emu_plan *p, ot_emu_part part);

/* tok may be NULL (a model without a tokenizer): the package then has no tokenizer files. */
int ot_emu_save(const ot_model *emu, const ot_emu_plan *p, const ot_tokenizer *tok, const char *dir);
/* Rewrites the package's emulator.json alone (its weights as they are): the measured gap. */
int ot_emu_write_plan(const ot_emu_plan *p, const char *dir);
/* Reads emulator.json (validated against itself). */
int ot_emu_plan_load(const char *dir, ot_emu_plan *out);
/* Loads an emulator package; checks config.json's n_layer against emulator.json. *tok is
 * NULL when the package has no tokenizer files (ot_tokenizer_load_dir_optional). */
int ot_emu_load(const char *dir, ot_backend *be, ot_model **m, ot_tokenizer **tok, ot_emu_plan *p);

/* ---- distillation ---------------------------------------------------------------- */

/* Teacher = full model (inference), student = emulator with only its middle trainable,
 * same inputs. loss = CE(student) + kd_weight * mean over B*T*C of
 * ((h_T - h_S) / rms(h_T))^2, h_T = teacher output of full block a+n-1, h_S = student
 * output of block a+k-1. Creating prepares both models for B x T. */
typedef struct ot_distill ot_distill;
int ot_distill_create(ot_model *teacher, ot_model *student, const ot_emu_plan *p, int B, int T,
                      float kd_weight, ot_distill **out);
void ot_distill_free(ot_distill *d);
/* Forward of both, the combined loss and the student's gradients (zeroed first);
 * an ot_train_config.loss_step (ctx = the ot_distill). */
int ot_distill_step(void *d, const int32_t *inputs, const int32_t *targets, float *loss);
/* Parts of the last step: cross-entropy and the unweighted KD mean. */
void ot_distill_last(const ot_distill *d, float *ce, float *kd);

/* ---- a middle perturbed afresh each step (device tuning) --------------------------- */

/* An adapter tuned against one fixed middle fits that middle's particular errors: the emulator
 * fine-tuned then beats the adapter plugged into the full model (docs/emulator.md, "Tuning
 * against a moving middle"). With a noise handle each training step sees the middle's frozen
 * matrices plus fresh Gaussian noise of `scale` x each matrix's rms, so the adapter learns only
 * what works across middles. The noise of a step is a function of (seed, step): a resumed run
 * sees the same. The middle must be fp32 (not ot_model_freeze_lowp) and frozen. */
typedef struct ot_emu_noise ot_emu_noise;
/* Keeps a host copy of the middle's matrices; scale > 0. */
int ot_emu_noise_create(ot_model *emu, const ot_emu_plan *p, float scale, uint64_t seed, ot_emu_noise **out);
void ot_emu_noise_free(ot_emu_noise *n);
/* Writes the middle of `step` (perturbed) or the middle as loaded (restore). */
int ot_emu_noise_apply(ot_emu_noise *n, int64_t step);
int ot_emu_noise_restore(ot_emu_noise *n);
/* Matrices perturbed and their scalars. */
void ot_emu_noise_size(const ot_emu_noise *n, int *tensors, size_t *scalars);

/* Where the emulator's blocks sit in the full model, for peft/ (adapter blocks = bottom and
 * top): fills *m and returns it. */
const ot_peft_map *ot_emu_peft_map(const ot_emu_plan *p, ot_peft_map *m);

#endif

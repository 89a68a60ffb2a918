/* Resumable training snapshots. <out>/train_state holds the trainable weights, the
 * optimizer state and the loop state (state.json). A new snapshot is written into a
 * fresh directory and swapped in whole (renameat2 RENAME_EXCHANGE), so a process killed
 * at any moment leaves the previous snapshot or the new one, never a mix of the two. */
#ifndef OT_SNAPSHOT_H
#define OT_SNAPSHOT_H

#include <stddef.h>
#include <stdint.h>

#include "ot_model.h"
#include "ot_optim.h"

typedef struct {
  int step;     /* optimizer steps done */
  size_t pos;   /* batcher position */
  uint64_t rng; /* batcher RNG state (shuffle) */
  int batch, seq_len;
  double best; /* early stopping: best held-out loss, < 0 when none yet */
  int bad;     /* evaluations without improvement */
  /* Weight averaging (may be off): avg is the caller's host array of the trainable tensors'
   * total size, the running mean over the weights after steps avg_from .. step; avg_from 0:
   * no averaging. On load avg and avg_from are inputs (they must match the saved run's) and
   * avg receives the saved mean. */
  float *avg;
  int avg_from;
} ot_snapshot_state;

/* 1 if <out>/train_state holds a complete snapshot. */
int ot_snapshot_exists(const char *out);
/* Writes the trainable tensors of m, the optimizer state, st and the running mean of
 * the weights (once st->step reaches st->avg_from) as one unit. */
int ot_snapshot_save(const char *out, ot_model *m, const ot_optimizer *opt, const ot_snapshot_state *st);
/* Restores a snapshot into m's trainable tensors and opt. st->batch and st->seq_len are
 * inputs (they must match the saved run); the rest is filled in. A saved position at or
 * past n_tokens, a missing or differently shaped tensor, another optimizer, or a running mean
 * that another averaging window would not have (st->avg_from) is an error. */
int ot_snapshot_load(const char *out, ot_model *m, ot_optimizer *opt, size_t n_tokens, ot_snapshot_state *st);

#endif

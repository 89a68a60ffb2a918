/* Token streams and the batch / window semantics the commands promise. */
#ifndef OT_DATA_H
#define OT_DATA_H

#include <stddef.h>
#include <stdint.h>

#include "ot_tokenizer.h"

typedef struct {
  int32_t *ids;
  size_t n;
} ot_tokens;

/* Whitespace-separated non-negative integer ids; anything else is OT_ERR_FORMAT
 * with the line number. Ids >= vocab_size are OT_ERR_RANGE (vocab_size <= 0: no check). */
int ot_tokens_read(const char *path, int vocab_size, ot_tokens *out);
int ot_tokens_write(const char *path, const ot_tokens *t);
/* Reads a UTF-8 text file and encodes it. */
int ot_tokens_from_text(const ot_tokenizer *tok, const char *path, ot_tokens *out);
/* A command's input: exactly one of a text file (encoded with tok) or a token file
 * (ids checked against vocab_size). */
int ot_tokens_load_input(const char *text_path, const char *tokens_path, const ot_tokenizer *tok,
                         int vocab_size, ot_tokens *out);
void ot_tokens_free(ot_tokens *t);

/* Sequential batches for training: step s reads B*T+1 consecutive tokens from p
 * (p starts at 0, advances by B*T, returns to 0 when fewer than B*T+1 remain);
 * row b = inputs p+b*T .. p+b*T+T-1, targets shifted by one.
 * With shuffle, each row starts at a uniformly random position instead (seeded). */
typedef struct {
  const int32_t *ids;
  size_t n;
  int B, T;
  size_t pos;
  int shuffle;
  uint64_t rng;
} ot_batcher;

int ot_batcher_init(ot_batcher *b, const ot_tokens *t, int B, int T, int shuffle, uint64_t seed);
/* Fills inputs[B*T] and targets[B*T]. */
void ot_batcher_next(ot_batcher *b, int32_t *inputs, int32_t *targets);

/* Evaluation windows: window k has inputs tokens[kT : kT+T] and targets
 * tokens[kT+1 : kT+T+1]; the last window may be shorter. */
size_t ot_eval_window_count(size_t n_tokens, int T);
/* Length of window k (number of inputs = number of targets). */
int ot_eval_window_len(size_t n_tokens, int T, size_t k);

#endif

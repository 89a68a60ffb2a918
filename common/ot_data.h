/* Token streams and the batch / window semantics the commands promise. */
#ifndef OT_DATA_H
#define OT_DATA_H

#include <stddef.h>
#include <stdint.h>

#include "ot_tokenizer.h"

/* mask (NULL for plain text: every token is a target) marks supervised examples
 * (ot_examples.h): OT_TOK_TARGET on tokens the loss is taken on, OT_TOK_START on the
 * first token of each example. */
enum { OT_TOK_TARGET = 1, OT_TOK_START = 2 };
typedef struct {
  int32_t *ids;
  size_t n;
  uint8_t *mask;
} ot_tokens;

/* Whitespace-separated non-negative integer ids; anything else is OT_ERR_FORMAT
 * with the line number. Ids >= vocab_size are OT_ERR_RANGE (vocab_size <= 0: no check). */
int ot_tokens_read(const char *path, int vocab_size, ot_tokens *out);
int ot_tokens_write(const char *path, const ot_tokens *t);
/* Reads a UTF-8 text file and encodes it. */
int ot_tokens_from_text(const ot_tokenizer *tok, const char *path, ot_tokens *out);
/* A command's input: exactly one of a text file (encoded with tok; a file ending in
 * .jsonl is read as supervised examples, ot_examples_read with the plain chat rendering)
 * or a token file (ids checked against vocab_size). */
int ot_tokens_load_input(const char *text_path, const char *tokens_path, const ot_tokenizer *tok,
                         int vocab_size, ot_tokens *out);
void ot_tokens_free(ot_tokens *t);
/* Views (no copies) of t without its last tail_tokens, and of those; with a mask, the cut
 * moves forward to the next example start, so no example is split. */
int ot_tokens_split(const ot_tokens *t, size_t tail_tokens, ot_tokens *head, ot_tokens *tail);

/* Supervised examples as rows of T: whole examples packed greedily in file order into
 * rows of T+1 tokens (inputs the first T, targets the last T); a target is -1 unless its
 * token has OT_TOK_TARGET and is not the first of its example; the rest of a row is
 * padding (input 0, target -1). An example longer than T+1 keeps its last T+1 tokens.
 * Attention is not reset between examples packed in one row (as in GPT-2 pre-training). */
int ot_pack_rows(const ot_tokens *t, int T, int32_t **in, int32_t **tg, size_t *n_rows, size_t *n_truncated);

/* The one place training batches are made (pre-training, fine-tuning, distillation and
 * the device's tuning).
 * Plain text: step s reads B*T+1 consecutive tokens from p (p starts at 0, advances by
 * B*T, returns to 0 when fewer than B*T+1 remain); row b = inputs p+b*T .. p+b*T+T-1,
 * targets shifted by one. With shuffle, each row starts at a uniformly random position
 * instead (seeded).
 * Supervised examples (t->mask): the rows of ot_pack_rows; step s takes rows p .. p+B-1
 * (p a row index, wrapping around), or B uniformly random rows with shuffle. */
typedef struct {
  const int32_t *ids;
  size_t n;
  int B, T;
  size_t pos;
  int shuffle;
  uint64_t rng;
  int32_t *rows_in, *rows_tg; /* supervised: n_rows x T each, owned */
  size_t n_rows, n_truncated;
} ot_batcher;

int ot_batcher_init(ot_batcher *b, const ot_tokens *t, int B, int T, int shuffle, uint64_t seed);
/* Fills inputs[B*T] and targets[B*T]. */
void ot_batcher_next(ot_batcher *b, int32_t *inputs, int32_t *targets);
/* Moves the sequential position as if `steps` steps had been taken (a session round that
 * continues where the last one stopped). */
void ot_batcher_skip(ot_batcher *b, uint64_t steps);
void ot_batcher_free(ot_batcher *b);

/* Evaluation windows: window k has inputs tokens[kT : kT+T] and targets
 * tokens[kT+1 : kT+T+1]; the last window may be shorter. */
size_t ot_eval_window_count(size_t n_tokens, int T);
/* Length of window k (number of inputs = number of targets). */
int ot_eval_window_len(size_t n_tokens, int T, size_t k);

#endif

/* Supervised examples: JSONL files of prompt/completion pairs or chat messages, read into
 * one token stream whose mask says which tokens are training targets (the completion or
 * the assistant's replies) and where each example starts (docs/data.md).
 *
 * One JSON object per line (blank lines skipped):
 *   {"prompt": "...", "completion": "..."}   loss on the completion's tokens
 *   {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
 *                                             loss on the assistant messages' tokens
 *   {"text": "..."}                           loss on every token (plain text among examples)
 * The prompt and the completion are tokenized separately and concatenated (put the space
 * that separates them at the start of the completion); "<|endoftext|>" follows the target
 * when the vocabulary has it. Anything else is OT_ERR_FORMAT naming the file and line. */
#ifndef OT_EXAMPLES_H
#define OT_EXAMPLES_H

#include <stddef.h>
#include <stdint.h>

#include "ot_data.h"
#include "ot_tokenizer.h"

/* One chat message as read from the file (strings owned by the reader). */
typedef struct {
  const char *role;
  const char *content;
} ot_chat_msg;

/* A rendered piece of an example: text and whether its tokens are training targets. */
typedef struct {
  char *text; /* malloc'd */
  int target;
} ot_text_piece;

/* Renders a conversation into pieces (malloc'd array of malloc'd texts). The seam for a
 * model's own chat template: a renderer from a higher layer (serve/'s template engine)
 * is passed in; without one, ot_chat_render_plain is used. */
typedef int (*ot_chat_render_fn)(void *ctx, const ot_chat_msg *msgs, size_t n, ot_text_piece **pieces,
                                 size_t *n_pieces);
typedef struct {
  ot_chat_render_fn render;
  void *ctx;
} ot_chat_renderer;

/* The documented plain rendering, for models without a chat template: each message becomes
 * "<Role>:" (System, User, Assistant) then " <content>\n"; the assistant's " <content>\n"
 * pieces are targets, everything else context. */
int ot_chat_render_plain(void *ctx, const ot_chat_msg *msgs, size_t n, ot_text_piece **pieces,
                         size_t *n_pieces);
void ot_text_pieces_free(ot_text_piece *p, size_t n);

/* Reads a JSONL file of examples into *out (ids, mask with OT_TOK_TARGET / OT_TOK_START).
 * chat NULL: the plain rendering. */
/* The next JSON object of a JSONL buffer (one per line; blank lines skipped) from *pos on:
 * *out is NULL at the end. *line counts lines for the "FILE:LINE:" errors of bad JSON or text
 * after the object. The one JSONL reader of supervised examples and task items. */
struct cJSON;
int ot_jsonl_next(const char *buf, size_t len, size_t *pos, size_t *line, const char *path,
                  struct cJSON **out);
int ot_examples_read(const char *path, const ot_tokenizer *tok, const ot_chat_renderer *chat, ot_tokens *out);
/* 1 if path names a JSONL examples file (ends in ".jsonl"): what the --text / --data
 * options read as examples instead of plain text. */
int ot_examples_is_jsonl(const char *path);

#endif

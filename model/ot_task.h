/* Task evaluation (`eval --task FILE.jsonl`), in the formats lm-evaluation-harness uses
 * (docs/tasks.md). One JSON object per line (blank lines skipped):
 *   {"type": "multiple_choice", "context": "...", "choices": ["...", ...], "label": K}
 *       acc: the choice with the highest log-likelihood given the context is K;
 *       acc_norm: the same with each log-likelihood divided by the choice's UTF-8 byte length
 *   {"type": "cloze", "context": "...", "target": "..."}
 *       acc: every token of target is the greedy (argmax) prediction (LAMBADA's last word)
 *   {"type": "generate", "context": "...", "target": "...", "max_tokens": N, "stop": [...]}
 *       exact_match: greedy generation (up to N tokens, default 32, cut at the first stop
 *       string, default ["\n"], or "<|endoftext|>") equals target, both stripped of
 *       surrounding whitespace
 * Context and continuation are tokenized separately (whitespace at the end of the context
 * moves to the front of the continuation, as lm-evaluation-harness does); a sequence longer
 * than the model's window keeps its last n_positions + 1 tokens. */
#ifndef OT_TASK_H
#define OT_TASK_H

#include <stddef.h>
#include <stdio.h>

#include "ot_model.h"
#include "ot_tokenizer.h"

typedef struct ot_task ot_task;

/* Reads and tokenizes a task file; a malformed line is OT_ERR_FORMAT naming it. */
int ot_task_read(const char *path, const ot_tokenizer *tok, ot_task **out);
size_t ot_task_count(const ot_task *t);
void ot_task_free(ot_task *t);

/* A mean of 0/1 outcomes and its standard error sqrt(p (1 - p) / (n - 1)) (the sample
 * standard deviation over sqrt(n), as lm-evaluation-harness reports; 0 when n < 2). */
typedef struct {
  size_t n;
  double mean, stderr_;
} ot_task_stat;

typedef struct {
  size_t n;                   /* items */
  ot_task_stat acc, acc_norm; /* multiple_choice */
  ot_task_stat cloze;         /* cloze accuracy */
  ot_task_stat exact_match;   /* generate */
} ot_task_result;

/* Scores every item with m (prepared here for `batch` rows of n_positions). details, when
 * not NULL, gets one JSON line per item: {"i", "type", "loglik": [...], "pred", "pred_norm",
 * "correct"} / {"i", "type", "loglik", "greedy", "correct"} / {"i", "type", "output",
 * "correct"}. progress may be NULL. */
int ot_task_eval(ot_model *m, const ot_tokenizer *tok, const ot_task *t, int batch, FILE *details,
                 FILE *progress, ot_task_result *out);
/* What the eval commands do with --task: checks the tokenizer (dir names the model or
 * emulator in the error), reads the file, scores it, writes the details to details_path
 * (atomically; may be NULL). *what names the failing phase. */
int ot_task_eval_file(ot_model *m, const ot_tokenizer *tok, const char *dir, const char *task_path,
                      const char *details_path, int batch, FILE *progress, ot_task_result *out,
                      const char **what);
/* Human-readable lines, or one JSON object: {"n", "multiple_choice": {"n", "acc",
 * "acc_stderr", "acc_norm", "acc_norm_stderr"}, "cloze": {"n", "acc", "acc_stderr"},
 * "generate": {"n", "exact_match", "exact_match_stderr"}} (the kinds present). */
void ot_task_print(FILE *f, const ot_task_result *r, int json);

#endif

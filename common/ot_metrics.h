/* Training metrics as JSON lines: one object per line, appended to a file next to a
 * command's output (DIR/metrics.jsonl) and, with a command's --json, echoed to a stream
 * (stdout) in place of the progress bar. The one writer of these records: ot_train writes a
 * "step" record after every optimizer step; commands add "eval" and "summary" records.
 *
 * Every record: {"kind": K, "label": L, "time": unix seconds, fields...}; the step record's
 * fields are step (1-based), steps, loss, lr, grad_norm, tokens (trained in the step),
 * tokens_per_s (since the run started) and elapsed_s. Numbers are written with 9
 * significant digits (a float round-trips); a non-finite value is written as null. */
#ifndef OT_METRICS_H
#define OT_METRICS_H

#include <stdio.h>

typedef struct ot_metrics ot_metrics;

#define OT_METRICS_FILE "metrics.jsonl"

/* path: the file to append to (made 0644 if absent; NULL: no file); echo: a stream that
 * gets each record too (NULL: none); label: every record's "label" (copied). */
int ot_metrics_open(const char *path, FILE *echo, const char *label, ot_metrics **out);
/* DIR/metrics.jsonl (dir is made if missing). */
int ot_metrics_open_dir(const char *dir, FILE *echo, const char *label, ot_metrics **out);
void ot_metrics_close(ot_metrics *m);

/* One record of kind with n numeric fields keys[i] = vals[i]; flushed at once, so a
 * killed run keeps every record written before. NULL m: nothing. */
int ot_metrics_record(ot_metrics *m, const char *kind, int n, const char *const *keys, const double *vals);

typedef struct {
  int step, steps;
  float loss, lr, grad_norm;
  double tokens, tokens_per_s, elapsed_s;
} ot_metrics_step;
int ot_metrics_write_step(ot_metrics *m, const ot_metrics_step *s);

#endif

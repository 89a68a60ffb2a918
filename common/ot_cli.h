/* Command-line helpers: a table-driven option parser, usage text, progress bars. */
#ifndef OT_CLI_H
#define OT_CLI_H

#include <stdint.h>
#include <stdio.h>

typedef enum { OT_OPT_STR, OT_OPT_INT, OT_OPT_FLOAT, OT_OPT_FLAG } ot_opt_kind;

typedef struct {
  const char *name; /* long name without dashes, e.g. "seq-len" */
  ot_opt_kind kind;
  void *dst;           /* const char **, int *, float *, int * (flag set to 1) */
  const char *metavar; /* e.g. "T"; NULL for flags */
  const char *help;
} ot_opt;

/* Parses argv[0..argc) (no program/command name) into the table. "--name value" and
 * "--name=value" are accepted; unknown options, missing values, bad numbers and stray
 * positional arguments are OT_ERR_INVALID with a detail naming the option.
 * Returns 1 (not an error) if --help or -h was given. */
int ot_cli_parse(int argc, char **argv, const ot_opt *opts, int n_opts);
/* Prints "usage: <synopsis>" and one aligned line per option. */
void ot_cli_usage(FILE *f, const char *synopsis, const char *description, const ot_opt *opts, int n_opts);

/* Progress bar on a terminal (redrawn in place), periodic plain lines otherwise. */
typedef struct {
  FILE *f;
  const char *label;
  int64_t total;
  double t_start;
  double t_last;
  int tty;
  int64_t last_done;
} ot_progress;

void ot_progress_start(ot_progress *p, FILE *f, const char *label, int64_t total);
/* extra: short status (e.g. "loss 2.31 | 1234 tok/s"); ETA is computed from the rate. */
void ot_progress_update(ot_progress *p, int64_t done, const char *extra);
void ot_progress_finish(ot_progress *p, const char *extra);

/* Monotonic wall clock in seconds. */
double ot_now(void);

#endif

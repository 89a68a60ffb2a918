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

/* A program with subcommands ("offtune-cloud eval ..."). */
typedef struct {
  const char *name;
  int (*run)(int argc, char **argv); /* gets the arguments after the command name */
  const char *help;
} ot_cli_command;

/* Runs argv[1] from the table; prints usage for none, --help/-h/help, or an unknown
 * command. Returns the exit code (2 for usage errors). Also makes writes past a
 * file-size limit fail with EFBIG (a clear error) instead of killing the process
 * half-way through a checkpoint. */
int ot_cli_dispatch(const char *prog, const char *about, const ot_cli_command *cmds, int n_cmds, int argc,
                    char **argv);
/* Prints "<prog>: <what>: <status>: <detail>" to stderr and returns exit code 1. */
int ot_cli_fail(const char *prog, const char *what, int status);

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

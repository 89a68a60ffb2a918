/* Shared helpers for the cmocka tests. Include after the cmocka prelude. */
#ifndef OT_TEST_UTIL_H
#define OT_TEST_UTIL_H

#include <stddef.h>

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

#endif

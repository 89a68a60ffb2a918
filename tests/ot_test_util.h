/* Shared helpers for the cmocka tests. Include after the cmocka prelude. */
#ifndef OT_TEST_UTIL_H
#define OT_TEST_UTIL_H

#include <stddef.h>

/* Environment paths set by ctest (tests/CMakeLists.txt); fail the test if unset. */
const char *ot_test_source_dir(void);
const char *ot_test_binary_dir(void);
const char *ot_test_npm_dir(void);
/* A fresh empty directory under the build tree for this test: <binary>/tests/tmp/<name>. */
char *ot_test_tmpdir(const char *name);
/* Runs a shell command, returns its exit status (-1 if it could not run). */
int ot_test_system(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

#endif

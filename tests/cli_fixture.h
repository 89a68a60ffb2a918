/* The command-line tests' fixture (test_emulator_cli, test_adapters_cli): a temp directory,
 * the offtune-cloud and offtune-device binaries and the last command's output. Include after
 * the cmocka prelude. */
#ifndef CLI_FIXTURE_H
#define CLI_FIXTURE_H

#include "ot_test_util.h"

extern char *dir;         /* tests/tmp/<name> */
extern char *cloud;       /* the offtune-cloud binary */
extern char *device;      /* the offtune-device binary */
extern char out[1 << 16]; /* the last command's output (RUN_OK, ot_test_run) */

#define RUN_OK(...) OT_TEST_RUN_OK(out, __VA_ARGS__)

/* Makes dir (tests/tmp/<name>) and the binaries' paths; 0 or -1. */
int cli_fixture_setup(const char *name);
/* A cmocka group teardown: frees what cli_fixture_setup made. */
int cli_fixture_teardown(void **state);

#endif

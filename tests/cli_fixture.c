/* The command-line tests' fixture: see cli_fixture.h. */
#include "cli_fixture.h"

#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdlib.h>

char *dir, *cloud, *device;
char out[1 << 16];

int cli_fixture_setup(const char *name) { return ot_test_cli_paths(name, &dir, &cloud, &device); }

int cli_fixture_teardown(void **state) {
  (void)state;
  free(dir);
  free(cloud);
  free(device);
  return 0;
}

/* offtune-device: the data owner's side. Only `keygen` so far; the rest of the client
 * (enrolment, local tuning, secure aggregation) comes with issues 3 and 5. */
#include <stdio.h>
#include <string.h>

#include "ot_identity.h"

static void usage(FILE *f) {
  fprintf(
      f,
      "usage: offtune-device <command> [options]\n\ncommands:\n"
      "  keygen     create this device's long-term Ed25519 identity (DIR/device.key 0600, DIR/device.pub)\n"
      "\nExit codes: 0 success, 1 failure, 2 usage error.\n");
}

int main(int argc, char **argv) {
  if (argc < 2) {
    usage(stderr);
    return 2;
  }
  if (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0 || strcmp(argv[1], "help") == 0) {
    usage(stdout);
    return 0;
  }
  if (strcmp(argv[1], "keygen") == 0)
    return ot_keygen_command("offtune-device", "device", argc - 2, argv + 2);
  fprintf(stderr, "offtune-device: unknown command '%s'\n\n", argv[1]);
  usage(stderr);
  return 2;
}

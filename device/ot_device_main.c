/* offtune-device: the data owner's side. Holds only the emulator and its private data;
 * tunes the adapter blocks locally. Private text never leaves this process. */
#include <stdio.h>
#include <string.h>

#include "ot_device_cmd.h"
#include "ot_error.h"
#include "ot_identity.h"

static int cmd_keygen(int argc, char **argv) {
  return ot_keygen_command("offtune-device", "device", argc, argv);
}

static const struct {
  const char *name;
  int (*run)(int, char **);
  const char *help;
} commands[] = {
    {"tune", ot_dev_tune, "train an offsite adapter on private data with the emulator"},
    {"keygen", cmd_keygen,
     "create this device's long-term Ed25519 identity (DIR/device.key 0600, DIR/device.pub)"},
    {"eval", ot_dev_eval, "perplexity of the emulator (optionally with an adapter) on a text or token file"},
};
#define N_COMMANDS (int)(sizeof commands / sizeof commands[0])

static void usage(FILE *f) {
  fprintf(
      f, "usage: offtune-device <command> [options]\n\n"
         "The data owner's side of offtune: tunes adapters on the emulator; data stays here.\n\ncommands:\n");
  for (int i = 0; i < N_COMMANDS; i++) fprintf(f, "  %-10s %s\n", commands[i].name, commands[i].help);
  fprintf(f, "\nRun 'offtune-device <command> --help' for a command's options.\n"
             "Exit codes: 0 success, 1 failure, 2 usage error.\n");
}

int main(int argc, char **argv) {
  if (argc < 2) {
    usage(stderr);
    return OT_EXIT_USAGE;
  }
  if (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0 || strcmp(argv[1], "help") == 0) {
    usage(stdout);
    return OT_EXIT_OK;
  }
  for (int i = 0; i < N_COMMANDS; i++)
    if (strcmp(argv[1], commands[i].name) == 0) return commands[i].run(argc - 2, argv + 2);
  fprintf(stderr, "offtune-device: unknown command '%s'\n\n", argv[1]);
  usage(stderr);
  return OT_EXIT_USAGE;
}

int ot_dev_fail(const char *what, int status) {
  const char *d = ot_error_detail();
  fprintf(stderr, "offtune-device: %s: %s%s%s\n", what, ot_strerror(status), *d ? ": " : "", d);
  return OT_EXIT_FAIL;
}

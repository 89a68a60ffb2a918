/* offtune-device: the data owner's side. Holds only the emulator and its private data;
 * tunes the adapter blocks locally. Private text never leaves this process. */
#include <stdio.h>
#include <string.h>

#include "ot_cli.h"
#include "ot_device_cmd.h"
#include "ot_error.h"
#include "ot_identity.h"

static int cmd_keygen(int argc, char **argv) {
  return ot_keygen_command("offtune-device", "device", argc, argv);
}

static const ot_cli_command commands[] = {
    {"tune", ot_dev_tune,
     "train an adapter (offsite, LoRA, bottleneck, BitFit) on private data with the emulator"},
    {"join", ot_dev_join, "enrol this device with a cloud daemon (once, with a one-time token)"},
    {"run", ot_dev_run, "take part in the cloud's tuning sessions: fetch, train locally, upload, repeat"},
    {"keygen", cmd_keygen,
     "create this device's long-term Ed25519 identity (DIR/device.key 0600, DIR/device.pub)"},
    {"eval", ot_dev_eval, "perplexity of the emulator (optionally with an adapter) on a text or token file"},
};

int main(int argc, char **argv) {
  return ot_cli_dispatch("offtune-device",
                         "The data owner's side of offtune: tunes adapters on the emulator; data stays here.",
                         commands, (int)(sizeof commands / sizeof commands[0]), argc, argv);
}

int ot_dev_fail(const char *what, int status) { return ot_cli_fail("offtune-device", what, status); }

/* Shared by fuzz_operator and fuzz_messages: the cloud daemon's request handling (the real
 * ot_daemon_ctl.c, ot_daemon_rpc.c, registry and secure-aggregation rounds) without its sockets
 * and threads.
 *
 * Made once, in a tmpfs directory: a state directory, a small model (config.json), an emulator
 * package's manifest, the round adapter under objects/adapters/ and an enrolled device's key.
 * fz_daemon_reset() gives every input the same starting point: a fresh in-memory registry with
 *   model "m";  the device, enrolled;
 *   session "s" (FedAvg) running round 1 with that emulator and adapter, the device's upload
 *     for it staged (staging/<key>.update.s.1, a valid update);
 *   session "q" (secure aggregation, DP) running round 1;
 * and fresh secure-aggregation rounds. */
#ifndef FUZZ_DAEMON_H
#define FUZZ_DAEMON_H

#include "ot_daemon.h"

#include <stdint.h>

typedef struct {
  ot_daemon *d;
  uint8_t device_pk[32];             /* enrolled in every fresh registry */
  char update_digest[OT_DIGEST_HEX]; /* of the staged upload */
  char adapter_digest[OT_DIGEST_HEX];
  int64_t emulator_id;
  int64_t secagg_session; /* id of "q" */
} fz_daemon;

/* Once (LLVMFuzzerInitialize). Aborts on failure. */
fz_daemon *fz_daemon_init(void);
/* Before every input. Aborts on failure. */
void fz_daemon_reset(fz_daemon *f);

#endif

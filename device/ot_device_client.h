/* The device's session client (ot_device_client.c): the checks on what the cloud sends that need
 * no connection, so that fuzz/fuzz_messages.c calls the code the device runs. */
#ifndef OT_DEVICE_CLIENT_H
#define OT_DEVICE_CLIENT_H

#include "ot_peft.h"
#include "session.pb-c.h"

/* A TRAIN RoundInfo is complete, and the names in it that become paths under the state
 * directory (session, emulator digest) stay inside it. */
int ot_dev_round_info_check(const Offtune__Session__RoundInfo *ri);
/* A file to fetch names a plain file in the directory it goes to. */
int ot_dev_file_ref_check(const Offtune__Session__FileRef *f);
/* The round's adapter settings (kind by name; the rest checked when the adapter attaches). */
int ot_dev_adapter_settings(const Offtune__Session__AdapterSettings *a, ot_peft_config *c);

#endif

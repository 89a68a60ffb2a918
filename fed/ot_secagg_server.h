/* The cloud's side of one secure-aggregation round (fed/ot_secagg.h,
 * docs/secagg.md): a state machine over message bytes that learns only the sum.
 *
 *   ot_secagg_server *s;
 *   ot_secagg_server_new(&params, n, roster, round_id, &s);   // stage ADVERTISE
 *   for each stage (ADVERTISE, SHARES, MASKED, UNMASK):
 *     for each message a device sends:   ot_secagg_server_receive(s, msg, len, &dev);
 *     when all are in or the deadline passed:  ot_secagg_server_advance(s);
 *     then for each device still in:     ot_secagg_server_outgoing(s, dev, &m, &ml);
 *   ot_secagg_server_result(s, sum, dim, &count);  // after UNMASK's advance: stage DONE
 *   audit: ot_secagg_server_audit_count / _audit_line
 *   ot_secagg_server_free(s);
 *
 * receive() refuses (and changes nothing for) a message of another round or stage,
 * from an unknown device or with a bad signature, a second message from the same
 * device in a stage (a replay), a malformed or inconsistent body. A revealed share
 * that fails its owner's signature is dropped (and audited) while the rest of that
 * message counts. advance() closes the stage: devices not heard from have dropped.
 * When too few devices remain to unmask, advance() fails with OT_ERR_RANGE, the
 * round is FAILED, and no sum is ever produced.
 *
 * The running sum is the only vector the server holds: each masked input is added to
 * it on arrival and not kept. The server reconstructs the self-mask seed of each
 * survivor and the mask key of each dropped device and never both for one device,
 * which the audit trail records device by device. */
#ifndef OT_SECAGG_SERVER_H
#define OT_SECAGG_SERVER_H

#include <stddef.h>
#include <stdint.h>

#include "ot_secagg.h"

typedef struct ot_secagg_server ot_secagg_server;

int ot_secagg_server_new(const ot_secagg_params *params, uint32_t n, const uint8_t (*roster)[OT_PK_BYTES],
                         uint64_t round_id, ot_secagg_server **out);
void ot_secagg_server_free(ot_secagg_server *s);

/* The stage whose messages receive() accepts now (ot_secagg_stage; DONE or FAILED at the end). */
int ot_secagg_server_stage(const ot_secagg_server *s);
/* The resolved parameters (defaults filled in). */
const ot_secagg_params *ot_secagg_server_params(const ot_secagg_server *s);

/* One device-to-cloud message of the current stage; *device is the sender on success. */
int ot_secagg_server_receive(ot_secagg_server *s, const uint8_t *msg, size_t len, uint32_t *device);
/* Closes the current stage and prepares the next stage's messages. */
int ot_secagg_server_advance(ot_secagg_server *s);
/* The message for `device` prepared by the last advance(); OT_ERR_NOTFOUND when the
 * device is out of the round (dropped). */
int ot_secagg_server_outgoing(const ot_secagg_server *s, uint32_t device, uint8_t **out, size_t *out_len);

/* The dequantised sum of the included updates (stage DONE only); *count = how many. */
int ot_secagg_server_result(const ot_secagg_server *s, float *sum, size_t n, uint32_t *count);
/* 1 if device's update is in the sum (its masked input arrived), else 0. */
int ot_secagg_server_included(const ot_secagg_server *s, uint32_t device);

size_t ot_secagg_server_audit_count(const ot_secagg_server *s);
const char *ot_secagg_server_audit_line(const ot_secagg_server *s, size_t i);

#endif

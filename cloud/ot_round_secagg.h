/* Secure aggregation of a session's rounds (docs/secagg.md, "Sessions"): the daemon's
 * side of the masking rounds, driven by the transport's workers (devices' messages)
 * and the scheduler (stage deadlines, unmasking, the aggregate).
 *
 * A round: devices train, then join (SecAggJoin); when max_devices have joined, or
 * at least max(min_devices, 3) at the deadline, the roster (the joined devices' Ed25519
 * keys) is fixed and an ot_secagg_server runs the four stages; each device's message
 * travels in its poll replies and SecAggSubmit requests (the masked input as a
 * transfer). The unmasked sum is (sum_i w_i delta_i, sum_i w_i) with w_i = tokens_i /
 * token cap, so FedAvg is global + S / W without any individual weight or update.
 *
 * All state of a masking round is in memory: a daemon killed mid-round starts the
 * round's masking again from the join stage after its restart (the devices rejoin with
 * the update they trained). Nothing of an individual update is ever written. */
#ifndef OT_ROUND_SECAGG_H
#define OT_ROUND_SECAGG_H

#include <stddef.h>
#include <stdint.h>

#include "ot_daemon.h"
#include "session.pb-c.h"

typedef struct ot_round_secagg ot_round_secagg;

int ot_round_secagg_new(ot_round_secagg **out);
void ot_round_secagg_free(ot_round_secagg *t);

/* What a device's poll of a secure-aggregation round gets. */
typedef enum {
  OT_SA_POLL_TRAIN = 0,  /* not joined: train (or reuse the trained update), then join */
  OT_SA_POLL_WAIT = 1,   /* joined, the roster is not fixed yet; or not in the roster */
  OT_SA_POLL_SECAGG = 2, /* in the roster: *info is filled */
} ot_sa_poll_kind;

/* The poll of device pk (row id dev) for session s's open round. On SECAGG, info's
 * fields point into *hold (free with ot_sa_poll_clear). */
typedef struct {
  Offtune__Session__SecAggInfo info;
  ProtobufCBinaryData *roster;
  uint8_t *msg;
} ot_sa_poll_hold;
int ot_sa_poll(ot_round_secagg *t, const ot_session_row *s, const uint8_t pk[32], ot_sa_poll_kind *kind,
               ot_sa_poll_hold *hold, char *detail, size_t detail_n);
void ot_sa_poll_clear(ot_sa_poll_hold *hold);

/* SecAggJoin: device pk trained round `round` of s and takes part in its masking. */
int ot_sa_join(ot_round_secagg *t, const ot_session_row *s, int64_t dev, const uint8_t pk[32], int round);
/* SecAggSubmit: a signed message of the current stage from device pk. */
int ot_sa_submit(ot_round_secagg *t, const ot_session_row *s, const uint8_t pk[32], int round,
                 uint64_t round_id, const uint8_t *msg, size_t len);
/* The largest masked-input transfer of session s (OT_ERR_MISMATCH when none is expected). */
int ot_sa_upload_limit(ot_round_secagg *t, const ot_session_row *s, const uint8_t pk[32], int round,
                       uint64_t *limit);

/* The scheduler's step of an open secure-aggregation round. */
int ot_sa_step(ot_daemon *d, const ot_session_row *s);
/* Forgets the masking round of a session (aborted, finished, failed). */
void ot_sa_forget(ot_round_secagg *t, int64_t session_id);

/* ot_round.c: publishes `avg_path` (an adapter file: the round's average) as the round's
 * result exactly as the plain path does (FedAvg: as is; FedAdam: its server step on
 * avg - global), then finishes the round in one transaction. roster: devices whose masking
 * started (roster - participants dropped out); tokens: the devices' tokens in all. */
int ot_round_publish_avg(ot_daemon *d, const ot_session_row *s, const char *avg_path, int participants,
                         int roster, double tokens, const char *summary);

/* ot_round.c: fails the session (with the reason) when round `round` would take the DP
 * accountant past the budget; *stopped = 1 then. */
int ot_round_dp_gate(ot_daemon *d, const ot_session_row *s, int round, int *stopped);

#endif

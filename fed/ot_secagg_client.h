/* The device side of one secure-aggregation round (fed/ot_secagg.h,
 * docs/secagg.md). A pure state machine over message bytes: the caller carries the
 * messages over whatever transport it has (the daemon's sessions, or an in-process
 * simulator in the tests and the benchmark).
 *
 *   ot_secagg_client *c;
 *   ot_secagg_client_new(&id, &params, round_id, roster, n, &c);  // roster: Ed25519 keys
 *   ot_secagg_client_advertise(c, &m, &ml);         // -> cloud
 *   ot_secagg_client_on_keys(c, in, il, &m, &ml);   // KeyList in -> sealed shares out
 *   ot_secagg_client_on_shares(c, in, il);          // ShareList in
 *   ot_secagg_client_mask_input(c, update, dim, &m, &ml);  // -> masked input
 *   ot_secagg_client_on_unmask(c, in, il, &m, &ml); // UnmaskRequest in -> shares out
 *   ot_secagg_client_free(c);                       // wipes every secret
 *
 * Each call checks the incoming message completely (round, stage, signatures of the
 * other devices, sizes) and, on error, changes nothing; out-buffers are malloc'd
 * and the caller frees them. A device reveals, for every neighbour, at most one
 * kind of share (self-mask seed if it survived, mask key if it dropped) and
 * answers one unmask request per round. */
#ifndef OT_SECAGG_CLIENT_H
#define OT_SECAGG_CLIENT_H

#include <stddef.h>
#include <stdint.h>

#include "ot_identity.h"
#include "ot_secagg.h"

typedef struct ot_secagg_client ot_secagg_client;

/* roster[i] = Ed25519 key of device i (n devices); id must be one of them. The
 * params are resolved with ot_secagg_params_resolve(); every party must use the same. */
int ot_secagg_client_new(const ot_identity *id, const ot_secagg_params *params, uint64_t round_id,
                         const uint8_t (*roster)[OT_PK_BYTES], uint32_t n, ot_secagg_client **out);
void ot_secagg_client_free(ot_secagg_client *c);
/* This device's index in the roster. */
uint32_t ot_secagg_client_index(const ot_secagg_client *c);

/* Stage 1: fresh X25519 keys and the self-mask commitment, signed. */
int ot_secagg_client_advertise(ot_secagg_client *c, uint8_t **out, size_t *out_len);
/* Stage 1 -> 2: the neighbours' advertisements; answers with the sealed shares of the
 * self-mask seed and the mask key for each neighbour that advertised. */
int ot_secagg_client_on_keys(ot_secagg_client *c, const uint8_t *in, size_t in_len, uint8_t **out,
                             size_t *out_len);
/* Stage 2 -> 3: the shares the neighbours dealt to this device. The senders are the
 * neighbours this device masks with. A share that fails to open or to verify is
 * counted (ot_secagg_client_bad_shares) and not kept. */
int ot_secagg_client_on_shares(ot_secagg_client *c, const uint8_t *in, size_t in_len);
/* Stage 3: quantises, masks and signs the update (n must equal params.dim). */
int ot_secagg_client_mask_input(ot_secagg_client *c, const float *update, size_t n, uint8_t **out,
                                size_t *out_len);
/* Stage 4: reveals shares per the cloud's survivor / dropped lists. */
int ot_secagg_client_on_unmask(ot_secagg_client *c, const uint8_t *in, size_t in_len, uint8_t **out,
                               size_t *out_len);
/* Shares received in stage 2 that did not open or verify. */
uint32_t ot_secagg_client_bad_shares(const ot_secagg_client *c);

/* What a colluding device could hand over: the share of `owner`'s secret of `kind`
 * it holds (owner = itself or a neighbour), for the tests of the cloud's view. */
int ot_secagg_client_held_share(const ot_secagg_client *c, uint32_t owner, uint32_t kind,
                                uint8_t share[OT_SA_SHARE_BYTES]);

#endif

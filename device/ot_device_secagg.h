/* The device's side of a session round under secure aggregation (docs/secagg.md,
 * "Sessions"): after training, join the round; then, stage by stage as the cloud's poll
 * replies say (RoundInfo SECAGG), answer with this device's signed message. The update
 * sent is w (local - global) followed by w, with w = tokens / token cap, clipped to L2
 * norm dp_clip first under DP, masked by ot_secagg_client: the cloud learns only sums.
 * The masking round lives in memory: a device restarted mid-round is out of it (the
 * cloud's unmask stage recovers or drops it). */
#ifndef OT_DEVICE_SECAGG_H
#define OT_DEVICE_SECAGG_H

#include "ot_identity.h"
#include "ot_transport.h"
#include "session.pb-c.h"

typedef struct ot_dev_secagg ot_dev_secagg;

/* SecAggJoin for (session, round): *accepted = 1 or 0 (the reason is printed). */
int ot_dev_secagg_join(ot_client *c, const char *session, unsigned round, float train_loss, int *accepted);
/* One SECAGG poll reply: makes the masking round's state on first sight (*st), answers
 * the stage unless already done. work = STATE/work/<session>/r<round> (global/, local/,
 * trained.json). *answered = the stage whose message this call got accepted (0: none;
 * OT_SA_MASKED: this device's update is in the round). */
int ot_dev_secagg_step(ot_dev_secagg **st, const ot_identity *id, ot_client *c, const char *work,
                       const Offtune__Session__RoundInfo *ri, uint32_t *answered);
void ot_dev_secagg_free(ot_dev_secagg *st);

#endif

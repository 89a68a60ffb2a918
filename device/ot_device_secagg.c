/* The device's side of a secure-aggregation round (ot_device_secagg.h). */
#include "ot_device_secagg.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>
#include <sodium.h>

#include "ot_dp.h"
#include "ot_error.h"
#include "ot_fileio.h"
#include "ot_pb.h"
#include "ot_safetensors.h"
#include "ot_secagg_client.h"

struct ot_dev_secagg {
  ot_secagg_client *c;
  uint64_t round_id;
  uint32_t sent_stage; /* the last stage this device answered */
};

void ot_dev_secagg_free(ot_dev_secagg *st) {
  if (!st) return;
  ot_secagg_client_free(st->c);
  free(st);
}

/* A request answered by a SubmitReply: *accepted, the reason printed when refused. */
static int submit(ot_client *c, const Offtune__Session__SessionRequest *req, const char *what,
                  int *accepted) {
  uint8_t *body = NULL, *reply = NULL;
  size_t bl = 0, len = 0;
  if (ot_pb_pack(&req->base, &body, &bl)) return ot_error(OT_ERR_NOMEM, "cannot allocate");
  int rc = ot_client_call(c, body, bl, &reply, &len);
  free(body);
  ot_pb_alloc pa;
  ot_pb_alloc_init(&pa, 1 << 20);
  Offtune__Session__SubmitReply *sr =
      rc == OT_OK ? offtune__session__submit_reply__unpack(&pa.a, len, reply) : NULL;
  if (rc == OT_OK && !sr) rc = ot_error(OT_ERR_FORMAT, "bad SubmitReply");
  if (sr) {
    *accepted = sr->accepted;
    if (!sr->accepted)
      fprintf(stderr, "[run] secure aggregation: %s refused: %s\n", what, sr->reason ? sr->reason : "");
    offtune__session__submit_reply__free_unpacked(sr, &pa.a);
  }
  free(reply);
  return rc;
}

int ot_dev_secagg_join(ot_client *c, const char *session, unsigned round, float train_loss, int *accepted) {
  Offtune__Session__SecAggJoin j = OFFTUNE__SESSION__SEC_AGG_JOIN__INIT;
  j.session = (char *)session;
  j.round = round;
  j.train_loss = train_loss;
  j.has_train_loss = 1;
  Offtune__Session__SessionRequest req = OFFTUNE__SESSION__SESSION_REQUEST__INIT;
  req.kind_case = OFFTUNE__SESSION__SESSION_REQUEST__KIND_SECAGG_JOIN;
  req.secagg_join = &j;
  return submit(c, &req, "join", accepted);
}

static int send_msg(ot_client *c, const Offtune__Session__RoundInfo *ri, uint64_t round_id, const uint8_t *m,
                    size_t ml, int via_transfer, int *accepted) {
  Offtune__Session__SecAggSubmit u = OFFTUNE__SESSION__SEC_AGG_SUBMIT__INIT;
  u.session = ri->session;
  u.round = ri->round;
  u.round_id = round_id;
  int rc = OT_OK;
  if (via_transfer) {
    /* the masked input: too large for a request, so a transfer the submit then names */
    char name[256];
    snprintf(name, sizeof name, "secagg.%s.%u", ri->session, ri->round);
    ot_send_opts so = {.window = 4};
    rc = ot_client_send(c, name, m, ml, &so);
    u.via_transfer = 1, u.has_via_transfer = 1;
  } else {
    u.msg.data = (uint8_t *)m, u.msg.len = ml, u.has_msg = 1;
  }
  Offtune__Session__SessionRequest req = OFFTUNE__SESSION__SESSION_REQUEST__INIT;
  req.kind_case = OFFTUNE__SESSION__SESSION_REQUEST__KIND_SECAGG_SUBMIT;
  req.secagg_submit = &u;
  if (rc == OT_OK) rc = submit(c, &req, "message", accepted);
  return rc;
}

/* w (local - global) || w, clipped to L2 norm dp_clip first when dp_clip > 0. */
static int build_update(const char *work, const Offtune__Session__SecAggInfo *in, float **out) {
  char gp[4300], lp[4300], tp[4300], *text = NULL;
  size_t len = 0;
  snprintf(gp, sizeof gp, "%s/global/adapter_model.safetensors", work);
  snprintf(lp, sizeof lp, "%s/local/adapter_model.safetensors", work);
  snprintf(tp, sizeof tp, "%s/trained.json", work);
  int rc = ot_file_read_all(tp, 1 << 16, &text, &len);
  cJSON *j = rc == OT_OK ? cJSON_Parse(text) : NULL;
  double tokens = cJSON_GetNumberValue(cJSON_GetObjectItemCaseSensitive(j, "tokens"));
  cJSON_Delete(j);
  free(text);
  if (rc == OT_OK &&
      (!(tokens > 0) || !in->has_token_cap || in->token_cap == 0 || tokens > (double)in->token_cap))
    rc = ot_error(OT_ERR_FORMAT, "%s: %g tokens against a cap of %llu", tp, tokens,
                  (unsigned long long)in->token_cap);
  if (rc) return rc;
  double w = tokens / (double)in->token_cap;
  ot_safetensors *g = NULL, *l = NULL;
  rc = ot_st_open(gp, &g);
  if (rc == OT_OK) rc = ot_st_open(lp, &l);
  float *v = rc == OT_OK ? calloc(in->dim, sizeof *v) : NULL, *a = NULL;
  if (rc == OT_OK && !v) rc = ot_error(OT_ERR_NOMEM, "cannot allocate");
  uint64_t off = 0;
  for (size_t i = 0; rc == OT_OK && i < ot_st_count(g); i++) {
    const ot_st_tensor *tg = ot_st_at(g, i), *tl = ot_st_find(l, tg->name);
    if (!tl || tl->numel != tg->numel || off + tg->numel + 1 > in->dim) {
      rc = ot_error(OT_ERR_MISMATCH, "the trained adapter does not match the round's (%s)", tg->name);
      break;
    }
    a = malloc(tg->numel * sizeof *a + 1);
    if (!a) rc = ot_error(OT_ERR_NOMEM, "cannot allocate");
    if (rc == OT_OK) rc = ot_st_read_f32(g, tg, a, tg->numel);
    if (rc == OT_OK) rc = ot_st_read_f32(l, tl, v + off, tl->numel);
    for (uint64_t k = 0; rc == OT_OK && k < tg->numel; k++) v[off + k] -= a[k];
    free(a);
    a = NULL;
    off += tg->numel;
  }
  ot_st_close(g);
  ot_st_close(l);
  if (rc == OT_OK && off + 1 != in->dim)
    rc = ot_error(OT_ERR_MISMATCH, "the round's adapter has %llu floats, the cloud expects %u",
                  (unsigned long long)off, in->dim - 1);
  double norm = 0;
  if (rc == OT_OK && in->has_dp_clip && in->dp_clip > 0) {
    rc = ot_dp_clip_l2(v, off, in->dp_clip, &norm);
    if (rc == OT_OK)
      fprintf(stderr, "[run] differential privacy: update norm %.4f clipped to %.4f\n", norm,
              (double)in->dp_clip);
  }
  float big = 0;
  for (uint64_t k = 0; rc == OT_OK && k < off; k++) {
    v[k] = (float)(v[k] * w);
    if (fabsf(v[k]) > big) big = fabsf(v[k]);
  }
  if (rc == OT_OK) v[off] = (float)w;
  if (rc == OT_OK && big > in->clip)
    fprintf(stderr,
            "[run] secure aggregation: a coordinate of %.4f exceeds the quantisation range %.4f and "
            "is clamped\n",
            big, (double)in->clip);
  if (rc == OT_OK)
    *out = v;
  else
    free(v);
  return rc;
}

int ot_dev_secagg_step(ot_dev_secagg **stp, const ot_identity *id, ot_client *c, const char *work,
                       const Offtune__Session__RoundInfo *ri, uint32_t *answered) {
  const Offtune__Session__SecAggInfo *in = ri->secagg;
  *answered = 0;
  if (!in || !in->has_round_id || !in->has_dim || !in->has_clip || in->n_roster < 2 || in->dim < 2)
    return ot_error(OT_ERR_FORMAT, "incomplete secure-aggregation RoundInfo");
  ot_dev_secagg *st = *stp;
  if (st && st->round_id != in->round_id) {
    ot_dev_secagg_free(st);
    st = *stp = NULL;
  }
  int rc = OT_OK;
  if (!st) {
    if (in->stage != OT_SA_ADVERTISE)
      return ot_error(OT_ERR_MISMATCH, "secure aggregation: joined late (stage %u): out of this round",
                      in->stage);
    uint8_t(*roster)[OT_PK_BYTES] = calloc(in->n_roster, sizeof *roster);
    if (!roster) return ot_error(OT_ERR_NOMEM, "cannot allocate");
    for (size_t i = 0; rc == OT_OK && i < in->n_roster; i++) {
      if (in->roster[i].len != OT_PK_BYTES)
        rc = ot_error(OT_ERR_FORMAT, "bad roster key");
      else
        memcpy(roster[i], in->roster[i].data, OT_PK_BYTES);
    }
    ot_secagg_params p = {.dim = in->dim,
                          .clip = in->clip,
                          .stochastic = 1,
                          .degree = in->has_degree ? in->degree : 0,
                          .threshold = in->has_threshold ? in->threshold : 0};
    st = calloc(1, sizeof *st);
    if (rc == OT_OK && !st) rc = ot_error(OT_ERR_NOMEM, "cannot allocate");
    if (rc == OT_OK)
      rc = ot_secagg_client_new(id, &p, in->round_id, (const uint8_t(*)[OT_PK_BYTES])roster,
                                (uint32_t)in->n_roster, &st->c);
    free(roster);
    if (rc) {
      free(st);
      return rc;
    }
    st->round_id = in->round_id;
    *stp = st;
    fprintf(stderr, "[run] %s round %u: secure aggregation with %zu devices (I am %u)\n", ri->session,
            ri->round, in->n_roster, ot_secagg_client_index(st->c));
  }
  if ((in->has_answered && in->answered) || in->stage <= st->sent_stage) return OT_OK;
  if (in->stage != OT_SA_ADVERTISE && !in->has_msg)
    return ot_error(OT_ERR_FORMAT, "secure aggregation stage %u without the cloud's message", in->stage);
  uint8_t *m = NULL;
  size_t ml = 0;
  int accepted = 0, via = 0;
  switch (in->stage) {
  case OT_SA_ADVERTISE: rc = ot_secagg_client_advertise(st->c, &m, &ml); break;
  case OT_SA_SHARES: rc = ot_secagg_client_on_keys(st->c, in->msg.data, in->msg.len, &m, &ml); break;
  case OT_SA_MASKED: {
    float *v = NULL;
    rc = ot_secagg_client_on_shares(st->c, in->msg.data, in->msg.len);
    if (rc == OT_OK) rc = build_update(work, in, &v);
    if (rc == OT_OK) rc = ot_secagg_client_mask_input(st->c, v, in->dim, &m, &ml);
    if (v) sodium_memzero(v, (size_t)in->dim * sizeof *v);
    free(v);
    via = 1;
    break;
  }
  case OT_SA_UNMASK: rc = ot_secagg_client_on_unmask(st->c, in->msg.data, in->msg.len, &m, &ml); break;
  default: rc = ot_error(OT_ERR_FORMAT, "secure aggregation stage %u", in->stage);
  }
  if (rc == OT_OK) rc = send_msg(c, ri, st->round_id, m, ml, via, &accepted);
  free(m);
  if (rc == OT_OK) {
    st->sent_stage = in->stage; /* answered once, accepted or not: a stage is never replayed */
    fprintf(stderr, "[run] %s round %u: secure aggregation stage %u %s\n", ri->session, ri->round, in->stage,
            accepted ? "answered" : "refused");
    if (accepted) *answered = in->stage;
  }
  return rc;
}

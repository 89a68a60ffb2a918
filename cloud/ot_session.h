/* A federated tuning session's settings: what the operator gave to `session create`,
 * stored as JSON in the registry (sessions.config) and parsed back (and validated)
 * whenever the daemon needs them. */
#ifndef OT_SESSION_H
#define OT_SESSION_H

#include <cjson/cJSON.h>

#include "ot_peft.h"
#include "ot_aggregate.h"

#define OT_NAME_MAX 64 /* session, model and adapter names: [A-Za-z0-9_-], 1..63 characters */

typedef struct {
  char name[OT_NAME_MAX];
  char model[OT_NAME_MAX]; /* registered model name */
  /* emulator */
  int bottom, top, keep; /* keep 0: half of the middle */
  int distill_steps, distill_batch, distill_seq;
  char distill_data[1024]; /* "" = the Brown public genres */
  /* held-out public text the emulator's gap is measured on ("" = the Brown pretraining
   * genres' held-out documents, which neither the base nor the emulator trained on) */
  char gap_data[1024];
  /* > 0: the gap the operator wants (0.15 = 15%); the cloud chooses keep (at most keep, or
   * half the middle) and distillation steps (at most distill_steps) to reach it */
  float target_gap;
  /* "" = none; else the cloud's own held-out text, scored after each round with the round's
   * adapter plugged into the full model (the round's record: docs/report.md) */
  char eval_data[1024];
  /* adapter and local training */
  ot_peft_config adapter;
  int steps, batch, seq_len;
  float lr;
  /* devices tune against the middle plus fresh noise of this x each matrix's rms each step
   * (ot_emu_noise_create: the adapter cannot fit the emulator's own middle); 0 = off */
  float middle_noise;
  /* devices send the mean of their adapter's weights after each of a round's last N steps (tail
   * averaging, N <= steps); 0 = the last weights */
  int average_last;
  /* rounds */
  int rounds, min_devices, max_devices, deadline_s, max_retries;
  /* aggregation */
  ot_agg_kind agg;
  float mu;                                /* FedProx */
  float server_lr, beta1, beta2, adam_eps; /* FedAdam */
  /* L2 bound on a device's update (its adapter minus the round's adapter): refused
   * above it (fedavg-clip: clipped to it); 0: no bound. Under secure aggregation the
   * unmasked sum of n updates must stay within n x the bound. */
  float max_update_norm;
  float trim_fraction; /* trimmed-mean: fraction trimmed per side */
  /* privacy (docs/secagg.md, "Sessions") */
  int secagg;         /* OT_SECAGG_AUTO / _OFF / _ON */
  float secagg_range; /* quantisation range per coordinate of a masked update */
  float dp_epsilon;   /* 0: no differential privacy */
  float dp_delta, dp_clip;
  float dp_noise; /* noise multiplier z; 0: the least z that fits the budget over `rounds` */
} ot_session_cfg;

enum { OT_SECAGG_AUTO = -1, OT_SECAGG_OFF = 0, OT_SECAGG_ON = 1 };
/* Secure aggregation for this session's rounds: on, or auto with min_devices >= 3 (every
 * round then has at least 3 devices). */
int ot_session_secagg(const ot_session_cfg *c);
/* The DP noise multiplier of the session (calibrated when dp_noise is 0). */
int ot_session_dp_noise(const ot_session_cfg *c, double *z);

void ot_session_cfg_default(ot_session_cfg *c);
/* Validates and fills c from the JSON form; unknown keys are refused. */
int ot_session_cfg_from_json(const cJSON *j, ot_session_cfg *out);
cJSON *ot_session_cfg_to_json(const ot_session_cfg *c);
/* The settings that determine the emulator (one emulator per model and key). */
void ot_session_emu_key(const ot_session_cfg *c, char *out, size_t n);
/* 1 if s is a valid session/model/adapter name. */
int ot_name_ok(const char *s);

#endif

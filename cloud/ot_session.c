#include "ot_session.h"

#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>

#include "ot_dp.h"
#include "ot_error.h"

int ot_name_ok(const char *s) {
  size_t n = s ? strlen(s) : 0;
  if (n < 1 || n >= OT_NAME_MAX) return 0;
  for (size_t i = 0; i < n; i++) {
    char ch = s[i];
    if (!((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') || ch == '_' ||
          ch == '-'))
      return 0;
  }
  return 1;
}

void ot_session_cfg_default(ot_session_cfg *c) {
  memset(c, 0, sizeof *c);
  c->bottom = 2;
  c->top = 2;
  c->distill_steps = 200;
  c->distill_batch = 8;
  ot_peft_config_default(&c->adapter);
  c->steps = 50;
  c->batch = 8;
  c->lr = 1e-3f;
  c->rounds = 3;
  c->min_devices = 1;
  c->max_devices = 3;
  c->deadline_s = 600;
  c->max_retries = 3;
  c->agg = OT_AGG_FEDAVG;
  c->mu = 0.01f;
  c->server_lr = 1e-2f;
  c->beta1 = 0.9f;
  c->beta2 = 0.99f;
  c->adam_eps = 1e-3f;
  /* generous, so that no honest update is ever refused (their norms are ~1 in test_session,
   * ~6 in the Brown demo) while the absurd ones (issue 14: 1e38) are; below it FedAvg is
   * bit-for-bit what it was without a bound. A real bound is the operator's to set. */
  c->max_update_norm = 1e6f;
  c->trim_fraction = 0.1f;
  c->secagg = OT_SECAGG_AUTO;
  c->secagg_range = 4.0f;
  c->dp_delta = 1e-5f;
  c->dp_clip = 1.0f;
}

int ot_session_secagg(const ot_session_cfg *c) {
  return c->secagg == OT_SECAGG_ON || (c->secagg == OT_SECAGG_AUTO && c->min_devices >= 3);
}

/* Every enrolled device takes part in every round: q = 1, no amplification by sampling. */
int ot_session_dp_noise(const ot_session_cfg *c, double *z) {
  if (c->dp_epsilon <= 0) return ot_error(OT_ERR_INVALID, "session '%s' has no DP budget", c->name);
  if (c->dp_noise > 0) {
    *z = c->dp_noise;
    return OT_OK;
  }
  return ot_dp_find_noise(1.0, (uint32_t)c->rounds, c->dp_epsilon, c->dp_delta, z);
}

static const char *secagg_names[] = {"auto", "off", "on"};

typedef struct {
  const char *key;
  char type; /* i int, f float, s string (OT_NAME_MAX), p path string (1024) */
  size_t off;
  double lo, hi;
} field;

#define F(k, t, m, lo, hi)                                                                                   \
  { k, t, offsetof(ot_session_cfg, m), lo, hi }
static const field fields[] = {
    F("name", 's', name, 0, 0),
    F("model", 's', model, 0, 0),
    F("bottom", 'i', bottom, 0, 256),
    F("top", 'i', top, 0, 256),
    F("keep", 'i', keep, 0, 256),
    F("distill_steps", 'i', distill_steps, 1, 1e7),
    F("distill_batch", 'i', distill_batch, 1, 4096),
    F("distill_seq", 'i', distill_seq, 0, 1 << 20),
    F("distill_data", 'p', distill_data, 0, 0),
    F("gap_data", 'p', gap_data, 0, 0),
    F("target_gap", 'f', target_gap, 0, 9.99),
    F("eval_data", 'p', eval_data, 0, 0),
    F("lora_r", 'i', adapter.lora_r, 1, 4096),
    F("lora_alpha", 'f', adapter.lora_alpha, 1e-6, 1e6),
    F("lora_dropout", 'f', adapter.lora_dropout, 0, 0.999),
    F("bottleneck_dim", 'i', adapter.bottleneck_dim, 1, 1 << 16),
    F("lora_rslora", 'i', adapter.lora_rslora, 0, 1),
    F("steps", 'i', steps, 1, 1e7),
    F("batch", 'i', batch, 1, 4096),
    F("seq_len", 'i', seq_len, 0, 1 << 20),
    F("lr", 'f', lr, 1e-9, 10),
    F("middle_noise", 'f', middle_noise, 0, 100),
    F("average_last", 'i', average_last, 0, 1e7),
    F("rounds", 'i', rounds, 1, 100000),
    F("min_devices", 'i', min_devices, 1, 100000),
    F("max_devices", 'i', max_devices, 1, 100000),
    F("deadline_s", 'i', deadline_s, 1, 1e7),
    F("max_retries", 'i', max_retries, 0, 1000),
    F("mu", 'f', mu, 0, 1e6),
    F("server_lr", 'f', server_lr, 1e-9, 10),
    F("beta1", 'f', beta1, 0, 0.999999),
    F("beta2", 'f', beta2, 0, 0.999999),
    F("adam_eps", 'f', adam_eps, 1e-12, 1),
    F("max_update_norm", 'f', max_update_norm, 0, 1e30),
    F("trim_fraction", 'f', trim_fraction, 0.01, 0.49),
    F("secagg_range", 'f', secagg_range, 1e-3, 1e4),
    F("dp_epsilon", 'f', dp_epsilon, 0, 1e4),
    F("dp_delta", 'f', dp_delta, 1e-12, 0.1),
    F("dp_clip", 'f', dp_clip, 1e-6, 1e4),
    F("dp_noise", 'f', dp_noise, 0, 1e4),
};
#define N_FIELDS ((int)(sizeof fields / sizeof fields[0]))

int ot_session_cfg_from_json(const cJSON *j, ot_session_cfg *out) {
  ot_session_cfg c;
  ot_session_cfg_default(&c);
  if (!cJSON_IsObject(j)) return ot_error(OT_ERR_FORMAT, "session settings: not a JSON object");
  const cJSON *it;
  cJSON_ArrayForEach(it, j) {
    const char *k = it->string;
    if (strcmp(k, "adapter") == 0 || strcmp(k, "aggregation") == 0 || strcmp(k, "lora_targets") == 0 ||
        strcmp(k, "seed") == 0 || strcmp(k, "secagg") == 0) {
      if (strcmp(k, "seed") == 0) {
        if (!cJSON_IsNumber(it) || it->valuedouble < 0 || it->valuedouble > 9007199254740991.0)
          return ot_error(OT_ERR_INVALID, "session settings: 'seed' must be a non-negative integer");
        c.adapter.seed = (uint64_t)it->valuedouble;
        continue;
      }
      if (!cJSON_IsString(it)) return ot_error(OT_ERR_INVALID, "session settings: '%s' must be a string", k);
      int rc = OT_OK;
      if (strcmp(k, "adapter") == 0) rc = ot_peft_parse_kind(it->valuestring, &c.adapter.kind);
      if (strcmp(k, "lora_targets") == 0) rc = ot_lora_parse_targets(it->valuestring, &c.adapter.lora_sites);
      if (strcmp(k, "secagg") == 0) {
        int a = -2;
        for (int i = 0; i < 3; i++)
          if (strcmp(it->valuestring, secagg_names[i]) == 0) a = i - 1;
        if (a < -1)
          rc = ot_error(OT_ERR_INVALID, "secagg '%s': use auto, on or off", it->valuestring);
        else
          c.secagg = a;
      }
      if (strcmp(k, "aggregation") == 0) {
        rc = ot_agg_parse(it->valuestring, &c.agg);
      }
      if (rc) return rc;
      continue;
    }
    int f = 0;
    while (f < N_FIELDS && strcmp(fields[f].key, k) != 0) f++;
    if (f == N_FIELDS) return ot_error(OT_ERR_INVALID, "session settings: unknown key '%s'", k);
    char *dst = (char *)&c + fields[f].off;
    if (fields[f].type == 's' || fields[f].type == 'p') {
      size_t cap = fields[f].type == 's' ? OT_NAME_MAX : sizeof c.distill_data;
      if (!cJSON_IsString(it) || strlen(it->valuestring) >= cap)
        return ot_error(OT_ERR_INVALID, "session settings: '%s' must be a string under %zu bytes", k, cap);
      snprintf(dst, cap, "%s", it->valuestring);
      continue;
    }
    if (!cJSON_IsNumber(it) || !isfinite(it->valuedouble) || it->valuedouble < fields[f].lo ||
        it->valuedouble > fields[f].hi)
      return ot_error(OT_ERR_INVALID, "session settings: '%s' must be a number in [%g, %g]", k, fields[f].lo,
                      fields[f].hi);
    if (fields[f].type == 'i') {
      if (it->valuedouble != floor(it->valuedouble))
        return ot_error(OT_ERR_INVALID, "session settings: '%s' must be an integer", k);
      *(int *)(void *)dst = (int)it->valuedouble;
    } else {
      *(float *)(void *)dst = (float)it->valuedouble;
    }
  }
  if (!ot_name_ok(c.name))
    return ot_error(OT_ERR_INVALID, "session name '%s': use 1-63 of [A-Za-z0-9_-]", c.name);
  if (!ot_name_ok(c.model)) return ot_error(OT_ERR_INVALID, "model name '%s' is not valid", c.model);
  if (c.average_last > c.steps)
    return ot_error(OT_ERR_INVALID, "average_last %d exceeds the %d steps of a round", c.average_last,
                    c.steps);
  if (c.min_devices > c.max_devices)
    return ot_error(OT_ERR_INVALID, "min_devices %d exceeds max_devices %d", c.min_devices, c.max_devices);
  if (c.adapter.lora_sites == 0) return ot_error(OT_ERR_INVALID, "lora_targets names no module");
  if (c.secagg == OT_SECAGG_ON && c.max_devices < 3)
    return ot_error(OT_ERR_INVALID, "secure aggregation needs rounds of at least 3 devices (max_devices %d)",
                    c.max_devices);
  /* the robust rules look at each update; secure aggregation shows the cloud only the sum */
  if (ot_agg_robust(c.agg) && ot_session_secagg(&c))
    return ot_error(OT_ERR_INVALID,
                    "aggregation '%s' needs each device's update, which secure aggregation hides from the "
                    "cloud: use secagg off (auto turns it on when min_devices >= 3)",
                    ot_agg_name(c.agg));
  if (c.agg == OT_AGG_CLIP && !(c.max_update_norm > 0))
    return ot_error(OT_ERR_INVALID, "aggregation 'fedavg-clip' clips to max_update_norm: it must be > 0");
  /* the noise is central on the unmasked sum: without secure aggregation the cloud would
   * see each un-noised update, so DP is offered with it only */
  if (c.dp_epsilon > 0 && !ot_session_secagg(&c))
    return ot_error(OT_ERR_INVALID, "dp_epsilon needs secure aggregation (secagg on, or auto with "
                                    "min_devices >= 3)");
  if (c.dp_epsilon > 0 && c.dp_clip > c.secagg_range)
    return ot_error(OT_ERR_INVALID, "dp_clip %g exceeds secagg_range %g", c.dp_clip, c.secagg_range);
  *out = c;
  return OT_OK;
}

cJSON *ot_session_cfg_to_json(const ot_session_cfg *c) {
  cJSON *j = cJSON_CreateObject();
  if (!j) return NULL;
  for (int f = 0; f < N_FIELDS; f++) {
    const char *src = (const char *)c + fields[f].off;
    if (fields[f].type == 's' || fields[f].type == 'p')
      cJSON_AddStringToObject(j, fields[f].key, src);
    else if (fields[f].type == 'i')
      cJSON_AddNumberToObject(j, fields[f].key, *(const int *)(const void *)src);
    else
      cJSON_AddNumberToObject(j, fields[f].key, *(const float *)(const void *)src);
  }
  cJSON_AddStringToObject(j, "adapter", ot_peft_kind_name(c->adapter.kind));
  char targets[256] = "";
  ot_lora_format_targets(c->adapter.lora_sites, targets, sizeof targets);
  cJSON_AddStringToObject(j, "lora_targets", targets);
  cJSON_AddNumberToObject(j, "seed", (double)c->adapter.seed);
  cJSON_AddStringToObject(j, "aggregation", ot_agg_name(c->agg));
  cJSON_AddStringToObject(j, "secagg", secagg_names[c->secagg + 1]);
  return j;
}

void ot_session_emu_key(const ot_session_cfg *c, char *out, size_t n) {
  int len = snprintf(out, n, "bottom=%d,top=%d,keep=%d,steps=%d,batch=%d,seq=%d,data=%s", c->bottom, c->top,
                     c->keep, c->distill_steps, c->distill_batch, c->distill_seq, c->distill_data);
  /* only sessions with a target differ from the keys registries already hold */
  if (c->target_gap > 0 && len >= 0 && (size_t)len < n)
    snprintf(out + len, n - (size_t)len, ",target_gap=%g,gap_data=%s", c->target_gap, c->gap_data);
}

/* The daemon's serving: one base model in memory, the adapters its sessions published
 * (looked up in the registry on every request, so publish/unpublish/delete take effect at
 * once), through the serving engine and its OpenAI-style HTTP API (docs/serving.md). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ot_cloud_cmd.h"
#include "ot_daemon.h"
#include "ot_dashboard.h"
#include "ot_error.h"
#include "ot_serve_api.h"
#include "ot_serve_engine.h"

struct ot_daemon_serving {
  ot_daemon *d;
  char model_name[OT_NAME_MAX], digest[OT_DIGEST_HEX], url[600];
  ot_backend *be;
  ot_model *m;
  ot_tokenizer *tok;
  ot_chat_config *chat;
  ot_serve_engine *eng;
  ot_serve_http *api;
  ot_dashboard dash; /* GET /dashboard: the operator's, on the same address */
};

typedef struct {
  char *dir;
  size_t cap;
} lookup;

static void found_dir(void *user, const char *name, const char *dir) {
  (void)name;
  lookup *l = user;
  snprintf(l->dir, l->cap, "%s", dir);
}

static int resolve(void *user, const char *name, char *dir, size_t cap) {
  ot_daemon_serving *s = user;
  lookup l = {dir, cap};
  int n = 0;
  int rc = ot_reg_adapters_published(s->d->reg, s->digest, name, found_dir, &l, &n);
  if (rc == OT_OK && n == 0)
    rc = ot_error(OT_ERR_NOTFOUND, "the model '%s' does not exist (no published adapter of that name on %s)",
                  name, s->model_name);
  return rc;
}

typedef struct {
  void (*add)(void *ctx, const char *name);
  void *ctx;
} lister;

static void add_name(void *user, const char *name, const char *dir) {
  (void)dir;
  lister *l = user;
  l->add(l->ctx, name);
}

static void list(void *user, void (*add)(void *ctx, const char *name), void *ctx) {
  ot_daemon_serving *s = user;
  lister l = {add, ctx};
  if (ot_reg_adapters_published(s->d->reg, s->digest, NULL, add_name, &l, NULL) != OT_OK)
    ot_daemon_log(s->d, "serving: cannot list adapters: %s", ot_error_detail());
}

static void log_line(void *user, const char *line) { ot_daemon_log(user, "serving: %s", line); }

void ot_daemon_serving_stop(ot_daemon_serving *s) {
  if (!s) return;
  if (s->api) ot_serve_http_stop(s->api); /* before the engine: it completes the replies */
  ot_serve_engine_free(s->eng);
  ot_tokenizer_free(s->tok);
  ot_chat_config_free(s->chat);
  ot_model_free(s->m);
  ot_backend_free(s->be);
  ot_dashboard_wipe(&s->dash);
  free(s);
}

/* The serving API's keys from the daemon's registry (offtune-cloud keys create --state DIR). */
static int check_key(void *user, const char *key, ot_serve_principal *p) {
  ot_daemon_serving *s = user;
  ot_api_key_row row;
  int rc = ot_reg_api_key_check(s->d->reg, key, &row);
  if (rc) return rc;
  if (row.revoked_at) return ot_error(OT_ERR_INVALID, "API key %s is revoked", row.id);
  memset(p, 0, sizeof *p);
  snprintf(p->tenant, sizeof p->tenant, "%s", row.tenant);
  p->admin = row.admin;
  p->base_allowed = ot_api_key_allows_model(&row, s->model_name);
  return OT_OK;
}

/* The daemon's part of GET /metrics: devices, sessions and rounds by state, uploads by fate
 * (from the audit log: accepted, refused, clipped, refused by secure aggregation). */
static void daemon_metrics(void *user, void (*line)(void *ctx, const char *text), void *ctx) {
  ot_daemon_serving *s = user;
  cJSON *rows = NULL;
  if (ot_reg_list_json(s->d->reg, "counts", NULL, &rows) != OT_OK) return;
  static const struct {
    const char *metric, *name, *label, *help;
  } kinds[] = {
      {"devices", "offtune_daemon_devices", "state", "Enrolled devices, active or revoked."},
      {"sessions", "offtune_daemon_sessions", "state", "Tuning sessions by state."},
      {"rounds", "offtune_daemon_rounds", "state", "Rounds by state."},
      {"updates", "offtune_daemon_updates_stored", NULL, "Device updates stored (accepted into a round)."},
      {"audit", "offtune_daemon_update_events_total", "event",
       "Uploads and updates by fate (audit events: update.accepted, update.refused, update.clipped, "
       "secagg.refused, secagg.refused_sum)."},
  };
  char buf[512];
  for (size_t k = 0; k < sizeof kinds / sizeof *kinds; k++) {
    snprintf(buf, sizeof buf, "# HELP %s %s\n# TYPE %s %s", kinds[k].name, kinds[k].help, kinds[k].name,
             k == 4 ? "counter" : "gauge");
    line(ctx, buf);
    const cJSON *r;
    cJSON_ArrayForEach(r, rows) {
      const char *m = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(r, "metric"));
      const char *l = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(r, "label"));
      double v = cJSON_GetNumberValue(cJSON_GetObjectItemCaseSensitive(r, "value"));
      if (!m || strcmp(m, kinds[k].metric) != 0) continue;
      if (kinds[k].label)
        snprintf(buf, sizeof buf, "%s{%s=\"%s\"} %.0f", kinds[k].name, kinds[k].label, l ? l : "", v);
      else
        snprintf(buf, sizeof buf, "%s %.0f", kinds[k].name, v);
      line(ctx, buf);
    }
  }
  cJSON_Delete(rows);
}

int ot_daemon_serving_start(ot_daemon *d, const char *model_name, const char *http, int threads, int keys,
                            int kv_mib, int kv_block_size, ot_daemon_serving **out) {
  ot_daemon_serving *s = calloc(1, sizeof *s);
  if (!s) return ot_error(OT_ERR_NOMEM, "cannot allocate");
  s->d = d;
  snprintf(s->model_name, sizeof s->model_name, "%s", model_name);
  char dir[1024];
  int rc = ot_reg_model_get(d->reg, model_name, dir, s->digest);
  if (rc == OT_OK) rc = ot_backend_cpu_create(threads, &s->be);
  if (rc == OT_OK) rc = ot_model_open_dir(dir, s->be, &s->m, &s->tok);
  if (rc == OT_OK) rc = ot_chat_config_load_dir(dir, &s->chat); /* a broken template fails here */
  int32_t eos = rc == OT_OK ? ot_serve_eos_id(s->tok, s->chat) : -1;
  ot_serve_config sc;
  ot_serve_config_default(&sc);
  sc.resolve = resolve;
  sc.resolve_user = s;
  sc.tok = s->tok;
  sc.eos_id = eos;
  sc.base_digest = s->digest;
  sc.kv_bytes = (size_t)kv_mib << 20;
  sc.kv_block_size = kv_block_size;
  if (rc == OT_OK) rc = ot_dashboard_init(&s->dash, d);
  if (rc == OT_OK) rc = ot_serve_engine_create(s->m, &sc, &s->eng);
  if (rc == OT_OK) rc = ot_serve_start(s->eng);
  if (rc == OT_OK) {
    snprintf(s->url, sizeof s->url, "%s%s", strncmp(http, "http://", 7) ? "http://" : "", http);
    ot_serve_http_config hc = {.url = s->url,
                               .engine = s->eng,
                               .tok = s->tok,
                               .base_name = s->model_name,
                               .list = list,
                               .list_user = s,
                               .eos_id = eos,
                               .chat = s->chat,
                               .auth = keys ? check_key : NULL,
                               .auth_user = s,
                               .metrics = daemon_metrics,
                               .metrics_user = s,
                               .log = log_line,
                               .log_user = d,
                               .extra_routes = s->dash.routes,
                               .n_extra_routes = 2};
    rc = ot_serve_http_start(&hc, &s->api);
  }
  if (rc) {
    ot_daemon_serving_stop(s);
    return rc;
  }
  /* the address clients use: the port actually bound (":0" picks one) */
  const char *colon = strrchr(s->url, ':');
  if (colon)
    snprintf(s->url + (colon - s->url), sizeof s->url - (size_t)(colon - s->url), ":%d",
             ot_serve_http_port(s->api));
  ot_daemon_log(d,
                "serving model '%s' and its sessions' published adapters on %s (POST /v1/completions%s); %s; "
                "operator dashboard %s/dashboard (loopback or STATE/dashboard.key)",
                model_name, s->url, s->chat && s->chat->tmpl ? ", /v1/chat/completions" : "",
                keys ? "API keys from the registry" : "UNAUTHENTICATED (no --http-keys)", s->url);
  *out = s;
  return OT_OK;
}

const char *ot_daemon_serving_url(const ot_daemon_serving *s) { return s->url; }

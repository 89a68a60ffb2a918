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
  ot_gpt2 *m;
  ot_tokenizer *tok;
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
  ot_gpt2_free(s->m);
  ot_backend_free(s->be);
  ot_dashboard_wipe(&s->dash);
  free(s);
}

int ot_daemon_serving_start(ot_daemon *d, const char *model_name, const char *http, int threads,
                            ot_daemon_serving **out) {
  ot_daemon_serving *s = calloc(1, sizeof *s);
  if (!s) return ot_error(OT_ERR_NOMEM, "cannot allocate");
  s->d = d;
  snprintf(s->model_name, sizeof s->model_name, "%s", model_name);
  char dir[1024];
  int rc = ot_reg_model_get(d->reg, model_name, dir, s->digest);
  if (rc == OT_OK) rc = ot_cmd_load_model(dir, "cpu", threads, &s->be, &s->m, &s->tok);
  int32_t eos = -1;
  if (rc == OT_OK && ot_tokenizer_token_id(s->tok, "<|endoftext|>", &eos) != OT_OK) {
    eos = -1;
    ot_error_clear();
  }
  ot_serve_config sc;
  ot_serve_config_default(&sc);
  sc.resolve = resolve;
  sc.resolve_user = s;
  sc.tok = s->tok;
  sc.eos_id = eos;
  sc.base_digest = s->digest;
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
                "serving model '%s' and its sessions' published adapters on %s (POST /v1/completions); "
                "operator dashboard %s/dashboard (loopback or STATE/dashboard.key)",
                model_name, s->url, s->url);
  *out = s;
  return OT_OK;
}

const char *ot_daemon_serving_url(const ot_daemon_serving *s) { return s->url; }

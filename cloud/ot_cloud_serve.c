/* offtune-cloud serve-model: one base model, many adapters, an OpenAI-style HTTP API and the
 * tenants' nng request API, until SIGINT/SIGTERM. */
#include <dirent.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ot_access.h"
#include "ot_cli.h"
#include "ot_cloud_cmd.h"
#include "ot_emulator.h"
#include "ot_error.h"
#include "ot_fileio.h"
#include "ot_regdb.h"
#include "ot_registry.h"
#include "ot_serve_api.h"
#include "ot_serve_engine.h"
#include "ot_transport.h"

#define N_OPTS(o) ((int)(sizeof(o) / sizeof((o)[0])))
#define MAX_NAMED 256

/* The named adapters (--adapter, and those loaded at run time) and --adapters-dir; the HTTP
 * thread loads and unloads while the engine resolves: one lock. */
typedef struct {
  char *name[MAX_NAMED], *dir[MAX_NAMED];
  int n;
  const char *adapters_dir;
  pthread_mutex_t mu;
} registry;

static void registry_free(registry *r) {
  for (int i = 0; i < r->n; i++) {
    free(r->name[i]);
    free(r->dir[i]);
  }
  r->n = 0;
}

static int part_ok(const char *s, size_t n) {
  if (n == 0 || *s == '.' || n > 100) return 0;
  for (size_t i = 0; i < n; i++)
    if (s[i] == '/' || s[i] == '\\' || (unsigned char)s[i] < 0x20) return 0;
  return 1;
}

/* An adapter name: NAME (the operator's) or TENANT/NAME (a tenant's: --adapters-dir/TENANT/NAME). */
static int name_ok(const char *s) {
  const char *slash = strchr(s, '/');
  if (!slash) return part_ok(s, strlen(s));
  return ot_api_tenant_ok_n(s, (size_t)(slash - s)) && part_ok(slash + 1, strlen(slash + 1));
}

/* Named adapters first, then a subdirectory of --adapters-dir holding an adapter. */
static int resolve(void *user, const char *name, char *dir, size_t cap) {
  registry *r = user;
  pthread_mutex_lock(&r->mu);
  for (int i = 0; i < r->n; i++)
    if (strcmp(r->name[i], name) == 0) {
      snprintf(dir, cap, "%s", r->dir[i]);
      pthread_mutex_unlock(&r->mu);
      return OT_OK;
    }
  pthread_mutex_unlock(&r->mu);
  if (r->adapters_dir && name_ok(name)) {
    char cand[4096];
    snprintf(cand, sizeof cand, "%s/%s", r->adapters_dir, name);
    if (ot_peft_is_adapter_dir(cand)) {
      snprintf(dir, cap, "%s/%s", r->adapters_dir, name);
      return OT_OK;
    }
  }
  return ot_error(OT_ERR_NOTFOUND, "the model '%s' does not exist", name);
}

/* The adapters in dir (prefix "" or "TENANT/"); one level of tenant directories below the top. */
static void list_dir(registry *r, const char *dir, const char *prefix,
                     void (*add)(void *ctx, const char *name), void *ctx) {
  DIR *d = opendir(dir);
  struct dirent *de;
  while (d && (de = readdir(d))) {
    char cand[4096], name[256];
    snprintf(name, sizeof name, "%s%s", prefix, de->d_name);
    if (!part_ok(de->d_name, strlen(de->d_name)) || !name_ok(name)) continue;
    snprintf(cand, sizeof cand, "%s/%s", dir, de->d_name);
    int shadowed = 0;
    for (int i = 0; i < r->n; i++) shadowed |= strcmp(r->name[i], name) == 0;
    if (!shadowed && ot_peft_is_adapter_dir(cand)) {
      add(ctx, name);
    } else if (!*prefix && ot_api_tenant_ok(de->d_name)) {
      char sub[4096], pre[300];
      snprintf(sub, sizeof sub, "%s/%s", dir, de->d_name);
      snprintf(pre, sizeof pre, "%s/", de->d_name);
      list_dir(r, sub, pre, add, ctx);
    }
  }
  if (d) closedir(d);
}

static void list(void *user, void (*add)(void *ctx, const char *name), void *ctx) {
  registry *r = user;
  pthread_mutex_lock(&r->mu);
  for (int i = 0; i < r->n; i++) add(ctx, r->name[i]);
  if (r->adapters_dir) list_dir(r, r->adapters_dir, "", add, ctx);
  pthread_mutex_unlock(&r->mu);
}

/* POST /v1/load_lora_adapter: the name now means the adapter in path (the API then loads it
 * through the engine with every check, and unloads it again if one fails). */
static int load_adapter(void *user, const char *name, const char *path) {
  registry *r = user;
  if (!name_ok(name)) return ot_error(OT_ERR_INVALID, "bad adapter name '%s' (NAME or TENANT/NAME)", name);
  if (!ot_peft_is_adapter_dir(path))
    return ot_error(OT_ERR_INVALID,
                    "%s is not an adapter directory (no offtune_adapter.json or adapter_config.json)", path);
  char *n = strdup(name), *d = strdup(path);
  int rc = n && d ? OT_OK : ot_error(OT_ERR_NOMEM, "cannot allocate");
  pthread_mutex_lock(&r->mu);
  int i = 0;
  while (i < r->n && strcmp(r->name[i], name) != 0) i++;
  if (rc == OT_OK && i == r->n && r->n == MAX_NAMED)
    rc = ot_error(OT_ERR_INVALID, "at most %d named adapters", MAX_NAMED);
  if (rc == OT_OK) {
    if (i == r->n) {
      r->name[r->n++] = n;
    } else {
      free(n);
      free(r->dir[i]);
    }
    r->dir[i] = d;
    n = d = NULL;
  }
  pthread_mutex_unlock(&r->mu);
  free(n);
  free(d);
  return rc;
}

static int unload_adapter(void *user, const char *name) {
  registry *r = user;
  pthread_mutex_lock(&r->mu);
  int i = 0, found;
  while (i < r->n && strcmp(r->name[i], name) != 0) i++;
  found = i < r->n;
  if (found) {
    free(r->name[i]);
    free(r->dir[i]);
    r->name[i] = r->name[r->n - 1];
    r->dir[i] = r->dir[r->n - 1];
    r->n--;
  }
  pthread_mutex_unlock(&r->mu);
  return found ? OT_OK : ot_error(OT_ERR_NOTFOUND, "no named adapter '%s'", name);
}

/* --keys: the serving API's keys in a registry database (offtune-cloud keys). Every request
 * looks its key up, so a revocation holds from the next request. */
typedef struct {
  ot_registry *reg;
  const char *base_name;
} keyring;

static int check_key(void *user, const char *key, ot_serve_principal *p) {
  keyring *k = user;
  ot_api_key_row row;
  int rc = ot_reg_api_key_check(k->reg, key, &row);
  if (rc) return rc;
  if (row.revoked_at) return ot_error(OT_ERR_INVALID, "API key %s is revoked", row.id);
  memset(p, 0, sizeof *p);
  snprintf(p->tenant, sizeof p->tenant, "%s", row.tenant);
  p->admin = row.admin;
  p->base_allowed = ot_api_key_allows_model(&row, k->base_name);
  return OT_OK;
}

/* Log lines come from the HTTP, engine and request-API threads: one lock keeps them whole. */
typedef struct {
  pthread_mutex_t mu;
} serve_log;

static void log_line(void *user, const char *line) {
  serve_log *lg = user;
  time_t t = time(NULL);
  struct tm tm;
  char ts[32];
  strftime(ts, sizeof ts, "%Y-%m-%dT%H:%M:%S", gmtime_r(&t, &tm));
  pthread_mutex_lock(&lg->mu);
  fprintf(stderr, "%s %s\n", ts, line);
  fflush(stderr);
  pthread_mutex_unlock(&lg->mu);
}

/* The request-API server hands its callbacks the ot_serve_rpc; its log goes the same way. */
static void rpc_log(void *user, const char *line) {
  const ot_serve_rpc *rpc = user;
  rpc->log(rpc->log_user, line);
}

/* --adapter NAME=DIR repeats, which the table parser does not do: take every occurrence out
 * of argv into reg, leaving the rest in rest[] (argc + 1 entries) for ot_cli_parse. */
static int take_adapters(int argc, char **argv, registry *reg, char **rest, int *nrest) {
  int rc = OT_OK;
  *nrest = 0;
  for (int i = 0; i < argc && rc == OT_OK; i++) {
    const char *v = NULL;
    if (strcmp(argv[i], "--adapter") == 0) {
      if (i + 1 >= argc) rc = ot_error(OT_ERR_INVALID, "--adapter needs NAME=DIR");
      v = i + 1 < argc ? argv[++i] : NULL;
    } else if (strncmp(argv[i], "--adapter=", 10) == 0) {
      v = argv[i] + 10;
    } else {
      rest[(*nrest)++] = argv[i];
      continue;
    }
    const char *eq = v ? strchr(v, '=') : NULL;
    if (rc == OT_OK && (!eq || eq == v || !eq[1]))
      rc = ot_error(OT_ERR_INVALID, "--adapter '%s': expected NAME=DIR", v ? v : "");
    if (rc == OT_OK && reg->n == MAX_NAMED) rc = ot_error(OT_ERR_INVALID, "at most %d --adapter", MAX_NAMED);
    if (rc == OT_OK) {
      char *nm = strndup(v, (size_t)(eq - v)), *dir = strdup(eq + 1);
      if (!nm || !dir || !name_ok(nm)) {
        free(nm);
        free(dir);
        rc = ot_error(OT_ERR_INVALID, "--adapter: bad name in '%s'", v);
      } else {
        reg->name[reg->n] = nm;
        reg->dir[reg->n++] = dir;
      }
    }
  }
  return rc;
}

int ot_cmd_serve_model(int argc, char **argv) {
  const char *model = NULL, *adapters_dir = NULL, *http = NULL, *listen = NULL, *key = NULL, *access = NULL,
             *backend = "cpu", *name = NULL, *keys = NULL;
  int open_http = 0, version = 0;
  const char *adapter_unused = NULL; /* take_adapters() removes every --adapter before parsing */
  int max_batch = 32, step_tokens = 512, max_seq = 0, memory_mib = 1024, threads = 0, workers = 8;
  int kv_mib = 0, kv_blocks = 0, kv_block_size = 16;
  int http_conns = OT_HTTP_MAX_CONNS, http_conns_peer = OT_HTTP_MAX_CONNS_PER_PEER;
  const ot_opt opts[] = {
      {"model", OT_OPT_STR, &model, "DIR", "base model checkpoint directory (with its tokenizer)"},
      {"adapter", OT_OPT_STR, &adapter_unused, "NAME=DIR",
       "serve the adapter in DIR as model NAME (repeatable)"},
      {"adapters-dir", OT_OPT_STR, &adapters_dir, "DIR",
       "every subdirectory holding an adapter is an adapter named by the subdirectory"},
      {"name", OT_OPT_STR, &name, "ID", "model id of the base model (default: the --model directory's name)"},
      {"http", OT_OPT_STR, &http, "HOST:PORT", "OpenAI-style HTTP API address (e.g. 127.0.0.1:8000)"},
      {"keys", OT_OPT_STR, &keys, "FILE",
       "API keys for --http: a registry database (offtune-cloud keys create --registry FILE); without it the "
       "HTTP API is unauthenticated and must listen on loopback"},
      {"allow-unauthenticated", OT_OPT_FLAG, &open_http, NULL,
       "let --http listen beyond loopback without --keys (anyone who reaches it uses every adapter)"},
      {"version", OT_OPT_FLAG, &version, NULL, "print the version and exit"},
      {"http-max-conns", OT_OPT_INT, &http_conns, "N", "HTTP connections open at once (default 256)"},
      {"http-max-conns-per-client", OT_OPT_INT, &http_conns_peer, "N",
       "HTTP connections open at once from one client address (default 32)"},
      {"listen", OT_OPT_STR, &listen, "URL", "tenants' encrypted nng request API (e.g. tcp://0.0.0.0:7000)"},
      {"key", OT_OPT_STR, &key, "FILE", "the cloud's identity for --listen (offtune-cloud keygen)"},
      {"access", OT_OPT_STR, &access, "FILE", "allowlist for --listen (offtune-cloud access)"},
      {"max-batch", OT_OPT_INT, &max_batch, "N", "requests running at once at most (default 32)"},
      {"kv-mib", OT_OPT_INT, &kv_mib, "MiB",
       "KV cache memory: a pool of blocks shared by the running requests; when full, requests wait and "
       "running ones are preempted (default: max-batch x max-seq positions, never full)"},
      {"kv-blocks", OT_OPT_INT, &kv_blocks, "N", "KV cache memory in blocks instead of --kv-mib"},
      {"kv-block-size", OT_OPT_INT, &kv_block_size, "N",
       "positions per KV cache block (default 16; = --max-seq gives fixed slots of max-seq positions)"},
      {"max-step-tokens", OT_OPT_INT, &step_tokens, "N",
       "rows per forward step, prefills included (default 512)"},
      {"max-seq", OT_OPT_INT, &max_seq, "N",
       "context per request, prompt + completion (default: the model's)"},
      {"adapter-memory", OT_OPT_INT, &memory_mib, "MiB", "adapters kept loaded, LRU beyond (default 1024)"},
      {"threads", OT_OPT_INT, &threads, "N", "CPU threads (default: all cores)"},
      {"workers", OT_OPT_INT, &workers, "N", "nng request API worker threads (default 8)"},
      {"backend", OT_OPT_STR, &backend, "NAME", "cpu (default) or cuda"},
  };
  const char *syn =
      "offtune-cloud serve-model --model DIR [--adapter NAME=DIR]... [--adapters-dir DIR] "
      "[--http 127.0.0.1:8000] [--listen tcp://... --key FILE --access FILE] [--max-batch N] "
      "[--kv-mib MiB | --kv-blocks N] [--kv-block-size 16] [--adapter-memory MiB] [--threads N]";
  registry reg;
  memset(&reg, 0, sizeof reg);
  pthread_mutex_init(&reg.mu, NULL);
  char **rest = calloc((size_t)argc + 1, sizeof *rest);
  int nrest = 0, rc = rest ? OT_OK : ot_error(OT_ERR_NOMEM, "cannot allocate");
  if (rc == OT_OK) rc = take_adapters(argc, argv, &reg, rest, &nrest);
  if (rc == OT_OK) rc = ot_cli_parse(nrest, rest, opts, N_OPTS(opts));
  if (rc == OT_OK && version) {
    printf("offtune-cloud serve-model %s\n", OT_VERSION);
    registry_free(&reg);
    free(rest);
    return OT_EXIT_OK;
  }
  if (rc == 1) {
    ot_cli_usage(
        stdout, syn,
        "Serves generation for the base model and many adapters at once (continuous batching, KV cache,\n"
        "adapters of every kind batched together; loaded on demand, evicted LRU). HTTP: POST\n"
        "/v1/completions, /v1/chat/completions (the chat_template of the model's tokenizer_config.json)\n"
        "and GET /v1/models, OpenAI-compatible; \"model\" names the adapter. Runs until SIGINT or\n"
        "SIGTERM; one log line per request.",
        opts, N_OPTS(opts));
    registry_free(&reg);
    free(rest);
    return OT_EXIT_OK;
  }
  if (rc == OT_OK && !model) rc = ot_error(OT_ERR_INVALID, "--model is required");
  if (rc == OT_OK && !http && !listen) rc = ot_error(OT_ERR_INVALID, "give --http, --listen or both");
  if (rc == OT_OK && listen && (!key || !access))
    rc = ot_error(OT_ERR_INVALID, "--listen needs --key and --access");
  if (rc == OT_OK &&
      (max_batch < 1 || step_tokens < max_batch || max_seq < 0 || memory_mib < 1 || workers < 1))
    rc = ot_error(OT_ERR_INVALID,
                  "need --max-batch >= 1, --max-step-tokens >= --max-batch, --adapter-memory >= 1");
  if (rc == OT_OK && (kv_mib < 0 || kv_blocks < 0 || kv_block_size < 1 || (kv_mib && kv_blocks)))
    rc = ot_error(OT_ERR_INVALID, "need --kv-mib >= 1 or --kv-blocks >= 1 (not both), --kv-block-size >= 1");
  if (rc == OT_OK && keys && !http) rc = ot_error(OT_ERR_INVALID, "--keys is for --http");
  if (rc == OT_OK && keys && !ot_regdb_is_pg(keys) && !ot_file_exists(keys)) /* a typo would serve nobody */
    rc = ot_error(OT_ERR_INVALID,
                  "--keys %s: no such file (offtune-cloud keys create --registry %s makes it)", keys, keys);
  if (rc == OT_OK && http && !keys && !open_http && !ot_http_url_loopback(http))
    rc = ot_error(
        OT_ERR_INVALID,
        "--http %s is not a loopback address: give --keys FILE (API keys), or --allow-unauthenticated "
        "to serve every client without keys",
        http);
  if (rc == OT_OK && (http_conns < 1 || http_conns_peer < 1))
    rc = ot_error(OT_ERR_INVALID, "need --http-max-conns >= 1 and --http-max-conns-per-client >= 1");
  if (rc) {
    fprintf(stderr, "offtune-cloud serve-model: %s\n", ot_error_detail());
    ot_cli_usage(stderr, syn, NULL, opts, N_OPTS(opts));
    registry_free(&reg);
    free(rest);
    return OT_EXIT_USAGE;
  }
  reg.adapters_dir = adapters_dir;
  serve_log lg;
  pthread_mutex_init(&lg.mu, NULL);
  /* every thread started from here on inherits the blocked signals; main waits for them */
  sigset_t sigs;
  sigemptyset(&sigs);
  sigaddset(&sigs, SIGINT);
  sigaddset(&sigs, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &sigs, NULL);

  ot_backend *be = NULL;
  ot_model *m = NULL;
  ot_tokenizer *tok = NULL;
  ot_chat_config *chat = NULL;
  ot_serve_engine *eng = NULL;
  ot_serve_http *api = NULL;
  ot_server *server = NULL;
  ot_access *acl = NULL;
  keyring kr = {NULL, NULL};
  ot_identity id;
  memset(&id, 0, sizeof id);
  char digest[OT_DIGEST_HEX], base_name[128], url[600];
  const char *what = "loading the model";
  rc = ot_cmd_load_model(model, backend, threads, &be, &m, &tok);
  if (rc == OT_OK) rc = ot_model_dir_digest(model, digest);
  if (rc == OT_OK) {
    what = "reading the chat template"; /* a broken template is refused now, not at a request */
    rc = ot_chat_config_load_dir(model, &chat);
  }
  int32_t eos = rc == OT_OK ? ot_serve_eos_id(tok, chat) : -1;
  ot_error_clear();
  if (name) {
    snprintf(base_name, sizeof base_name, "%s", name);
    char *e = strchr(base_name, '/');
    if (e) *e = '\0';
  } else if (rc == OT_OK) {
    rc = ot_path_basename(model, base_name, sizeof base_name);
  }
  ot_serve_config sc;
  ot_serve_config_default(&sc);
  sc.max_batch = max_batch;
  sc.max_step_tokens = step_tokens;
  sc.max_seq = max_seq;
  sc.kv_block_size = kv_block_size;
  sc.kv_blocks = kv_blocks;
  sc.kv_bytes = (size_t)kv_mib << 20;
  sc.adapter_budget = (size_t)memory_mib << 20;
  sc.resolve = resolve;
  sc.resolve_user = &reg;
  sc.tok = tok;
  sc.eos_id = eos;
  sc.base_digest = digest;
  if (rc == OT_OK) {
    what = "starting the engine";
    rc = ot_serve_engine_create(m, &sc, &eng);
  }
  if (rc == OT_OK) rc = ot_serve_start(eng);
  if (rc == OT_OK && keys) {
    what = "opening the API keys";
    rc = ot_reg_open(keys, &kr.reg);
    kr.base_name = base_name;
  }
  if (rc == OT_OK && http) {
    what = "starting the HTTP API";
    snprintf(url, sizeof url, "%s%s", strncmp(http, "http://", 7) ? "http://" : "", http);
    ot_serve_http_config hc = {.url = url,
                               .engine = eng,
                               .tok = tok,
                               .base_name = base_name,
                               .list = list,
                               .list_user = &reg,
                               .eos_id = eos,
                               .chat = chat,
                               .max_body = 1 << 20,
                               .max_prompts = 32,
                               .log = log_line,
                               .log_user = &lg,
                               .max_conns = http_conns,
                               .max_conns_per_peer = http_conns_peer,
                               .auth = kr.reg ? check_key : NULL,
                               .auth_user = &kr,
                               .load_adapter = load_adapter,
                               .unload_adapter = unload_adapter,
                               .adapters_user = &reg};
    rc = ot_serve_http_start(&hc, &api);
  }
  ot_serve_rpc rpc = {eng, tok, base_name, eos, log_line, &lg};
  if (rc == OT_OK && listen) {
    what = "starting the request API";
    rc = ot_identity_load(key, &id);
    if (rc == OT_OK) rc = ot_access_new(&acl);
    if (rc == OT_OK) rc = ot_access_load(acl, access);
    ot_server_config svc = {0};
    svc.url = listen;
    svc.id = &id;
    svc.acl = &ot_access_memory_ops;
    svc.acl_self = acl;
    svc.n_workers = workers;
    svc.on_request = ot_serve_handle_request;
    svc.log = rpc_log;
    svc.user = &rpc;
    if (rc == OT_OK) rc = ot_server_start(&svc, &server);
  }
  if (rc == OT_OK) {
    char line[1200];
    const ot_model_config *mc = ot_model_cfg(m);
    ot_serve_stats st;
    ot_serve_get_stats(eng, &st);
    double kv_used = (double)ot_model_kv_block_bytes(m, st.kv_block_size) * st.kv_blocks / 1048576.0;
    snprintf(
        line, sizeof line,
        "serving %s (%d blocks, %d wide) on %s backend: max batch %d, max seq %d, KV cache %d blocks of %d "
        "positions (%.1f MiB), %d tokens per step, adapters %d named%s%s, %d MiB for adapters",
        base_name, mc->n_layer, mc->n_embd, be->ops->name, max_batch, st.max_seq, st.kv_blocks,
        st.kv_block_size, kv_used, step_tokens, reg.n, adapters_dir ? " + " : "",
        adapters_dir ? adapters_dir : "", memory_mib);
    log_line(&lg, line);
    if (api) {
      snprintf(line, sizeof line,
               "HTTP API on %s, port %d (POST /v1/completions%s, GET /v1/models, GET /health, GET /metrics, "
               "POST /v1/load_lora_adapter and /v1/unload_lora_adapter)",
               url, ot_serve_http_port(api),
               chat && chat->tmpl ? ", POST /v1/chat/completions" : "; no chat template, so no chat");
      log_line(&lg, line);
      if (kr.reg)
        snprintf(line, sizeof line, "HTTP API keys from %s: every request needs 'Authorization: Bearer KEY'",
                 keys);
      else
        snprintf(line, sizeof line,
                 "HTTP API is UNAUTHENTICATED (no --keys): every client that reaches %s uses every adapter%s",
                 url, ot_http_url_loopback(http) ? " (loopback only)" : "");
      log_line(&lg, line);
    }
    if (server) {
      snprintf(line, sizeof line, "request API on %s (port %d)", listen, ot_server_port(server));
      log_line(&lg, line);
    }
    int sig = 0;
    sigwait(&sigs, &sig);
    snprintf(line, sizeof line, "signal %d: stopping", sig);
    log_line(&lg, line);
  }
  int fail = rc;
  if (api) ot_serve_http_stop(api);
  if (server) ot_server_stop(server);
  ot_serve_engine_free(eng);
  ot_access_free(acl);
  ot_reg_close(kr.reg);
  ot_identity_wipe(&id);
  ot_tokenizer_free(tok);
  ot_chat_config_free(chat);
  ot_model_free(m);
  ot_backend_free(be);
  pthread_mutex_destroy(&lg.mu);
  registry_free(&reg);
  pthread_mutex_destroy(&reg.mu);
  free(rest);
  return fail ? ot_cmd_fail(what, fail) : OT_EXIT_OK;
}

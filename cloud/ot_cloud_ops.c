/* Operator commands against a running daemon: offtune-cloud session|device|token|adapter.
 * Each sends one JSON request to STATE/control.sock (ot_daemon_ctl.c) and prints the
 * answer for people, or as JSON with --json. */
#include <nng/nng.h>
#include <nng/protocol/reqrep0/req.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ot_cli.h"
#include "ot_cloud_cmd.h"
#include "ot_error.h"
#include "ot_session.h"

#include <cjson/cJSON.h>

#define N_ELEMS(a) ((int)(sizeof(a) / sizeof((a)[0])))
#define N_OPTS(o) N_ELEMS(o)

/* Sends req (consumed) to the daemon; *reply is its answer when it says ok. */
static int ctl_call(const char *state, cJSON *req, cJSON **reply) {
  char url[2200];
  snprintf(url, sizeof url, "ipc://%s/control.sock", state);
  char *text = cJSON_PrintUnformatted(req);
  cJSON_Delete(req);
  if (!text) return ot_error(OT_ERR_NOMEM, "cannot allocate");
  nng_socket s;
  int rv = nng_req0_open(&s);
  if (!rv) rv = nng_socket_set_ms(s, NNG_OPT_RECVTIMEO, 30000);
  if (!rv) rv = nng_socket_set_ms(s, NNG_OPT_SENDTIMEO, 5000);
  if (!rv) rv = nng_socket_set_size(s, NNG_OPT_RECVMAXSZ, 64 << 20);
  if (!rv) rv = nng_dial(s, url, NULL, 0);
  if (rv) {
    free(text);
    nng_close(s);
    return ot_error(OT_ERR_IO,
                    "cannot reach the daemon at %s: %s (is `offtune-cloud serve --state %s` running?)", url,
                    nng_strerror(rv), state);
  }
  rv = nng_send(s, text, strlen(text), 0);
  free(text);
  char *buf = NULL;
  size_t len = 0;
  if (!rv) rv = nng_recv(s, &buf, &len, NNG_FLAG_ALLOC);
  nng_close(s);
  if (rv) return ot_error(OT_ERR_IO, "daemon at %s: %s", url, nng_strerror(rv));
  cJSON *r = cJSON_ParseWithLength(buf, len);
  nng_free(buf, len);
  if (!r) return ot_error(OT_ERR_FORMAT, "the daemon's reply is not JSON");
  if (!cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(r, "ok"))) {
    int rc =
        ot_error(OT_ERR_INVALID, "%s", cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(r, "error")));
    cJSON_Delete(r);
    return rc;
  }
  *reply = r;
  return OT_OK;
}

static cJSON *request(const char *cmd) {
  cJSON *r = cJSON_CreateObject();
  cJSON_AddStringToObject(r, "cmd", cmd);
  return r;
}

static void print_json(const cJSON *j) {
  char *t = cJSON_Print(j);
  if (t) printf("%s\n", t);
  free(t);
}

static const char *jstr(const cJSON *o, const char *k) {
  const char *s = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(o, k));
  return s ? s : "-";
}
static double jnum(const cJSON *o, const char *k) {
  const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, k);
  return cJSON_IsNumber(v) ? v->valuedouble : 0;
}
static const char *when(const cJSON *o, const char *k, char *buf, size_t n) {
  const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, k);
  if (!cJSON_IsNumber(v)) return "-";
  time_t t = (time_t)v->valuedouble;
  struct tm tm;
  gmtime_r(&t, &tm);
  strftime(buf, n, "%Y-%m-%d %H:%M:%SZ", &tm);
  return buf;
}

/* NAME as the first argument (before the options) of show/revoke/publish/delete. */
static const char *take_name(int *argc, char ***argv) {
  if (*argc > 0 && (*argv)[0][0] != '-') {
    const char *n = (*argv)[0];
    (*argc)--;
    (*argv)++;
    return n;
  }
  return NULL;
}

static int usage_fail(const char *cmd, const char *syn, const ot_opt *opts, int n) {
  fprintf(stderr, "offtune-cloud %s: %s\n", cmd, ot_error_detail());
  ot_cli_usage(stderr, syn, NULL, opts, n);
  return OT_EXIT_USAGE;
}

/* ---- session ------------------------------------------------------------------------- */

static int session_create(int argc, char **argv) {
  const char *state = NULL, *name = NULL, *model = NULL, *adapter = "offsite", *targets = "all",
             *agg = "fedavg", *distill_data = NULL, *eval_data = NULL, *gap_data = NULL, *target_gap = NULL,
             *secagg = "auto";
  ot_session_cfg c;
  ot_session_cfg_default(&c);
  int json = 0;
  float mu = -1;
  const ot_opt opts[] = {
      {"state", OT_OPT_STR, &state, "DIR", "the daemon's state directory (required)"},
      {"name", OT_OPT_STR, &name, "NAME", "session name, also the published adapter's (required)"},
      {"model", OT_OPT_STR, &model, "NAME", "base model registered with serve --model (required)"},
      {"bottom", OT_OPT_INT, &c.bottom, "A", "emulator: bottom adapter blocks (default 2)"},
      {"top", OT_OPT_INT, &c.top, "B", "emulator: top adapter blocks (default 2)"},
      {"keep", OT_OPT_INT, &c.keep, "K", "emulator: middle blocks kept (default: half)"},
      {"distill-steps", OT_OPT_INT, &c.distill_steps, "N", "emulator: distillation steps (default 200)"},
      {"distill-batch", OT_OPT_INT, &c.distill_batch, "B", "emulator: distillation batch (default 8)"},
      {"distill-seq-len", OT_OPT_INT, &c.distill_seq, "T",
       "emulator: distillation sequence length (default: ctx)"},
      {"distill-data", OT_OPT_STR, &distill_data, "FILE",
       "public text to distil on (default: Brown public genres)"},
      {"gap-data", OT_OPT_STR, &gap_data, "FILE",
       "emulator: held-out public text its gap to the full model is measured on (default: the Brown "
       "pretraining genres' held-out documents)"},
      {"target-gap", OT_OPT_STR, &target_gap, "PCT",
       "emulator: the gap wanted (e.g. 15%); the cloud chooses the kept blocks (at most --keep) and the "
       "distillation steps (at most --distill-steps) that reach it"},
      {"eval-data", OT_OPT_STR, &eval_data, "FILE",
       "the cloud's held-out text: after each round the full model with the round's adapter is scored on "
       "it (the round's record, the report's curve; default: none)"},
      {"adapter", OT_OPT_STR, &adapter, "KIND", "offsite (default), lora, bottleneck or bitfit"},
      {"lora-r", OT_OPT_INT, &c.adapter.lora_r, "R", "LoRA rank (default 8)"},
      {"lora-alpha", OT_OPT_FLOAT, &c.adapter.lora_alpha, "A", "LoRA alpha (default 16)"},
      {"lora-dropout", OT_OPT_FLOAT, &c.adapter.lora_dropout, "P", "LoRA dropout (default 0.05)"},
      {"lora-rslora", OT_OPT_FLAG, &c.adapter.lora_rslora, NULL, "rank-stabilised LoRA: scale alpha/sqrt(r)"},
      {"lora-targets", OT_OPT_STR, &targets, "LIST",
       "PEFT target modules (default all: every linear layer of the model)"},
      {"bottleneck-dim", OT_OPT_INT, &c.adapter.bottleneck_dim, "M", "bottleneck size (default 16)"},
      {"steps", OT_OPT_INT, &c.steps, "N", "device: local steps per round (default 50)"},
      {"lr", OT_OPT_FLOAT, &c.lr, "LR", "device: AdamW learning rate (default 1e-3)"},
      {"middle-noise", OT_OPT_FLOAT, &c.middle_noise, "S",
       "device: each step sees the emulator's middle plus fresh Gaussian noise of S x each matrix's rms: the "
       "adapter cannot fit the emulator's own middle, so the emulator fine-tuned stays behind the served "
       "plug-in (2.5: docs/emulator.md; default 0: off)"},
      {"average-last", OT_OPT_INT, &c.average_last, "N",
       "device: send the mean of the adapter's weights after each of a round's last N steps (tail "
       "averaging; default 0: the last weights)"},
      {"batch", OT_OPT_INT, &c.batch, "B", "device: sequences per step (default 8)"},
      {"seq-len", OT_OPT_INT, &c.seq_len, "T", "device: tokens per sequence (default: ctx)"},
      {"rounds", OT_OPT_INT, &c.rounds, "N", "rounds (default 3)"},
      {"min-devices", OT_OPT_INT, &c.min_devices, "N", "updates a round needs at its deadline (default 1)"},
      {"max-devices", OT_OPT_INT, &c.max_devices, "N", "updates that end a round at once (default 3)"},
      {"deadline", OT_OPT_INT, &c.deadline_s, "SECONDS", "round deadline (default 600)"},
      {"max-retries", OT_OPT_INT, &c.max_retries, "N",
       "deadlines a round may miss (fewer than --min-devices) before the session fails (default 3)"},
      {"aggregation", OT_OPT_STR, &agg, "KIND",
       "fedavg (default), fedprox, fedadam; robust (need --secagg off): fedavg-clip, trimmed-mean, median"},
      {"mu", OT_OPT_FLOAT, &mu, "MU",
       "FedProx: proximal weight, devices add (mu/2)||w - w_global||^2 (default 0.01)"},
      {"server-lr", OT_OPT_FLOAT, &c.server_lr, "LR", "FedAdam: server learning rate (default 1e-2)"},
      {"beta1", OT_OPT_FLOAT, &c.beta1, "B1", "FedAdam: beta1 (default 0.9)"},
      {"beta2", OT_OPT_FLOAT, &c.beta2, "B2", "FedAdam: beta2 (default 0.99)"},
      {"adam-eps", OT_OPT_FLOAT, &c.adam_eps, "EPS", "FedAdam: epsilon (default 1e-3)"},
      {"max-update-norm", OT_OPT_FLOAT, &c.max_update_norm, "B",
       "L2 bound on a device's update (adapter - round's adapter): refused above it, fedavg-clip clips to "
       "it; 0: none (default 1e6)"},
      {"trim-fraction", OT_OPT_FLOAT, &c.trim_fraction, "F",
       "trimmed-mean: fraction trimmed per side, at least 1 with 3 or more updates (default 0.1)"},
      {"secagg", OT_OPT_STR, &secagg, "auto|on|off",
       "secure aggregation: the cloud learns only the sum (auto: on when --min-devices >= 3)"},
      {"secagg-range", OT_OPT_FLOAT, &c.secagg_range, "R",
       "secure aggregation: quantisation range per coordinate of an update (default 4)"},
      {"dp-epsilon", OT_OPT_FLOAT, &c.dp_epsilon, "E",
       "differential privacy budget over the session (needs secure aggregation; default off)"},
      {"dp-delta", OT_OPT_FLOAT, &c.dp_delta, "D", "DP delta (default 1e-5)"},
      {"dp-clip", OT_OPT_FLOAT, &c.dp_clip, "C", "DP: L2 clip of each device's update (default 1)"},
      {"dp-noise", OT_OPT_FLOAT, &c.dp_noise, "Z",
       "DP noise multiplier (default: the least that fits the budget over --rounds)"},
      {"json", OT_OPT_FLAG, &json, NULL, "print the reply as JSON"},
  };
  const char *syn = "offtune-cloud session create --state DIR --name NAME --model MODEL [options]";
  int rc = ot_cli_parse(argc, argv, opts, N_OPTS(opts));
  if (rc == 1) {
    ot_cli_usage(
        stdout, syn,
        "Creates a federated tuning session on the running daemon: it distils the emulator (once per\n"
        "model and settings), then runs the rounds with the enrolled devices that poll it.",
        opts, N_OPTS(opts));
    return OT_EXIT_OK;
  }
  if (rc == OT_OK && (!state || !name || !model))
    rc = ot_error(OT_ERR_INVALID, "--state, --name and --model are required");
  if (rc == OT_OK && target_gap) rc = ot_cmd_parse_gap(target_gap, &c.target_gap);
  if (rc) return usage_fail("session create", syn, opts, N_OPTS(opts));
  cJSON *cfg = ot_session_cfg_to_json(&c);
  cJSON_ReplaceItemInObject(cfg, "name", cJSON_CreateString(name));
  cJSON_ReplaceItemInObject(cfg, "model", cJSON_CreateString(model));
  cJSON_ReplaceItemInObject(cfg, "adapter", cJSON_CreateString(adapter));
  cJSON_ReplaceItemInObject(cfg, "lora_targets", cJSON_CreateString(targets));
  cJSON_ReplaceItemInObject(cfg, "aggregation", cJSON_CreateString(agg));
  cJSON_ReplaceItemInObject(cfg, "secagg", cJSON_CreateString(secagg));
  if (distill_data) {
    char abs[4096];
    cJSON_ReplaceItemInObject(cfg, "distill_data",
                              cJSON_CreateString(realpath(distill_data, abs) ? abs : distill_data));
  }
  if (gap_data) {
    char abs[4096];
    cJSON_ReplaceItemInObject(cfg, "gap_data", cJSON_CreateString(realpath(gap_data, abs) ? abs : gap_data));
  }
  if (eval_data) {
    char abs[4096];
    cJSON_ReplaceItemInObject(cfg, "eval_data",
                              cJSON_CreateString(realpath(eval_data, abs) ? abs : eval_data));
  }
  if (mu >= 0) cJSON_ReplaceItemInObject(cfg, "mu", cJSON_CreateNumber(mu));
  cJSON *req = request("session.create"), *reply = NULL;
  cJSON_AddItemToObject(req, "config", cfg);
  rc = ctl_call(state, req, &reply);
  if (rc) return ot_cmd_fail("session create", rc);
  if (json)
    print_json(reply);
  else
    printf("session '%s' created; the daemon prepares the emulator, then opens round 1\n", name);
  cJSON_Delete(reply);
  return OT_EXIT_OK;
}

static int simple(const char *cmd_name, const char *cmd, const char *name_key, int need_name, int argc,
                  char **argv, void (*human)(const cJSON *reply)) {
  const char *state = NULL, *label = NULL;
  int json = 0;
  const char *name = take_name(&argc, &argv);
  ot_opt opts[] = {
      {"state", OT_OPT_STR, &state, "DIR", "the daemon's state directory (required)"},
      {"json", OT_OPT_FLAG, &json, NULL, "print the reply as JSON"},
      {"label", OT_OPT_STR, &label, "TEXT", "a note kept with the token (token issue)"},
  };
  int n_opts = strcmp(cmd, "token.issue") == 0 ? 3 : 2;
  char syn[256];
  snprintf(syn, sizeof syn, "offtune-cloud %s%s --state DIR [--json]", cmd_name, need_name ? " NAME" : "");
  int rc = ot_cli_parse(argc, argv, opts, n_opts);
  if (rc == 1) {
    ot_cli_usage(stdout, syn, NULL, opts, n_opts);
    return OT_EXIT_OK;
  }
  if (rc == OT_OK && !state) rc = ot_error(OT_ERR_INVALID, "--state DIR is required");
  if (rc == OT_OK && need_name && !name) rc = ot_error(OT_ERR_INVALID, "give the NAME first");
  if (rc == OT_OK && !need_name && name) rc = ot_error(OT_ERR_INVALID, "unexpected argument '%s'", name);
  if (rc) return usage_fail(cmd_name, syn, opts, n_opts);
  cJSON *req = request(cmd), *reply = NULL;
  if (name) cJSON_AddStringToObject(req, name_key, name);
  if (label) cJSON_AddStringToObject(req, "label", label);
  rc = ctl_call(state, req, &reply);
  if (rc) return ot_cmd_fail(cmd_name, rc);
  if (json)
    print_json(reply);
  else
    human(reply);
  cJSON_Delete(reply);
  return OT_EXIT_OK;
}

static void h_sessions(const cJSON *r) {
  const cJSON *s;
  printf("%-20s %-10s %7s %8s %9s  %s\n", "SESSION", "STATE", "ROUND", "UPDATES", "DEVICES", "ADAPTER");
  cJSON_ArrayForEach(s, cJSON_GetObjectItemCaseSensitive(r, "sessions")) {
    char round[32], dev[32];
    snprintf(round, sizeof round, "%.0f/%.0f", jnum(s, "round"), jnum(s, "rounds"));
    snprintf(dev, sizeof dev, "%.0f..%.0f", jnum(s, "min_devices"), jnum(s, "max_devices"));
    printf("%-20s %-10s %7s %8.0f %9s  %.16s\n", jstr(s, "name"), jstr(s, "state"), round, jnum(s, "updates"),
           dev, jstr(s, "adapter"));
  }
}

static void h_session(const cJSON *r) {
  const cJSON *s = cJSON_GetObjectItemCaseSensitive(r, "session"),
              *c = cJSON_GetObjectItemCaseSensitive(s, "config");
  char t[64];
  printf("session %s: %s, round %.0f of %.0f\n", jstr(s, "name"), jstr(s, "state"), jnum(s, "round"),
         jnum(c, "rounds"));
  if (cJSON_IsString(cJSON_GetObjectItemCaseSensitive(s, "error"))) printf("  error: %s\n", jstr(s, "error"));
  printf("  model %s, emulator bottom %.0f top %.0f keep %.0f (%s)\n", jstr(c, "model"), jnum(c, "bottom"),
         jnum(c, "top"), jnum(c, "keep"), jstr(s, "emulator"));
  const cJSON *g = cJSON_GetObjectItemCaseSensitive(s, "emulator_measured_gap");
  if (cJSON_IsObject(g)) /* what the emulator gives away, as the cloud measured it */
    printf("  emulator gap %.1f%% on %s (perplexity %.3f vs full %.3f, %.0f tokens; keep %.0f, %.0f "
           "distillation "
           "steps%s)\n",
           100 * jnum(g, "gap"), jstr(g, "text"), jnum(g, "emulator_perplexity"), jnum(g, "full_perplexity"),
           jnum(g, "tokens"), jnum(g, "keep"), jnum(g, "steps"),
           jnum(c, "target_gap") > 0 ? ", chosen for the session's target" : "");
  char seq[32] = "ctx";
  if (jnum(c, "seq_len") > 0) snprintf(seq, sizeof seq, "%.0f", jnum(c, "seq_len"));
  char noise[48] = "", avg[64] = "";
  if (jnum(c, "middle_noise") > 0)
    snprintf(noise, sizeof noise, ", middle noise %g", jnum(c, "middle_noise"));
  if (jnum(c, "average_last") > 0)
    snprintf(avg, sizeof avg, ", the mean of the last %.0f steps sent", jnum(c, "average_last"));
  printf("  adapter %s; devices train %.0f steps of %.0f x %s at lr %g%s%s; %s aggregation\n",
         jstr(c, "adapter"), jnum(c, "steps"), jnum(c, "batch"), seq, jnum(c, "lr"), noise, avg,
         jstr(c, "aggregation"));
  printf("  %.0f..%.0f devices per round, deadline %.0f s; current adapter %s\n", jnum(c, "min_devices"),
         jnum(c, "max_devices"), jnum(c, "deadline_s"), jstr(s, "adapter"));
  printf("  update norm bound %g; secure aggregation %s\n", jnum(c, "max_update_norm"), jstr(c, "secagg"));
  const cJSON *dp = cJSON_GetObjectItemCaseSensitive(r, "dp"), *x;
  if (dp) {
    printf("  differential privacy: budget epsilon %g at delta %g, clip %g, noise z %.4f; epsilon after each "
           "round:",
           jnum(dp, "budget"), jnum(dp, "delta"), jnum(dp, "clip"), jnum(dp, "noise"));
    cJSON_ArrayForEach(x, cJSON_GetObjectItemCaseSensitive(dp, "epsilon"))
        printf(" %.4f", cJSON_GetNumberValue(x));
    printf("\n");
  }
  printf("  %-6s %-12s %-9s %-13s %s\n", "ROUND", "STATE", "UPDATES", "ATTEMPTS", "RESULT");
  cJSON_ArrayForEach(x, cJSON_GetObjectItemCaseSensitive(r, "rounds")) {
    printf("  %-6.0f %-12s %-9.0f %-13.0f %.16s\n", jnum(x, "round"), jstr(x, "state"),
           jnum(x, "participants"), jnum(x, "attempts"), jstr(x, "result"));
  }
  printf("  updates:\n");
  cJSON_ArrayForEach(x, cJSON_GetObjectItemCaseSensitive(r, "updates")) {
    printf("    round %.0f  %s  %8.0f tokens  loss %.4f  %.16s  %s\n", jnum(x, "round"), jstr(x, "device"),
           jnum(x, "tokens"), jnum(x, "loss"), jstr(x, "digest"), when(x, "received_at", t, sizeof t));
  }
}

/* A number, or "-" for null (not recorded). */
static const char *num(const cJSON *o, const char *k, const char *fmt, char *buf, size_t n) {
  const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, k);
  if (!cJSON_IsNumber(v)) return "-";
  snprintf(buf, n, fmt, v->valuedouble);
  return buf;
}

static void h_metrics(const cJSON *r) {
  const cJSON *s = cJSON_GetObjectItemCaseSensitive(r, "session"), *x;
  char b[6][32];
  printf("session %s: %s; emulator gap (distillation KD) %s\n", jstr(s, "name"), jstr(s, "state"),
         num(s, "emulator_gap", "%.5f", b[0], sizeof b[0]));
  printf("%-6s %-7s %-8s %-11s %-10s %-10s %-9s %-9s %s\n", "ROUND", "DEVICES", "DROPPED", "STRAGGLERS",
         "TOKENS", "MEAN LOSS", "REPORTED", "AGG S", "DP EPSILON");
  cJSON_ArrayForEach(x, cJSON_GetObjectItemCaseSensitive(r, "metrics")) {
    printf("%-6.0f %-7.0f %-8.0f %-11.0f %-10s %-10s %-9.0f %-9s %s\n", jnum(x, "round"),
           jnum(x, "participants"), jnum(x, "dropped"), jnum(x, "stragglers"),
           num(x, "tokens", "%.0f", b[1], sizeof b[1]), num(x, "mean_loss", "%.4f", b[2], sizeof b[2]),
           jnum(x, "losses_reported"), num(x, "agg_seconds", "%.3f", b[3], sizeof b[3]),
           num(x, "dp_epsilon", "%.4f", b[4], sizeof b[4]));
  }
}

static void h_devices(const cJSON *r) {
  const cJSON *x;
  char t[64];
  printf("%-44s %-16s %-21s %-8s %s\n", "DEVICE", "NAME", "ENROLLED", "UPDATES", "STATUS");
  cJSON_ArrayForEach(x, cJSON_GetObjectItemCaseSensitive(r, "devices")) {
    printf("%-44s %-16s %-21s %-8.0f %s\n", jstr(x, "fingerprint"), jstr(x, "name"),
           when(x, "enrolled_at", t, sizeof t), jnum(x, "updates"),
           cJSON_IsNumber(cJSON_GetObjectItemCaseSensitive(x, "revoked_at")) ? "revoked" : "active");
  }
}

static void h_revoked(const cJSON *r) { printf("revoked %s\n", jstr(r, "device")); }
static void h_token(const cJSON *r) { printf("%s\n", jstr(r, "token")); }
static void h_ok(const cJSON *r) {
  (void)r;
  printf("ok\n");
}

static void h_adapters(const cJSON *r) {
  const cJSON *x;
  printf("%-20s %-20s %-10s %s\n", "ADAPTER", "SESSION", "PUBLISHED", "DIRECTORY");
  cJSON_ArrayForEach(x, cJSON_GetObjectItemCaseSensitive(r, "adapters")) {
    printf("%-20s %-20s %-10s %s\n", jstr(x, "name"), jstr(x, "session"), jnum(x, "published") ? "yes" : "no",
           jstr(x, "dir"));
  }
}

typedef struct {
  const char *sub, *cmd, *key;
  int need_name;
  void (*human)(const cJSON *);
  const char *help;
} sub_t;

static int dispatch(const char *group, const sub_t *subs, int n, int argc, char **argv) {
  if (argc < 1 || strcmp(argv[0], "--help") == 0 || strcmp(argv[0], "-h") == 0) {
    FILE *f = argc < 1 ? stderr : stdout;
    fprintf(f, "usage: offtune-cloud %s <command> --state DIR [--json]\n", group);
    if (strcmp(group, "session") == 0)
      fprintf(f, "  %-10s %s\n", "create", "create a session (see create --help)");
    for (int i = 0; i < n; i++) fprintf(f, "  %-10s %s\n", subs[i].sub, subs[i].help);
    return argc < 1 ? OT_EXIT_USAGE : OT_EXIT_OK;
  }
  if (strcmp(group, "session") == 0 && strcmp(argv[0], "create") == 0)
    return session_create(argc - 1, argv + 1);
  for (int i = 0; i < n; i++) {
    if (strcmp(argv[0], subs[i].sub) != 0) continue;
    char name[64];
    snprintf(name, sizeof name, "%s %s", group, subs[i].sub);
    return simple(name, subs[i].cmd, subs[i].key, subs[i].need_name, argc - 1, argv + 1, subs[i].human);
  }
  fprintf(stderr, "offtune-cloud %s: unknown command '%s' (try --help)\n", group, argv[0]);
  return OT_EXIT_USAGE;
}

int ot_cmd_session(int argc, char **argv) {
  static const sub_t subs[] = {
      {"list", "session.list", NULL, 0, h_sessions, "sessions and their rounds"},
      {"show", "session.show", "name", 1, h_session, "one session: settings, rounds, updates (show NAME)"},
      {"metrics", "session.show", "name", 1, h_metrics,
       "one session's per-round record: devices, dropped, stragglers, tokens, mean loss, aggregation time, "
       "DP epsilon (metrics NAME; --json: the whole session show)"},
  };
  return dispatch("session", subs, N_ELEMS(subs), argc, argv);
}

int ot_cmd_device(int argc, char **argv) {
  static const sub_t subs[] = {
      {"list", "device.list", NULL, 0, h_devices, "enrolled devices"},
      {"revoke", "device.revoke", "device", 1, h_revoked,
       "revoke a device (revoke FINGERPRINT|PUBKEY); at once"},
  };
  return dispatch("device", subs, N_ELEMS(subs), argc, argv);
}

int ot_cmd_token(int argc, char **argv) {
  static const sub_t subs[] = {
      {"issue", "token.issue", NULL, 0, h_token, "print a one-time enrolment token [--label TEXT]"},
  };
  return dispatch("token", subs, N_ELEMS(subs), argc, argv);
}

int ot_cmd_adapter(int argc, char **argv) {
  static const sub_t subs[] = {
      {"list", "adapter.list", NULL, 0, h_adapters, "adapters (the sessions' results)"},
      {"publish", "adapter.publish", "name", 1, h_ok, "mark an adapter published (publish NAME)"},
      {"unpublish", "adapter.unpublish", "name", 1, h_ok,
       "withdraw an adapter from serving (unpublish NAME)"},
      {"delete", "adapter.delete", "name", 1, h_ok, "delete an adapter's registry entry (delete NAME)"},
  };
  return dispatch("adapter", subs, N_ELEMS(subs), argc, argv);
}

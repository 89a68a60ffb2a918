/* offtune-cloud keys create|revoke|list: the serving HTTP API's keys (docs/serving.md,
 * "Tenants and keys"), kept hashed in a registry database: the daemon's STATE/registry.db
 * (--state DIR) or a file of their own for serve-model --keys (--registry FILE). SQLite lets
 * this run next to a daemon or a serve-model that has the file open; a revocation holds from
 * their next request. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ot_cli.h"
#include "ot_cloud_cmd.h"
#include "ot_error.h"
#include "ot_registry.h"

#define N_OPTS(o) ((int)(sizeof(o) / sizeof((o)[0])))

static int open_registry(const char *state, const char *file, ot_registry **r) {
  if (!!state == !!file) return ot_error(OT_ERR_INVALID, "give --state DIR or --registry FILE");
  char path[4200];
  snprintf(path, sizeof path, "%s%s", state ? state : file, state ? "/registry.db" : "");
  return ot_reg_open(path, r);
}

static int usage(const char *syn, const ot_opt *opts, int n) {
  fprintf(stderr, "offtune-cloud keys: %s\n", ot_error_detail());
  ot_cli_usage(stderr, syn, NULL, opts, n);
  return OT_EXIT_USAGE;
}

int ot_cmd_keys(int argc, char **argv) {
  const char *sub = argc > 0 ? argv[0] : "";
  if (argc < 1 || (strcmp(sub, "create") && strcmp(sub, "revoke") && strcmp(sub, "list"))) {
    FILE *f = argc < 1 || (strcmp(sub, "--help") && strcmp(sub, "-h")) ? stderr : stdout;
    fprintf(f,
            "usage: offtune-cloud keys <command> (--state DIR | --registry FILE) [--json]\n"
            "  create     issue a key for a tenant: --tenant T [--models a,b|*] [--admin] [--label TEXT];\n"
            "             prints the key once (only its hash is stored)\n"
            "  revoke     revoke a key by its id (revoke KEY_ID); refused from the next request on\n"
            "  list       the keys: id, tenant, models, admin, created, revoked\n");
    return f == stdout ? OT_EXIT_OK : OT_EXIT_USAGE;
  }
  argc--;
  argv++;
  const char *id = NULL;
  if (strcmp(sub, "revoke") == 0 && argc > 0 && argv[0][0] != '-') {
    id = argv[0];
    argc--;
    argv++;
  }
  const char *state = NULL, *file = NULL, *tenant = NULL, *models = "*", *label = NULL;
  int admin = 0, json = 0;
  const ot_opt opts[] = {
      {"state", OT_OPT_STR, &state, "DIR", "the daemon's state directory (its registry.db)"},
      {"registry", OT_OPT_STR, &file, "DB",
       "a registry database: a file of its own (serve-model --keys FILE), or the PostgreSQL registry of "
       "daemons started with --registry postgresql://..."},
      {"tenant", OT_OPT_STR, &tenant, "T", "create: the tenant (its adapters are named T/NAME)"},
      {"models", OT_OPT_STR, &models, "LIST",
       "create: base models the key may use, comma-separated (default *)"},
      {"admin", OT_OPT_FLAG, &admin, NULL,
       "create: sees every adapter and /metrics, loads and unloads adapters"},
      {"label", OT_OPT_STR, &label, "TEXT", "create: a note kept with the key"},
      {"json", OT_OPT_FLAG, &json, NULL, "print JSON"},
  };
  char syn[200];
  snprintf(syn, sizeof syn, "offtune-cloud keys %s (--state DIR | --registry FILE)%s", sub,
           strcmp(sub, "create") == 0   ? " --tenant T [--models LIST] [--admin] [--label TEXT]"
           : strcmp(sub, "revoke") == 0 ? " KEY_ID"
                                        : "");
  int rc = ot_cli_parse(argc, argv, opts, N_OPTS(opts));
  if (rc == 1) {
    ot_cli_usage(stdout, syn, NULL, opts, N_OPTS(opts));
    return OT_EXIT_OK;
  }
  if (rc == OT_OK && !!state == !!file) rc = ot_error(OT_ERR_INVALID, "give --state DIR or --registry FILE");
  if (rc == OT_OK && strcmp(sub, "create") == 0 && !tenant)
    rc = ot_error(OT_ERR_INVALID, "--tenant is required");
  if (rc == OT_OK && strcmp(sub, "revoke") == 0 && !id)
    rc = ot_error(OT_ERR_INVALID, "name the key: revoke KEY_ID");
  if (rc) return usage(syn, opts, N_OPTS(opts));
  ot_registry *r = NULL;
  rc = open_registry(state, file, &r);
  if (rc == OT_OK && strcmp(sub, "create") == 0) {
    char key[OT_API_KEY_CHARS + 1], kid[OT_API_KEY_ID_CHARS + 1];
    rc = ot_reg_api_key_create(r, tenant, models, admin, label, key, kid);
    if (rc == OT_OK && json)
      printf("{\"id\": \"%s\", \"tenant\": \"%s\", \"key\": \"%s\"}\n", kid, tenant, key);
    else if (rc == OT_OK) {
      printf("%s\n", key);
      fprintf(stderr, "key %s for tenant %s (shown once; only its hash is stored)\n", kid, tenant);
    }
    memset(key, 0, sizeof key);
  } else if (rc == OT_OK && strcmp(sub, "revoke") == 0) {
    rc = ot_reg_api_key_revoke(r, id);
    if (rc == OT_OK) printf("revoked %s\n", id);
  } else if (rc == OT_OK) {
    cJSON *arr = NULL;
    rc = ot_reg_list_json(r, "api_keys", NULL, &arr);
    if (rc == OT_OK && json) {
      char *t = cJSON_Print(arr);
      if (t) printf("%s\n", t);
      free(t);
    } else if (rc == OT_OK) {
      printf("%-17s %-20s %-20s %-6s %s\n", "ID", "TENANT", "MODELS", "ADMIN", "STATE");
      const cJSON *k;
      cJSON_ArrayForEach(k, arr) {
        const cJSON *rev = cJSON_GetObjectItemCaseSensitive(k, "revoked_at");
        printf("%-17s %-20s %-20s %-6s %s\n", cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(k, "id")),
               cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(k, "tenant")),
               cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(k, "models")),
               cJSON_GetNumberValue(cJSON_GetObjectItemCaseSensitive(k, "admin")) != 0 ? "yes" : "no",
               cJSON_IsNumber(rev) ? "revoked" : "active");
      }
    }
    cJSON_Delete(arr);
  }
  ot_reg_close(r);
  return rc ? ot_cmd_fail("keys", rc) : OT_EXIT_OK;
}

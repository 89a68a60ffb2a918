/* offtune-cloud report: a session's report as one self-contained HTML file (ot_report.h),
 * read from the daemon's registry (the daemon may be running or not). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ot_cli.h"
#include "ot_cloud_cmd.h"
#include "ot_error.h"
#include "ot_fileio.h"
#include "ot_regdb.h"
#include "ot_registry.h"
#include "ot_report.h"

#define N_OPTS(o) ((int)(sizeof(o) / sizeof((o)[0])))

int ot_cmd_report(int argc, char **argv) {
  const char *state = NULL, *session = NULL, *out = NULL, *registry = NULL;
  const ot_opt opts[] = {
      {"state", OT_OPT_STR, &state, "DIR", "the daemon's state directory (its registry.db and quality/)"},
      {"registry", OT_OPT_STR, &registry, "DB",
       "the registry when not STATE/registry.db: a SQLite file or PostgreSQL (postgresql://... or a "
       "conninfo)"},
      {"session", OT_OPT_STR, &session, "NAME", "the session (default: the newest)"},
      {"out", OT_OPT_STR, &out, "FILE", "the HTML file to write (required)"},
  };
  const char *syn = "offtune-cloud report (--state DIR | --registry DB) [--session NAME] --out FILE.html";
  const char *desc =
      "Writes one self-contained HTML page (inline SVG charts, no script, nothing fetched) on a session:\n"
      "settings, the rounds (devices, dropped, stragglers), the devices' training losses, the emulator's\n"
      "distillation curve, the quality table (STATE/quality/SESSION.json, if recorded), the published\n"
      "adapters with their digests and the audit trail of secure aggregation and DP.";
  int rc = ot_cli_parse(argc, argv, opts, N_OPTS(opts));
  if (rc == 1) {
    ot_cli_usage(stdout, syn, desc, opts, N_OPTS(opts));
    return OT_EXIT_OK;
  }
  if (rc == OT_OK && ((!state && !registry) || !out))
    rc = ot_error(OT_ERR_INVALID, "--state (or --registry) and --out are required");
  if (rc) {
    fprintf(stderr, "offtune-cloud report: %s\n", ot_error_detail());
    ot_cli_usage(stderr, syn, NULL, opts, N_OPTS(opts));
    return OT_EXIT_USAGE;
  }
  char db[4200];
  snprintf(db, sizeof db, "%s%s", registry ? registry : state, registry ? "" : "/registry.db");
  /* opening would create an empty SQLite registry: a wrong path must say so instead */
  if (!ot_regdb_is_pg(db) && !ot_file_exists(db))
    return ot_cmd_fail("report",
                       ot_error(OT_ERR_NOTFOUND, "%s: no registry (is %s a daemon's %s?)", db,
                                registry ? "--registry" : "--state", registry ? "registry" : "state"));
  ot_registry *r = NULL;
  cJSON *data = NULL;
  char *html = NULL;
  size_t len = 0;
  rc = ot_reg_open(db, &r);
  if (rc == OT_OK) rc = ot_report_collect(r, state, session, &data);
  if (rc == OT_OK) rc = ot_report_html(data, NULL, &html, &len);
  if (rc == OT_OK) rc = ot_file_write_atomic(out, html, len);
  cJSON_Delete(data);
  free(html);
  ot_reg_close(r);
  if (rc) return ot_cmd_fail("report", rc);
  printf("%s\n", out);
  return OT_EXIT_OK;
}

/* offtune-cloud report: a session's report as one self-contained HTML file (ot_report.h),
 * read from the daemon's registry (the daemon may be running or not). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ot_cli.h"
#include "ot_cloud_cmd.h"
#include "ot_error.h"
#include "ot_fileio.h"
#include "ot_registry.h"
#include "ot_report.h"

#define N_OPTS(o) ((int)(sizeof(o) / sizeof((o)[0])))

int ot_cmd_report(int argc, char **argv) {
  const char *state = NULL, *session = NULL, *out = NULL;
  const ot_opt opts[] = {
      {"state", OT_OPT_STR, &state, "DIR", "the daemon's state directory (required)"},
      {"session", OT_OPT_STR, &session, "NAME", "the session (default: the newest)"},
      {"out", OT_OPT_STR, &out, "FILE", "the HTML file to write (required)"},
  };
  const char *syn = "offtune-cloud report --state DIR [--session NAME] --out FILE.html";
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
  if (rc == OT_OK && (!state || !out)) rc = ot_error(OT_ERR_INVALID, "--state and --out are required");
  if (rc) {
    fprintf(stderr, "offtune-cloud report: %s\n", ot_error_detail());
    ot_cli_usage(stderr, syn, NULL, opts, N_OPTS(opts));
    return OT_EXIT_USAGE;
  }
  char db[4200];
  snprintf(db, sizeof db, "%s/registry.db", state);
  /* opening would create an empty registry: a wrong --state must say so instead */
  if (!ot_file_exists(db))
    return ot_cmd_fail("report",
                       ot_error(OT_ERR_NOTFOUND, "%s: no registry (is --state a daemon's state?)", db));
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

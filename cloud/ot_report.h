/* A session's report (issue 19): what the registry knows of one session, as one
 * self-contained HTML page with inline SVG charts (no network, no scripts). `offtune-cloud
 * report` writes it to a file; the daemon's dashboard (ot_daemon_serve.c) serves the same
 * page, refreshed, while rounds run.
 *
 * Every string that comes from the registry (names, device names, audit details, settings)
 * is HTML-escaped; numbers are written by the report itself. Each chart point carries its
 * value in data attributes (data-series, data-x, data-y, 9 significant digits), so a test or
 * a script can read the charts back from the DOM. */
#ifndef OT_REPORT_H
#define OT_REPORT_H

#include <stddef.h>

#include <cjson/cJSON.h>

#include "ot_registry.h"

/* The data of session `name` (NULL or "": the newest session): {"session", "rounds",
 * "updates", "metrics", "adapters", "audit", "distill" (the emulator's metrics records, from
 * its package's metrics.jsonl), "quality" (STATE/quality/<session>.json if present)}.
 * state_dir: the daemon's state directory (for the quality file); may be NULL. */
int ot_report_collect(ot_registry *r, const char *state_dir, const char *name, cJSON **out);

typedef struct {
  int refresh_s;           /* > 0: the page reloads itself every refresh_s seconds (the dashboard) */
  const cJSON *sessions;   /* NULL, or the session list (the dashboard links to each session) */
  const char *link_prefix; /* with sessions: a session's link is link_prefix + name */
} ot_report_opts;

/* The page (malloc'd, NUL-terminated; *len without the NUL). */
int ot_report_html(const cJSON *data, const ot_report_opts *o, char **html, size_t *len);

/* HTML-escapes s (& < > " ') into a malloc'd string. */
char *ot_html_escape(const char *s);

#endif

/* The daemon's live dashboard (issue 19): the session report (ot_report.h) served on the
 * daemon's HTTP address next to the serving API, refreshed by the page itself while rounds
 * run. GET /dashboard[?session=NAME] is the page, GET /dashboard/data[?session=NAME] its data
 * as JSON.
 *
 * For the operator only: a request is answered when it comes from a loopback address
 * (127.0.0.0/8, ::1) or carries "Authorization: Bearer <operator key>", the key in
 * STATE/dashboard.key (made on first start, 0600). Serving's tenant keys are a different
 * store and are never consulted here; everything else gets 403. */
#ifndef OT_DASHBOARD_H
#define OT_DASHBOARD_H

#include "ot_daemon.h"
#include "ot_http.h"

#define OT_DASHBOARD_KEY_HEX 64

typedef struct {
  ot_daemon *d;
  char key[OT_DASHBOARD_KEY_HEX + 1];
  int trust_loopback; /* 1; test hook OT_TEST_DASHBOARD_LOOPBACK=0 treats loopback peers as remote */
  ot_http_route routes[2];
} ot_dashboard;

/* Loads (or makes) STATE/dashboard.key and fills db->routes. */
int ot_dashboard_init(ot_dashboard *db, ot_daemon *d);
void ot_dashboard_wipe(ot_dashboard *db);

/* 1 if a request from peer (ot_http_req_peer's text) with this Authorization header (may be
 * NULL) may see the dashboard; trust_loopback 0: only the key. */
int ot_dashboard_allowed(const char *peer, const char *authorization, const char *key, int trust_loopback);

#endif

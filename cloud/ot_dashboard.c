#include "ot_dashboard.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <sodium.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "ot_error.h"
#include "ot_fileio.h"
#include "ot_report.h"

#define REFRESH_S 5

int ot_dashboard_allowed(const char *peer, const char *authorization, const char *key, int trust_loopback) {
  struct in_addr a4;
  struct in6_addr a6;
  if (trust_loopback && peer && inet_pton(AF_INET, peer, &a4) == 1 && (ntohl(a4.s_addr) >> 24) == 127)
    return 1;
  if (trust_loopback && peer && inet_pton(AF_INET6, peer, &a6) == 1 && IN6_IS_ADDR_LOOPBACK(&a6)) return 1;
  static const char bearer[] = "Bearer ";
  if (!authorization || !key || strlen(key) != OT_DASHBOARD_KEY_HEX ||
      strncmp(authorization, bearer, sizeof bearer - 1) != 0)
    return 0;
  const char *given = authorization + sizeof bearer - 1;
  return strlen(given) == OT_DASHBOARD_KEY_HEX && sodium_memcmp(given, key, OT_DASHBOARD_KEY_HEX) == 0;
}

/* ?session=NAME (names are [A-Za-z0-9_-], so no decoding); "" when absent. */
static int session_arg(const char *query, char *out, size_t n) {
  out[0] = '\0';
  for (const char *p = query; p && *p;) {
    const char *amp = strchr(p, '&'), *end = amp ? amp : p + strlen(p);
    if (strncmp(p, "session=", 8) == 0) {
      size_t len = (size_t)(end - p - 8);
      if (len >= n) return ot_error(OT_ERR_INVALID, "session name too long");
      memcpy(out, p + 8, len);
      out[len] = '\0';
      if (len && !ot_name_ok(out)) return ot_error(OT_ERR_INVALID, "bad session name");
    }
    p = amp ? amp + 1 : end;
  }
  return OT_OK;
}

static const char *headers = "Cache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n"
                             "Content-Security-Policy: default-src 'none'; style-src 'unsafe-inline'\r\n";

static void handle(void *user, ot_http_req *req) {
  ot_dashboard *db = user;
  if (!ot_dashboard_allowed(ot_http_req_peer(req), ot_http_req_header(req, "Authorization"), db->key,
                            db->trust_loopback)) {
    ot_http_respond_error(req, 403, "permission_error", NULL, NULL,
                          "the dashboard is for the operator: loopback, or the key in the daemon's "
                          "dashboard.key");
    return;
  }
  int as_json = strcmp(ot_http_req_path(req), "/dashboard/data") == 0;
  char name[OT_NAME_MAX];
  cJSON *data = NULL, *sessions = NULL;
  char *body = NULL;
  size_t len = 0;
  /* registry calls are short transactions; rendering is a few ms: fine on the I/O thread */
  int rc = session_arg(ot_http_req_query(req), name, sizeof name);
  if (rc == OT_OK) rc = ot_report_collect(db->d->reg, db->d->state, name, &data);
  if (rc == OT_OK && as_json) {
    body = cJSON_PrintUnformatted(data);
    len = body ? strlen(body) : 0;
    if (!body) rc = ot_error(OT_ERR_NOMEM, "cannot allocate");
  } else if (rc == OT_OK) {
    rc = ot_reg_list_json(db->d->reg, "sessions", NULL, &sessions);
    ot_report_opts o = {.refresh_s = REFRESH_S, .sessions = sessions, .link_prefix = "/dashboard?session="};
    if (rc == OT_OK) rc = ot_report_html(data, &o, &body, &len);
  }
  if (rc == OT_OK)
    ot_http_respond(req, 200, as_json ? "application/json" : "text/html; charset=utf-8", headers, body, len);
  else
    ot_http_respond_error(req,
                          rc == OT_ERR_NOTFOUND  ? 404
                          : rc == OT_ERR_INVALID ? 400
                                                 : 500,
                          "invalid_request_error", NULL, NULL, "%s", ot_error_detail());
  free(body);
  cJSON_Delete(data);
  cJSON_Delete(sessions);
}

static int load_key(ot_daemon *d, char key[OT_DASHBOARD_KEY_HEX + 1]) {
  char path[2600];
  int rc = ot_daemon_path(d, path, sizeof path, "dashboard.key");
  if (rc) return rc;
  if (!ot_file_exists(path)) {
    uint8_t raw[32];
    char hex[OT_DASHBOARD_KEY_HEX + 2];
    randombytes_buf(raw, sizeof raw);
    sodium_bin2hex(hex, sizeof hex, raw, sizeof raw);
    sodium_memzero(raw, sizeof raw);
    hex[OT_DASHBOARD_KEY_HEX] = '\n';
    int fd = open(path, O_WRONLY | O_CREAT | O_EXCL, 0600);
    if (fd < 0 && errno != EEXIST) rc = ot_error(OT_ERR_IO, "cannot create %s: %s", path, strerror(errno));
    if (fd >= 0) {
      if (write(fd, hex, OT_DASHBOARD_KEY_HEX + 1) != OT_DASHBOARD_KEY_HEX + 1 || fsync(fd) != 0)
        rc = ot_error(OT_ERR_IO, "cannot write %s: %s", path, strerror(errno));
      close(fd);
    }
    sodium_memzero(hex, sizeof hex);
    if (rc) return rc;
  }
  char *text = NULL;
  size_t len = 0;
  rc = ot_file_read_all(path, 4096, &text, &len);
  if (rc == OT_OK && (len < OT_DASHBOARD_KEY_HEX || strspn(text, "0123456789abcdef") < OT_DASHBOARD_KEY_HEX))
    rc = ot_error(OT_ERR_FORMAT, "%s: not a 64-hex-digit key", path);
  if (rc == OT_OK) {
    memcpy(key, text, OT_DASHBOARD_KEY_HEX);
    key[OT_DASHBOARD_KEY_HEX] = '\0';
  }
  if (text) sodium_memzero(text, len);
  free(text);
  return rc;
}

int ot_dashboard_init(ot_dashboard *db, ot_daemon *d) {
  memset(db, 0, sizeof *db);
  db->d = d;
  const char *hook = getenv("OT_TEST_DASHBOARD_LOOPBACK");
  db->trust_loopback = !(hook && strcmp(hook, "0") == 0);
  int rc = load_key(d, db->key);
  if (rc) return rc;
  db->routes[0] = (ot_http_route){"GET", "/dashboard", 0, handle, db};
  db->routes[1] = (ot_http_route){"GET", "/dashboard/data", 0, handle, db};
  return OT_OK;
}

void ot_dashboard_wipe(ot_dashboard *db) { sodium_memzero(db->key, sizeof db->key); }

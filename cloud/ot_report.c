/* A session's report as one HTML page (ot_report.h). The charts are SVG drawn here: axes
 * with rounded ticks, one polyline and one circle per point (with a <title> tooltip and its
 * value in data attributes), so the page needs no script and no network. */
#include "ot_report.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ot_error.h"
#include "ot_fileio.h"
#include "ot_metrics.h"

/* ---- a growing string ------------------------------------------------------------------ */

typedef struct {
  char *p;
  size_t n, cap;
  int err;
} sb;

static void sb_put(sb *b, const char *s, size_t n) {
  if (b->err) return;
  if (b->n + n + 1 > b->cap) {
    size_t cap = b->cap ? b->cap : 1 << 14;
    while (cap < b->n + n + 1) cap *= 2;
    char *p = realloc(b->p, cap);
    if (!p) {
      b->err = 1;
      return;
    }
    b->p = p, b->cap = cap;
  }
  memcpy(b->p + b->n, s, n);
  b->n += n;
  b->p[b->n] = '\0';
}

static void sb_s(sb *b, const char *s) { sb_put(b, s, strlen(s)); }

static void sb_f(sb *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void sb_f(sb *b, const char *fmt, ...) {
  char buf[1024];
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  if (n < 0) {
    b->err = 1;
    return;
  }
  if ((size_t)n < sizeof buf) {
    sb_put(b, buf, (size_t)n);
    return;
  }
  char *big = malloc((size_t)n + 1);
  if (!big) {
    b->err = 1;
    return;
  }
  va_start(ap, fmt);
  vsnprintf(big, (size_t)n + 1, fmt, ap);
  va_end(ap);
  sb_put(b, big, (size_t)n);
  free(big);
}

/* Text from the registry: every character HTML gives a meaning to is escaped. */
static void sb_esc(sb *b, const char *s) {
  for (; s && *s; s++) {
    switch (*s) {
    case '&': sb_s(b, "&amp;"); break;
    case '<': sb_s(b, "&lt;"); break;
    case '>': sb_s(b, "&gt;"); break;
    case '"': sb_s(b, "&quot;"); break;
    case '\'': sb_s(b, "&#39;"); break;
    default: sb_put(b, s, 1);
    }
  }
}

char *ot_html_escape(const char *s) {
  sb b = {0};
  sb_s(&b, "");
  sb_esc(&b, s);
  if (b.err) {
    free(b.p);
    return NULL;
  }
  return b.p;
}

/* ---- JSON helpers ---------------------------------------------------------------------- */

static const cJSON *jget(const cJSON *o, const char *k) { return cJSON_GetObjectItemCaseSensitive(o, k); }
static const char *jstr(const cJSON *o, const char *k) {
  const char *s = cJSON_GetStringValue(jget(o, k));
  return s ? s : "";
}
static double jnum(const cJSON *o, const char *k) {
  const cJSON *v = jget(o, k);
  return cJSON_IsNumber(v) ? v->valuedouble : NAN;
}

static void sb_when(sb *b, double t) {
  if (!isfinite(t)) {
    sb_s(b, "-");
    return;
  }
  time_t tt = (time_t)t;
  struct tm tm;
  char buf[64];
  gmtime_r(&tt, &tm);
  strftime(buf, sizeof buf, "%Y-%m-%d %H:%M:%SZ", &tm);
  sb_s(b, buf);
}

static void sb_num(sb *b, double v, const char *fmt) {
  if (isfinite(v))
    sb_f(b, fmt, v);
  else
    sb_s(b, "-");
}

/* ---- collecting --------------------------------------------------------------------------- */

static int add_list(ot_registry *r, cJSON *o, const char *key, const char *what, const char *arg) {
  cJSON *a = NULL;
  int rc = ot_reg_list_json(r, what, arg, &a);
  if (rc == OT_OK) cJSON_AddItemToObject(o, key, a);
  return rc;
}

/* The emulator's metrics records (step and distill kinds): its distillation curve. */
static int read_distill(const char *emu_dir, cJSON *out) {
  char *path = NULL, *text = NULL;
  size_t len = 0;
  int rc = ot_path_join(emu_dir, OT_METRICS_FILE, &path);
  if (rc == OT_OK && !ot_file_exists(path)) {
    free(path);
    return OT_OK; /* distilled before records existed, or elsewhere */
  }
  if (rc == OT_OK) rc = ot_file_read_all(path, 64u << 20, &text, &len);
  free(path);
  for (char *line = text, *next; rc == OT_OK && line && *line; line = next) {
    next = strchr(line, '\n');
    if (next) *next++ = '\0';
    cJSON *j = cJSON_Parse(line);
    const char *kind = cJSON_GetStringValue(jget(j, "kind"));
    if (kind && (strcmp(kind, "step") == 0 || strcmp(kind, "distill") == 0))
      cJSON_AddItemToArray(out, j);
    else
      cJSON_Delete(j); /* a torn last line of a killed run, or another kind */
  }
  free(text);
  return rc;
}

int ot_report_collect(ot_registry *r, const char *state_dir, const char *name, cJSON **out) {
  cJSON *o = cJSON_CreateObject(), *all = NULL;
  if (!o) return ot_error(OT_ERR_NOMEM, "cannot allocate");
  int rc = ot_reg_list_json(r, "sessions", NULL, &all);
  char nm[OT_NAME_MAX] = "";
  if (rc == OT_OK) {
    const cJSON *pick = NULL, *s;
    cJSON_ArrayForEach(s, all) {
      if (!name || !*name || strcmp(jstr(s, "name"), name) == 0) pick = s; /* the newest, or the named */
    }
    if (!pick)
      rc = name && *name ? ot_error(OT_ERR_NOTFOUND, "no session named '%s'", name)
                         : ot_error(OT_ERR_NOTFOUND, "the registry has no session yet");
    else
      snprintf(nm, sizeof nm, "%s", jstr(pick, "name"));
  }
  cJSON_Delete(all);
  cJSON *one = NULL;
  if (rc == OT_OK) rc = ot_reg_list_json(r, "session", nm, &one);
  if (rc == OT_OK) cJSON_AddItemToObject(o, "session", cJSON_DetachItemFromArray(one, 0));
  cJSON_Delete(one);
  if (rc == OT_OK) rc = add_list(r, o, "rounds", "rounds", nm);
  if (rc == OT_OK) rc = add_list(r, o, "updates", "updates", nm);
  if (rc == OT_OK) rc = add_list(r, o, "metrics", "round_stats", nm);
  if (rc == OT_OK) rc = add_list(r, o, "audit", "session_audit", nm);
  cJSON *ad = NULL;
  if (rc == OT_OK) rc = ot_reg_list_json(r, "adapters", NULL, &ad);
  if (rc == OT_OK) {
    cJSON *mine = cJSON_AddArrayToObject(o, "adapters"), *a;
    cJSON_ArrayForEach(a, ad) {
      if (strcmp(jstr(a, "session"), nm) == 0) cJSON_AddItemToArray(mine, cJSON_Duplicate(a, 1));
    }
  }
  cJSON_Delete(ad);
  cJSON *distill = cJSON_AddArrayToObject(o, "distill");
  const char *emu = jstr(jget(o, "session"), "emulator");
  if (rc == OT_OK && *emu) rc = read_distill(emu, distill);
  if (rc == OT_OK && state_dir) {
    char qpath[2400];
    snprintf(qpath, sizeof qpath, "%s/quality/%s.json", state_dir, nm);
    if (ot_file_exists(qpath)) {
      char *text = NULL;
      size_t len;
      rc = ot_file_read_all(qpath, 1 << 20, &text, &len);
      cJSON *q = rc == OT_OK ? cJSON_Parse(text) : NULL;
      free(text);
      if (rc == OT_OK && !q) rc = ot_error(OT_ERR_FORMAT, "%s is not JSON", qpath);
      if (rc == OT_OK) cJSON_AddItemToObject(o, "quality", q);
    }
  }
  if (rc) {
    cJSON_Delete(o);
    return rc;
  }
  *out = o;
  return OT_OK;
}

/* ---- charts ------------------------------------------------------------------------------- */

enum { W = 480, H = 280, ML = 66, MR = 14, MT = 34, MB = 44 };
static const char *const palette[] = {"#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e",
                                      "#17becf", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22"};

typedef struct {
  char name[96]; /* from the registry: escaped when written */
  int n, cap;
  double *x, *y;
} series;

static int series_add(series *s, double x, double y) {
  if (!isfinite(x) || !isfinite(y)) return OT_OK;
  if (s->n == s->cap) {
    int cap = s->cap ? 2 * s->cap : 16;
    double *nx = realloc(s->x, (size_t)cap * sizeof *nx);
    if (!nx) return ot_error(OT_ERR_NOMEM, "cannot allocate");
    s->x = nx;
    double *ny = realloc(s->y, (size_t)cap * sizeof *ny);
    if (!ny) return ot_error(OT_ERR_NOMEM, "cannot allocate");
    s->y = ny, s->cap = cap;
  }
  s->x[s->n] = x, s->y[s->n] = y, s->n++;
  return OT_OK;
}

static void series_free(series *s, int n) {
  for (int i = 0; i < n; i++) free(s[i].x), free(s[i].y);
}

/* A step of 1, 2 or 5 x 10^k giving about `want` intervals over span. */
static double nice_step(double span, int want) {
  double raw = span / want, mag = pow(10, floor(log10(raw))), f = raw / mag;
  return (f < 1.5 ? 1 : f < 3.5 ? 2 : f < 7.5 ? 5 : 10) * mag;
}

static void axis_label(sb *b, double v, double step) {
  int dec = step >= 1 ? 0 : (int)ceil(-log10(step) - 1e-9);
  if (dec > 6) dec = 6;
  sb_f(b, "%.*f", dec, v);
}

/* A line chart of ns series; integer_x: ticks only at integers (rounds). */
static void line_chart(sb *b, const char *id, const char *title, const char *xl, const char *yl,
                       const series *s, int ns, int integer_x) {
  double x0 = INFINITY, x1 = -INFINITY, y0 = INFINITY, y1 = -INFINITY;
  int pts = 0;
  for (int i = 0; i < ns; i++)
    for (int k = 0; k < s[i].n; k++) {
      x0 = fmin(x0, s[i].x[k]), x1 = fmax(x1, s[i].x[k]);
      y0 = fmin(y0, s[i].y[k]), y1 = fmax(y1, s[i].y[k]);
      pts++;
    }
  sb_f(b, "<figure class=\"chart\" id=\"%s\"><figcaption>", id);
  sb_esc(b, title);
  sb_s(b, "</figcaption>");
  if (!pts) {
    sb_s(b, "<p class=\"none\">nothing recorded yet</p></figure>\n");
    return;
  }
  if (x1 - x0 < 1e-12) x0 -= 1, x1 += 1;
  if (y1 - y0 < 1e-12 * fmax(1, fabs(y0))) y0 -= fmax(0.5, fabs(y0) * 0.05), y1 += fmax(0.5, fabs(y1) * 0.05);
  double pad = (y1 - y0) * 0.06;
  y0 -= pad, y1 += pad;
  double ys = nice_step(y1 - y0, 5),
         xs = integer_x ? fmax(1, ceil(nice_step(x1 - x0, 6))) : nice_step(x1 - x0, 6);
  /* the legend wraps into rows above the plot; the plot keeps its size */
  enum { MAXS = 64 };
  double lx[MAXS], ly[MAXS], cx = ML;
  int rows = ns > 1 ? 1 : 0;
  for (int i = 0; i < ns && i < MAXS && ns > 1; i++) {
    double w = 24 + 7.4 * (double)strlen(s[i].name);
    if (cx > ML && cx + w > W - MR) cx = ML, rows++;
    lx[i] = cx, ly[i] = 10 + 17.0 * (rows - 1);
    cx += w;
  }
  int mt = rows ? 14 + 17 * rows : 16, hh = H - MT + mt;
  int pw = W - ML - MR, ph = H - MT - MB;
#define PX(v) (ML + ((v)-x0) / (x1 - x0) * pw)
#define PY(v) (mt + ph - ((v)-y0) / (y1 - y0) * ph)
  sb_f(b,
       "<svg viewBox=\"0 0 %d %d\" role=\"img\" "
       "preserveAspectRatio=\"xMidYMid meet\">",
       W, hh);
  sb_f(b, "<rect x=\"%d\" y=\"%d\" width=\"%d\" height=\"%d\" class=\"plot\"/>", ML, mt, pw, ph);
  for (double v = ceil(y0 / ys) * ys; v <= y1 + 1e-12; v += ys) {
    sb_f(b, "<line class=\"grid\" x1=\"%d\" x2=\"%d\" y1=\"%.1f\" y2=\"%.1f\"/>", ML, ML + pw, PY(v), PY(v));
    sb_f(b, "<text class=\"tick\" x=\"%d\" y=\"%.1f\" text-anchor=\"end\">", ML - 5, PY(v) + 4);
    axis_label(b, v, ys);
    sb_s(b, "</text>");
  }
  for (double v = ceil(x0 / xs) * xs; v <= x1 + 1e-12; v += xs) {
    sb_f(b, "<line class=\"grid\" x1=\"%.1f\" x2=\"%.1f\" y1=\"%d\" y2=\"%d\"/>", PX(v), PX(v), mt, mt + ph);
    sb_f(b, "<text class=\"tick\" x=\"%.1f\" y=\"%d\" text-anchor=\"middle\">", PX(v), mt + ph + 16);
    axis_label(b, v, xs);
    sb_s(b, "</text>");
  }
  sb_f(b, "<text class=\"axis\" x=\"%d\" y=\"%d\" text-anchor=\"middle\">", ML + pw / 2, hh - 6);
  sb_esc(b, xl);
  sb_f(b, "</text><text class=\"axis\" transform=\"translate(14 %d) rotate(-90)\" text-anchor=\"middle\">",
       mt + ph / 2);
  sb_esc(b, yl);
  sb_s(b, "</text>");
  for (int i = 0; i < ns && i < MAXS && ns > 1; i++) {
    const char *c = palette[i % 10];
    sb_f(b, "<rect x=\"%.0f\" y=\"%.0f\" width=\"10\" height=\"10\" fill=\"%s\"/>", lx[i], ly[i], c);
    sb_f(b, "<text class=\"legend\" x=\"%.0f\" y=\"%.0f\">", lx[i] + 13, ly[i] + 9);
    sb_esc(b, s[i].name);
    sb_s(b, "</text>");
  }
  for (int i = 0; i < ns; i++) {
    const char *c = palette[i % 10];
    if (s[i].n > 1) {
      sb_f(b, "<polyline fill=\"none\" stroke=\"%s\" stroke-width=\"2\" points=\"", c);
      for (int k = 0; k < s[i].n; k++) sb_f(b, "%s%.1f,%.1f", k ? " " : "", PX(s[i].x[k]), PY(s[i].y[k]));
      sb_s(b, "\"/>");
    }
    double r = s[i].n > 60 ? 1.6 : 3.5;
    for (int k = 0; k < s[i].n; k++) {
      sb_f(b,
           "<circle class=\"pt\" cx=\"%.1f\" cy=\"%.1f\" r=\"%.1f\" fill=\"%s\" data-chart=\"%s\" "
           "data-series=\"",
           PX(s[i].x[k]), PY(s[i].y[k]), r, c, id);
      sb_esc(b, s[i].name);
      sb_f(b, "\" data-x=\"%.9g\" data-y=\"%.9g\"><title>", s[i].x[k], s[i].y[k]);
      sb_esc(b, s[i].name);
      sb_f(b, ": %s %.9g, %.6g</title></circle>", integer_x ? "round" : "step", s[i].x[k], s[i].y[k]);
    }
  }
#undef PX
#undef PY
  sb_s(b, "</svg></figure>\n");
}

/* Rounds as stacked bars: devices in the result, dropped, stragglers. */
static void timeline_chart(sb *b, const cJSON *metrics) {
  sb_s(b, "<figure class=\"chart\" id=\"timeline\"><figcaption>Devices per round</figcaption>");
  double top = 1;
  const cJSON *m;
  int n = 0;
  cJSON_ArrayForEach(m, metrics) {
    if (jnum(m, "round") < 1) continue; /* round 0: the starting point's record, no devices */
    top = fmax(top, jnum(m, "participants") + jnum(m, "dropped") + jnum(m, "stragglers"));
    n++;
  }
  int pw = W - ML - MR, ph = H - MT - MB;
  if (!n) {
    sb_s(b, "<p class=\"none\">no round finished yet</p></figure>\n");
    return;
  }
  double slot = (double)pw / n, bw = fmin(48, slot * 0.6), ys = fmax(1, ceil(nice_step(top, 4)));
  top = ceil(top / ys) * ys;
  sb_f(b, "<svg viewBox=\"0 0 %d %d\" role=\"img\">", W, H);
  sb_f(b, "<rect x=\"%d\" y=\"%d\" width=\"%d\" height=\"%d\" class=\"plot\"/>", ML, MT, pw, ph);
  for (double v = 0; v <= top + 1e-9; v += ys) {
    double y = MT + ph - v / top * ph;
    sb_f(b, "<line class=\"grid\" x1=\"%d\" x2=\"%d\" y1=\"%.1f\" y2=\"%.1f\"/>", ML, ML + pw, y, y);
    sb_f(b, "<text class=\"tick\" x=\"%d\" y=\"%.1f\" text-anchor=\"end\">%.0f</text>", ML - 5, y + 4, v);
  }
  static const char *const part[] = {"participants", "dropped", "stragglers"};
  static const char *const col[] = {"#2ca02c", "#d62728", "#ff7f0e"};
  for (int k = 0; k < 3; k++) {
    sb_f(b, "<rect x=\"%d\" y=\"10\" width=\"10\" height=\"10\" fill=\"%s\"/>", ML + k * 120, col[k]);
    sb_f(b, "<text class=\"legend\" x=\"%d\" y=\"19\">%s</text>", ML + k * 120 + 13,
         k == 0 ? "in the result" : part[k]);
  }
  int i = 0;
  cJSON_ArrayForEach(m, metrics) {
    if (jnum(m, "round") < 1) continue;
    double x = ML + slot * (i + 0.5) - bw / 2, base = 0;
    for (int k = 0; k < 3; k++) {
      double v = jnum(m, part[k]);
      if (!(v > 0)) continue;
      double y = MT + ph - (base + v) / top * ph, h = v / top * ph;
      sb_f(b,
           "<rect class=\"bar\" x=\"%.1f\" y=\"%.1f\" width=\"%.1f\" height=\"%.1f\" fill=\"%s\" "
           "data-round=\"%.0f\" data-kind=\"%s\" data-value=\"%.0f\"><title>round %.0f: %.0f "
           "%s</title></rect>",
           x, y, bw, h, col[k], jnum(m, "round"), part[k], v, jnum(m, "round"), v, part[k]);
      base += v;
    }
    sb_f(b, "<text class=\"tick\" x=\"%.1f\" y=\"%d\" text-anchor=\"middle\">%.0f</text>", x + bw / 2,
         MT + ph + 16, jnum(m, "round"));
    i++;
  }
  sb_f(b, "<text class=\"axis\" x=\"%d\" y=\"%d\" text-anchor=\"middle\">round</text>", ML + pw / 2, H - 6);
  sb_f(
      b,
      "<text class=\"axis\" transform=\"translate(14 %d) rotate(-90)\" text-anchor=\"middle\">devices</text>",
      MT + ph / 2);
  sb_s(b, "</svg></figure>\n");
}

/* ---- the page ----------------------------------------------------------------------------- */

static const char *css =
    "body{font:15px/1.45 system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:0;color:#1b1f24;"
    "background:#f6f7f9}"
    "header{background:#20324a;color:#fff;padding:14px 20px}header h1{margin:0;font-size:1.35em;"
    "overflow-wrap:anywhere}header p{margin:4px 0 0;opacity:.85;font-size:.9em}"
    "main{max-width:1100px;margin:0 auto;padding:8px 16px 40px}"
    "section{background:#fff;border:1px solid #dde1e6;border-radius:6px;margin:14px 0;padding:10px 14px}"
    "h2{font-size:1.1em;margin:4px 0 10px}"
    ".charts{display:grid;grid-template-columns:repeat(auto-fill,minmax(min(100%,440px),1fr));gap:12px}"
    "figure.chart{margin:0}figure.chart figcaption{font-weight:600;font-size:.92em;margin-bottom:2px}"
    "svg{width:100%;height:auto;display:block}"
    "svg .plot{fill:#fbfcfd;stroke:#c9ced6}svg .grid{stroke:#e6e9ee;stroke-width:1}"
    "svg text{font-family:system-ui,sans-serif}svg .tick{font-size:13px;fill:#444}"
    "svg .axis{font-size:14px;fill:#222}svg .legend{font-size:13px;fill:#222}"
    ".scroll{overflow-x:auto}table{border-collapse:collapse;font-size:.88em;min-width:100%}"
    "th,td{border-bottom:1px solid #e3e6ea;padding:4px 8px;text-align:left;vertical-align:top}"
    "th{background:#f0f2f5;white-space:nowrap}td.t{white-space:nowrap}td.d{overflow-wrap:anywhere;min-width:"
    "16em}td.num{text-align:right;font-variant-"
    "numeric:tabular-nums}"
    "code{font-size:.92em;overflow-wrap:anywhere}.none{color:#777;font-style:italic}"
    ".ev-secagg{color:#0b5394}.ev-dp{color:#7b2d8e}.ev-refused{color:#b00020}"
    "nav a{margin-right:10px;color:#fff}"
    "@media (max-width:600px){body{font-size:14px}main{padding:4px 8px 30px}section{padding:8px}}";

static void settings_table(sb *b, const cJSON *cfg) {
  sb_s(b, "<div class=\"scroll\"><table id=\"settings\"><tr><th>setting</th><th>value</th></tr>");
  const cJSON *x;
  cJSON_ArrayForEach(x, cfg) {
    sb_s(b, "<tr><td>");
    sb_esc(b, x->string);
    sb_s(b, "</td><td>");
    if (cJSON_IsString(x))
      sb_esc(b, x->valuestring);
    else if (cJSON_IsNumber(x))
      sb_f(b, "%.6g", x->valuedouble); /* settings are floats: 0.01, not 0.00999999978 */
    else if (cJSON_IsBool(x))
      sb_s(b, cJSON_IsTrue(x) ? "true" : "false");
    else {
      char *t = cJSON_PrintUnformatted(x);
      sb_esc(b, t ? t : "");
      free(t);
    }
    sb_s(b, "</td></tr>");
  }
  sb_s(b, "</table></div>\n");
}

static void rounds_table(sb *b, const cJSON *rounds, const cJSON *metrics) {
  sb_s(b,
       "<div class=\"scroll\"><table id=\"rounds\"><tr><th>round</th><th>state</th><th>started</th>"
       "<th>finished</th><th>attempts</th><th>devices</th><th>dropped</th><th>stragglers</th><th>tokens</th>"
       "<th>mean device loss</th><th>held-out loss</th><th>aggregation s</th><th>DP epsilon</th><th>result "
       "adapter</th></tr>");
  const cJSON *r;
  cJSON_ArrayForEach(r, rounds) {
    const cJSON *m = NULL, *x;
    cJSON_ArrayForEach(x, metrics) {
      if (jnum(x, "round") == jnum(r, "round")) m = x;
    }
    sb_f(b, "<tr data-round=\"%.0f\"><td class=\"num\">%.0f</td><td>", jnum(r, "round"), jnum(r, "round"));
    sb_esc(b, jstr(r, "state"));
    sb_s(b, "</td><td class=\"t\">");
    sb_when(b, jnum(r, "started_at"));
    sb_s(b, "</td><td class=\"t\">");
    sb_when(b, jnum(r, "finished_at"));
    sb_f(b, "</td><td class=\"num\">%.0f</td>", jnum(r, "attempts"));
    static const char *const k[] = {"participants", "dropped", "stragglers", "tokens"};
    for (int i = 0; i < 4; i++) {
      sb_s(b, "<td class=\"num\">");
      sb_num(b, m ? jnum(m, k[i]) : (i == 0 ? jnum(r, "participants") : NAN), "%.0f");
      sb_s(b, "</td>");
    }
    sb_s(b, "<td class=\"num\">");
    sb_num(b, m ? jnum(m, "mean_loss") : NAN, "%.4f");
    sb_s(b, "</td><td class=\"num\">");
    sb_num(b, m ? jnum(m, "heldout_loss") : NAN, "%.4f");
    sb_s(b, "</td><td class=\"num\">");
    sb_num(b, m ? jnum(m, "agg_seconds") : NAN, "%.3f");
    sb_s(b, "</td><td class=\"num\">");
    sb_num(b, m ? jnum(m, "dp_epsilon") : NAN, "%.4f");
    sb_s(b, "</td><td><code title=\"");
    sb_esc(b, jstr(r, "result"));
    char head[17];
    snprintf(head, sizeof head, "%s", jstr(r, "result"));
    sb_s(b, "\">");
    sb_esc(b, head); /* the first 16 hex digits; the whole digest in the tooltip */
    sb_s(b, "</code></td></tr>");
  }
  sb_s(b, "</table></div>\n");
}

static void quality_table(sb *b, const cJSON *q) {
  const cJSON *cols = jget(q, "columns"), *rows = jget(q, "rows"), *x, *row;
  if (cJSON_IsString(jget(q, "title"))) {
    sb_s(b, "<p>");
    sb_esc(b, jstr(q, "title"));
    sb_s(b, "</p>");
  }
  sb_s(b, "<div class=\"scroll\"><table id=\"quality\"><tr>");
  cJSON_ArrayForEach(x, cols) {
    sb_s(b, "<th>");
    sb_esc(b, cJSON_IsString(x) ? x->valuestring : "");
    sb_s(b, "</th>");
  }
  sb_s(b, "</tr>");
  cJSON_ArrayForEach(row, rows) {
    sb_s(b, "<tr>");
    cJSON_ArrayForEach(x, row) {
      if (cJSON_IsNumber(x)) {
        sb_f(b, "<td class=\"num\">%.6g</td>", x->valuedouble);
      } else {
        sb_s(b, "<td>");
        sb_esc(b, cJSON_IsString(x) ? x->valuestring : "");
        sb_s(b, "</td>");
      }
    }
    sb_s(b, "</tr>");
  }
  sb_s(b, "</table></div>\n");
}

static const char *event_class(const char *ev) {
  if (strncmp(ev, "secagg", 6) == 0) return "ev-secagg";
  if (strncmp(ev, "dp.", 3) == 0) return "ev-dp";
  if (strstr(ev, "refused") || strstr(ev, "clipped") || strstr(ev, "failed")) return "ev-refused";
  return "";
}

static void audit_table(sb *b, const cJSON *audit) {
  sb_s(b, "<div class=\"scroll\"><table id=\"audit\"><tr><th>time</th><th>actor</th><th>event</th>"
          "<th>detail</th></tr>");
  const cJSON *a;
  cJSON_ArrayForEach(a, audit) {
    const char *ev = jstr(a, "event");
    sb_f(b, "<tr class=\"%s\"><td class=\"t\">", event_class(ev));
    sb_when(b, jnum(a, "at"));
    /* a device's fingerprint is long: its start, the whole in the tooltip */
    char head[21];
    snprintf(head, sizeof head, "%s", jstr(a, "actor"));
    sb_s(b, "</td><td class=\"t\"><code title=\"");
    sb_esc(b, jstr(a, "actor"));
    sb_s(b, "\">");
    sb_esc(b, head);
    sb_s(b, strlen(jstr(a, "actor")) > 20 ? "&hellip;" : "");
    sb_s(b, "</code></td><td class=\"t\">");
    sb_esc(b, ev);
    sb_s(b, "</td><td class=\"d\">");
    const char *det = jstr(a, "detail");
    if (strlen(det) > 200) { /* a session's settings: folded, no script needed */
      char head[81];
      size_t k = 80;
      while (k > 0 && ((unsigned char)det[k] & 0xC0) == 0x80) k--; /* not inside a UTF-8 character */
      memcpy(head, det, k);
      head[k] = '\0';
      sb_s(b, "<details><summary>");
      sb_esc(b, head);
      sb_s(b, "&hellip;</summary>");
      sb_esc(b, det);
      sb_s(b, "</details>");
    } else {
      sb_esc(b, det);
    }
    sb_s(b, "</td></tr>");
  }
  sb_s(b, "</table></div>\n");
}

/* The devices' reported losses per round: one series per device (plain rounds, where each
 * update row has its loss), and the round's mean over every report (round_stats). */
static int loss_series(const cJSON *updates, const cJSON *metrics, series **out, int *n_out) {
  int cap = 1 + cJSON_GetArraySize(updates), n = 1;
  series *s = calloc((size_t)cap, sizeof *s);
  if (!s) return ot_error(OT_ERR_NOMEM, "cannot allocate");
  snprintf(s[0].name, sizeof s[0].name, "mean of the devices");
  int rc = OT_OK;
  const cJSON *x;
  cJSON_ArrayForEach(x, metrics) {
    if (rc == OT_OK) rc = series_add(&s[0], jnum(x, "round"), jnum(x, "mean_loss"));
  }
  cJSON_ArrayForEach(x, updates) {
    const char *dev = *jstr(x, "device_name") ? jstr(x, "device_name") : jstr(x, "device");
    int k = 1;
    while (k < n && strcmp(s[k].name, dev) != 0) k++;
    if (k == n) snprintf(s[n++].name, sizeof s[0].name, "%s", dev);
    if (rc == OT_OK) rc = series_add(&s[k], jnum(x, "round"), jnum(x, "loss"));
  }
  for (int k = n - 1; k >= 1; k--) /* devices that reported nothing */
    if (!s[k].n) {
      series_free(&s[k], 1);
      memmove(&s[k], &s[k + 1], (size_t)(n - k - 1) * sizeof *s);
      n--;
    }
  if (rc) {
    series_free(s, n);
    free(s);
    return rc;
  }
  *out = s;
  *n_out = n;
  return OT_OK;
}

int ot_report_html(const cJSON *data, const ot_report_opts *o, char **html, size_t *len) {
  ot_report_opts none = {0};
  if (!o) o = &none;
  const cJSON *ses = jget(data, "session"), *cfg = jget(ses, "config"), *metrics = jget(data, "metrics");
  sb b = {0};
  sb_s(&b, "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
           "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
           /* no script may run, nothing may load: defence in depth behind the escaping */
           "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src "
           "'unsafe-inline'\">");
  if (o->refresh_s > 0) sb_f(&b, "<meta http-equiv=\"refresh\" content=\"%d\">", o->refresh_s);
  sb_s(&b, "<title>offtune session ");
  sb_esc(&b, jstr(ses, "name"));
  sb_f(&b, "</title><style>%s</style></head><body>\n<header><h1>Session <span id=\"session-name\">", css);
  sb_esc(&b, jstr(ses, "name"));
  sb_s(&b, "</span></h1><p>");
  sb_esc(&b, jstr(ses, "state"));
  sb_f(&b, ", round %.0f of %.0f; model ", jnum(ses, "round"), jnum(cfg, "rounds"));
  sb_esc(&b, jstr(cfg, "model"));
  sb_s(&b, "; ");
  sb_s(&b, o->refresh_s > 0 ? "live dashboard, refreshed every few seconds; " : "report ");
  sb_s(&b, "generated ");
  sb_when(&b, (double)time(NULL));
  sb_s(&b, "</p>");
  if (o->sessions && o->link_prefix) {
    sb_s(&b, "<nav>sessions: ");
    const cJSON *x;
    cJSON_ArrayForEach(x, o->sessions) {
      sb_f(&b, "<a href=\"%s", o->link_prefix);
      sb_esc(&b, jstr(x, "name")); /* names are [A-Za-z0-9_-]: safe in a URL too */
      sb_s(&b, "\">");
      sb_esc(&b, jstr(x, "name"));
      sb_s(&b, "</a>");
    }
    sb_s(&b, "</nav>");
  }
  sb_s(&b, "</header>\n<main>\n");
  if (cJSON_IsString(jget(ses, "error"))) {
    sb_s(&b, "<section><h2>Failure</h2><p class=\"ev-refused\">");
    sb_esc(&b, jstr(ses, "error"));
    sb_s(&b, "</p></section>\n");
  }

  /* rounds */
  sb_s(&b, "<section id=\"sec-rounds\"><h2>Rounds</h2><div class=\"charts\">");
  timeline_chart(&b, metrics);
  series *ls = NULL;
  int nls = 0;
  int rc = loss_series(jget(data, "updates"), metrics, &ls, &nls);
  if (rc == OT_OK)
    line_chart(&b, "device-loss", "Devices' training loss per round", "round", "loss (nats/token)", ls, nls,
               1);
  /* the aggregate's quality round by round, when the session names a held-out text */
  series hs = {.name = "full model + round adapter"};
  const cJSON *x;
  cJSON_ArrayForEach(x, metrics) {
    if (rc == OT_OK) rc = series_add(&hs, jnum(x, "round"), jnum(x, "heldout_loss"));
  }
  if (rc == OT_OK && *jstr(cfg, "eval_data"))
    line_chart(&b, "heldout-loss", "Aggregate's held-out loss (the cloud's eval_data)", "round",
               "loss (nats/token)", &hs, 1, 1);
  series_free(&hs, 1);
  series_free(ls, nls);
  free(ls);
  sb_s(&b, "</div>");
  rounds_table(&b, jget(data, "rounds"), metrics);
  sb_s(&b, "</section>\n");

  /* the cloud's distillation of the emulator */
  series ds[2] = {{.name = "loss"}, {.name = "CE"}};
  /* a long distillation is drawn with at most about MAX_POINTS points a curve: every k-th step */
  enum { MAX_POINTS = 500 };
  int nsteps = 0, ks = 0, kd = 0;
  cJSON_ArrayForEach(x, jget(data, "distill")) { nsteps += strcmp(jstr(x, "kind"), "step") == 0; }
  int stride = nsteps > MAX_POINTS ? (nsteps + MAX_POINTS - 1) / MAX_POINTS : 1;
  cJSON_ArrayForEach(x, jget(data, "distill")) {
    const char *k = jstr(x, "kind");
    if (rc == OT_OK && strcmp(k, "step") == 0 && ks++ % stride == 0)
      rc = series_add(&ds[0], jnum(x, "step"), jnum(x, "loss"));
    if (rc == OT_OK && strcmp(k, "distill") == 0 && kd++ % stride == 0)
      rc = series_add(&ds[1], jnum(x, "step"), jnum(x, "ce"));
  }
  sb_s(&b, "<section id=\"sec-distill\"><h2>Emulator distillation (cloud)</h2><p>Emulator <code>");
  sb_esc(&b, jstr(ses, "emulator_digest"));
  sb_s(&b, "</code>; gap to the full model at the end of distillation (KD term): ");
  sb_num(&b, jnum(ses, "emulator_gap"), "%.6g");
  sb_s(&b, ", CE ");
  sb_num(&b, jnum(ses, "emulator_ce"), "%.6g");
  sb_s(&b, "</p><div class=\"charts\">");
  if (rc == OT_OK)
    line_chart(&b, "distill-loss", "Distillation loss (CE + 30 x KD) and CE", "step", "nats/token", ds, 2, 0);
  sb_s(&b, "</div></section>\n");
  series_free(ds, 2);

  /* quality */
  sb_s(&b, "<section id=\"sec-quality\"><h2>Quality</h2>");
  if (jget(data, "quality"))
    quality_table(&b, jget(data, "quality"));
  else
    sb_s(&b, "<p class=\"none\">no quality table recorded (STATE/quality/SESSION.json)</p>");
  sb_s(&b, "</section>\n");

  /* adapters */
  sb_s(&b, "<section id=\"sec-adapters\"><h2>Published adapters</h2>");
  const cJSON *ads = jget(data, "adapters");
  if (!cJSON_GetArraySize(ads))
    sb_s(&b, "<p class=\"none\">none yet (published when the last round ends)</p>");
  sb_s(&b, "<div class=\"scroll\"><table id=\"adapters\"><tr><th>name</th><th>published</th><th>digest "
           "(BLAKE2b-256 of adapter_model.safetensors)</th><th>created</th></tr>");
  cJSON_ArrayForEach(x, ads) {
    sb_s(&b, "<tr><td>");
    sb_esc(&b, jstr(x, "name"));
    sb_f(&b, "</td><td>%s</td><td><code class=\"digest\">", jnum(x, "published") > 0 ? "yes" : "no");
    sb_esc(&b, jstr(x, "digest"));
    sb_s(&b, "</code></td><td>");
    sb_when(&b, jnum(x, "created_at"));
    sb_s(&b, "</td></tr>");
  }
  sb_s(&b, "</table></div></section>\n");

  /* privacy */
  int dp = jnum(cfg, "dp_epsilon") > 0;
  sb_s(&b, "<section id=\"sec-privacy\"><h2>Secure aggregation and differential privacy</h2><p>Secure "
           "aggregation: ");
  sb_esc(&b, jstr(cfg, "secagg"));
  if (dp)
    sb_f(&b, "; DP budget epsilon %.6g at delta %.3g, clip %.6g", jnum(cfg, "dp_epsilon"),
         jnum(cfg, "dp_delta"), jnum(cfg, "dp_clip"));
  else
    sb_s(&b, "; no differential privacy");
  sb_s(&b, ".</p>");
  if (dp) {
    series es = {.name = "epsilon spent"};
    cJSON_ArrayForEach(x, metrics) {
      if (rc == OT_OK) rc = series_add(&es, jnum(x, "round"), jnum(x, "dp_epsilon"));
    }
    sb_s(&b, "<div class=\"charts\">");
    if (rc == OT_OK)
      line_chart(&b, "dp-epsilon", "DP epsilon spent after each round", "round", "epsilon", &es, 1, 1);
    sb_s(&b, "</div>");
    series_free(&es, 1);
  }
  sb_s(&b, "<h2>Audit trail</h2>");
  audit_table(&b, jget(data, "audit"));
  sb_s(&b, "</section>\n<section id=\"sec-settings\"><h2>Settings</h2>");
  settings_table(&b, cfg);
  sb_s(&b, "</section>\n</main></body></html>\n");
  if (rc == OT_OK && b.err) rc = ot_error(OT_ERR_NOMEM, "cannot allocate the report");
  if (rc) {
    free(b.p);
    return rc;
  }
  *html = b.p;
  *len = b.n;
  return OT_OK;
}

#include "ot_metrics.h"

#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ot_error.h"
#include "ot_fileio.h"

struct ot_metrics {
  FILE *f, *echo;
  char label[64];
};

int ot_metrics_open(const char *path, FILE *echo, const char *label, ot_metrics **out) {
  ot_metrics *m = calloc(1, sizeof *m);
  if (!m) return ot_error(OT_ERR_NOMEM, "cannot allocate");
  snprintf(m->label, sizeof m->label, "%s", label ? label : "train");
  m->echo = echo;
  if (path && !(m->f = fopen(path, "a"))) {
    int rc = ot_error(OT_ERR_IO, "cannot open %s for the metrics records: %s", path, strerror(errno));
    free(m);
    return rc;
  }
  *out = m;
  return OT_OK;
}

int ot_metrics_open_dir(const char *dir, FILE *echo, const char *label, ot_metrics **out) {
  char *path = NULL;
  int rc = ot_mkdir_p(dir);
  if (rc == OT_OK) rc = ot_path_join(dir, OT_METRICS_FILE, &path);
  if (rc == OT_OK) rc = ot_metrics_open(path, echo, label, out);
  free(path);
  return rc;
}

void ot_metrics_close(ot_metrics *m) {
  if (!m) return;
  if (m->f) fclose(m->f);
  free(m);
}

/* The label is ours or a command's literal: only [A-Za-z0-9_-] pass, so no escaping is needed. */
static int format(const ot_metrics *m, const char *kind, int n, const char *const *keys, const double *vals,
                  char *buf, size_t cap) {
  char lab[64];
  size_t k = 0;
  for (const char *p = m->label; *p && k + 1 < sizeof lab; p++)
    lab[k++] = (*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') ||
                       *p == '-' || *p == '_'
                   ? *p
                   : '_';
  lab[k] = '\0';
  size_t len = (size_t)snprintf(buf, cap, "{\"kind\":\"%s\",\"label\":\"%s\",\"time\":%lld", kind, lab,
                                (long long)time(NULL));
  for (int i = 0; i < n && len < cap; i++) {
    if (isfinite(vals[i]))
      len += (size_t)snprintf(buf + len, cap - len, ",\"%s\":%.9g", keys[i], vals[i]);
    else
      len += (size_t)snprintf(buf + len, cap - len, ",\"%s\":null", keys[i]);
  }
  if (len < cap) len += (size_t)snprintf(buf + len, cap - len, "}\n");
  if (len >= cap) return ot_error(OT_ERR_RANGE, "metrics record too long");
  return OT_OK;
}

int ot_metrics_record(ot_metrics *m, const char *kind, int n, const char *const *keys, const double *vals) {
  if (!m) return OT_OK;
  char buf[2048];
  int rc = format(m, kind, n, keys, vals, buf, sizeof buf);
  if (rc) return rc;
  if (m->f && (fputs(buf, m->f) == EOF || fflush(m->f) != 0))
    return ot_error(OT_ERR_IO, "writing a metrics record: %s", strerror(errno));
  if (m->echo) {
    fputs(buf, m->echo);
    fflush(m->echo);
  }
  return OT_OK;
}

int ot_metrics_write_step(ot_metrics *m, const ot_metrics_step *s) {
  static const char *const keys[] = {"step",      "steps",  "loss",         "lr",
                                     "grad_norm", "tokens", "tokens_per_s", "elapsed_s"};
  const double v[] = {s->step,      s->steps,  s->loss,         s->lr,
                      s->grad_norm, s->tokens, s->tokens_per_s, s->elapsed_s};
  return ot_metrics_record(m, "step", 8, keys, v);
}

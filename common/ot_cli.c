#include "ot_cli.h"

#include "ot_error.h"

#include <errno.h>
#include <stdarg.h>
#include <float.h>
#include <limits.h>
#include <math.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/ioctl.h>
#include <unistd.h>

/* ---- parsing ---- */

typedef union {
  const char *s;
  int i;
  float f;
} opt_value;

static int find_opt(const ot_opt *opts, int n_opts, const char *name, size_t len) {
  for (int i = 0; i < n_opts; i++)
    if (strlen(opts[i].name) == len && strncmp(opts[i].name, name, len) == 0) return i;
  return -1;
}

static int parse_int(const char *name, const char *s, int *out) {
  /* strtol skips leading blanks and takes "" as 0; neither is a number the user meant. */
  if (!*s || *s == ' ' || *s == '\t')
    return ot_error(OT_ERR_INVALID, "option --%s: \"%s\" is not an integer", name, s);
  char *end = NULL;
  errno = 0;
  long v = strtol(s, &end, 10);
  if (*end) return ot_error(OT_ERR_INVALID, "option --%s: \"%s\" is not an integer", name, s);
  if (errno == ERANGE || v < INT_MIN || v > INT_MAX)
    return ot_error(OT_ERR_INVALID, "option --%s: %s is out of range", name, s);
  *out = (int)v;
  return OT_OK;
}

static int parse_float(const char *name, const char *s, float *out) {
  if (!*s || *s == ' ' || *s == '\t')
    return ot_error(OT_ERR_INVALID, "option --%s: \"%s\" is not a number", name, s);
  char *end = NULL;
  errno = 0;
  double v = strtod(s, &end);
  if (*end) return ot_error(OT_ERR_INVALID, "option --%s: \"%s\" is not a number", name, s);
  /* Underflow to a tiny value is harmless; inf, nan and overflow are not. */
  if (!isfinite(v) || fabs(v) > FLT_MAX)
    return ot_error(OT_ERR_INVALID, "option --%s: %s is out of range", name, s);
  *out = (float)v;
  return OT_OK;
}

int ot_cli_parse(int argc, char **argv, const ot_opt *opts, int n_opts) {
  if (argc < 0 || (argc > 0 && !argv) || n_opts < 0 || (n_opts > 0 && !opts))
    return ot_error(OT_ERR_INVALID, "ot_cli_parse: bad arguments");
  for (int i = 0; i < n_opts; i++)
    if (!opts[i].name || !opts[i].dst)
      return ot_error(OT_ERR_INTERNAL, "option table entry %d is incomplete", i);

  /* Values are staged and copied out only when the whole command line is good,
   * so a failed parse leaves the caller's defaults untouched. */
  opt_value *val = calloc((size_t)n_opts + 1, sizeof *val);
  unsigned char *set = calloc((size_t)n_opts + 1, 1);
  int rc = OT_OK;
  if (!val || !set) {
    rc = ot_error(OT_ERR_NOMEM, "ot_cli_parse: out of memory");
    goto done;
  }
  for (int a = 0; a < argc; a++) {
    const char *arg = argv[a];
    if (strcmp(arg, "--help") == 0 || strcmp(arg, "-h") == 0) {
      rc = 1;
      goto done;
    }
    if (strncmp(arg, "--", 2) != 0 || arg[2] == '\0') {
      if (arg[0] == '-' && arg[1] != '\0' && arg[1] != '-')
        rc = ot_error(OT_ERR_INVALID, "unknown option %s (options are spelled --name)", arg);
      else
        rc = ot_error(OT_ERR_INVALID, "unexpected argument \"%s\"", arg);
      goto done;
    }
    const char *name = arg + 2;
    const char *eq = strchr(name, '=');
    size_t name_len = eq ? (size_t)(eq - name) : strlen(name);
    int k = find_opt(opts, n_opts, name, name_len);
    if (k < 0) {
      rc = ot_error(OT_ERR_INVALID, "unknown option --%.*s", (int)name_len, name);
      goto done;
    }
    const ot_opt *o = &opts[k];
    if (o->kind == OT_OPT_FLAG) {
      if (eq) {
        rc = ot_error(OT_ERR_INVALID, "option --%s takes no value", o->name);
        goto done;
      }
      val[k].i = 1;
      set[k] = 1;
      continue;
    }
    const char *v;
    if (eq) {
      v = eq + 1;
    } else {
      /* "--out --steps 5" is a forgotten value, not an output file named "--steps". */
      if (a + 1 >= argc || (strncmp(argv[a + 1], "--", 2) == 0 && argv[a + 1][2] != '\0')) {
        rc = ot_error(OT_ERR_INVALID, "option --%s needs a value%s%s", o->name, o->metavar ? " " : "",
                      o->metavar ? o->metavar : "");
        goto done;
      }
      v = argv[++a];
    }
    switch (o->kind) {
    case OT_OPT_STR: val[k].s = v; break;
    case OT_OPT_INT: rc = parse_int(o->name, v, &val[k].i); break;
    case OT_OPT_FLOAT: rc = parse_float(o->name, v, &val[k].f); break;
    default: rc = ot_error(OT_ERR_INTERNAL, "option --%s has an unknown kind", o->name); break;
    }
    if (rc != OT_OK) goto done;
    set[k] = 1;
  }
  for (int k = 0; k < n_opts; k++) {
    if (!set[k]) continue;
    switch (opts[k].kind) {
    case OT_OPT_STR: *(const char **)opts[k].dst = val[k].s; break;
    case OT_OPT_INT:
    case OT_OPT_FLAG: *(int *)opts[k].dst = val[k].i; break;
    case OT_OPT_FLOAT: *(float *)opts[k].dst = val[k].f; break;
    }
  }

done:
  free(val);
  free(set);
  return rc;
}

/* ---- usage ---- */

enum { USAGE_WIDTH = 80, USAGE_MAX_LEFT = 30 };

/* Prints `text` word-wrapped into columns [col, USAGE_WIDTH), assuming the cursor is at `col`
 * already; continuation lines are indented to `col`. Explicit newlines are kept. */
static void print_wrapped(FILE *f, const char *text, int col) {
  int avail = USAGE_WIDTH - col;
  if (avail < 20) avail = 20;
  int x = 0;
  const char *p = text;
  while (*p) {
    if (*p == '\n') {
      /* Reflow: a lone newline joins lines (authors wrap at their own width); a blank
       * line or a line starting with '-' or a space (a list) keeps its break. */
      p++;
      if (*p && *p != '\n' && *p != '-' && *p != ' ') {
        continue;
      }
      fputc('\n', f);
      if (*p) fprintf(f, "%*s", col, "");
      x = 0;
      continue;
    }
    if (*p == ' ') {
      p++;
      continue;
    }
    size_t wl = strcspn(p, " \n");
    if (x > 0 && x + 1 + (int)wl > avail) {
      fprintf(f, "\n%*s", col, "");
      x = 0;
    } else if (x > 0) {
      fputc(' ', f);
      x++;
    }
    fwrite(p, 1, wl, f);
    x += (int)wl;
    p += wl;
  }
  fputc('\n', f);
}

static int opt_left(const ot_opt *o, char *buf, size_t n) {
  if (o->kind == OT_OPT_FLAG || !o->metavar) return snprintf(buf, n, "  --%s", o->name);
  return snprintf(buf, n, "  --%s %s", o->name, o->metavar);
}

void ot_cli_usage(FILE *f, const char *synopsis, const char *description, const ot_opt *opts, int n_opts) {
  if (!f) return;
  fprintf(f, "usage: %s\n", synopsis ? synopsis : "");
  if (description && *description) {
    fputc('\n', f);
    print_wrapped(f, description, 0);
  }
  char left[256];
  int width = (int)strlen("  -h, --help");
  for (int i = 0; i < n_opts; i++) {
    int w = opt_left(&opts[i], left, sizeof left);
    if (w > width && w <= USAGE_MAX_LEFT) width = w;
  }
  int col = width + 2;
  fprintf(f, "\noptions:\n");
  for (int i = 0; i < n_opts; i++) {
    int w = opt_left(&opts[i], left, sizeof left);
    fputs(left, f);
    const char *help = opts[i].help ? opts[i].help : "";
    if (w + 2 > col) {
      /* Too long to align: help starts on its own line. */
      fprintf(f, "\n%*s", col, "");
    } else {
      fprintf(f, "%*s", col - w, "");
    }
    print_wrapped(f, help, col);
  }
  fprintf(f, "  -h, --help%*s", col - (int)strlen("  -h, --help"), "");
  print_wrapped(f, "show this help and exit", col);
}

/* ---- progress ---- */

double ot_now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void fmt_duration(char *buf, size_t n, double s) {
  if (!(s >= 0) || s > 360000.0 * 24) {
    snprintf(buf, n, "--:--");
    return;
  }
  long t = (long)(s + 0.5);
  if (t >= 3600)
    snprintf(buf, n, "%ld:%02ld:%02ld", t / 3600, t / 60 % 60, t % 60);
  else
    snprintf(buf, n, "%02ld:%02ld", t / 60, t % 60);
}

enum { BAR_WIDTH = 24 };
/* TTY redraws are throttled: a tight training loop must not spend its time printing. */
#define TTY_MIN_INTERVAL 0.1
#define LOG_MIN_INTERVAL 10.0
#define LOG_MIN_FRACTION 0.05

/* Appends to a fixed line buffer; output past the end is cut, never overflowed. */
static void line_add(char *buf, size_t cap, size_t *len, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static void line_add(char *buf, size_t cap, size_t *len, const char *fmt, ...) {
  if (*len >= cap - 1) return;
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(buf + *len, cap - *len, fmt, ap);
  va_end(ap);
  if (n > 0) *len = (size_t)n < cap - *len ? *len + (size_t)n : cap - 1;
}

static int tty_columns(FILE *f) {
  struct winsize ws;
  if (ioctl(fileno(f), TIOCGWINSZ, &ws) == 0 && ws.ws_col > 0) return ws.ws_col;
  return 0;
}

static void draw(ot_progress *p, int64_t done, const char *extra, double now, int final) {
  char line[512], el[32], eta[32] = "--:--";
  size_t len = 0;
  double elapsed = now - p->t_start;
  fmt_duration(el, sizeof el, elapsed);
  int known = p->total > 0;
  double frac = known ? (double)done / (double)p->total : 0.0;
  if (frac < 0) frac = 0;
  if (frac > 1) frac = 1;
  if (known && done > 0 && elapsed > 0)
    fmt_duration(eta, sizeof eta, elapsed * (double)(p->total - done) / (double)done);
  const char *label = p->label ? p->label : "";
  if (p->tty && known) {
    char bar[BAR_WIDTH + 1];
    int fill = (int)(frac * BAR_WIDTH + 0.5);
    for (int i = 0; i < BAR_WIDTH; i++) bar[i] = i < fill ? '#' : '.';
    bar[BAR_WIDTH] = '\0';
    line_add(line, sizeof line, &len, "%s [%s] ", label, bar);
  } else {
    line_add(line, sizeof line, &len, "%s%s", label, *label ? ": " : "");
  }
  if (known)
    line_add(line, sizeof line, &len, "%lld/%lld %5.1f%%", (long long)done, (long long)p->total,
             100.0 * frac);
  else
    line_add(line, sizeof line, &len, "%lld", (long long)done);
  if (extra && *extra) line_add(line, sizeof line, &len, " | %s", extra);
  if (final || !known)
    line_add(line, sizeof line, &len, " | %s elapsed", el);
  else
    line_add(line, sizeof line, &len, " | %s elapsed, ETA %s", el, eta);
  if (p->tty) {
    /* A line wider than the terminal wraps, and \r then redraws only its last row. */
    int cols = tty_columns(p->f);
    if (cols > 1 && len > (size_t)cols - 1) len = (size_t)cols - 1;
    /* \033[K clears what a longer previous line left behind. */
    fprintf(p->f, "\r%.*s\033[K%s", (int)len, line, final ? "\n" : "");
  } else {
    fprintf(p->f, "%.*s\n", (int)len, line);
  }
  fflush(p->f);
  p->t_last = now;
  p->last_done = done;
}

void ot_progress_start(ot_progress *p, FILE *f, const char *label, int64_t total) {
  if (!p) return;
  double now = ot_now();
  ot_progress np = {
      .f = f, .label = label, .total = total, .t_start = now, .t_last = now, .tty = 0, .last_done = 0};
  if (f) {
    int fd = fileno(f);
    np.tty = fd >= 0 && isatty(fd);
  }
  *p = np;
  if (f && np.tty) draw(p, 0, NULL, now, 0);
}

void ot_progress_update(ot_progress *p, int64_t done, const char *extra) {
  if (!p || !p->f) return;
  double now = ot_now();
  int known = p->total > 0;
  int64_t since = done - p->last_done;
  /* With a total, last_done is the last drawn count (the 5% rule measures from it);
   * without one it follows every update, so that finish can report the count. */
  if (!known) p->last_done = done;
  if (p->tty) {
    if (now - p->t_last < TTY_MIN_INTERVAL && !(known && done >= p->total)) return;
  } else {
    /* Logs: a line only once both 10 s and 5% of the total have passed since the last
     * one, so a short run logs just its final line and a long one at most ~20 lines.
     * Without a known total, time alone decides. */
    if (now - p->t_last < LOG_MIN_INTERVAL) return;
    if (known && (double)since < LOG_MIN_FRACTION * (double)p->total) return;
  }
  draw(p, done, extra, now, 0);
}

void ot_progress_finish(ot_progress *p, const char *extra) {
  if (!p || !p->f) return;
  int64_t done = p->total > 0 ? p->total : p->last_done;
  draw(p, done, extra, ot_now(), 1);
}

static void dispatch_usage(FILE *f, const char *prog, const char *about, const ot_cli_command *cmds, int n) {
  fprintf(f, "usage: %s <command> [options]\n\n%s\n\ncommands:\n", prog, about);
  for (int i = 0; i < n; i++) fprintf(f, "  %-10s %s\n", cmds[i].name, cmds[i].help);
  fprintf(f,
          "\nRun '%s <command> --help' for a command's options.\n"
          "Exit codes: 0 success, 1 failure, 2 usage error.\n",
          prog);
}

int ot_cli_dispatch(const char *prog, const char *about, const ot_cli_command *cmds, int n_cmds, int argc,
                    char **argv) {
  signal(SIGXFSZ, SIG_IGN);
  if (argc < 2) {
    dispatch_usage(stderr, prog, about, cmds, n_cmds);
    return 2;
  }
  if (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0 || strcmp(argv[1], "help") == 0) {
    dispatch_usage(stdout, prog, about, cmds, n_cmds);
    return 0;
  }
  for (int i = 0; i < n_cmds; i++)
    if (strcmp(argv[1], cmds[i].name) == 0) return cmds[i].run(argc - 2, argv + 2);
  fprintf(stderr, "%s: unknown command '%s'\n\n", prog, argv[1]);
  dispatch_usage(stderr, prog, about, cmds, n_cmds);
  return 2;
}

int ot_cli_fail(const char *prog, const char *what, int status) {
  const char *d = ot_error_detail();
  fprintf(stderr, "%s: %s: %s%s%s\n", prog, what, ot_strerror(status), *d ? ": " : "", d);
  return 1;
}

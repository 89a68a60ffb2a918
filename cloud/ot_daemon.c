/* offtune-cloud serve: state directory, identity, registry, the protocol server, the
 * operator socket and the round scheduler; runs until SIGINT/SIGTERM. */
#include "ot_daemon.h"
#include "ot_round_secagg.h"

#include <errno.h>
#include <fcntl.h>
#include <dirent.h>
#include <ftw.h>
#include <limits.h>
#include <signal.h>
#include <sodium.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include "ot_cli.h"
#include "ot_cloud_cmd.h"
#include "ot_error.h"
#include "ot_http.h"
#include "ot_fileio.h"
#include "ot_regdb.h"

#define N_OPTS(o) ((int)(sizeof(o) / sizeof((o)[0])))

static pthread_mutex_t log_mu = PTHREAD_MUTEX_INITIALIZER;

void ot_daemon_log(ot_daemon *d, const char *fmt, ...) {
  (void)d;
  struct timeval tv;
  gettimeofday(&tv, NULL);
  struct tm tm;
  gmtime_r(&tv.tv_sec, &tm);
  char line[2048];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(line, sizeof line, fmt, ap);
  va_end(ap);
  pthread_mutex_lock(&log_mu);
  fprintf(stderr, "[serve %02d:%02d:%02d.%03d] %s\n", tm.tm_hour, tm.tm_min, tm.tm_sec,
          (int)(tv.tv_usec / 1000), line);
  fflush(stderr);
  pthread_mutex_unlock(&log_mu);
}

static void transport_log(void *user, const char *line) { ot_daemon_log(user, "transport: %s", line); }

void ot_daemon_kick(ot_daemon *d) {
  pthread_mutex_lock(&d->mu);
  d->kick = 1;
  pthread_cond_broadcast(&d->cv);
  pthread_mutex_unlock(&d->mu);
}

int ot_daemon_path(const ot_daemon *d, char *out, size_t n, const char *fmt, ...) {
  char rel[1024];
  va_list ap;
  va_start(ap, fmt);
  int k = vsnprintf(rel, sizeof rel, fmt, ap);
  va_end(ap);
  if (k < 0 || (size_t)k >= sizeof rel || (size_t)snprintf(out, n, "%s/%s", d->state, rel) >= n)
    return ot_error(OT_ERR_RANGE, "path too long under %s", d->state);
  return OT_OK;
}

int ot_daemon_obj_path(const ot_daemon *d, char *out, size_t n, const char *fmt, ...) {
  char rel[1024];
  va_list ap;
  va_start(ap, fmt);
  int k = vsnprintf(rel, sizeof rel, fmt, ap);
  va_end(ap);
  const char *root = d->objects[0] ? d->objects : d->state; /* not set yet: the state directory */
  if (k < 0 || (size_t)k >= sizeof rel || (size_t)snprintf(out, n, "%s/%s", root, rel) >= n)
    return ot_error(OT_ERR_RANGE, "path too long under %s", root);
  return OT_OK;
}

int ot_fsync_dir(const char *dir) {
  int fd = open(dir, O_RDONLY | O_DIRECTORY);
  if (fd < 0) return ot_error(OT_ERR_IO, "cannot open %s: %s", dir, strerror(errno));
  int rc = OT_OK;
  if (fsync(fd) != 0 && errno != EINVAL && errno != ENOTSUP)
    rc = ot_error(OT_ERR_IO, "cannot fsync %s: %s", dir, strerror(errno));
  close(fd);
  return rc;
}

static int rm_one(const char *p, const struct stat *sb, int flag, struct FTW *ftw) {
  (void)sb;
  (void)flag;
  (void)ftw;
  return remove(p);
}

int ot_rm_rf(const char *path) {
  if (!ot_file_exists(path)) return OT_OK;
  if (nftw(path, rm_one, 16, FTW_DEPTH | FTW_PHYS) != 0)
    return ot_error(OT_ERR_IO, "cannot remove %s: %s", path, strerror(errno));
  return OT_OK;
}

/* fsync every regular file of a directory, then the directory. */
static int fsync_tree(const char *dir) {
  int rc = OT_OK;
  DIR *dp = opendir(dir);
  if (!dp) return ot_error(OT_ERR_IO, "cannot open %s: %s", dir, strerror(errno));
  struct dirent *e;
  while (rc == OT_OK && (e = readdir(dp))) {
    if (e->d_name[0] == '.') continue;
    char p[4200];
    snprintf(p, sizeof p, "%s/%s", dir, e->d_name);
    int fd = open(p, O_RDONLY);
    if (fd < 0) continue;
    if (fsync(fd) != 0) rc = ot_error(OT_ERR_IO, "cannot fsync %s: %s", p, strerror(errno));
    close(fd);
  }
  closedir(dp);
  if (rc == OT_OK) rc = ot_fsync_dir(dir);
  return rc;
}

/* A copy of file src at dst (created, 0600), fsync'd. */
static int copy_file(const char *src, const char *dst) {
  int in = -1, rc = OT_OK;
  uint64_t size = 0;
  rc = ot_file_open_regular(src, UINT64_MAX, &in, &size);
  int out = rc == OT_OK ? open(dst, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600) : -1;
  if (rc == OT_OK && out < 0) rc = ot_error(OT_ERR_IO, "cannot create %s: %s", dst, strerror(errno));
  char buf[1 << 16];
  while (rc == OT_OK) {
    ssize_t k = read(in, buf, sizeof buf);
    if (k < 0 && errno == EINTR) continue;
    if (k < 0) rc = ot_error(OT_ERR_IO, "cannot read %s: %s", src, strerror(errno));
    if (k <= 0) break;
    rc = ot_fd_write_all(out, buf, (size_t)k, -1, dst);
  }
  if (rc == OT_OK && fsync(out) != 0) rc = ot_error(OT_ERR_IO, "cannot fsync %s: %s", dst, strerror(errno));
  if (in >= 0) close(in);
  if (out >= 0) close(out);
  return rc;
}

int ot_daemon_move_in(const char *src, const char *dst) {
  char parent[4200];
  snprintf(parent, sizeof parent, "%s", dst);
  char *slash = strrchr(parent, '/');
  if (!slash) return ot_error(OT_ERR_INVALID, "%s: not an absolute path", dst);
  *slash = '\0';
  if (rename(src, dst) == 0) return ot_fsync_dir(parent);
  if (errno == EEXIST || errno == ENOTEMPTY) return ot_rm_rf(src); /* the same content is there */
  if (errno != EXDEV) return ot_error(OT_ERR_IO, "cannot move %s to %s: %s", src, dst, strerror(errno));
  /* another file system: copy next to dst under a name no reader looks up, then rename */
  char tmp[4300];
  uint8_t r[6];
  randombytes_buf(r, sizeof r);
  snprintf(tmp, sizeof tmp, "%s.incoming-%02x%02x%02x%02x%02x%02x", dst, r[0], r[1], r[2], r[3], r[4], r[5]);
  struct stat sb;
  int rc = stat(src, &sb) == 0 ? OT_OK : ot_error(OT_ERR_IO, "%s: %s", src, strerror(errno));
  if (rc == OT_OK && S_ISDIR(sb.st_mode)) {
    if (mkdir(tmp, 0700) != 0) rc = ot_error(OT_ERR_IO, "cannot make %s: %s", tmp, strerror(errno));
    DIR *dp = rc == OT_OK ? opendir(src) : NULL;
    if (rc == OT_OK && !dp) rc = ot_error(OT_ERR_IO, "cannot open %s: %s", src, strerror(errno));
    struct dirent *e;
    while (rc == OT_OK && (e = readdir(dp))) {
      if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0) continue;
      char a[4700], b[4700];
      if ((size_t)snprintf(a, sizeof a, "%s/%s", src, e->d_name) >= sizeof a ||
          (size_t)snprintf(b, sizeof b, "%s/%s", tmp, e->d_name) >= sizeof b)
        rc = ot_error(OT_ERR_RANGE, "path too long under %s", src);
      if (rc == OT_OK) rc = copy_file(a, b); /* objects are flat directories of files */
    }
    if (dp) closedir(dp);
    if (rc == OT_OK) rc = ot_fsync_dir(tmp);
  } else if (rc == OT_OK) {
    rc = copy_file(src, tmp);
  }
  if (rc == OT_OK && rename(tmp, dst) != 0) {
    if (errno == EEXIST || errno == ENOTEMPTY)
      ot_rm_rf(tmp);
    else
      rc = ot_error(OT_ERR_IO, "cannot move %s to %s: %s", tmp, dst, strerror(errno));
  }
  if (rc == OT_OK) rc = ot_fsync_dir(parent);
  if (rc == OT_OK) rc = ot_rm_rf(src);
  if (rc) ot_rm_rf(tmp);
  return rc;
}

int ot_daemon_object_check(const char *path, const char *digest) {
  char h[OT_DIGEST_HEX];
  int rc = ot_file_digest(path, h);
  if (rc) return rc;
  if (strcmp(h, digest) != 0)
    return ot_error(OT_ERR_FORMAT, "object %s has digest %.16s..., not %.16s...: the object store is corrupt",
                    path, h, digest);
  return OT_OK;
}

int ot_daemon_adapter_put(ot_daemon *d, const char *tmp_dir, char digest[OT_DIGEST_HEX]) {
  char st[4200], dst[2600];
  snprintf(st, sizeof st, "%s/adapter_model.safetensors", tmp_dir);
  char h[OT_DIGEST_HEX];
  int rc = ot_file_digest(st, h);
  if (rc == OT_OK) rc = ot_daemon_obj_path(d, dst, sizeof dst, "objects/adapters/%s", h);
  if (rc == OT_OK) rc = fsync_tree(tmp_dir);
  if (rc == OT_OK)
    rc = ot_file_exists(dst) ? ot_rm_rf(tmp_dir) /* same content already stored */
                             : ot_daemon_move_in(tmp_dir, dst);
  if (rc == OT_OK) memcpy(digest, h, OT_DIGEST_HEX);
  return rc;
}

int ot_daemon_object_put(ot_daemon *d, const char *kind, const char *tmp_file, char digest[OT_DIGEST_HEX]) {
  char dst[2600], h[OT_DIGEST_HEX];
  int rc = ot_file_digest(tmp_file, h);
  if (rc == OT_OK) rc = ot_daemon_obj_path(d, dst, sizeof dst, "objects/%s/%s.safetensors", kind, h);
  if (rc == OT_OK) {
    int fd = open(tmp_file, O_RDONLY);
    if (fd < 0 || fsync(fd) != 0) rc = ot_error(OT_ERR_IO, "cannot fsync %s: %s", tmp_file, strerror(errno));
    if (fd >= 0) close(fd);
  }
  if (rc == OT_OK) {
    if (ot_file_exists(dst))
      unlink(tmp_file);
    else
      rc = ot_daemon_move_in(tmp_file, dst);
  }
  if (rc == OT_OK) memcpy(digest, h, OT_DIGEST_HEX);
  return rc;
}

/* The state directory: 0700, with its subdirectories; tmp/ is emptied (leftovers of a
 * run killed mid-way are never referenced by the registry). */
static int state_prepare(ot_daemon *d) {
  static const char *subs[] = {"staging", "tmp"};
  static const char *obj_subs[] = {"objects/adapters", "objects/updates", "objects/state", "emulators"};
  int rc = ot_mkdir_p(d->state);
  if (rc == OT_OK && chmod(d->state, 0700) != 0)
    rc = ot_error(OT_ERR_IO, "cannot chmod %s: %s", d->state, strerror(errno));
  /* absolute from here on: the registry records paths (adapters, emulators) others open */
  char abs[PATH_MAX];
  if (rc == OT_OK && !realpath(d->state, abs)) rc = ot_error(OT_ERR_IO, "%s: %s", d->state, strerror(errno));
  if (rc == OT_OK && strlen(abs) >= sizeof d->state) rc = ot_error(OT_ERR_RANGE, "state path too long");
  if (rc == OT_OK) memcpy(d->state, abs, strlen(abs) + 1);
  char p[2600];
  if (rc == OT_OK) rc = ot_daemon_path(d, p, sizeof p, "tmp");
  if (rc == OT_OK) rc = ot_rm_rf(p);
  for (size_t i = 0; rc == OT_OK && i < sizeof subs / sizeof subs[0]; i++) {
    rc = ot_daemon_path(d, p, sizeof p, "%s", subs[i]);
    if (rc == OT_OK) rc = ot_mkdir_p(p);
  }
  /* the object store: the state directory, or --objects (shared storage; absolute too) */
  if (rc == OT_OK && !d->objects[0]) memcpy(d->objects, d->state, strlen(d->state) + 1);
  if (rc == OT_OK) rc = ot_mkdir_p(d->objects);
  if (rc == OT_OK && !realpath(d->objects, abs))
    rc = ot_error(OT_ERR_IO, "%s: %s", d->objects, strerror(errno));
  if (rc == OT_OK && strlen(abs) >= sizeof d->objects) rc = ot_error(OT_ERR_RANGE, "objects path too long");
  if (rc == OT_OK) memcpy(d->objects, abs, strlen(abs) + 1);
  for (size_t i = 0; rc == OT_OK && i < sizeof obj_subs / sizeof obj_subs[0]; i++) {
    rc = ot_daemon_obj_path(d, p, sizeof p, "%s", obj_subs[i]);
    if (rc == OT_OK) rc = ot_mkdir_p(p);
  }
  return rc;
}

/* An unfinished upload untouched this long is dead: twice the transport's idle limit (the
 * daemon keeps the transport's default). */
#define STAGING_PARTIAL_MAX_AGE (2 * OT_TRANSFER_IDLE_DEFAULT)

/* 1 if a finished upload "<hex>.update|secagg.<session>.<round>" can no longer be used. */
static int staged_is_stale(ot_daemon *d, const char *name) {
  const char *p = strchr(name, '.');
  if (!p || (strncmp(p, ".update.", 8) != 0 && strncmp(p, ".secagg.", 8) != 0)) return 0; /* not ours */
  p += 8;
  const char *dot = strrchr(p, '.');
  char session[OT_NAME_MAX], *end = NULL;
  if (!dot || (size_t)(dot - p) >= sizeof session) return 1;
  memcpy(session, p, (size_t)(dot - p));
  session[dot - p] = '\0';
  long round = strtol(dot + 1, &end, 10);
  if (!end || *end) return 1;
  ot_session_row s;
  int rc = ot_reg_session_get(d->reg, session, &s);
  if (rc) return rc == OT_ERR_NOTFOUND; /* a registry that cannot answer now removes nothing */
  return s.state != OT_SS_RUNNING || round < s.round;
}

int ot_daemon_staging_sweep(ot_daemon *d, int at_start, int *removed) {
  char dir[2600];
  int rc = ot_daemon_path(d, dir, sizeof dir, "staging");
  if (rc) return rc;
  DIR *dp = opendir(dir);
  if (!dp) return ot_error(OT_ERR_IO, "cannot open %s: %s", dir, strerror(errno));
  int n = 0;
  time_t now = time(NULL);
  struct dirent *e;
  while ((e = readdir(dp))) {
    if (e->d_name[0] == '.') continue;
    char p[4200];
    struct stat sb;
    snprintf(p, sizeof p, "%s/%s", dir, e->d_name);
    if (lstat(p, &sb) != 0 || !S_ISREG(sb.st_mode)) continue;
    size_t len = strlen(e->d_name);
    int partial = len > 8 && strcmp(e->d_name + len - 8, ".partial") == 0;
    int stale =
        partial ? at_start || now - sb.st_mtime > STAGING_PARTIAL_MAX_AGE : staged_is_stale(d, e->d_name);
    if (stale && unlink(p) == 0) n++;
  }
  closedir(dp);
  if (n) ot_daemon_log(d, "staging: removed %d abandoned upload file(s)", n);
  if (removed) *removed = n;
  return OT_OK;
}

static int identity_load_or_make(ot_daemon *d) {
  char key[2600];
  int rc = ot_daemon_path(d, key, sizeof key, "cloud.key");
  if (rc) return rc;
  if (ot_file_exists(key)) return ot_identity_load(key, &d->id);
  rc = ot_identity_generate(&d->id);
  if (rc == OT_OK) rc = ot_identity_save(&d->id, d->state, "cloud");
  if (rc == OT_OK) ot_daemon_log(d, "made the cloud identity %s", key);
  return rc;
}

/* --model NAME=DIR or DIR (name = the directory's last component), comma-separated; *n
 * counts them and last_name is the last one's name. */
static int register_models(ot_daemon *d, const char *list, char last_name[OT_NAME_MAX], int *n) {
  char *copy = strdup(list), *save = NULL;
  if (!copy) return ot_error(OT_ERR_NOMEM, "cannot allocate");
  int rc = OT_OK;
  for (char *t = strtok_r(copy, ",", &save); t && rc == OT_OK; t = strtok_r(NULL, ",", &save)) {
    char *eq = strchr(t, '='), *dir = eq ? eq + 1 : t, name[OT_NAME_MAX];
    if (eq) {
      *eq = '\0';
      snprintf(name, sizeof name, "%s", t);
    } else if (ot_path_basename(dir, name, sizeof name) != OT_OK) {
      rc = ot_error(OT_ERR_INVALID, "model directory %s: name too long; use NAME=DIR", dir);
      break;
    }
    if (!ot_name_ok(name)) {
      rc = ot_error(OT_ERR_INVALID, "model name '%s': use NAME=DIR with NAME of [A-Za-z0-9_-]", name);
      break;
    }
    char abs[PATH_MAX], digest[OT_DIGEST_HEX];
    if (!realpath(dir, abs)) {
      rc = ot_error(OT_ERR_NOTFOUND, "model directory %s: %s", dir, strerror(errno));
      break;
    }
    rc = ot_model_dir_digest(abs, digest);
    if (rc == OT_OK) rc = ot_reg_model_put(d->reg, name, abs, digest);
    if (rc == OT_OK) {
      ot_daemon_log(d, "model '%s' = %s (digest %.16s...)", name, abs, digest);
      memcpy(last_name, name, OT_NAME_MAX);
      (*n)++;
    }
  }
  free(copy);
  return rc;
}

/* The lease keeper: renews this daemon's leases every third of their length while it lives,
 * also while the scheduler is in a long step (distillation, aggregation); a daemon killed
 * stops renewing and its sessions pass to another after at most --lease-seconds. */
static void *lease_main(void *arg) {
  ot_daemon *d = arg;
  pthread_mutex_lock(&d->mu);
  while (!d->stop) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    long ms = d->lease_s * 1000L / 3;
    ts.tv_sec += ms / 1000;
    ts.tv_nsec += (ms % 1000) * 1000000L;
    if (ts.tv_nsec >= 1000000000L) {
      ts.tv_sec++;
      ts.tv_nsec -= 1000000000L;
    }
    pthread_cond_timedwait(&d->cv, &d->mu, &ts);
    if (d->stop) break;
    pthread_mutex_unlock(&d->mu);
    if (ot_reg_lease_renew(d->reg, d->node, d->lease_s) != OT_OK)
      ot_daemon_log(d, "lease: %s", ot_error_detail());
    pthread_mutex_lock(&d->mu);
  }
  pthread_mutex_unlock(&d->mu);
  return NULL;
}

/* STATE/cloud.json: where to reach this daemon and which key to pin (for scripts). */
static int write_endpoint(ot_daemon *d, const char *url) {
  char fp[OT_FINGERPRINT_LEN], hex[65], real[1200], path[2600], body[2048];
  ot_fingerprint(d->id.pk, fp);
  ot_pubkey_hex(d->id.pk, hex);
  int port = ot_server_port(d->srv);
  const char *colon = strrchr(url, ':');
  if (strncmp(url, "tcp://", 6) == 0 && colon && port > 0)
    snprintf(real, sizeof real, "%.*s:%d", (int)(colon - url), url, port);
  else
    snprintf(real, sizeof real, "%s", url);
  int n = snprintf(body, sizeof body,
                   "{\"url\": \"%s\", \"fingerprint\": \"%s\", \"public_key\": \"%s\", \"http\": \"%s\"}\n",
                   real, fp, hex, d->serving ? ot_daemon_serving_url(d->serving) : "");
  int rc = ot_daemon_path(d, path, sizeof path, "cloud.json");
  if (rc == OT_OK) rc = ot_file_write_atomic(path, body, (size_t)n);
  if (rc == OT_OK) ot_daemon_log(d, "listening on %s as %s", real, fp);
  return rc;
}

int ot_cmd_serve(int argc, char **argv) {
  const char *state = NULL, *listen = "tcp://127.0.0.1:7450", *models = NULL, *http = NULL,
             *serve_model = NULL, *registry = NULL, *objects = NULL, *node = NULL;
  int workers = 2, serve_threads = 0, n_models = 0, http_keys = 0, http_open = 0, version = 0,
      lease_s = OT_DAEMON_LEASE_DEFAULT;
  int http_kv_mib = 0, http_kv_block_size = 16;
  char model_name[OT_NAME_MAX] = "";
  const ot_opt opts[] = {
      {"state", OT_OPT_STR, &state, "DIR",
       "state directory (registry, keys, objects; created 0700; required)"},
      {"listen", OT_OPT_STR, &listen, "URL",
       "where devices connect (default tcp://127.0.0.1:7450; port 0 picks)"},
      {"model", OT_OPT_STR, &models, "[NAME=]DIR,...",
       "base model checkpoints sessions may use (name: the directory's name unless given)"},
      {"workers", OT_OPT_INT, &workers, "N", "transport worker threads (default 2)"},
      {"registry", OT_OPT_STR, &registry, "DB",
       "the registry: a SQLite file (default STATE/registry.db) or PostgreSQL (postgresql://... or a "
       "conninfo), which several daemons share (docs/deploy.md)"},
      {"objects", OT_OPT_STR, &objects, "DIR",
       "the object store (adapters, updates, emulators; default STATE): shared storage every daemon on "
       "the registry reaches"},
      {"node", OT_OPT_STR, &node, "NAME",
       "this daemon's name among those sharing a PostgreSQL registry (default HOST:STATE; keep it across "
       "restarts)"},
      {"lease-seconds", OT_OPT_INT, &lease_s, "N",
       "how long a daemon leads a session's rounds without renewing (default 15; another daemon takes "
       "over after it)"},
      {"http", OT_OPT_STR, &http, "HOST:PORT",
       "also serve generation (OpenAI-style /v1/completions, /v1/models) with the published adapters"},
      {"serve-model", OT_OPT_STR, &serve_model, "NAME",
       "the registered model --http serves (default: the only one given with --model)"},
      {"serve-threads", OT_OPT_INT, &serve_threads, "N", "CPU threads of the serving engine (default: all)"},
      {"http-keys", OT_OPT_FLAG, &http_keys, NULL,
       "--http needs API keys: those of this registry (offtune-cloud keys create --state DIR)"},
      {"http-allow-unauthenticated", OT_OPT_FLAG, &http_open, NULL,
       "let --http listen beyond loopback without --http-keys"},
      {"http-kv-mib", OT_OPT_INT, &http_kv_mib, "MiB",
       "KV cache memory of --http serving (paged; when full, requests wait or are preempted; default: 32 "
       "sequences of the model's context)"},
      {"http-kv-block-size", OT_OPT_INT, &http_kv_block_size, "N",
       "positions per KV cache block (default 16)"},
      {"version", OT_OPT_FLAG, &version, NULL, "print the version and exit"},
  };
  const char *syn =
      "offtune-cloud serve --state DIR [--listen URL] [--model [NAME=]DIR,...] [--http HOST:PORT]";
  const char *desc =
      "The cloud daemon: admits enrolled devices (one-time tokens), runs federated tuning sessions\n"
      "round by round (distils the emulator once per model and settings, aggregates the devices'\n"
      "adapter updates, publishes the final adapter), and takes operator commands on the local\n"
      "socket STATE/control.sock (mode 0600 in a 0700 directory: only this user).\n"
      "Writes STATE/cloud.json (url, fingerprint). Stops on SIGINT/SIGTERM; killed at any moment,\n"
      "it resumes every session from the registry when started again.";
  int rc = ot_cli_parse(argc, argv, opts, N_OPTS(opts));
  if (rc == 1) {
    ot_cli_usage(stdout, syn, desc, opts, N_OPTS(opts));
    return OT_EXIT_OK;
  }
  if (rc == OT_OK && version) {
    printf("offtune-cloud serve %s\n", OT_VERSION);
    return OT_EXIT_OK;
  }
  if (rc == OT_OK && !state) rc = ot_error(OT_ERR_INVALID, "--state DIR is required");
  if (rc == OT_OK && (http_kv_mib < 0 || http_kv_block_size < 1))
    rc = ot_error(OT_ERR_INVALID, "need --http-kv-mib >= 0 and --http-kv-block-size >= 1");
  if (rc == OT_OK && http && !http_keys && !http_open && !ot_http_url_loopback(http))
    rc = ot_error(OT_ERR_INVALID,
                  "--http %s is not a loopback address: give --http-keys (API keys), or "
                  "--http-allow-unauthenticated to serve every client without keys",
                  http);
  if (rc == OT_OK && (workers < 1 || workers > 64)) rc = ot_error(OT_ERR_INVALID, "--workers must be 1..64");
  if (rc == OT_OK && (lease_s < 2 || lease_s > 3600))
    rc = ot_error(OT_ERR_INVALID, "--lease-seconds must be 2..3600");
  if (rc == OT_OK && node && (!*node || strlen(node) >= sizeof((ot_daemon *)0)->node))
    rc = ot_error(OT_ERR_INVALID, "--node: give a name of 1..159 characters");
  if (rc == OT_OK && objects && strlen(objects) >= sizeof((ot_daemon *)0)->objects)
    rc = ot_error(OT_ERR_INVALID, "--objects: path too long");
  if (rc) {
    fprintf(stderr, "offtune-cloud serve: %s\n", ot_error_detail());
    ot_cli_usage(stderr, syn, NULL, opts, N_OPTS(opts));
    return OT_EXIT_USAGE;
  }
  ot_daemon *d = calloc(1, sizeof *d);
  if (!d) return ot_cmd_fail("starting", ot_error(OT_ERR_NOMEM, "cannot allocate"));
  pthread_mutex_init(&d->mu, NULL);
  pthread_cond_init(&d->cv, NULL);
  pthread_cond_init(&d->submit_cv, NULL);
  snprintf(d->state, sizeof d->state, "%s", state);
  if (objects) snprintf(d->objects, sizeof d->objects, "%s", objects);
  d->lease_s = lease_s;
  ot_cmd_npm_dir(d->npm_dir, sizeof d->npm_dir);
  /* SIGINT/SIGTERM are taken by sigwait below; threads inherit the blocked mask */
  sigset_t sigs;
  sigemptyset(&sigs);
  sigaddset(&sigs, SIGINT);
  sigaddset(&sigs, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &sigs, NULL);
  signal(SIGPIPE, SIG_IGN);
  const char *what = "preparing the state directory";
  rc = ot_sodium_init();
  if (rc == OT_OK) rc = state_prepare(d);
  if (rc == OT_OK) {
    what = "loading the cloud identity";
    rc = identity_load_or_make(d);
  }
  /* one daemon per state directory: the lock goes with the process, kill -9 included */
  char lock_path[2600];
  int lock_fd = -1;
  if (rc == OT_OK) rc = ot_daemon_path(d, lock_path, sizeof lock_path, "daemon.lock");
  if (rc == OT_OK) {
    lock_fd = open(lock_path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (lock_fd < 0 || flock(lock_fd, LOCK_EX | LOCK_NB) != 0)
      rc = ot_error(OT_ERR_INVALID, "another daemon runs on %s (%s)", d->state,
                    lock_fd < 0 ? strerror(errno) : "the lock is held");
  }
  char db[2600];
  if (rc == OT_OK) {
    what = "opening the registry";
    if (registry)
      snprintf(db, sizeof db, "%s", registry);
    else
      rc = ot_daemon_path(d, db, sizeof db, "registry.db");
  }
  if (rc == OT_OK) rc = ot_reg_open(db, &d->reg);
  /* the lease owner: stable across restarts, so a daemon started again on its state directory
   * resumes its sessions at once instead of waiting for its own leases to expire */
  if (rc == OT_OK) {
    char host[64] = "";
    gethostname(host, sizeof host - 1);
    int shared = registry && ot_regdb_is_pg(registry);
    if (node)
      snprintf(d->node, sizeof d->node, "%s", node);
    else if (!shared) /* one daemon per SQLite registry (the state lock): its leases are always its own */
      snprintf(d->node, sizeof d->node, "local");
    else
      snprintf(d->node, sizeof d->node, "%s:%.*s", host, (int)(sizeof d->node - strlen(host) - 2), d->state);
    d->shared = shared;
    if (shared) ot_daemon_log(d, "registry: PostgreSQL; node '%s'; objects in %s", d->node, d->objects);
  }
  if (rc == OT_OK) rc = ot_daemon_staging_sweep(d, 1, NULL);
  if (rc == OT_OK && models) {
    what = "registering models";
    rc = register_models(d, models, model_name, &n_models);
  }
  if (rc == OT_OK) {
    what = "starting the server";
    ot_server_config sc = {.url = listen,
                           .id = &d->id,
                           .acl = &ot_reg_access_ops,
                           .acl_self = d->reg,
                           .n_workers = workers,
                           .on_request = ot_daemon_on_request,
                           .on_transfer_open = ot_daemon_on_transfer_open,
                           .on_transfer_end = ot_daemon_on_transfer_end,
                           .on_fetch_open = ot_daemon_on_fetch_open,
                           .on_fetch_close = ot_daemon_on_fetch_close,
                           .log = transport_log,
                           .user = d};
    rc = ot_server_start(&sc, &d->srv);
  }
  if (rc == OT_OK && http) {
    what = "starting the serving API";
    if (!serve_model && n_models != 1)
      rc = ot_error(OT_ERR_INVALID, "--http needs --serve-model NAME unless --model names exactly one model");
    if (rc == OT_OK)
      rc = ot_daemon_serving_start(d, serve_model ? serve_model : model_name, http, serve_threads, http_keys,
                                   http_kv_mib, http_kv_block_size, &d->serving);
  }
  if (rc == OT_OK) rc = write_endpoint(d, listen);
  int ctl_started = 0, sched_started = 0, lease_started = 0;
  if (rc == OT_OK) {
    what = "starting the operator socket";
    int e = pthread_create(&d->ctl_thread, NULL, ot_daemon_ctl_main, d);
    if (e) rc = ot_error(OT_ERR_INTERNAL, "pthread_create: %s", strerror(e));
    ctl_started = e == 0;
  }
  if (rc == OT_OK) {
    int e = pthread_create(&d->lease_thread, NULL, lease_main, d);
    if (e) rc = ot_error(OT_ERR_INTERNAL, "pthread_create: %s", strerror(e));
    lease_started = e == 0;
  }
  if (rc == OT_OK) {
    int e = pthread_create(&d->sched_thread, NULL, ot_round_main, d);
    if (e) rc = ot_error(OT_ERR_INTERNAL, "pthread_create: %s", strerror(e));
    sched_started = e == 0;
  }
  if (rc == OT_OK) {
    ot_reg_audit(d->reg, "daemon", "daemon.start", "%s", listen);
    int sig = 0;
    sigwait(&sigs, &sig);
    ot_daemon_log(d, "signal %d: stopping", sig);
  }
  int saved = rc;
  const char *saved_detail = rc ? strdup(ot_error_detail()) : NULL;
  pthread_mutex_lock(&d->mu);
  d->stop = 1;
  pthread_cond_broadcast(&d->cv);
  pthread_mutex_unlock(&d->mu);
  if (ctl_started) pthread_join(d->ctl_thread, NULL);
  if (sched_started) pthread_join(d->sched_thread, NULL);
  if (lease_started) pthread_join(d->lease_thread, NULL);
  if (d->srv) ot_server_stop(d->srv);
  ot_daemon_serving_stop(d->serving);
  ot_round_secagg_free(d->sa);
  if (d->reg) {
    if (d->node[0]) ot_reg_lease_drop(d->reg, d->node); /* the others take over at once */
    ot_reg_audit(d->reg, "daemon", "daemon.stop", "%s", saved ? "failed" : "signal");
    ot_reg_close(d->reg);
  }
  ot_identity_wipe(&d->id);
  if (lock_fd >= 0) close(lock_fd);
  pthread_cond_destroy(&d->cv);
  pthread_cond_destroy(&d->submit_cv);
  pthread_mutex_destroy(&d->mu);
  free(d);
  if (saved) {
    ot_error(saved, "%s", saved_detail ? saved_detail : "");
    free((void *)saved_detail);
    return ot_cmd_fail(what, saved);
  }
  return OT_EXIT_OK;
}

uint64_t ot_daemon_upload_limit(uint64_t ref_size) { return 2 * ref_size + (1u << 20); }

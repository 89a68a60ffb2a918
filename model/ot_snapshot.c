#include "ot_snapshot.h"

#include <cjson/cJSON.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "ot_error.h"
#include "ot_fileio.h"
#include "ot_safetensors.h"

#define SNAP_DIR "train_state"
#define SNAP_OLD "train_state.old" /* only while a swap without RENAME_EXCHANGE is under way */

/* Removes a snapshot directory (flat: files only). */
static void remove_dir(const char *dir) {
  DIR *d = opendir(dir);
  if (!d) return;
  struct dirent *e;
  while ((e = readdir(d))) {
    if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0) continue;
    char *p = NULL;
    if (ot_path_join(dir, e->d_name, &p) == OT_OK) unlink(p);
    free(p);
  }
  closedir(d);
  rmdir(dir);
}

static int fsync_path(const char *path) {
  int fd = open(path, O_RDONLY | O_DIRECTORY);
  if (fd < 0) return ot_error(OT_ERR_IO, "cannot open %s: %s", path, strerror(errno));
  int r = fsync(fd);
  close(fd);
  return r == 0 ? OT_OK : ot_error(OT_ERR_IO, "fsync %s: %s", path, strerror(errno));
}

/* The directory to read: train_state, or train_state.old if a non-exchange swap was cut
 * between its two renames. NULL if neither holds a state.json. */
static char *snapshot_dir(const char *out) {
  const char *names[2] = {SNAP_DIR, SNAP_OLD};
  for (int i = 0; i < 2; i++) {
    char *d = NULL, *s = NULL;
    if (ot_path_join(out, names[i], &d) == OT_OK && ot_path_join(d, "state.json", &s) == OT_OK &&
        ot_file_exists(s)) {
      free(s);
      return d;
    }
    free(d);
    free(s);
  }
  return NULL;
}

int ot_snapshot_exists(const char *out) {
  char *d = snapshot_dir(out);
  free(d);
  return d != NULL;
}

/* The trainable tensors, from the model or (src != NULL) from a host array of their values. */
static int write_weights(const char *path, ot_model *m, const float *src_host) {
  ot_backend *be = ot_model_backend(m);
  size_t total = 0;
  for (int i = 0; i < ot_model_param_count(m); i++)
    if (ot_model_param(m, i)->trainable) total += ot_model_param(m, i)->numel;
  /* host memory is written as is; a device backend's tensors are staged on the host */
  int stage = !src_host && !be->ops->host_visible;
  float *host = stage ? malloc((total ? total : 1) * sizeof(float)) : NULL;
  ot_st_writer *w = NULL;
  int rc = host || !stage ? ot_st_writer_new(&w) : ot_error(OT_ERR_NOMEM, "cannot allocate snapshot buffer");
  size_t off = 0;
  for (int i = 0; i < ot_model_param_count(m) && rc == OT_OK; i++) {
    ot_param *p = ot_model_param(m, i);
    if (!p->trainable) continue;
    int64_t shape[2] = {p->shape[0], p->shape[1]};
    const float *src = src_host ? src_host + off : p->data;
    if (host) {
      rc = be->ops->download(be, host + off, p->data, p->numel * sizeof(float));
      src = host + off;
    }
    if (rc == OT_OK) rc = ot_st_writer_add(w, p->name, OT_DTYPE_F32, p->ndim, shape, src);
    off += p->numel;
  }
  if (rc == OT_OK) rc = ot_st_writer_save(w, path);
  ot_st_writer_free(w);
  free(host);
  return rc;
}

/* 1 if a snapshot at `step` holds a running mean for an averaging window from `from`. */
static int has_mean(int step, int from) { return from > 0 && step >= from; }

int ot_snapshot_save(const char *out, ot_model *m, const ot_optimizer *opt, const ot_snapshot_state *st) {
  char *tmpl = NULL, *dir = NULL, *cur = NULL, *old = NULL, *p = NULL, *json = NULL;
  int rc = ot_mkdir_p(out);
  if (rc == OT_OK && asprintf(&tmpl, "%s/" SNAP_DIR ".new-XXXXXX", out) < 0)
    rc = ot_error(OT_ERR_NOMEM, "cannot allocate");
  if (rc == OT_OK && !(dir = mkdtemp(tmpl)))
    rc = ot_error(OT_ERR_IO, "cannot create a snapshot directory in %s: %s", out, strerror(errno));
  if (rc == OT_OK) rc = ot_path_join(dir, "weights.safetensors", &p);
  if (rc == OT_OK) rc = write_weights(p, m, NULL);
  free(p);
  p = NULL;
  if (rc == OT_OK && has_mean(st->step, st->avg_from)) {
    rc = ot_path_join(dir, "average.safetensors", &p);
    if (rc == OT_OK) rc = write_weights(p, m, st->avg);
    free(p);
    p = NULL;
  }
  if (rc == OT_OK) rc = ot_path_join(dir, "optimizer.safetensors", &p);
  if (rc == OT_OK) rc = ot_optimizer_save(opt, p);
  free(p);
  p = NULL;
  if (rc == OT_OK) {
    if (asprintf(&json,
                 "{\"step\": %d, \"pos\": %zu, \"rng\": \"%llu\", \"batch\": %d, \"seq_len\": %d, \"best\": "
                 "%.17g, "
                 "\"bad\": %d, \"avg_from\": %d}\n",
                 st->step, st->pos, (unsigned long long)st->rng, st->batch, st->seq_len, st->best, st->bad,
                 st->avg_from) < 0)
      rc = ot_error(OT_ERR_NOMEM, "cannot format the training state");
    else if ((rc = ot_path_join(dir, "state.json", &p)) == OT_OK)
      rc = ot_file_write_atomic(p, json, strlen(json));
  }
  if (rc == OT_OK) rc = fsync_path(dir);
  if (rc == OT_OK) rc = ot_path_join(out, SNAP_DIR, &cur);
  if (rc == OT_OK) rc = ot_path_join(out, SNAP_OLD, &old);
  if (rc == OT_OK) {
    /* Swap: one atomic exchange where the filesystem can; otherwise two renames, and a
     * reader that finds no train_state falls back to train_state.old. */
    if (!ot_file_exists(cur)) {
      if (rename(dir, cur) != 0)
        rc = ot_error(OT_ERR_IO, "rename %s: %s", dir, strerror(errno));
      else
        remove_dir(old); /* left by a swap cut between its renames; superseded now */
    } else if (renameat2(AT_FDCWD, dir, AT_FDCWD, cur, RENAME_EXCHANGE) == 0) {
      remove_dir(dir); /* now holds the previous snapshot */
    } else {
      remove_dir(old);
      if (rename(cur, old) != 0 || rename(dir, cur) != 0)
        rc = ot_error(OT_ERR_IO, "cannot replace %s: %s", cur, strerror(errno));
      else
        remove_dir(old);
    }
  }
  if (rc == OT_OK) rc = fsync_path(out);
  if (rc && dir) remove_dir(dir);
  free(tmpl);
  free(cur);
  free(old);
  free(p);
  free(json);
  return rc;
}

/* Into the model's trainable tensors or (dst != NULL) a host array of their values. */
static int read_weights(const char *path, ot_model *m, float *dst_host) {
  ot_safetensors *st = NULL;
  int rc = ot_st_open(path, &st);
  if (rc) return rc;
  ot_backend *be = ot_model_backend(m);
  size_t total = 0;
  for (int i = 0; i < ot_model_param_count(m); i++)
    if (ot_model_param(m, i)->trainable) total += ot_model_param(m, i)->numel;
  /* stage everything first: a bad file leaves the model untouched */
  float *host = malloc((total ? total : 1) * sizeof(float));
  if (!host) rc = ot_error(OT_ERR_NOMEM, "cannot allocate snapshot buffer");
  size_t off = 0;
  for (int i = 0; i < ot_model_param_count(m) && rc == OT_OK; i++) {
    ot_param *p = ot_model_param(m, i);
    if (!p->trainable) continue;
    const ot_st_tensor *t = ot_st_find(st, p->name);
    if (!t)
      rc = ot_error(OT_ERR_MISMATCH, "%s: no tensor '%s': the snapshot is of another model or adapter", path,
                    p->name);
    else if (t->numel != p->numel)
      rc = ot_error(OT_ERR_MISMATCH,
                    "%s: '%s' has %llu values, this model %zu: the snapshot is of another model", path,
                    p->name, (unsigned long long)t->numel, p->numel);
    else
      rc = ot_st_read_f32(st, t, host + off, p->numel);
    off += p->numel;
  }
  off = 0;
  for (int i = 0; i < ot_model_param_count(m) && rc == OT_OK; i++) {
    ot_param *p = ot_model_param(m, i);
    if (!p->trainable) continue;
    if (dst_host)
      memcpy(dst_host + off, host + off, p->numel * sizeof(float));
    else
      rc = be->ops->upload(be, p->data, host + off, p->numel * sizeof(float));
    off += p->numel;
  }
  free(host);
  ot_st_close(st);
  return rc;
}

int ot_snapshot_load(const char *out, ot_model *m, ot_optimizer *opt, size_t n_tokens,
                     ot_snapshot_state *st) {
  char *dir = snapshot_dir(out), *p = NULL, *buf = NULL;
  if (!dir) return ot_error(OT_ERR_NOTFOUND, "no training snapshot in %s", out);
  size_t len;
  ot_snapshot_state s = *st;
  int rc = ot_path_join(dir, "state.json", &p);
  if (rc == OT_OK) rc = ot_file_read_all(p, 1 << 16, &buf, &len);
  cJSON *j = rc == OT_OK ? cJSON_Parse(buf) : NULL;
  if (rc == OT_OK) {
    cJSON *step = cJSON_GetObjectItem(j, "step"), *pos = cJSON_GetObjectItem(j, "pos"),
          *rng = cJSON_GetObjectItem(j, "rng"), *b = cJSON_GetObjectItem(j, "batch"),
          *q = cJSON_GetObjectItem(j, "seq_len"), *best = cJSON_GetObjectItem(j, "best"),
          *bad = cJSON_GetObjectItem(j, "bad"), *from = cJSON_GetObjectItem(j, "avg_from");
    int saved_from = cJSON_IsNumber(from) ? from->valueint : 0; /* absent in older snapshots */
    if (!cJSON_IsNumber(step) || !cJSON_IsNumber(pos) || !cJSON_IsString(rng) || !cJSON_IsNumber(b) ||
        !cJSON_IsNumber(q) || !cJSON_IsNumber(best) || !cJSON_IsNumber(bad) || step->valuedouble < 0 ||
        step->valuedouble > 1e9 || pos->valuedouble < 0 || (from && !cJSON_IsNumber(from)))
      rc = ot_error(OT_ERR_FORMAT, "%s: malformed training state", p);
    else if (pos->valuedouble >= (double)n_tokens)
      rc = ot_error(OT_ERR_MISMATCH, "%s: saved at token %.0f, past the %zu tokens of this data", p,
                    pos->valuedouble, n_tokens);
    else if (b->valueint != st->batch || q->valueint != st->seq_len)
      rc = ot_error(OT_ERR_MISMATCH, "%s: saved with --batch %d --seq-len %d; resume with the same", p,
                    b->valueint, q->valueint);
    else if ((has_mean(step->valueint, saved_from) || has_mean(step->valueint, st->avg_from)) &&
             saved_from != st->avg_from)
      rc =
          ot_error(OT_ERR_MISMATCH,
                   "%s: the running mean of the weights began at step %d, this run's at %d (0: none); resume "
                   "with the same --steps and --average-last",
                   p, saved_from, st->avg_from);
    else {
      s.step = step->valueint;
      s.pos = (size_t)pos->valuedouble;
      s.rng = strtoull(rng->valuestring, NULL, 10);
      s.best = best->valuedouble;
      s.bad = bad->valueint;
    }
  }
  cJSON_Delete(j);
  free(buf);
  free(p);
  p = NULL;
  /* the mean first: a missing one leaves the model untouched */
  if (rc == OT_OK && has_mean(s.step, st->avg_from)) {
    rc = ot_path_join(dir, "average.safetensors", &p);
    if (rc == OT_OK) rc = read_weights(p, m, st->avg);
    free(p);
    p = NULL;
  }
  if (rc == OT_OK) rc = ot_path_join(dir, "weights.safetensors", &p);
  if (rc == OT_OK) rc = read_weights(p, m, NULL);
  free(p);
  p = NULL;
  if (rc == OT_OK) rc = ot_path_join(dir, "optimizer.safetensors", &p);
  if (rc == OT_OK) rc = ot_optimizer_load(opt, p);
  free(p);
  free(dir);
  if (rc == OT_OK) *st = s;
  return rc;
}

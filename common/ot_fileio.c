/* mkostemp is a GNU extension. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "ot_fileio.h"

#include "ot_error.h"

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static int io_error(const char *what, const char *path, int err) {
  return ot_error(err == ENOENT ? OT_ERR_NOTFOUND : OT_ERR_IO, "%s %s: %s", what, path, strerror(err));
}

int ot_file_open_regular(const char *path, uint64_t max_bytes, int *fd_out, uint64_t *size_out) {
  if (!path || !fd_out) return ot_error(OT_ERR_INVALID, "ot_file_open_regular: NULL argument");
  /* O_NONBLOCK: opening a FIFO must not wait for a writer; O_NOCTTY: a terminal is no input */
  int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY);
  if (fd < 0) return io_error("cannot open", path, errno);
  struct stat sb;
  if (fstat(fd, &sb) != 0) {
    int e = errno;
    close(fd);
    return io_error("cannot stat", path, e);
  }
  if (!S_ISREG(sb.st_mode)) {
    close(fd);
    return ot_error(OT_ERR_IO, "%s is not a regular file (%s)", path,
                    S_ISDIR(sb.st_mode)    ? "a directory"
                    : S_ISFIFO(sb.st_mode) ? "a FIFO"
                    : S_ISCHR(sb.st_mode)  ? "a character device"
                    : S_ISBLK(sb.st_mode)  ? "a block device"
                    : S_ISSOCK(sb.st_mode) ? "a socket"
                                           : "not a file");
  }
  if ((uint64_t)sb.st_size > max_bytes) {
    close(fd);
    return ot_error(OT_ERR_RANGE, "%s is %llu bytes, more than the limit of %llu", path,
                    (unsigned long long)sb.st_size, (unsigned long long)max_bytes);
  }
  int fl = fcntl(fd, F_GETFL);
  if (fl >= 0) fcntl(fd, F_SETFL, fl & ~O_NONBLOCK);
  *fd_out = fd;
  if (size_out) *size_out = (uint64_t)sb.st_size;
  return OT_OK;
}

int ot_file_read_all(const char *path, size_t max_bytes, char **out, size_t *out_len) {
  if (!path || !out) return ot_error(OT_ERR_INVALID, "ot_file_read_all: NULL argument");
  int fd = -1;
  uint64_t size = 0;
  int rc = ot_file_open_regular(path, max_bytes, &fd, &size);
  if (rc) return rc;
  /* the size is only a hint: the file may grow under us */
  size_t cap = (size_t)size + 1;
  size_t len = 0;
  char *buf = malloc(cap);
  if (!buf) {
    close(fd);
    return ot_error(OT_ERR_NOMEM, "cannot allocate %zu bytes for %s", cap, path);
  }
  for (;;) {
    if (len + 1 == cap) {
      /* Buffer full: one probe byte tells EOF apart from a file that grew or a pipe. */
      char probe;
      ssize_t r = read(fd, &probe, 1);
      if (r < 0 && errno == EINTR) continue;
      if (r == 0) break;
      int e = errno;
      if (r < 0 || len >= max_bytes) {
        free(buf);
        close(fd);
        if (r < 0) return io_error("cannot read", path, e);
        return ot_error(OT_ERR_RANGE, "%s is larger than the limit of %zu bytes", path, max_bytes);
      }
      size_t ncap = cap > SIZE_MAX / 2 ? SIZE_MAX : cap * 2;
      if (ncap - 1 > max_bytes) ncap = max_bytes + 1;
      char *nb = realloc(buf, ncap);
      if (!nb) {
        free(buf);
        close(fd);
        return ot_error(OT_ERR_NOMEM, "cannot allocate %zu bytes for %s", ncap, path);
      }
      buf = nb;
      cap = ncap;
      buf[len++] = probe;
      continue;
    }
    ssize_t r = read(fd, buf + len, cap - 1 - len);
    if (r < 0) {
      if (errno == EINTR) continue;
      int e = errno;
      free(buf);
      close(fd);
      return io_error("cannot read", path, e);
    }
    if (r == 0) break;
    len += (size_t)r;
  }
  close(fd);
  buf[len] = '\0';
  *out = buf;
  if (out_len) *out_len = len;
  return OT_OK;
}

struct ot_atomic_file {
  int fd;
  char *path;
  char *tmp;
};

static int fsync_parent_dir(const char *path) {
  const char *slash = strrchr(path, '/');
  char *dir;
  if (!slash)
    dir = strdup(".");
  else if (slash == path)
    dir = strdup("/");
  else
    dir = strndup(path, (size_t)(slash - path));
  if (!dir) return ot_error(OT_ERR_NOMEM, "cannot allocate directory name of %s", path);
  int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) {
    int rc = io_error("cannot open directory", dir, errno);
    free(dir);
    return rc;
  }
  int rc = OT_OK;
  /* Some file systems cannot fsync a directory; the rename itself already happened. */
  if (fsync(fd) != 0 && errno != EINVAL && errno != ENOTSUP)
    rc = io_error("cannot fsync directory", dir, errno);
  close(fd);
  free(dir);
  return rc;
}

static void atomic_free(ot_atomic_file *f) {
  free(f->path);
  free(f->tmp);
  free(f);
}

int ot_atomic_open(const char *path, ot_atomic_file **out) {
  if (!path || !*path || !out) return ot_error(OT_ERR_INVALID, "ot_atomic_open: NULL or empty argument");
  ot_atomic_file *f = calloc(1, sizeof *f);
  if (!f) return ot_error(OT_ERR_NOMEM, "cannot allocate writer for %s", path);
  f->fd = -1;
  f->path = strdup(path);
  size_t n = strlen(path);
  f->tmp = malloc(n + sizeof ".tmp.XXXXXX");
  if (!f->path || !f->tmp) {
    atomic_free(f);
    return ot_error(OT_ERR_NOMEM, "cannot allocate writer for %s", path);
  }
  memcpy(f->tmp, path, n);
  memcpy(f->tmp + n, ".tmp.XXXXXX", sizeof ".tmp.XXXXXX");
  /* Same directory as the target, so the final rename cannot cross file systems. */
  f->fd = mkostemp(f->tmp, O_CLOEXEC);
  if (f->fd < 0) {
    int rc = io_error("cannot create temporary file for", path, errno);
    atomic_free(f);
    return rc;
  }
  /* mkstemp makes 0600; checkpoints and configs are meant to be shared. */
  if (fchmod(f->fd, 0644) != 0) {
    int rc = io_error("cannot chmod", f->tmp, errno);
    ot_atomic_abort(f);
    return rc;
  }
  *out = f;
  return OT_OK;
}

int ot_fd_write_all(int fd, const void *data, size_t len, int64_t off, const char *what) {
  const char *p = data;
  while (len > 0) {
    ssize_t w = off < 0 ? write(fd, p, len) : pwrite(fd, p, len, (off_t)off);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) return ot_error(OT_ERR_IO, "cannot write %s: %s", what, strerror(errno));
    p += w;
    if (off >= 0) off += w;
    len -= (size_t)w;
  }
  return OT_OK;
}

int ot_atomic_write(ot_atomic_file *f, const void *data, size_t len) {
  if (!f || (!data && len)) return ot_error(OT_ERR_INVALID, "ot_atomic_write: NULL argument");
  return ot_fd_write_all(f->fd, data, len, -1, f->tmp);
}

int ot_atomic_commit(ot_atomic_file *f) {
  if (!f) return ot_error(OT_ERR_INVALID, "ot_atomic_commit: NULL file");
  if (fsync(f->fd) != 0) {
    int rc = io_error("cannot fsync", f->tmp, errno);
    ot_atomic_abort(f);
    return rc;
  }
  int fd = f->fd;
  f->fd = -1;
  if (close(fd) != 0) {
    int rc = io_error("cannot close", f->tmp, errno);
    ot_atomic_abort(f);
    return rc;
  }
  if (rename(f->tmp, f->path) != 0) {
    int rc = io_error("cannot rename temporary file to", f->path, errno);
    ot_atomic_abort(f);
    return rc;
  }
  int rc = fsync_parent_dir(f->path);
  atomic_free(f);
  return rc;
}

void ot_atomic_abort(ot_atomic_file *f) {
  if (!f) return;
  if (f->fd >= 0) close(f->fd);
  unlink(f->tmp);
  atomic_free(f);
}

int ot_file_write_atomic(const char *path, const void *data, size_t len) {
  ot_atomic_file *f = NULL;
  int rc = ot_atomic_open(path, &f);
  if (rc != OT_OK) return rc;
  rc = ot_atomic_write(f, data, len);
  if (rc != OT_OK) {
    ot_atomic_abort(f);
    return rc;
  }
  return ot_atomic_commit(f);
}

int ot_mkdir_p(const char *path) {
  if (!path || !*path) return ot_error(OT_ERR_INVALID, "ot_mkdir_p: empty path");
  char *buf = strdup(path);
  if (!buf) return ot_error(OT_ERR_NOMEM, "cannot copy path %s", path);
  /* Create each prefix ending before a '/', then the full path. */
  for (char *p = buf + 1;; p++) {
    if (*p != '/' && *p != '\0') continue;
    char c = *p;
    *p = '\0';
    if (mkdir(buf, 0755) != 0 && errno != EEXIST) {
      int rc = io_error("cannot create directory", buf, errno);
      free(buf);
      return rc;
    }
    *p = c;
    if (c == '\0') break;
  }
  free(buf);
  struct stat sb;
  if (stat(path, &sb) != 0) return io_error("cannot stat", path, errno);
  if (!S_ISDIR(sb.st_mode)) return ot_error(OT_ERR_IO, "%s exists and is not a directory", path);
  return OT_OK;
}

int ot_path_join(const char *dir, const char *name, char **out) {
  if (!dir || !name || !out) return ot_error(OT_ERR_INVALID, "ot_path_join: NULL argument");
  size_t dl = strlen(dir), nl = strlen(name);
  int sep = dl > 0 && dir[dl - 1] != '/';
  char *p = malloc(dl + (size_t)sep + nl + 1);
  if (!p) return ot_error(OT_ERR_NOMEM, "cannot allocate path %s/%s", dir, name);
  memcpy(p, dir, dl);
  if (sep) p[dl] = '/';
  memcpy(p + dl + (size_t)sep, name, nl + 1);
  *out = p;
  return OT_OK;
}

int ot_path_basename(const char *path, char *out, size_t n) {
  if (!path || !out || n == 0) return ot_error(OT_ERR_INVALID, "ot_path_basename: NULL argument");
  size_t end = strlen(path);
  while (end > 1 && path[end - 1] == '/') end--; /* "dir/" names dir; "/" stays "/" */
  size_t start = end;
  while (start > 0 && path[start - 1] != '/') start--;
  size_t len = end - start;
  if (len >= n) return ot_error(OT_ERR_INVALID, "last component of path %s is too long", path);
  memcpy(out, path + start, len);
  out[len] = '\0';
  return OT_OK;
}

int ot_file_exists(const char *path) {
  struct stat sb;
  return path && stat(path, &sb) == 0;
}

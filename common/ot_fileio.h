/* Small file helpers shared by every reader and writer. */
#ifndef OT_FILEIO_H
#define OT_FILEIO_H

#include <stddef.h>
#include <stdint.h>

/* Opens path for reading if it is a regular file of at most max_bytes (a FIFO, device or
 * directory is refused without blocking or reading): every file a client, a peer or a
 * directory can name is opened through here. *size = its size at open. */
int ot_file_open_regular(const char *path, uint64_t max_bytes, int *fd, uint64_t *size);
/* Reads a whole regular file into a malloc'd, NUL-terminated buffer; refuses files over
 * max_bytes (also one that grows past it while being read). */
int ot_file_read_all(const char *path, size_t max_bytes, char **out, size_t *out_len);
/* Writes a file atomically: temporary file in the same directory, fsync, rename, fsync dir. */
int ot_file_write_atomic(const char *path, const void *data, size_t len);
/* Creates a directory and its parents (mode 0755); fine if it exists. */
int ot_mkdir_p(const char *path);
/* Joins dir and name into a malloc'd path. */
int ot_path_join(const char *dir, const char *name, char **out);
/* The last component of path, trailing slashes ignored ("a/b/" -> "b", "/" -> ""), into
 * out[n]; OT_ERR_INVALID if it does not fit. */
int ot_path_basename(const char *path, char *out, size_t n);
/* 1 if something exists at path (file, directory, ...), 0 otherwise. */
int ot_file_exists(const char *path);
/* Writes all len bytes to fd, at offset off (pwrite) or at the file position when off < 0,
 * retrying on EINTR and short writes; `what` names the file in the error. */
int ot_fd_write_all(int fd, const void *data, size_t len, int64_t off, const char *what);

/* Streaming form of ot_file_write_atomic for outputs too large to build in memory:
 * open a temporary file next to `path`, write pieces, then commit (fsync, rename,
 * fsync dir) or abort (remove the temporary file). Commit and abort free `f`. */
typedef struct ot_atomic_file ot_atomic_file;
int ot_atomic_open(const char *path, ot_atomic_file **out);
int ot_atomic_write(ot_atomic_file *f, const void *data, size_t len);
int ot_atomic_commit(ot_atomic_file *f);
void ot_atomic_abort(ot_atomic_file *f);

#endif

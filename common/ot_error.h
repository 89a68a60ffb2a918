/* Error codes for every offtune library function.
 *
 * Functions return OT_OK (0) or a negative ot_status. A failing function may
 * leave a human-readable detail for the calling thread (like errno plus a
 * message), which main() prints; output parameters are written only on success. */
#ifndef OT_ERROR_H
#define OT_ERROR_H

typedef enum {
  OT_OK = 0,
  OT_ERR_NOMEM = -1,       /* allocation failed */
  OT_ERR_IO = -2,          /* read/write/open failed (errno in detail) */
  OT_ERR_FORMAT = -3,      /* malformed file or message */
  OT_ERR_INVALID = -4,     /* invalid argument or option */
  OT_ERR_NOTFOUND = -5,    /* missing file, tensor, key */
  OT_ERR_MISMATCH = -6,    /* shapes, models or versions do not match */
  OT_ERR_UNSUPPORTED = -7, /* valid but not supported (dtype, backend) */
  OT_ERR_RANGE = -8,       /* value out of range (token id, length) */
  OT_ERR_INTERNAL = -9,    /* a bug: an invariant did not hold */
} ot_status;

/* Short fixed description of a status code. */
const char *ot_strerror(int status);

/* Records a formatted detail for the calling thread and returns `status`,
 * so callers can write `return ot_error(OT_ERR_FORMAT, "bad header in %s", p);`. */
int ot_error(int status, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* The calling thread's last detail ("" if none). Valid until the next ot_error. */
const char *ot_error_detail(void);

/* Clears the calling thread's detail. */
void ot_error_clear(void);

#endif

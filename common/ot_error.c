#include "ot_error.h"

#include <stdarg.h>
#include <stdio.h>

/* Thread-local like errno: each thread reports its own failures. */
static _Thread_local char ot_detail[512];

const char *ot_strerror(int status) {
  switch (status) {
  case OT_OK: return "success";
  case OT_ERR_NOMEM: return "out of memory";
  case OT_ERR_IO: return "I/O error";
  case OT_ERR_FORMAT: return "malformed input";
  case OT_ERR_INVALID: return "invalid argument";
  case OT_ERR_NOTFOUND: return "not found";
  case OT_ERR_MISMATCH: return "mismatch";
  case OT_ERR_UNSUPPORTED: return "unsupported";
  case OT_ERR_RANGE: return "out of range";
  case OT_ERR_INTERNAL: return "internal error";
  default: return "unknown error";
  }
}

int ot_error(int status, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(ot_detail, sizeof ot_detail, fmt, ap);
  va_end(ap);
  return status;
}

const char *ot_error_detail(void) { return ot_detail; }

void ot_error_clear(void) { ot_detail[0] = '\0'; }

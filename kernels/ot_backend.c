#include "ot_backend.h"

#include <string.h>

#include "ot_error.h"

int ot_backend_parse(const char *name, ot_backend_kind *out) {
  if (strcmp(name, "cpu") == 0) {
    *out = OT_BACKEND_CPU;
    return OT_OK;
  }
  if (strcmp(name, "cuda") == 0) {
    *out = OT_BACKEND_CUDA;
    return OT_OK;
  }
  return ot_error(OT_ERR_INVALID, "unknown backend '%s' (expected cpu or cuda)", name);
}

int ot_backend_create(ot_backend_kind kind, int n_threads, ot_backend **out) {
  switch (kind) {
  case OT_BACKEND_CPU: return ot_backend_cpu_create(n_threads, out);
  case OT_BACKEND_CUDA:
    return ot_error(OT_ERR_UNSUPPORTED, "this build of offtune has no CUDA backend; use --backend cpu");
  }
  return ot_error(OT_ERR_INVALID, "unknown backend kind %d", (int)kind);
}

void ot_backend_free(ot_backend *be) {
  if (!be) return;
  be->ops->destroy(be);
}

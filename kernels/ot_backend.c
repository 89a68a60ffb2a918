#include "ot_backend.h"

#include <stdlib.h>
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

#ifndef OT_HAVE_CUDA
int ot_backend_cuda_create(int device, unsigned flags, ot_backend **out) {
  (void)device;
  (void)flags;
  (void)out;
  return ot_error(OT_ERR_UNSUPPORTED,
                  "this build of offtune has no CUDA backend (nvcc not found at build time)");
}
#endif

static int env_on(const char *name, int dflt) {
  const char *v = getenv(name);
  if (!v || !*v) return dflt;
  return strcmp(v, "0") != 0;
}

int ot_backend_create(ot_backend_kind kind, int n_threads, ot_backend **out) {
  switch (kind) {
  case OT_BACKEND_CPU: return ot_backend_cpu_create(n_threads, out);
  case OT_BACKEND_CUDA: {
    unsigned flags =
        (env_on("OT_CUDA_BF16", 0) ? OT_CUDA_BF16 : 0) | (env_on("OT_CUDA_FLASH", 1) ? 0 : OT_CUDA_NO_FLASH);
    return ot_backend_cuda_create(0, flags, out);
  }
  }
  return ot_error(OT_ERR_INVALID, "unknown backend kind %d", (int)kind);
}

int ot_backend_create_or_cpu(ot_backend_kind kind, int n_threads, ot_backend **out, int *fell_back) {
  *fell_back = 0;
  int rc = ot_backend_create(kind, n_threads, out);
  if (rc != OT_ERR_UNSUPPORTED || kind == OT_BACKEND_CPU) return rc;
  /* keep the reason: the CPU backend's success does not touch the detail */
  rc = ot_backend_cpu_create(n_threads, out);
  if (rc == OT_OK) *fell_back = 1;
  return rc;
}

int ot_backend_check_op(const ot_backend *be, int present, const char *op) {
  if (present) return OT_OK;
  return ot_error(OT_ERR_UNSUPPORTED, "the %s backend does not implement the %s op", be->ops->name, op);
}

void ot_backend_free(ot_backend *be) {
  if (!be) return;
  be->ops->destroy(be);
}

#include "ot_digest.h"

#include <errno.h>
#include <sodium.h>
#include <string.h>
#include <unistd.h>

#include "ot_error.h"
#include "ot_fileio.h"

int ot_file_digest_max(const char *path, uint64_t max_bytes, char hex[OT_DIGEST_HEX]) {
  if (sodium_init() < 0) return ot_error(OT_ERR_INTERNAL, "libsodium failed to initialise");
  int fd = -1;
  uint64_t size = 0;
  int rc = ot_file_open_regular(path, max_bytes, &fd, &size);
  if (rc) return rc;
  crypto_generichash_state st;
  crypto_generichash_init(&st, NULL, 0, 32);
  unsigned char buf[1 << 16], h[32];
  uint64_t total = 0;
  for (;;) {
    ssize_t n = read(fd, buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      rc = ot_error(OT_ERR_IO, "%s: read error: %s", path, strerror(errno));
      break;
    }
    if (n == 0) break;
    total += (uint64_t)n;
    if (total > max_bytes) { /* it grew while we read it */
      rc =
          ot_error(OT_ERR_RANGE, "%s grew past the limit of %llu bytes", path, (unsigned long long)max_bytes);
      break;
    }
    crypto_generichash_update(&st, buf, (size_t)n);
  }
  close(fd);
  if (rc) return rc;
  crypto_generichash_final(&st, h, sizeof h);
  sodium_bin2hex(hex, OT_DIGEST_HEX, h, sizeof h);
  return OT_OK;
}

int ot_file_digest(const char *path, char hex[OT_DIGEST_HEX]) {
  return ot_file_digest_max(path, UINT64_MAX, hex);
}

int ot_digest_bytes(const void *data, size_t len, char hex[OT_DIGEST_HEX]) {
  if (sodium_init() < 0) return ot_error(OT_ERR_INTERNAL, "libsodium failed to initialise");
  unsigned char h[32];
  crypto_generichash(h, sizeof h, data, len, NULL, 0);
  sodium_bin2hex(hex, OT_DIGEST_HEX, h, sizeof h);
  return OT_OK;
}

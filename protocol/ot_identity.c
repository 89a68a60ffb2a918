#include "ot_identity.h"

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <sodium.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "ot_cli.h"
#include "ot_error.h"
#include "ot_fileio.h"

#define KEY_MAGIC "offtune-ed25519-secret-v1"
#define PUB_MAGIC "offtune-ed25519-v1"

int ot_sodium_init(void) {
  if (sodium_init() < 0) return ot_error(OT_ERR_INTERNAL, "libsodium failed to initialise");
  return OT_OK;
}

int ot_identity_generate(ot_identity *out) {
  if (!out) return ot_error(OT_ERR_INVALID, "ot_identity_generate: NULL");
  int rc = ot_sodium_init();
  if (rc) return rc;
  crypto_sign_keypair(out->pk, out->sk);
  return OT_OK;
}

void ot_identity_wipe(ot_identity *id) {
  if (id) sodium_memzero(id, sizeof *id);
}

void ot_pubkey_hex(const uint8_t pk[OT_PK_BYTES], char out[65]) { sodium_bin2hex(out, 65, pk, OT_PK_BYTES); }

int ot_pubkey_parse(const char *hex, uint8_t pk[OT_PK_BYTES]) {
  if (!hex || !pk) return ot_error(OT_ERR_INVALID, "ot_pubkey_parse: NULL");
  while (isspace((unsigned char)*hex)) hex++;
  uint8_t tmp[OT_PK_BYTES];
  size_t n = 0;
  const char *end = NULL;
  if (sodium_hex2bin(tmp, sizeof tmp, hex, strlen(hex), NULL, &n, &end) != 0 || n != OT_PK_BYTES)
    return ot_error(OT_ERR_FORMAT, "public key is not 64 hex digits");
  while (*end && isspace((unsigned char)*end)) end++;
  if (*end) return ot_error(OT_ERR_FORMAT, "public key has trailing characters");
  memcpy(pk, tmp, OT_PK_BYTES);
  return OT_OK;
}

void ot_fingerprint(const uint8_t pk[OT_PK_BYTES], char out[OT_FINGERPRINT_LEN]) {
  uint8_t h[32];
  crypto_generichash(h, sizeof h, pk, OT_PK_BYTES, NULL, 0);
  char *p = out;
  p += sprintf(p, "ot1");
  for (int g = 0; g < 8; g++) p += sprintf(p, ":%02x%02x", h[2 * g], h[2 * g + 1]);
}

int ot_fingerprint_matches(const uint8_t pk[OT_PK_BYTES], const char *fp) {
  if (!fp) return 0;
  char want[OT_FINGERPRINT_LEN], got[OT_FINGERPRINT_LEN];
  ot_fingerprint(pk, want);
  size_t n = strlen(fp);
  if (n != OT_FINGERPRINT_LEN - 1) return 0;
  for (size_t i = 0; i < n; i++) got[i] = (char)tolower((unsigned char)fp[i]);
  got[n] = '\0';
  return sodium_memcmp(want, got, n) == 0;
}

/* Writes a secret file: O_EXCL temporary with mode 0600, fsync, then link() so an
 * existing key is never replaced, then fsync the directory. */
static int write_secret(const char *path, const char *data, size_t len) {
  size_t pl = strlen(path);
  char *tmp = malloc(pl + 16);
  if (!tmp) return ot_error(OT_ERR_NOMEM, "out of memory");
  snprintf(tmp, pl + 16, "%s.tmp%06d", path, (int)(getpid() % 1000000));
  int fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0600);
  if (fd < 0) {
    int rc = ot_error(OT_ERR_IO, "cannot create %s: %s", tmp, strerror(errno));
    free(tmp);
    return rc;
  }
  int rc = ot_fd_write_all(fd, data, len, -1, tmp);
  if (rc == OT_OK && fchmod(fd, 0600) != 0) rc = ot_error(OT_ERR_IO, "chmod %s: %s", tmp, strerror(errno));
  if (rc == OT_OK && fsync(fd) != 0) rc = ot_error(OT_ERR_IO, "fsync %s: %s", tmp, strerror(errno));
  close(fd);
  if (rc == OT_OK && link(tmp, path) != 0)
    rc = errno == EEXIST ? ot_error(OT_ERR_INVALID, "%s already exists; refusing to overwrite a key", path)
                         : ot_error(OT_ERR_IO, "cannot create %s: %s", path, strerror(errno));
  unlink(tmp);
  free(tmp);
  if (rc == OT_OK) {
    char *dir = strdup(path);
    if (dir) {
      char *slash = strrchr(dir, '/');
      const char *d = slash ? (slash == dir ? "/" : (*slash = '\0', dir)) : ".";
      int dfd = open(d, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
      if (dfd >= 0) {
        (void)fsync(dfd);
        close(dfd);
      }
      free(dir);
    }
  }
  return rc;
}

int ot_identity_save(const ot_identity *id, const char *dir, const char *name) {
  if (!id || !dir || !name || !*name) return ot_error(OT_ERR_INVALID, "ot_identity_save: NULL argument");
  if (strchr(name, '/')) return ot_error(OT_ERR_INVALID, "key name '%s' must not contain '/'", name);
  int rc = ot_mkdir_p(dir);
  if (rc) return rc;
  char *kp = NULL, *pp = NULL;
  size_t nl = strlen(name);
  char *kn = malloc(nl + 5), *pn = malloc(nl + 5);
  if (!kn || !pn) {
    free(kn);
    free(pn);
    return ot_error(OT_ERR_NOMEM, "out of memory");
  }
  sprintf(kn, "%s.key", name);
  sprintf(pn, "%s.pub", name);
  rc = ot_path_join(dir, kn, &kp);
  if (rc == OT_OK) rc = ot_path_join(dir, pn, &pp);
  free(kn);
  free(pn);
  if (rc == OT_OK && ot_file_exists(kp))
    rc = ot_error(OT_ERR_INVALID, "%s already exists; refusing to overwrite a key", kp);
  if (rc == OT_OK) {
    char text[sizeof KEY_MAGIC + 2 * OT_SK_BYTES + 4];
    int n = snprintf(text, sizeof text, "%s\n", KEY_MAGIC);
    sodium_bin2hex(text + n, sizeof text - (size_t)n, id->sk, OT_SK_BYTES);
    size_t len = strlen(text);
    text[len++] = '\n';
    rc = write_secret(kp, text, len);
    sodium_memzero(text, sizeof text);
  }
  if (rc == OT_OK) {
    char hex[65], fp[OT_FINGERPRINT_LEN], line[200];
    ot_pubkey_hex(id->pk, hex);
    ot_fingerprint(id->pk, fp);
    int n = snprintf(line, sizeof line, "%s\n# %s %s %s\n", hex, PUB_MAGIC, name, fp);
    rc = ot_file_write_atomic(pp, line, (size_t)n);
  }
  free(kp);
  free(pp);
  return rc;
}

int ot_identity_load(const char *key_path, ot_identity *out) {
  if (!key_path || !out) return ot_error(OT_ERR_INVALID, "ot_identity_load: NULL argument");
  int rc = ot_sodium_init();
  if (rc) return rc;
  int fd = open(key_path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK);
  if (fd < 0)
    return ot_error(errno == ENOENT ? OT_ERR_NOTFOUND : OT_ERR_IO, "cannot open %s: %s", key_path,
                    strerror(errno));
  struct stat sb;
  if (fstat(fd, &sb) != 0) {
    close(fd);
    return ot_error(OT_ERR_IO, "cannot stat %s: %s", key_path, strerror(errno));
  }
  if (!S_ISREG(sb.st_mode)) {
    close(fd);
    return ot_error(OT_ERR_INVALID, "%s is not a regular file", key_path);
  }
  if (sb.st_mode & 077) {
    close(fd);
    return ot_error(OT_ERR_INVALID, "%s: secret key is accessible by others (mode %03o); run chmod 600 %s",
                    key_path, (unsigned)(sb.st_mode & 0777), key_path);
  }
  if (sb.st_uid != geteuid()) {
    close(fd);
    return ot_error(OT_ERR_INVALID, "%s: secret key is owned by another user (uid %u)", key_path,
                    (unsigned)sb.st_uid);
  }
  char buf[512];
  ssize_t n = read(fd, buf, sizeof buf - 1);
  close(fd);
  if (n < 0) return ot_error(OT_ERR_IO, "cannot read %s: %s", key_path, strerror(errno));
  buf[n] = '\0';
  rc = OT_OK;
  size_t ml = strlen(KEY_MAGIC);
  ot_identity id;
  if ((size_t)n < ml + 1 + 2 * OT_SK_BYTES || memcmp(buf, KEY_MAGIC, ml) != 0 || buf[ml] != '\n') {
    rc = ot_error(OT_ERR_FORMAT, "%s is not an offtune secret key", key_path);
  } else {
    size_t got = 0;
    if (sodium_hex2bin(id.sk, OT_SK_BYTES, buf + ml + 1, 2 * OT_SK_BYTES, NULL, &got, NULL) != 0 ||
        got != OT_SK_BYTES)
      rc = ot_error(OT_ERR_FORMAT, "%s: secret key is not 128 hex digits", key_path);
    else if (crypto_sign_ed25519_sk_to_pk(id.pk, id.sk) != 0)
      rc = ot_error(OT_ERR_FORMAT, "%s: invalid secret key", key_path);
    else {
      /* The stored sk embeds pk; check it is self-consistent by re-deriving from the seed. */
      uint8_t seed[32], pk2[32], sk2[64];
      crypto_sign_ed25519_sk_to_seed(seed, id.sk);
      crypto_sign_seed_keypair(pk2, sk2, seed);
      if (sodium_memcmp(pk2, id.pk, 32) != 0)
        rc = ot_error(OT_ERR_FORMAT, "%s: corrupted secret key", key_path);
      sodium_memzero(seed, sizeof seed);
      sodium_memzero(sk2, sizeof sk2);
    }
  }
  sodium_memzero(buf, sizeof buf);
  if (rc == OT_OK) memcpy(out, &id, sizeof id);
  sodium_memzero(&id, sizeof id);
  return rc;
}

int ot_pubkey_load(const char *path, uint8_t pk[OT_PK_BYTES]) {
  char *text = NULL;
  size_t len = 0;
  int rc = ot_file_read_all(path, 4096, &text, &len);
  if (rc) return rc;
  char *nl = strchr(text, '\n');
  if (nl) *nl = '\0';
  rc = ot_pubkey_parse(text, pk);
  free(text);
  if (rc) return ot_error(rc, "%s: %s", path, ot_error_detail());
  return OT_OK;
}

int ot_keygen_command(const char *prog, const char *default_name, int argc, char **argv) {
  const char *out = NULL, *name = default_name;
  ot_opt opts[] = {
      {"out", OT_OPT_STR, &out, "DIR", "directory for NAME.key (0600) and NAME.pub (required)"},
      {"name", OT_OPT_STR, &name, "NAME", "file name stem"},
  };
  int n_opts = (int)(sizeof opts / sizeof opts[0]);
  char synopsis[128];
  snprintf(synopsis, sizeof synopsis, "%s keygen --out DIR [--name NAME]", prog);
  int rc = ot_cli_parse(argc, argv, opts, n_opts);
  if (rc == 1) {
    ot_cli_usage(stdout, synopsis, "Creates a long-term Ed25519 identity.", opts, n_opts);
    return 0;
  }
  if (rc == OT_OK && !out) rc = ot_error(OT_ERR_INVALID, "--out DIR is required");
  if (rc) {
    fprintf(stderr, "%s: keygen: %s\n", prog, ot_error_detail());
    ot_cli_usage(stderr, synopsis, "Creates a long-term Ed25519 identity.", opts, n_opts);
    return 2;
  }
  ot_identity id;
  rc = ot_identity_generate(&id);
  if (rc == OT_OK) rc = ot_identity_save(&id, out, name);
  if (rc) {
    ot_identity_wipe(&id);
    fprintf(stderr, "%s: keygen: %s: %s\n", prog, ot_strerror(rc), ot_error_detail());
    return 1;
  }
  char hex[65], fp[OT_FINGERPRINT_LEN];
  ot_pubkey_hex(id.pk, hex);
  ot_fingerprint(id.pk, fp);
  ot_identity_wipe(&id);
  printf("secret key  %s/%s.key (mode 0600, keep it private)\npublic key  %s/%s.pub\n%s\nfingerprint %s\n",
         out, name, out, name, hex, fp);
  return 0;
}

#include "ot_access.h"

#include <pthread.h>
#include <sodium.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ot_error.h"
#include "ot_fileio.h"

typedef struct {
  uint8_t (*v)[32];
  size_t n, cap;
} keyset;

struct ot_access {
  pthread_mutex_t mu;
  keyset allow, revoked, tokens; /* tokens: BLAKE2b-256 of each unused token */
};

static int set_has(const keyset *s, const uint8_t k[32]) {
  for (size_t i = 0; i < s->n; i++)
    if (sodium_memcmp(s->v[i], k, 32) == 0) return 1;
  return 0;
}

static int set_add(keyset *s, const uint8_t k[32]) {
  if (set_has(s, k)) return OT_OK;
  if (s->n == s->cap) {
    size_t cap = s->cap ? 2 * s->cap : 16;
    void *p = realloc(s->v, cap * 32);
    if (!p) return ot_error(OT_ERR_NOMEM, "out of memory");
    s->v = p;
    s->cap = cap;
  }
  memcpy(s->v[s->n++], k, 32);
  return OT_OK;
}

static void set_del(keyset *s, const uint8_t k[32]) {
  for (size_t i = 0; i < s->n; i++)
    if (sodium_memcmp(s->v[i], k, 32) == 0) {
      memmove(s->v[i], s->v[s->n - 1], 32);
      s->n--;
      return;
    }
}

int ot_access_new(ot_access **out) {
  if (!out) return ot_error(OT_ERR_INVALID, "ot_access_new: NULL");
  int rc = ot_sodium_init();
  if (rc) return rc;
  ot_access *a = calloc(1, sizeof *a);
  if (!a) return ot_error(OT_ERR_NOMEM, "out of memory");
  pthread_mutex_init(&a->mu, NULL);
  *out = a;
  return OT_OK;
}

void ot_access_free(ot_access *a) {
  if (!a) return;
  pthread_mutex_destroy(&a->mu);
  if (a->tokens.v) sodium_memzero(a->tokens.v, a->tokens.cap * 32);
  free(a->allow.v);
  free(a->revoked.v);
  free(a->tokens.v);
  free(a);
}

int ot_access_allow(ot_access *a, const uint8_t pk[32]) {
  pthread_mutex_lock(&a->mu);
  int rc = set_add(&a->allow, pk);
  if (rc == OT_OK) set_del(&a->revoked, pk); /* an explicit allow lifts a revocation */
  pthread_mutex_unlock(&a->mu);
  return rc;
}

int ot_access_revoke(ot_access *a, const uint8_t pk[32]) {
  pthread_mutex_lock(&a->mu);
  int rc = set_add(&a->revoked, pk);
  if (rc == OT_OK) set_del(&a->allow, pk);
  pthread_mutex_unlock(&a->mu);
  return rc;
}

void ot_token_hash(const char *token, uint8_t hash[32]) {
  crypto_generichash(hash, 32, (const uint8_t *)token, strlen(token), (const uint8_t *)"offtune/1 token", 15);
}

void ot_token_new(char token[OT_TOKEN_CHARS + 1], uint8_t hash[32]) {
  uint8_t raw[32];
  randombytes_buf(raw, sizeof raw);
  memcpy(token, "ote1-", 5);
  sodium_bin2base64(token + 5, OT_TOKEN_CHARS + 1 - 5, raw, sizeof raw,
                    sodium_base64_VARIANT_URLSAFE_NO_PADDING);
  sodium_memzero(raw, sizeof raw);
  ot_token_hash(token, hash);
}

int ot_access_issue_token(ot_access *a, char token[OT_TOKEN_CHARS + 1]) {
  uint8_t h[32];
  char tmp[OT_TOKEN_CHARS + 1];
  ot_token_new(tmp, h);
  pthread_mutex_lock(&a->mu);
  int rc = set_add(&a->tokens, h);
  pthread_mutex_unlock(&a->mu);
  if (rc == OT_OK) memcpy(token, tmp, sizeof tmp);
  sodium_memzero(tmp, sizeof tmp);
  return rc;
}

int ot_access_admit(ot_access *a, const uint8_t pk[32], const char *token, int *enrolled) {
  char fp[OT_FINGERPRINT_LEN];
  ot_fingerprint(pk, fp);
  pthread_mutex_lock(&a->mu);
  int rc = OT_OK, enr = 0;
  if (set_has(&a->revoked, pk)) {
    rc = ot_error(OT_ERR_INVALID, "device %s is revoked", fp);
  } else if (!set_has(&a->allow, pk)) {
    uint8_t h[32];
    if (!token || !*token) {
      rc = ot_error(OT_ERR_NOTFOUND, "device %s is not enrolled (no token given)", fp);
    } else {
      ot_token_hash(token, h);
      if (!set_has(&a->tokens, h)) {
        rc = ot_error(OT_ERR_NOTFOUND, "device %s: enrolment token unknown or already used", fp);
      } else {
        rc = set_add(&a->allow, pk);
        if (rc == OT_OK) {
          set_del(&a->tokens, h);
          enr = 1;
        }
      }
    }
  }
  pthread_mutex_unlock(&a->mu);
  if (rc == OT_OK && enrolled) *enrolled = enr;
  return rc;
}

int ot_access_check(ot_access *a, const uint8_t pk[32]) {
  pthread_mutex_lock(&a->mu);
  int ok = !set_has(&a->revoked, pk) && set_has(&a->allow, pk);
  pthread_mutex_unlock(&a->mu);
  if (ok) return OT_OK;
  char fp[OT_FINGERPRINT_LEN];
  ot_fingerprint(pk, fp);
  return ot_error(OT_ERR_INVALID, "device %s is revoked or no longer allowed", fp);
}

static int mem_admit(void *self, const uint8_t pk[32], const char *token, int *enrolled) {
  return ot_access_admit(self, pk, token, enrolled);
}
static int mem_check(void *self, const uint8_t pk[32]) { return ot_access_check(self, pk); }
const ot_access_ops ot_access_memory_ops = {mem_admit, mem_check};

int ot_access_save(ot_access *a, const char *path) {
  pthread_mutex_lock(&a->mu);
  size_t n = a->allow.n + a->revoked.n + a->tokens.n;
  char *buf = malloc(n * 72 + 1);
  int rc = OT_OK;
  if (!buf) rc = ot_error(OT_ERR_NOMEM, "out of memory");
  size_t len = 0;
  const struct {
    const char *word;
    keyset *s;
  } parts[] = {{"allow ", &a->allow}, {"revoke", &a->revoked}, {"token ", &a->tokens}};
  for (int p = 0; rc == OT_OK && p < 3; p++)
    for (size_t i = 0; i < parts[p].s->n; i++) {
      char hex[65];
      sodium_bin2hex(hex, sizeof hex, parts[p].s->v[i], 32);
      len += (size_t)sprintf(buf + len, "%s %s\n", parts[p].word, hex);
    }
  pthread_mutex_unlock(&a->mu);
  if (rc == OT_OK) rc = ot_file_write_atomic(path, buf, len);
  free(buf);
  return rc;
}

int ot_access_load(ot_access *a, const char *path) {
  char *text = NULL;
  size_t len = 0;
  int rc = ot_file_read_all(path, 64u << 20, &text, &len);
  if (rc) return rc;
  ot_access *tmp = NULL;
  rc = ot_access_new(&tmp);
  int line = 0;
  for (char *save = NULL, *l = rc ? NULL : strtok_r(text, "\n", &save); l && rc == OT_OK;
       l = strtok_r(NULL, "\n", &save)) {
    line++;
    if (*l == '#' || *l == '\0') continue;
    char word[8], hex[80];
    uint8_t k[32];
    if (sscanf(l, "%7s %79s", word, hex) != 2 || ot_pubkey_parse(hex, k) != OT_OK) {
      rc = ot_error(OT_ERR_FORMAT, "%s:%d: expected 'allow|revoke|token <64 hex>'", path, line);
      break;
    }
    if (strcmp(word, "allow") == 0)
      rc = set_add(&tmp->allow, k);
    else if (strcmp(word, "revoke") == 0)
      rc = set_add(&tmp->revoked, k);
    else if (strcmp(word, "token") == 0)
      rc = set_add(&tmp->tokens, k);
    else
      rc = ot_error(OT_ERR_FORMAT, "%s:%d: unknown entry '%s'", path, line, word);
  }
  free(text);
  if (rc == OT_OK) { /* swap in only after the whole file parsed */
    pthread_mutex_lock(&a->mu);
    keyset t;
    t = a->allow, a->allow = tmp->allow, tmp->allow = t;
    t = a->revoked, a->revoked = tmp->revoked, tmp->revoked = t;
    t = a->tokens, a->tokens = tmp->tokens, tmp->tokens = t;
    pthread_mutex_unlock(&a->mu);
  }
  ot_access_free(tmp);
  return rc;
}

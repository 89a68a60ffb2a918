#include "ot_transfer.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sodium.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "ot_error.h"
#include "ot_fileio.h"
#include "ot_pb.h"

static void put64(uint8_t *p, uint64_t v) {
  for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i));
}

uint64_t ot_transfer_chunks(uint64_t total, uint32_t chunk) {
  return chunk ? (total + chunk - 1) / chunk : 0;
}

void ot_chunk_hash(uint64_t index, const uint8_t *data, size_t len, uint8_t out[32]) {
  crypto_generichash_state st;
  uint8_t l[8];
  crypto_generichash_init(&st, NULL, 0, 32);
  crypto_generichash_update(&st, (const uint8_t *)"offtune/1 chunk", 15);
  put64(l, index);
  crypto_generichash_update(&st, l, 8);
  crypto_generichash_update(&st, data, len);
  crypto_generichash_final(&st, out, 32);
}

void ot_transfer_digest(const uint8_t (*hashes)[32], uint64_t n, uint64_t total, uint32_t chunk,
                        uint8_t out[32]) {
  crypto_generichash_state st;
  uint8_t l[8];
  crypto_generichash_init(&st, NULL, 0, 32);
  crypto_generichash_update(&st, (const uint8_t *)"offtune/1 digest", 16);
  put64(l, total);
  crypto_generichash_update(&st, l, 8);
  put64(l, chunk);
  crypto_generichash_update(&st, l, 8);
  for (uint64_t i = 0; i < n; i++) crypto_generichash_update(&st, hashes[i], 32);
  crypto_generichash_final(&st, out, 32);
}

void ot_transfer_digest_buf(const uint8_t *data, uint64_t total, uint32_t chunk, uint8_t out[32]) {
  crypto_generichash_state st;
  uint8_t l[8], h[32];
  crypto_generichash_init(&st, NULL, 0, 32);
  crypto_generichash_update(&st, (const uint8_t *)"offtune/1 digest", 16);
  put64(l, total);
  crypto_generichash_update(&st, l, 8);
  put64(l, chunk);
  crypto_generichash_update(&st, l, 8);
  uint64_t n = ot_transfer_chunks(total, chunk);
  for (uint64_t i = 0; i < n; i++) {
    uint64_t off = i * chunk;
    ot_chunk_hash(i, data + off, (size_t)(total - off < chunk ? total - off : chunk), h);
    crypto_generichash_update(&st, h, 32);
  }
  crypto_generichash_final(&st, out, 32);
}

/* ---- sinks ---- */

typedef struct {
  int fd;
  char *path, *tmp;
} file_sink;

static int fs_write(void *self, uint64_t off, const void *data, size_t len) {
  file_sink *f = self;
  return ot_fd_write_all(f->fd, data, len, (int64_t)off, f->tmp);
}

static void fs_free(file_sink *f) {
  if (f->fd >= 0) close(f->fd);
  free(f->path);
  free(f->tmp);
  free(f);
}

static int fs_commit(void *self) {
  file_sink *f = self;
  int rc = OT_OK;
  if (fsync(f->fd) != 0) rc = ot_error(OT_ERR_IO, "fsync %s: %s", f->tmp, strerror(errno));
  if (rc == OT_OK && rename(f->tmp, f->path) != 0)
    rc = ot_error(OT_ERR_IO, "cannot rename %s to %s: %s", f->tmp, f->path, strerror(errno));
  if (rc) unlink(f->tmp);
  fs_free(f);
  return rc;
}

static void fs_abort(void *self) {
  file_sink *f = self;
  unlink(f->tmp);
  fs_free(f);
}

int ot_file_sink_open(const char *path, ot_sink *out) {
  if (!path || !out) return ot_error(OT_ERR_INVALID, "ot_file_sink_open: NULL argument");
  file_sink *f = calloc(1, sizeof *f);
  if (!f) return ot_error(OT_ERR_NOMEM, "out of memory");
  f->fd = -1;
  f->path = strdup(path);
  f->tmp = malloc(strlen(path) + 9);
  if (!f->path || !f->tmp) {
    fs_free(f);
    return ot_error(OT_ERR_NOMEM, "out of memory");
  }
  sprintf(f->tmp, "%s.partial", path);
  f->fd = open(f->tmp, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0600);
  if (f->fd < 0) {
    int rc = ot_error(OT_ERR_IO, "cannot create %s: %s", f->tmp, strerror(errno));
    fs_free(f);
    return rc;
  }
  *out = (ot_sink){fs_write, fs_commit, fs_abort, f};
  return OT_OK;
}

typedef struct {
  uint8_t *buf;
  uint64_t size;
  int committed;
} mem_sink;

static int ms_write(void *self, uint64_t off, const void *data, size_t len) {
  mem_sink *m = self;
  if (off > m->size || len > m->size - off) return ot_error(OT_ERR_RANGE, "write past the end of the buffer");
  memcpy(m->buf + off, data, len);
  return OT_OK;
}
static int ms_commit(void *self) {
  ((mem_sink *)self)->committed = 1;
  return OT_OK;
}
static void ms_abort(void *self) { ((mem_sink *)self)->committed = 0; }

int ot_mem_sink_open(uint64_t size, ot_sink *out) {
  if (!out || size > SIZE_MAX) return ot_error(OT_ERR_INVALID, "ot_mem_sink_open: bad argument");
  mem_sink *m = calloc(1, sizeof *m);
  if (m) m->buf = malloc(size ? (size_t)size : 1);
  if (!m || !m->buf) {
    free(m);
    return ot_error(OT_ERR_NOMEM, "out of memory for a %llu-byte buffer", (unsigned long long)size);
  }
  m->size = size;
  *out = (ot_sink){ms_write, ms_commit, ms_abort, m};
  return OT_OK;
}

uint8_t *ot_mem_sink_take(ot_sink *s, uint64_t *size) {
  mem_sink *m = s->self;
  if (!m || !m->committed) return NULL;
  uint8_t *b = m->buf;
  m->buf = NULL;
  if (size) *size = m->size;
  return b;
}

void ot_mem_sink_free(ot_sink *s) {
  mem_sink *m = s ? s->self : NULL;
  if (!m) return;
  free(m->buf);
  free(m);
  s->self = NULL;
}

/* ---- receiver ---- */

struct ot_rx {
  pthread_mutex_t mu;
  uint8_t id[16];
  uint64_t total, n;
  uint32_t chunk;
  uint8_t *have;
  uint8_t (*hashes)[32];
  uint64_t prefix;
  int committed, failed;
  ot_sink sink;
};

int ot_rx_new(const uint8_t id[16], uint64_t total, uint32_t chunk, uint64_t max_total, ot_sink sink,
              ot_rx **out) {
  if (!id || !out || !sink.write_at) return ot_error(OT_ERR_INVALID, "ot_rx_new: bad argument");
  if (chunk == 0 || chunk > OT_CHUNK_MAX)
    return ot_error(OT_ERR_RANGE, "chunk size %u out of range (1..%u)", chunk, OT_CHUNK_MAX);
  if (total > max_total)
    return ot_error(OT_ERR_RANGE, "transfer of %llu bytes exceeds the limit of %llu",
                    (unsigned long long)total, (unsigned long long)max_total);
  ot_rx *r = calloc(1, sizeof *r);
  if (!r) return ot_error(OT_ERR_NOMEM, "out of memory");
  r->n = ot_transfer_chunks(total, chunk);
  r->have = calloc(r->n ? r->n : 1, 1);
  r->hashes = calloc(r->n ? r->n : 1, 32);
  if (!r->have || !r->hashes) {
    free(r->have);
    free(r->hashes);
    free(r);
    return ot_error(OT_ERR_NOMEM, "out of memory");
  }
  pthread_mutex_init(&r->mu, NULL);
  memcpy(r->id, id, 16);
  r->total = total;
  r->chunk = chunk;
  r->sink = sink;
  *out = r;
  return OT_OK;
}

int ot_rx_chunk(ot_rx *r, uint64_t index, const uint8_t *data, size_t len) {
  if (index >= r->n)
    return ot_error(OT_ERR_RANGE, "chunk %llu out of range (transfer has %llu)", (unsigned long long)index,
                    (unsigned long long)r->n);
  uint64_t off = index * r->chunk;
  uint64_t want = r->total - off < r->chunk ? r->total - off : r->chunk;
  if (len != want)
    return ot_error(OT_ERR_FORMAT, "chunk %llu has %zu bytes, expected %llu", (unsigned long long)index, len,
                    (unsigned long long)want);
  pthread_mutex_lock(&r->mu);
  int done = r->committed || r->failed;
  pthread_mutex_unlock(&r->mu);
  if (done) return ot_error(OT_ERR_INVALID, "transfer already finished");
  uint8_t h[32];
  ot_chunk_hash(index, data, len, h);
  int rc = r->sink.write_at(r->sink.self, off, data, len);
  if (rc) return rc;
  pthread_mutex_lock(&r->mu);
  memcpy(r->hashes[index], h, 32);
  r->have[index] = 1;
  while (r->prefix < r->n && r->have[r->prefix]) r->prefix++;
  pthread_mutex_unlock(&r->mu);
  return OT_OK;
}

int ot_rx_final(ot_rx *r, const uint8_t digest[32]) {
  pthread_mutex_lock(&r->mu);
  int rc = OT_OK;
  if (r->committed) {
    rc = OT_OK; /* a retried final marker: already done */
  } else if (r->failed) {
    rc = ot_error(OT_ERR_INVALID, "transfer already failed");
  } else if (r->prefix != r->n) {
    rc = ot_error(OT_ERR_FORMAT, "final marker before all chunks: have %llu of %llu",
                  (unsigned long long)r->prefix, (unsigned long long)r->n);
  } else {
    uint8_t d[32];
    ot_transfer_digest((const uint8_t(*)[32])r->hashes, r->n, r->total, r->chunk, d);
    if (sodium_memcmp(d, digest, 32) != 0) {
      rc = ot_error(OT_ERR_FORMAT, "transfer digest mismatch: data discarded");
      r->failed = 1;
      r->sink.abort(r->sink.self);
      r->sink.self = NULL;
    } else {
      rc = r->sink.commit(r->sink.self);
      r->sink.self = NULL;
      if (rc == OT_OK)
        r->committed = 1;
      else
        r->failed = 1;
    }
  }
  pthread_mutex_unlock(&r->mu);
  return rc;
}

uint64_t ot_rx_prefix(ot_rx *r) {
  pthread_mutex_lock(&r->mu);
  uint64_t p = r->prefix;
  pthread_mutex_unlock(&r->mu);
  return p;
}

int ot_rx_committed(ot_rx *r) {
  pthread_mutex_lock(&r->mu);
  int c = r->committed;
  pthread_mutex_unlock(&r->mu);
  return c;
}

void ot_rx_free(ot_rx *r) {
  if (!r) return;
  if (r->sink.self && r->sink.abort) r->sink.abort(r->sink.self);
  pthread_mutex_destroy(&r->mu);
  free(r->have);
  free(r->hashes);
  free(r);
}

/* ---- bodies ---- */

size_t ot_chunk_packed_len(uint64_t index, int final, size_t len, int has_digest) {
  size_t n = 2 + 16 + 1 + ot_pb_varint_len(index) + 2;
  if (!final) n += 1 + ot_pb_varint_len(len) + len;
  if (has_digest) n += 2 + 32;
  return n;
}

int ot_chunk_pack_to(const uint8_t id[16], uint64_t index, int final, const uint8_t *data, size_t len,
                     const uint8_t *digest, uint8_t *out, size_t out_len) {
  if (out_len != ot_chunk_packed_len(index, final, data ? len : 0, digest != NULL) || (final && data))
    return ot_error(OT_ERR_INTERNAL, "ot_chunk_pack_to: bad arguments");
  /* Chunk fields in order, as protobuf-c writes them */
  uint8_t *p = out;
  *p++ = 0x0a;
  *p++ = 16;
  memcpy(p, id, 16);
  p += 16;
  *p++ = 0x10;
  p = ot_pbw_varint(p, index);
  *p++ = 0x18;
  *p++ = final ? 1 : 0;
  if (!final) {
    *p++ = 0x22;
    p = ot_pbw_varint(p, len);
    if (len && p != data) memmove(p, data, len); /* data may already be in place */
    p += len;
  }
  if (digest) {
    *p++ = 0x2a;
    *p++ = 32;
    memcpy(p, digest, 32);
  }
  return OT_OK;
}

int ot_chunk_pack(const uint8_t id[16], uint64_t index, int final, const uint8_t *data, size_t len,
                  const uint8_t *digest, uint8_t **out, size_t *out_len) {
  if (final && data) { /* kept packable for tests of the receiver's checks */
    Offtune__Chunk c = OFFTUNE__CHUNK__INIT;
    c.transfer_id = (ProtobufCBinaryData){16, (uint8_t *)id};
    c.index = index;
    c.final = 1;
    c.has_data = 1;
    c.data = (ProtobufCBinaryData){len, (uint8_t *)data};
    if (digest) {
      c.has_digest = 1;
      c.digest = (ProtobufCBinaryData){32, (uint8_t *)digest};
    }
    if (ot_pb_pack(&c.base, out, out_len) != 0) return ot_error(OT_ERR_NOMEM, "out of memory");
    return OT_OK;
  }
  size_t n = ot_chunk_packed_len(index, final, data ? len : 0, digest != NULL);
  uint8_t *b = malloc(n);
  if (!b) return ot_error(OT_ERR_NOMEM, "out of memory");
  int rc = ot_chunk_pack_to(id, index, final, data, data ? len : 0, digest, b, n);
  if (rc) {
    free(b);
    return rc;
  }
  *out = b;
  *out_len = n;
  return OT_OK;
}

/* In place: data points into body. */
int ot_chunk_decode(const uint8_t *body, size_t len, ot_chunk *out) {
  if (len > (size_t)OT_CHUNK_MAX + 1024)
    return ot_error(OT_ERR_RANGE, "chunk message of %zu bytes is too large", len);
  ot_pbr r = {body, body + len};
  const uint8_t *id = NULL, *data = NULL, *digest = NULL;
  size_t idl = 0, dl = 0, dgl = 0;
  uint64_t index = 0, fin = 0;
  unsigned seen = 0;
  uint32_t f;
  int wt, more;
  while ((more = ot_pbr_next(&r, &f, &wt)) == 1) {
    int bad;
    if (f == 1)
      bad = wt != 2 || ot_pbr_bytes(&r, &id, &idl);
    else if (f == 2)
      bad = wt != 0 || ot_pbr_varint(&r, &index);
    else if (f == 3)
      bad = wt != 0 || ot_pbr_varint(&r, &fin);
    else if (f == 4)
      bad = wt != 2 || ot_pbr_bytes(&r, &data, &dl);
    else if (f == 5)
      bad = wt != 2 || ot_pbr_bytes(&r, &digest, &dgl);
    else
      bad = ot_pbr_skip(&r, wt);
    if (bad) break;
    if (f < 6) seen |= 1u << f;
  }
  if (more != 0 || (seen & 0x0e) != 0x0e) return ot_error(OT_ERR_FORMAT, "malformed chunk");
  int has_data = (seen >> 4) & 1, has_digest = (seen >> 5) & 1, final = fin != 0;
  if (idl != 16) return ot_error(OT_ERR_FORMAT, "chunk: transfer id must be 16 bytes");
  if (final ? (has_data || !has_digest || dgl != 32) : (!has_data || has_digest))
    return ot_error(OT_ERR_FORMAT, "chunk: data/digest do not match the final flag");
  ot_chunk c = {0};
  memcpy(c.id, id, 16);
  c.index = index;
  c.final = final;
  c.data = data;
  c.len = dl;
  c.has_digest = has_digest;
  if (has_digest) memcpy(c.digest, digest, 32);
  *out = c;
  return OT_OK;
}

void ot_chunk_release(ot_chunk *c) {
  if (c) c->priv = NULL; /* nothing to free: the chunk points into its body */
}

/* Object names: [A-Za-z0-9._-], not starting with a dot (no path traversal). */
static int check_name(const char *what, const char *name, size_t cap) {
  size_t nl = strlen(name);
  if (nl == 0 || nl >= cap) return ot_error(OT_ERR_FORMAT, "%s: name length %zu", what, nl);
  for (size_t i = 0; i < nl; i++) {
    char ch = name[i];
    if (!((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') || ch == '_' ||
          ch == '-' || ch == '.') ||
        (i == 0 && ch == '.'))
      return ot_error(OT_ERR_FORMAT, "%s: name has a character outside [A-Za-z0-9._-]", what);
  }
  return OT_OK;
}

int ot_begin_pack(const ot_transfer_begin *b, uint8_t **out, size_t *out_len) {
  Offtune__TransferBegin m = OFFTUNE__TRANSFER_BEGIN__INIT;
  m.transfer_id = (ProtobufCBinaryData){16, (uint8_t *)b->id};
  m.name = (char *)b->name;
  m.total_size = b->total;
  m.chunk_size = b->chunk;
  if (ot_pb_pack(&m.base, out, out_len) != 0) return ot_error(OT_ERR_NOMEM, "out of memory");
  return OT_OK;
}

int ot_begin_decode(const uint8_t *body, size_t len, ot_transfer_begin *out) {
  ot_pb_alloc ca;
  ot_pb_alloc_init(&ca, 8192);
  Offtune__TransferBegin *m = len <= 4096 ? offtune__transfer_begin__unpack(&ca.a, len, body) : NULL;
  int rc = OT_OK;
  if (!m) return ot_error(OT_ERR_FORMAT, "malformed TransferBegin");
  size_t nl = strlen(m->name);
  if (m->transfer_id.len != 16)
    rc = ot_error(OT_ERR_FORMAT, "TransferBegin: transfer id must be 16 bytes");
  else
    rc = check_name("TransferBegin", m->name, sizeof out->name);
  if (rc == OT_OK) {
    memcpy(out->id, m->transfer_id.data, 16);
    memcpy(out->name, m->name, nl + 1);
    out->total = m->total_size;
    out->chunk = m->chunk_size;
  }
  offtune__transfer_begin__free_unpacked(m, &ca.a);
  return rc;
}

int ot_status_pack(const ot_transfer_status *s, uint8_t **out, size_t *out_len) {
  Offtune__TransferStatus m = OFFTUNE__TRANSFER_STATUS__INIT;
  m.transfer_id = (ProtobufCBinaryData){16, (uint8_t *)s->id};
  m.have_prefix = s->have_prefix;
  m.committed = s->committed;
  if (ot_pb_pack(&m.base, out, out_len) != 0) return ot_error(OT_ERR_NOMEM, "out of memory");
  return OT_OK;
}

int ot_status_decode(const uint8_t *body, size_t len, ot_transfer_status *out) {
  ot_pb_alloc ca;
  ot_pb_alloc_init(&ca, 4096);
  Offtune__TransferStatus *m = len <= 1024 ? offtune__transfer_status__unpack(&ca.a, len, body) : NULL;
  if (!m) return ot_error(OT_ERR_FORMAT, "malformed TransferStatus");
  int rc = OT_OK;
  if (m->transfer_id.len != 16)
    rc = ot_error(OT_ERR_FORMAT, "TransferStatus: transfer id must be 16 bytes");
  else {
    memcpy(out->id, m->transfer_id.data, 16);
    out->have_prefix = m->have_prefix;
    out->committed = m->committed;
  }
  offtune__transfer_status__free_unpacked(m, &ca.a);
  return rc;
}

int ot_fetch_open_pack(const ot_fetch_open_body *b, uint8_t **out, size_t *out_len) {
  Offtune__FetchOpen m = OFFTUNE__FETCH_OPEN__INIT;
  m.name = (char *)b->name;
  if (b->chunk) {
    m.has_chunk_size = 1;
    m.chunk_size = b->chunk;
  }
  if (ot_pb_pack(&m.base, out, out_len) != 0) return ot_error(OT_ERR_NOMEM, "out of memory");
  return OT_OK;
}

int ot_fetch_open_decode(const uint8_t *body, size_t len, ot_fetch_open_body *out) {
  ot_pb_alloc ca;
  ot_pb_alloc_init(&ca, 8192);
  Offtune__FetchOpen *m = len <= 4096 ? offtune__fetch_open__unpack(&ca.a, len, body) : NULL;
  if (!m) return ot_error(OT_ERR_FORMAT, "malformed FetchOpen");
  int rc = check_name("FetchOpen", m->name, sizeof out->name);
  if (rc == OT_OK) {
    memcpy(out->name, m->name, strlen(m->name) + 1);
    out->chunk = m->has_chunk_size ? m->chunk_size : 0;
  }
  offtune__fetch_open__free_unpacked(m, &ca.a);
  return rc;
}

int ot_fetch_info_pack(const ot_fetch_info *f, uint8_t **out, size_t *out_len) {
  Offtune__FetchInfo m = OFFTUNE__FETCH_INFO__INIT;
  m.fetch_id = (ProtobufCBinaryData){16, (uint8_t *)f->id};
  m.size = f->size;
  m.chunk_size = f->chunk;
  m.digest = (ProtobufCBinaryData){32, (uint8_t *)f->digest};
  if (ot_pb_pack(&m.base, out, out_len) != 0) return ot_error(OT_ERR_NOMEM, "out of memory");
  return OT_OK;
}

int ot_fetch_info_decode(const uint8_t *body, size_t len, ot_fetch_info *out) {
  ot_pb_alloc ca;
  ot_pb_alloc_init(&ca, 4096);
  Offtune__FetchInfo *m = len <= 1024 ? offtune__fetch_info__unpack(&ca.a, len, body) : NULL;
  if (!m) return ot_error(OT_ERR_FORMAT, "malformed FetchInfo");
  int rc = OT_OK;
  if (m->fetch_id.len != 16 || m->digest.len != 32)
    rc = ot_error(OT_ERR_FORMAT, "FetchInfo: id must be 16 bytes and digest 32");
  else {
    memcpy(out->id, m->fetch_id.data, 16);
    out->size = m->size;
    out->chunk = m->chunk_size;
    memcpy(out->digest, m->digest.data, 32);
  }
  offtune__fetch_info__free_unpacked(m, &ca.a);
  return rc;
}

int ot_fetch_chunk_pack(const uint8_t id[16], uint64_t index, uint8_t **out, size_t *out_len) {
  Offtune__FetchChunk m = OFFTUNE__FETCH_CHUNK__INIT;
  m.fetch_id = (ProtobufCBinaryData){16, (uint8_t *)id};
  m.index = index;
  if (ot_pb_pack(&m.base, out, out_len) != 0) return ot_error(OT_ERR_NOMEM, "out of memory");
  return OT_OK;
}

int ot_fetch_chunk_decode(const uint8_t *body, size_t len, uint8_t id[16], uint64_t *index) {
  ot_pb_alloc ca;
  ot_pb_alloc_init(&ca, 4096);
  Offtune__FetchChunk *m = len <= 1024 ? offtune__fetch_chunk__unpack(&ca.a, len, body) : NULL;
  if (!m) return ot_error(OT_ERR_FORMAT, "malformed FetchChunk");
  int rc = OT_OK;
  if (m->fetch_id.len != 16)
    rc = ot_error(OT_ERR_FORMAT, "FetchChunk: fetch id must be 16 bytes");
  else {
    memcpy(id, m->fetch_id.data, 16);
    *index = m->index;
  }
  offtune__fetch_chunk__free_unpacked(m, &ca.a);
  return rc;
}

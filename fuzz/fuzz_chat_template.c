/* libFuzzer harness: chat templates (serve/ot_chat_template.h). The input is a template, then
 * after the first 0x00 byte the messages as role 0x00 content 0x00 pairs. The template comes
 * from a model's tokenizer_config.json (the operator's files); the messages from any client.
 * A template that parses renders the messages or refuses with a detail; rendering must stay
 * within its caps (no crash, no unbounded memory or recursion, output NUL-terminated and under
 * 16 MiB). The published templates in fuzz/corpus/chat_template seed it. */
#include "ot_chat_template.h"
#include "ot_error.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  const char *d = (const char *)data;
  const char *sep = memchr(d, '\0', size);
  size_t tl = sep ? (size_t)(sep - d) : size;
  ot_chat_template *t = NULL;
  int rc = ot_chat_template_parse(d, tl, &t);
  if (rc != OT_OK) {
    if (t || !*ot_error_detail()) abort();
    return 0;
  }
  /* messages: NUL-separated role/content strings (a copy, so each is terminated) */
  size_t rest = sep ? size - tl - 1 : 0;
  char *m = malloc(rest + 2);
  if (!m) abort();
  if (rest) memcpy(m, sep + 1, rest);
  m[rest] = '\0';
  m[rest + 1] = '\0';
  ot_chat_msg msgs[16];
  size_t n = 0;
  for (size_t i = 0; i < rest && n < 16;) {
    const char *role = m + i;
    i += strlen(role) + 1;
    const char *content = i <= rest ? m + i : "";
    i += strlen(content) + 1;
    msgs[n].role = role;
    msgs[n++].content = content;
  }
  ot_chat_vars v = {"<s>", "</s>", NULL, NULL, (int)(size & 1)};
  char *out = NULL;
  size_t len = 0;
  rc = ot_chat_template_render(t, msgs, n, &v, &out, &len);
  if (rc == OT_OK) {
    if (!out || out[len] != '\0' || len > (16u << 20)) abort();
  } else {
    if (out || (rc != OT_ERR_INVALID && rc != OT_ERR_NOMEM) || !*ot_error_detail()) abort();
  }
  free(out);
  free(m);
  ot_chat_template_free(t);
  return 0;
}

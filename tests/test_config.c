/* GPT-2 config.json parsing, validation and saving. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include "ot_model_config.h"
#include "ot_error.h"
#include "ot_fileio.h"
#include "ot_test_util.h"

#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* The config.json of the real 124M GPT-2 on the Hugging Face hub. */
static const char gpt2_124m[] =
    "{\"activation_function\":\"gelu_new\",\"architectures\":[\"GPT2LMHeadModel\"],\"attn_pdrop\":0.1,"
    "\"bos_token_id\":50256,\"embd_pdrop\":0.1,\"eos_token_id\":50256,\"initializer_range\":0.02,"
    "\"layer_norm_epsilon\":1e-05,\"model_type\":\"gpt2\",\"n_ctx\":1024,\"n_embd\":768,\"n_head\":12,"
    "\"n_layer\":12,\"n_positions\":1024,\"resid_pdrop\":0.1,\"summary_activation\":null,"
    "\"summary_first_dropout\":0.1,\"summary_proj_to_labels\":true,\"summary_type\":\"cls_index\","
    "\"summary_use_proj\":true,\"task_specific_params\":{\"text-generation\":{\"do_sample\":true,"
    "\"max_length\":50}},\"vocab_size\":50257}";

#define BASE "\"n_layer\":2,\"n_head\":4,\"n_embd\":64,\"vocab_size\":256,\"n_positions\":128"

static ot_model_config parse_ok(const char *json) {
  ot_model_config c;
  memset(&c, 0, sizeof c);
  int rc = ot_model_config_parse(json, strlen(json), &c);
  if (rc != OT_OK) fail_msg("%s: %s", json, ot_error_detail());
  return c;
}

/* Expects `rc`, a detail mentioning `needle`, and the output left untouched. */
static void parse_bad(const char *json, int rc, const char *needle) {
  ot_model_config c, sentinel;
  memset(&sentinel, 0x5a, sizeof sentinel);
  c = sentinel;
  ot_error_clear();
  int got = ot_model_config_parse(json, strlen(json), &c);
  if (got != rc) fail_msg("%s: got %d (%s), want %d", json, got, ot_error_detail(), rc);
  assert_memory_equal(&c, &sentinel, sizeof c);
  if (needle && !strstr(ot_error_detail(), needle))
    fail_msg("%s: detail '%s' lacks '%s'", json, ot_error_detail(), needle);
}

static void test_real_gpt2_config(void **state) {
  (void)state;
  ot_model_config c = parse_ok(gpt2_124m);
  assert_int_equal(c.n_layer, 12);
  assert_int_equal(c.n_head, 12);
  assert_int_equal(c.n_embd, 768);
  assert_int_equal(c.vocab_size, 50257);
  assert_int_equal(c.n_positions, 1024);
  assert_true(c.layer_norm_epsilon == 1e-5f);
  /* With its terminating NUL counted, too. */
  ot_model_config d;
  assert_int_equal(ot_model_config_parse(gpt2_124m, sizeof gpt2_124m, &d), OT_OK);
  assert_memory_equal(&c, &d, sizeof c);
  /* Cut short, it is not JSON. */
  assert_int_equal(ot_model_config_parse(gpt2_124m, sizeof gpt2_124m / 2, &d), OT_ERR_FORMAT);
}

static void test_variants(void **state) {
  (void)state;
  ot_model_config c = parse_ok("{" BASE "}");
  assert_int_equal(c.n_layer, 2);
  assert_int_equal(c.n_positions, 128);
  assert_true(c.layer_norm_epsilon == 1e-5f); /* default */
  /* n_ctx stands in for n_positions; n_positions wins when both are there. */
  c = parse_ok("{\"n_layer\":1,\"n_head\":1,\"n_embd\":8,\"vocab_size\":10,\"n_ctx\":77}");
  assert_int_equal(c.n_positions, 77);
  c = parse_ok("{" BASE ",\"n_ctx\":64}");
  assert_int_equal(c.n_positions, 128);
  c = parse_ok("{" BASE ",\"activation_function\":\"gelu_pytorch_tanh\",\"n_inner\":256,"
               "\"layer_norm_epsilon\":0.001,\"tie_word_embeddings\":true,\"model_type\":\"gpt2\"}");
  assert_true(c.layer_norm_epsilon == 0.001f);
  parse_ok("{" BASE ",\"n_inner\":null,\"scale_attn_weights\":true,\"reorder_and_upcast_attn\":true}");
  parse_ok("  \n{\"n_layer\":2.0,\"n_head\":4,\"n_embd\":64,\"vocab_size\":256,\"n_positions\":128}\n");
  /* Limits are inclusive. */
  parse_ok("{\"n_layer\":1024,\"n_head\":1,\"n_embd\":65536,\"vocab_size\":4194304,\"n_positions\":1048576}");
}

static void test_bad_configs(void **state) {
  (void)state;
  const int F = OT_ERR_FORMAT, R = OT_ERR_RANGE, U = OT_ERR_UNSUPPORTED, I = OT_ERR_INVALID;
  /* found by fuzz_config: a width whose derived sizes would overflow is refused by range first */
  parse_bad("{\"n_layer\":1,\"n_head\":1,\"n_embd\":555555552,\"vocab_size\":10,\"n_ctx\":16,\"n_inner\":8}",
            OT_ERR_RANGE, "n_embd");
  parse_bad("", F, "JSON");
  parse_bad("nope", F, "JSON");
  parse_bad("{" BASE, F, "JSON");
  parse_bad("[1]", F, "object");
  parse_bad("{" BASE "} {}", F, "junk");
  /* Missing or mistyped sizes. */
  parse_bad("{\"n_head\":4,\"n_embd\":64,\"vocab_size\":256,\"n_positions\":128}", F, "n_layer");
  parse_bad("{\"n_layer\":2,\"n_head\":4,\"n_embd\":64,\"vocab_size\":256}", F, "n_positions");
  parse_bad("{" BASE ",\"n_layer\":2}", F, "twice");
  parse_bad("{\"n_layer\":\"2\",\"n_head\":4,\"n_embd\":64,\"vocab_size\":256,\"n_positions\":128}", F,
            "n_layer");
  parse_bad("{\"n_layer\":2.5,\"n_head\":4,\"n_embd\":64,\"vocab_size\":256,\"n_positions\":128}", F,
            "integer");
  parse_bad("{\"n_layer\":null,\"n_head\":4,\"n_embd\":64,\"vocab_size\":256,\"n_positions\":128}", F,
            "n_layer");
  /* Out of range. */
  parse_bad("{\"n_layer\":0,\"n_head\":4,\"n_embd\":64,\"vocab_size\":256,\"n_positions\":128}", R,
            "n_layer");
  parse_bad("{\"n_layer\":-3,\"n_head\":4,\"n_embd\":64,\"vocab_size\":256,\"n_positions\":128}", R,
            "n_layer");
  parse_bad("{\"n_layer\":1025,\"n_head\":4,\"n_embd\":64,\"vocab_size\":256,\"n_positions\":128}", R,
            "n_layer");
  parse_bad("{\"n_layer\":1e20,\"n_head\":4,\"n_embd\":64,\"vocab_size\":256,\"n_positions\":128}", R,
            "n_layer");
  parse_bad("{\"n_layer\":2,\"n_head\":1,\"n_embd\":65537,\"vocab_size\":256,\"n_positions\":128}", R,
            "n_embd");
  parse_bad("{\"n_layer\":2,\"n_head\":4,\"n_embd\":64,\"vocab_size\":4194305,\"n_positions\":128}", R,
            "vocab");
  parse_bad("{\"n_layer\":2,\"n_head\":4,\"n_embd\":64,\"vocab_size\":0,\"n_positions\":128}", R, "vocab");
  parse_bad("{\"n_layer\":2,\"n_head\":4,\"n_embd\":64,\"vocab_size\":256,\"n_positions\":1048577}", R,
            "n_positions");
  parse_bad("{\"n_layer\":2,\"n_head\":0,\"n_embd\":64,\"vocab_size\":256,\"n_positions\":128}", R, "n_head");
  parse_bad("{" BASE ",\"layer_norm_epsilon\":0}", R, "epsilon");
  parse_bad("{" BASE ",\"layer_norm_epsilon\":-1e-5}", R, "epsilon");
  parse_bad("{" BASE ",\"layer_norm_epsilon\":1e-60}", R, "epsilon"); /* zero as a float */
  parse_bad("{" BASE ",\"layer_norm_epsilon\":\"1e-5\"}", F, "epsilon");
  /* Shapes we cannot run. */
  parse_bad("{\"n_layer\":2,\"n_head\":5,\"n_embd\":64,\"vocab_size\":256,\"n_positions\":128}", I,
            "divisible");
  parse_bad("{" BASE ",\"n_inner\":100}", U, "n_inner");
  parse_bad("{" BASE ",\"n_inner\":\"256\"}", F, "n_inner");
  parse_bad("{" BASE ",\"activation_function\":\"relu\"}", U, "relu");
  parse_bad("{" BASE ",\"activation_function\":\"gelu\"}", U, "gelu");
  parse_bad("{" BASE ",\"activation_function\":7}", F, "activation_function");
  /* llama is an architecture now (test_llama_ref); one that is not stays refused by name */
  parse_bad("{" BASE ",\"model_type\":\"falcon\"}", U, "falcon");
  parse_bad("{" BASE ",\"model_type\":null}", F, "model_type");
  parse_bad("{" BASE ",\"tie_word_embeddings\":false}", U, "tie_word_embeddings");
  parse_bad("{" BASE ",\"tie_word_embeddings\":1}", F, "tie_word_embeddings");
  parse_bad("{" BASE ",\"scale_attn_by_inverse_layer_idx\":true}", U, "scale_attn_by_inverse_layer_idx");
  parse_bad("{" BASE ",\"scale_attn_weights\":false}", U, "scale_attn_weights");
  parse_bad("{" BASE ",\"add_cross_attention\":true}", U, "add_cross_attention");

  ot_model_config c;
  assert_int_equal(ot_model_config_parse(NULL, 0, &c), OT_ERR_INVALID);
  assert_int_equal(ot_model_config_parse("{}", 2, NULL), OT_ERR_INVALID);
}

static void test_validate(void **state) {
  (void)state;
  ot_model_config c = {.n_layer = 12,
                       .n_head = 12,
                       .n_embd = 768,
                       .vocab_size = 50257,
                       .n_positions = 1024,
                       .layer_norm_epsilon = 1e-5f};
  assert_int_equal(ot_model_config_validate(&c), OT_OK);
  ot_model_config b = c;
  b.n_head = 7;
  assert_int_equal(ot_model_config_validate(&b), OT_ERR_INVALID);
  b = c;
  b.n_positions = 0;
  assert_int_equal(ot_model_config_validate(&b), OT_ERR_RANGE);
  b = c;
  b.layer_norm_epsilon = 0.0f / 0.0f;
  assert_int_equal(ot_model_config_validate(&b), OT_ERR_RANGE);
  assert_int_equal(ot_model_config_validate(NULL), OT_ERR_INVALID);
}

static void test_save_load(void **state) {
  (void)state;
  char *dir = ot_test_tmpdir("config_save");
  char *path = NULL;
  assert_int_equal(ot_path_join(dir, "config.json", &path), OT_OK);
  ot_model_config c = {.n_layer = 6,
                       .n_head = 8,
                       .n_embd = 512,
                       .vocab_size = 50257,
                       .n_positions = 256,
                       .layer_norm_epsilon = 1e-5f};
  assert_int_equal(ot_model_config_save(path, &c), OT_OK);
  ot_model_config d;
  memset(&d, 0, sizeof d);
  assert_int_equal(ot_model_config_load(path, &d), OT_OK);
  assert_memory_equal(&c, &d, sizeof c);

  /* What Hugging Face needs to build a GPT2LMHeadModel. */
  char *text = NULL;
  size_t len = 0;
  assert_int_equal(ot_file_read_all(path, 1 << 20, &text, &len), OT_OK);
  cJSON *j = cJSON_Parse(text);
  assert_non_null(j);
  assert_string_equal(cJSON_GetObjectItem(j, "model_type")->valuestring, "gpt2");
  assert_string_equal(cJSON_GetArrayItem(cJSON_GetObjectItem(j, "architectures"), 0)->valuestring,
                      "GPT2LMHeadModel");
  assert_string_equal(cJSON_GetObjectItem(j, "activation_function")->valuestring, "gelu_new");
  assert_int_equal(cJSON_GetObjectItem(j, "n_ctx")->valueint, 256);
  assert_int_equal(cJSON_GetObjectItem(j, "n_positions")->valueint, 256);
  assert_int_equal(cJSON_GetObjectItem(j, "n_embd")->valueint, 512);
  assert_true(cJSON_IsNull(cJSON_GetObjectItem(j, "n_inner")));
  assert_true(cJSON_IsTrue(cJSON_GetObjectItem(j, "tie_word_embeddings")));
  assert_true(cJSON_GetObjectItem(j, "resid_pdrop")->valuedouble == 0.0);
  assert_true(cJSON_GetObjectItem(j, "embd_pdrop")->valuedouble == 0.0);
  assert_true(cJSON_GetObjectItem(j, "attn_pdrop")->valuedouble == 0.0);
  cJSON_Delete(j);
  assert_non_null(strstr(text, "\"layer_norm_epsilon\":\t1e-05")); /* not 9.99999974737875e-06 */
  free(text);

  /* Python's json reads it the same way. */
  const char *py = getenv("OT_PYTHON");
  assert_int_equal(
      ot_test_system("%s -c 'import json,sys; c=json.load(open(sys.argv[1])); "
                     "assert c[\"n_layer\"]==6 and c[\"n_head\"]==8 and c[\"n_inner\"] is None "
                     "and c[\"layer_norm_epsilon\"]==1e-5 and c[\"tie_word_embeddings\"] is True' '%s'",
                     py && *py ? py : "python3", path),
      0);

  /* A bad config is refused and leaves the old file alone. */
  ot_model_config bad = c;
  bad.n_head = 3;
  assert_int_equal(ot_model_config_save(path, &bad), OT_ERR_INVALID);
  assert_int_equal(ot_model_config_load(path, &d), OT_OK);
  assert_int_equal(d.n_head, 8);

  /* Load errors name the file. */
  char *missing = NULL, *broken = NULL;
  assert_int_equal(ot_path_join(dir, "missing.json", &missing), OT_OK);
  assert_int_equal(ot_model_config_load(missing, &d), OT_ERR_NOTFOUND);
  assert_non_null(strstr(ot_error_detail(), "missing.json"));
  assert_int_equal(ot_path_join(dir, "broken.json", &broken), OT_OK);
  assert_int_equal(ot_file_write_atomic(broken, "{\"n_layer\":", 11), OT_OK);
  assert_int_equal(ot_model_config_load(broken, &d), OT_ERR_FORMAT);
  assert_non_null(strstr(ot_error_detail(), "broken.json"));
  assert_int_equal(ot_file_write_atomic(broken, gpt2_124m, sizeof gpt2_124m - 1), OT_OK);
  assert_int_equal(ot_model_config_load(broken, &d), OT_OK);
  assert_int_equal(d.n_embd, 768);
  free(broken);
  free(missing);
  free(path);
  free(dir);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_real_gpt2_config), cmocka_unit_test(test_variants),
      cmocka_unit_test(test_bad_configs),      cmocka_unit_test(test_validate),
      cmocka_unit_test(test_save_load),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}

/* The shipped default base models (models/brown-llama-16x128, the main job's, and
 * models/brown-8x128) load and still score what their model card says on held-out documents,
 * so a damaged or silently replaced file is caught. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "ot_test_util.h"

static void check_genre(const char *model, const char *genre, double want_ppl) {
  char *dir = ot_test_tmpdir("default_model");
  static char out[1 << 16];
  const char *bin = ot_test_binary_dir();
  int rc = ot_test_run(out, sizeof out,
                       "%s/cloud/offtune-cloud corpus --genres %s --part heldout --out %s/heldout.txt", bin,
                       genre, dir);
  assert_int_equal(rc, 0);
  rc = ot_test_run(out, sizeof out,
                   "%s/cloud/offtune-cloud eval --model %s/models/%s --text %s/heldout.txt --json", bin,
                   ot_test_source_dir(), model, dir);
  if (rc != 0) fprintf(stderr, "%s\n", out);
  assert_int_equal(rc, 0);
  double loss, tokens;
  ot_test_eval_json(out, genre, &loss, &tokens);
  /* The card's figures are to 4 significant digits; a changed weight file moves them more. */
  if (fabs(exp(loss) - want_ppl) / want_ppl >= 5e-4)
    fail_msg("%s on %s: perplexity %.3f, the model card says %.2f", model, genre, exp(loss), want_ppl);
  free(dir);
}

static void test_pretrain_heldout(void **state) {
  (void)state;
  check_genre("brown-8x128", "pretrain", 75.21);
  check_genre("brown-llama-16x128", "pretrain", 89.33);
}

static void test_private_genres(void **state) {
  (void)state;
  check_genre("brown-8x128", "romance", 75.73);
  check_genre("brown-8x128", "humor", 99.52);
  check_genre("brown-llama-16x128", "romance", 88.30);
  check_genre("brown-llama-16x128", "humor", 128.2);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_pretrain_heldout),
      cmocka_unit_test(test_private_genres),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}

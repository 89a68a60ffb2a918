/* The serving tests' fixture: a small random GPT-2 (4 blocks, 32 wide, byte vocabulary) saved
 * under tests/tmp/<name>/base, adapters of every kind made in-test on its emulator (offsite
 * off1/off2, LoRA lora1/lora2, bottleneck bn1, BitFit bf1) and ot_generate's greedy completions of
 * each prompt on each adapter-applied model. Include after the cmocka prelude. */
#ifndef SERVE_FIXTURE_H
#define SERVE_FIXTURE_H

#include <stdint.h>

#include "ot_emulator.h"
#include "ot_model.h"
#include "ot_serve_engine.h"
#include "ot_tokenizer.h"

#define N_MODELS 7
#define N_PROMPTS 3
#define GEN 24

extern const char *models[N_MODELS]; /* "" = base */
extern const char *prompts[N_PROMPTS];
extern char *dir;
extern char digest[OT_DIGEST_HEX];
extern ot_backend *be;
extern ot_model *base;
extern ot_model *ref[N_MODELS];            /* base + adapter applied, prepared for generation */
extern int32_t *want[N_MODELS][N_PROMPTS]; /* ot_generate greedy completions (GEN tokens) */
extern ot_tokenizer *tok;

int serve_fixture_setup(const char *name);
int serve_fixture_teardown(void);
int32_t *encode(const char *s, size_t *n);
/* Adapter name -> dir/<name> (an ot_serve_resolve_fn). */
int resolve(void *user, const char *name, char *out, size_t cap);
/* An engine over the fixture's base (fails the test on error). */
ot_serve_engine *engine(int max_batch, int step_tokens, size_t budget, int32_t eos);

#endif

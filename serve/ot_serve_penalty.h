/* OpenAI's logit adjustments before sampling, as the serving engine applies them to each
 * request's next-token logits:
 *   logit[j] += bias[j] - frequency_penalty * c[j] - presence_penalty * (c[j] > 0)
 * where c[j] counts token j in the request's completion so far (not its prompt: as OpenAI and
 * vLLM define it) and bias is the request's logit_bias. Separate from the forward code. */
#ifndef OT_SERVE_PENALTY_H
#define OT_SERVE_PENALTY_H

#include <stddef.h>
#include <stdint.h>

typedef struct {
  int32_t token;
  float bias; /* added to the token's logit; OpenAI's range [-100, 100] */
} ot_serve_logit_bias;

/* Adjusts logits[V] in place. completion[n] are the tokens generated so far; count is scratch
 * of V ints, all zero on entry and left all zero. Tokens outside [0, V) are ignored. */
void ot_serve_adjust_logits(float *logits, int V, const int32_t *completion, int n, float presence_penalty,
                            float frequency_penalty, const ot_serve_logit_bias *bias, int n_bias, int *count);

#endif

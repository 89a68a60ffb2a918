#include "ot_serve_penalty.h"

void ot_serve_adjust_logits(float *logits, int V, const int32_t *completion, int n, float presence_penalty,
                            float frequency_penalty, const ot_serve_logit_bias *bias, int n_bias,
                            int *count) {
  for (int i = 0; i < n_bias; i++)
    if (bias[i].token >= 0 && bias[i].token < V) logits[bias[i].token] += bias[i].bias;
  if (presence_penalty == 0.0f && frequency_penalty == 0.0f) return;
  for (int i = 0; i < n; i++)
    if (completion[i] >= 0 && completion[i] < V) count[completion[i]]++;
  /* each distinct token once: its count is cleared when it is applied */
  for (int i = 0; i < n; i++) {
    int32_t t = completion[i];
    if (t < 0 || t >= V || count[t] == 0) continue;
    logits[t] -= frequency_penalty * (float)count[t] + presence_penalty;
    count[t] = 0;
  }
}

/* Per-architecture tensor tables (the way llama.cpp's llama-arch names every tensor of every
 * architecture in one place): block roles, their Hugging Face names and the PEFT module path
 * of each linear site. The block code (ot_model.c) reads nothing architecture-specific but
 * this table and the config. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ot_error.h"
#include "ot_model.h"

static const ot_arch_info gpt2_info = {
    .block_prefix = "transformer.h.",
    .role_names =
        {
            [OT_R_ATTN_NORM] = "ln_1.weight",
            [OT_R_ATTN_NORM_B] = "ln_1.bias",
            [OT_R_QKV] = "attn.c_attn.weight",
            [OT_R_QKV_B] = "attn.c_attn.bias",
            [OT_R_O] = "attn.c_proj.weight",
            [OT_R_O_B] = "attn.c_proj.bias",
            [OT_R_FFN_NORM] = "ln_2.weight",
            [OT_R_FFN_NORM_B] = "ln_2.bias",
            [OT_R_UP] = "mlp.c_fc.weight",
            [OT_R_UP_B] = "mlp.c_fc.bias",
            [OT_R_DOWN] = "mlp.c_proj.weight",
            [OT_R_DOWN_B] = "mlp.c_proj.bias",
        },
    .site_modules =
        {
            [OT_SITE_QKV] = "attn.c_attn",
            [OT_SITE_O] = "attn.c_proj",
            [OT_SITE_UP] = "mlp.c_fc",
            [OT_SITE_DOWN] = "mlp.c_proj",
        },
};

/* Llama 2/3, Mistral and Qwen2 share names; which biases exist comes from the config. */
static const ot_arch_info llama_info = {
    .block_prefix = "model.layers.",
    .role_names =
        {
            [OT_R_ATTN_NORM] = "input_layernorm.weight",
            [OT_R_Q] = "self_attn.q_proj.weight",
            [OT_R_Q_B] = "self_attn.q_proj.bias",
            [OT_R_K] = "self_attn.k_proj.weight",
            [OT_R_K_B] = "self_attn.k_proj.bias",
            [OT_R_V] = "self_attn.v_proj.weight",
            [OT_R_V_B] = "self_attn.v_proj.bias",
            [OT_R_O] = "self_attn.o_proj.weight",
            [OT_R_O_B] = "self_attn.o_proj.bias",
            [OT_R_FFN_NORM] = "post_attention_layernorm.weight",
            [OT_R_GATE] = "mlp.gate_proj.weight",
            [OT_R_UP] = "mlp.up_proj.weight",
            [OT_R_DOWN] = "mlp.down_proj.weight",
        },
    .site_modules =
        {
            [OT_SITE_Q] = "self_attn.q_proj",
            [OT_SITE_K] = "self_attn.k_proj",
            [OT_SITE_V] = "self_attn.v_proj",
            [OT_SITE_O] = "self_attn.o_proj",
            [OT_SITE_GATE] = "mlp.gate_proj",
            [OT_SITE_UP] = "mlp.up_proj",
            [OT_SITE_DOWN] = "mlp.down_proj",
        },
};

const ot_arch_info *ot_arch_get(ot_arch a) { return a == OT_ARCH_GPT2 ? &gpt2_info : &llama_info; }

unsigned ot_arch_sites(ot_arch a) {
  const ot_arch_info *in = ot_arch_get(a);
  unsigned s = 0;
  for (int i = 0; i < OT_SITE_COUNT; i++)
    if (in->site_modules[i]) s |= 1u << i;
  return s;
}

static const int site_roles[OT_SITE_COUNT][2] = {
    [OT_SITE_QKV] = {OT_R_QKV, OT_R_QKV_B}, [OT_SITE_O] = {OT_R_O, OT_R_O_B},
    [OT_SITE_UP] = {OT_R_UP, OT_R_UP_B},    [OT_SITE_DOWN] = {OT_R_DOWN, OT_R_DOWN_B},
    [OT_SITE_Q] = {OT_R_Q, OT_R_Q_B},       [OT_SITE_K] = {OT_R_K, OT_R_K_B},
    [OT_SITE_V] = {OT_R_V, OT_R_V_B},       [OT_SITE_GATE] = {OT_R_GATE, -1},
};

int ot_site_weight_role(int site) { return site >= 0 && site < OT_SITE_COUNT ? site_roles[site][0] : -1; }
int ot_site_bias_role(int site) { return site >= 0 && site < OT_SITE_COUNT ? site_roles[site][1] : -1; }

/* PEFT's rule: a target names a module equal to it or ending in ".target". Module names are
 * unique across architectures, so one list serves all of them. */
static unsigned match_target(const char *t) {
  unsigned s = 0;
  size_t lt = strlen(t);
  const ot_arch_info *all[2] = {&gpt2_info, &llama_info};
  for (int a = 0; a < 2; a++)
    for (int i = 0; i < OT_SITE_COUNT; i++) {
      const char *mod = all[a]->site_modules[i];
      if (!mod) continue;
      size_t lm = strlen(mod);
      if (strcmp(mod, t) == 0 || (lm > lt && mod[lm - lt - 1] == '.' && strcmp(mod + lm - lt, t) == 0))
        s |= 1u << i;
    }
  return s;
}

int ot_lora_parse_targets(const char *list, unsigned *sites) {
  char buf[256];
  if (!list || strlen(list) >= sizeof buf) return ot_error(OT_ERR_INVALID, "LoRA targets: a list is needed");
  snprintf(buf, sizeof buf, "%s", list);
  unsigned s = 0;
  char *save = NULL;
  for (char *t = strtok_r(buf, ",", &save); t; t = strtok_r(NULL, ",", &save)) {
    unsigned m = strcmp(t, "all") == 0 || strcmp(t, "all-linear") == 0 ? OT_SITES_ALL : match_target(t);
    if (!m)
      return ot_error(
          OT_ERR_INVALID,
          "LoRA target '%s' names no linear module (GPT-2: attn.c_attn, attn.c_proj, mlp.c_fc, "
          "mlp.c_proj; LLaMA family: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj; "
          "or all)",
          t);
    s |= m;
  }
  if (!s) return ot_error(OT_ERR_INVALID, "LoRA targets: the list is empty");
  *sites = s;
  return OT_OK;
}

int ot_lora_format_targets(unsigned sites, char *buf, size_t n) {
  if (n == 0) return ot_error(OT_ERR_INVALID, "ot_lora_format_targets: no room");
  buf[0] = '\0';
  if ((sites & OT_SITES_ALL) == OT_SITES_ALL) {
    snprintf(buf, n, "all");
    return OT_OK;
  }
  size_t len = 0;
  for (int s = 0; s < OT_SITE_COUNT; s++) {
    if (!((sites >> s) & 1)) continue;
    const char *mod = gpt2_info.site_modules[s] ? gpt2_info.site_modules[s] : llama_info.site_modules[s];
    int w = snprintf(buf + len, n - len, "%s%s", len ? "," : "", mod);
    if (w < 0 || (size_t)w >= n - len) return ot_error(OT_ERR_RANGE, "LoRA targets do not fit %zu bytes", n);
    len += (size_t)w;
  }
  return OT_OK;
}

int ot_block_tensor_split(const char *name, int *layer, const char **rest) {
  const ot_arch_info *all[2] = {&gpt2_info, &llama_info};
  const char *n = name;
  for (int a = 0; a < 2; a++) {
    const char *pre = all[a]->block_prefix;
    size_t lp = strlen(pre);
    /* GPT-2 checkpoints also come without the "transformer." prefix */
    if (a == 0 && strncmp(n, "h.", 2) == 0) {
      pre = "h.";
      lp = 2;
    }
    if (strncmp(n, pre, lp) != 0) continue;
    const char *p = n + lp;
    if (*p < '0' || *p > '9') return 0;
    char *end = NULL;
    long l = strtol(p, &end, 10);
    if (*end != '.' || l < 0 || l > 1 << 20 || end[1] == '\0') return 0;
    *layer = (int)l;
    *rest = end + 1;
    return 1;
  }
  return 0;
}

void ot_arch_site_dims(const ot_model_config *cfg, int site, int *in, int *out) {
  int C = cfg->n_embd, F = cfg->n_ff, QW = cfg->n_head * cfg->head_dim, KW = cfg->n_kv_head * cfg->head_dim;
  int d[OT_SITE_COUNT][2] = {
      [OT_SITE_QKV] = {C, 3 * C}, [OT_SITE_O] = {QW, C}, [OT_SITE_UP] = {C, F}, [OT_SITE_DOWN] = {F, C},
      [OT_SITE_Q] = {C, QW},      [OT_SITE_K] = {C, KW}, [OT_SITE_V] = {C, KW}, [OT_SITE_GATE] = {C, F}};
  int has = site >= 0 && site < OT_SITE_COUNT && ot_arch_get(cfg->arch)->site_modules[site];
  *in = has ? d[site][0] : 0;
  *out = has ? d[site][1] : 0;
}

/* The table names a role; the LLaMA family's attention biases also need the config. */
static int role_present(const ot_model_config *cfg, int r) {
  if (r < 0 || r >= OT_R_COUNT || !ot_arch_get(cfg->arch)->role_names[r]) return 0;
  if (cfg->arch == OT_ARCH_GPT2) return 1;
  if (r == OT_R_Q_B || r == OT_R_K_B || r == OT_R_V_B) return cfg->attn_bias;
  if (r == OT_R_O_B) return cfg->o_bias;
  return 1;
}

int ot_arch_role_shape(const ot_model_config *cfg, int r, int *d0, int *d1) {
  int s0 = 0, s1 = 0, present = role_present(cfg, r);
  if (present && (r == OT_R_ATTN_NORM || r == OT_R_ATTN_NORM_B || r == OT_R_FFN_NORM || r == OT_R_FFN_NORM_B))
    s0 = cfg->n_embd;
  for (int s = 0; present && !s0 && s < OT_SITE_COUNT; s++) {
    int in, out;
    if (ot_site_weight_role(s) != r && ot_site_bias_role(s) != r) continue;
    ot_arch_site_dims(cfg, s, &in, &out);
    if (ot_site_bias_role(s) == r) {
      s0 = out;
    } else if (cfg->arch == OT_ARCH_GPT2) { /* Conv1D stores [in, out] */
      s0 = in;
      s1 = out;
    } else {
      s0 = out;
      s1 = in;
    }
  }
  if (d0) *d0 = s0;
  if (d1) *d1 = s1;
  return present;
}

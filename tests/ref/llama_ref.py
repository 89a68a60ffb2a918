#!/usr/bin/env python3
"""Independent PyTorch reference for offtune's LLaMA family (llama, qwen2, mistral), written
from the Hugging Face definitions (modeling_llama.py / modeling_qwen2.py): RMSNorm, rotary
embeddings in the rotate-half convention with rope_theta and Llama 3's rope_scaling,
grouped-query attention (repeat_kv), SwiGLU MLP, tied or untied head. For each case it writes
a Hugging Face checkpoint (config.json + model.safetensors with HF names, a sharded copy with
model.safetensors.index.json, a BF16 copy) and the float64 results: logits, loss, the gradient
of every parameter and the losses of a few AdamW steps.

Run with Debian's /usr/bin/python3 (python3-torch). Usage: llama_ref.py OUT_DIR
"""
import json
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpt2_ref import DT, write_safetensors  # noqa: E402  (the same hand-written file writer)

# name, model_type, L, NH, NKV, C, head_dim (None = C/NH), F, V, P, theta, tied, attn_bias,
# rope_scaling, B, T, seed, ignore_some_targets
CASES = [
    ("gqa", "llama", 2, 4, 2, 32, None, 48, 61, 32, 10000.0, False, False, None, 2, 9, 11, False),
    ("mha_tied", "llama", 2, 2, 2, 16, None, 40, 37, 16, 500000.0, True, False, None, 3, 7, 12, True),
    ("qwen2", "qwen2", 2, 4, 1, 32, None, 64, 53, 32, 1000000.0, False, True, None, 2, 11, 13, False),
    ("headdim_bias", "llama", 3, 4, 2, 24, 8, 40, 45, 32, 10000.0, False, True, None, 2, 6, 14, True),
    ("llama3_rope", "llama", 2, 2, 1, 16, None, 32, 41, 64, 500000.0, True, False,
     {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 16}, 1, 40, 15, False),
    ("mistral", "mistral", 2, 4, 2, 32, None, 56, 47, 24, 10000.0, False, False, None, 2, 8, 16, False),
]


def inv_freq(D, theta, scaling):
    """transformers' _compute_default_rope_parameters and _compute_llama3_parameters."""
    f = 1.0 / (theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    if scaling is None:
        return f
    factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    low_wl, high_wl = old / lo, old / hi
    wl = 2 * math.pi / f
    f_l = torch.where(wl > low_wl, f / factor, f)
    smooth = (old / wl - lo) / (hi - lo)
    smoothed = (1 - smooth) * f_l / factor + smooth * f_l
    medium = ~(wl < high_wl) & ~(wl > low_wl)
    return torch.where(medium, smoothed, f_l)


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def rms_norm(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def forward(P, idx, targets, cfg, want_logits=False):
    L, NH, NKV = cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    C, D, eps = cfg["hidden_size"], cfg["head_dim"], cfg["rms_norm_eps"]
    B, T = idx.shape
    fr = inv_freq(D, cfg["rope_theta"], cfg.get("rope_scaling"))
    ang = torch.arange(T, dtype=torch.float64)[:, None] * fr[None, :]
    emb = torch.cat((ang, ang), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    mask = torch.tril(torch.ones(T, T, dtype=torch.bool))
    bias = cfg["model_type"] == "qwen2" or cfg.get("attention_bias", False)
    x = P["model.embed_tokens.weight"][idx]
    for l in range(L):
        g = lambda n: P[f"model.layers.{l}.{n}"]
        lin = lambda h, n, b: h @ g(n + ".weight").t() + (g(n + ".bias") if b else 0)
        h = rms_norm(x, g("input_layernorm.weight"), eps)
        q = lin(h, "self_attn.q_proj", bias).view(B, T, NH, D).transpose(1, 2)
        k = lin(h, "self_attn.k_proj", bias).view(B, T, NKV, D).transpose(1, 2)
        v = lin(h, "self_attn.v_proj", bias).view(B, T, NKV, D).transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        rep = NH // NKV  # repeat_kv: query head i reads key/value head i // rep
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(D)
        att = att.masked_fill(~mask, float("-inf")).softmax(dim=-1)
        y = (att @ v).transpose(1, 2).reshape(B, T, NH * D)
        x = x + lin(y, "self_attn.o_proj", cfg["model_type"] != "qwen2" and cfg.get("attention_bias", False))
        h = rms_norm(x, g("post_attention_layernorm.weight"), eps)
        x = x + lin(F.silu(lin(h, "mlp.gate_proj", False)) * lin(h, "mlp.up_proj", False), "mlp.down_proj", False)
    x = rms_norm(x, P["model.norm.weight"], eps)
    head = P["model.embed_tokens.weight"] if cfg["tie_word_embeddings"] else P["lm_head.weight"]
    logits = x @ head.t()
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-1)
    return (loss, logits) if want_logits else loss


def param_shapes(cfg):
    L, NH, NKV, C, D, Fd, V = (cfg[k] for k in ("num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                                               "hidden_size", "head_dim", "intermediate_size", "vocab_size"))
    qb = cfg["model_type"] == "qwen2" or cfg.get("attention_bias", False)
    ob = cfg["model_type"] != "qwen2" and cfg.get("attention_bias", False)
    s = [("model.embed_tokens.weight", (V, C))]
    for l in range(L):
        p = f"model.layers.{l}."
        s += [(p + "input_layernorm.weight", (C,)), (p + "self_attn.q_proj.weight", (NH * D, C))]
        s += [(p + "self_attn.q_proj.bias", (NH * D,))] if qb else []
        s += [(p + "self_attn.k_proj.weight", (NKV * D, C))]
        s += [(p + "self_attn.k_proj.bias", (NKV * D,))] if qb else []
        s += [(p + "self_attn.v_proj.weight", (NKV * D, C))]
        s += [(p + "self_attn.v_proj.bias", (NKV * D,))] if qb else []
        s += [(p + "self_attn.o_proj.weight", (C, NH * D))]
        s += [(p + "self_attn.o_proj.bias", (C,))] if ob else []
        s += [(p + "post_attention_layernorm.weight", (C,)), (p + "mlp.gate_proj.weight", (Fd, C)),
              (p + "mlp.up_proj.weight", (Fd, C)), (p + "mlp.down_proj.weight", (C, Fd))]
    s += [("model.norm.weight", (C,))]
    if not cfg["tie_word_embeddings"]:
        s += [("lm_head.weight", (V, C))]
    return s


def make_case(out, name, mtype, L, NH, NKV, C, hd, Fd, V, Pn, theta, tied, abias, scaling, B, T, seed, ignore):
    d = os.path.join(out, name)
    os.makedirs(d, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    cfg = {"model_type": mtype, "architectures": [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                                                  "mistral": "MistralForCausalLM"}[mtype]],
           "num_hidden_layers": L, "num_attention_heads": NH, "num_key_value_heads": NKV, "hidden_size": C,
           "head_dim": hd if hd else C // NH, "intermediate_size": Fd, "vocab_size": V,
           "max_position_embeddings": Pn, "rms_norm_eps": 1e-6, "rope_theta": theta, "hidden_act": "silu",
           "tie_word_embeddings": tied, "rope_scaling": scaling, "bos_token_id": 1, "eos_token_id": [2, 3],
           "torch_dtype": "float32", "initializer_range": 0.02, "attention_dropout": 0.0}
    if mtype == "llama":
        cfg["attention_bias"] = abias
        cfg["mlp_bias"] = False
    if mtype == "qwen2":
        cfg["use_sliding_window"] = False
        cfg["sliding_window"] = 4096
    if mtype == "mistral":
        cfg["sliding_window"] = None
    shapes = param_shapes(cfg)
    P32 = {}
    for n, shp in shapes:
        if n.endswith("layernorm.weight") or n == "model.norm.weight":
            t = 1.0 + 0.1 * torch.randn(shp, generator=g)
        elif n.endswith("bias"):
            t = 0.05 * torch.randn(shp, generator=g)
        else:
            t = 0.1 * torch.randn(shp, generator=g)
        P32[n] = t.float()
    idx = torch.randint(0, V, (B, T), generator=g)
    tgt = torch.randint(0, V, (B, T), generator=g)
    if ignore:
        tgt[0, : T // 3] = -1
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f)
    st = {n: ("F32", t) for n, t in P32.items()}
    # older checkpoints carry the rotary buffer; it must be ignored
    st["model.layers.0.self_attn.rotary_emb.inv_freq"] = ("F32", inv_freq(cfg["head_dim"], theta, None).float())
    write_safetensors(os.path.join(d, "model.safetensors"), st, {"format": "pt"})
    # the same weights in two shards with an index, as save_pretrained writes large models
    sh = os.path.join(d, "sharded")
    os.makedirs(sh, exist_ok=True)
    with open(os.path.join(sh, "config.json"), "w") as f:
        json.dump(cfg, f)
    names = [n for n, _ in shapes]
    half = len(names) // 2
    files = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    wmap = {}
    for fn, ns in files.items():
        write_safetensors(os.path.join(sh, fn), {n: ("F32", P32[n]) for n in ns}, {"format": "pt"})
        wmap.update({n: fn for n in ns})
    with open(os.path.join(sh, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": 4 * sum(t.numel() for t in P32.values())}, "weight_map": wmap}, f)
    # BF16 copy, scored on the rounded weights
    bf = os.path.join(d, "bf16")
    os.makedirs(bf, exist_ok=True)
    with open(os.path.join(bf, "config.json"), "w") as f:
        json.dump(cfg, f)
    write_safetensors(os.path.join(bf, "model.safetensors"), {n: ("BF16", t) for n, t in P32.items()})
    with torch.no_grad():
        loss_bf16 = forward({n: t.to(torch.bfloat16).double() for n, t in P32.items()}, idx, tgt, cfg).reshape(1)

    P = {n: t.double().requires_grad_(True) for n, t in P32.items()}
    loss, logits = forward(P, idx, tgt, cfg, want_logits=True)
    loss.backward()
    ref = {"inputs": ("I32", idx.int()), "targets": ("I32", tgt.int()), "logits": ("F32", logits.detach()),
           "loss": ("F32", loss.detach().reshape(1)), "loss_bf16": ("F32", loss_bf16)}
    for n, _ in shapes:
        ref["grad." + n] = ("F32", P[n].grad)

    # AdamW with decoupled decay on 2-D weights, gradient clipping: 4 steps
    Q = {n: t.double().clone().requires_grad_(True) for n, t in P32.items()}
    decay = [Q[n] for n, s in shapes if len(s) == 2]
    nodecay = [Q[n] for n, s in shapes if len(s) != 2]
    opt = torch.optim.AdamW([{"params": decay}, {"params": nodecay, "weight_decay": 0.0}], lr=3e-3,
                            betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    losses = []
    for _ in range(4):
        opt.zero_grad()
        lo = forward(Q, idx, tgt, cfg)
        lo.backward()
        torch.nn.utils.clip_grad_norm_(list(Q.values()), 0.5)
        opt.step()
        losses.append(lo.item())
    with torch.no_grad():
        losses.append(forward(Q, idx, tgt, cfg).item())
    ref["adamw_losses"] = ("F32", torch.tensor(losses, dtype=torch.float64))
    write_safetensors(os.path.join(d, "ref.safetensors"), ref,
                      {"n_layer": str(L), "B": str(B), "T": str(T), "adamw_lr": "3e-3", "adamw_wd": "0.1",
                       "adamw_clip": "0.5"})


def main():
    out = sys.argv[1]
    torch.manual_seed(0)
    names = []
    for c in CASES:
        make_case(out, *c)
        names.append(c[0])
    with open(os.path.join(out, "cases.txt"), "w") as f:
        f.write("\n".join(names) + "\n")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""PyTorch float64 reference for offtune's adapters on a small GPT-2 (4 blocks, adapters on
blocks 0 and 3, everything else frozen):
- lora/: LoRA on all four linear layers (r 4, alpha 8), dropout 0;
- lora_drop/: the same with dropout 0.25 at training step 3; the masks are regenerated
  from offtune's counter-based hash (ot_backend.h: ot_dropout_seed, ot_dropout_keep);
- bottleneck/: Houlsby adapters (m 4) after both output projections;
- bitfit/: only the biases (LayerNorm biases too) of blocks 0 and 3 train.
Each directory: config.json + model.safetensors (the base model) and ref.safetensors
(inputs, targets, loss, the adapter tensors under the model's names, grad.<name> for every
trainable tensor). Adapter tensors are random (B and up nonzero) so every gradient is real.

Usage: adapters_ref.py OUT_DIR (Debian /usr/bin/python3 with python3-torch)
"""
import json
import math
import os
import struct
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpt2_ref import param_shapes, write_safetensors  # noqa: E402

L, NH, C, V, Pn, B, T = 4, 2, 16, 64, 16, 2, 8
BLOCKS = (0, 3)
SITES = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
DIMS = {"attn.c_attn": (C, 3 * C), "attn.c_proj": (C, C), "mlp.c_fc": (C, 4 * C), "mlp.c_proj": (4 * C, C)}
R, ALPHA, SEED, STEP = 4, 8.0, 7, 3
M64 = (1 << 64) - 1


def mix64(z):
    z = (z + 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def f32(x):
    return struct.unpack("f", struct.pack("f", x))[0]


def dropout_mask(seed, step, site, n, p):
    s = mix64((mix64((mix64(seed) + step) & M64) + site) & M64)
    pf = f32(p)
    keep = [float((mix64(s ^ mix64(i)) >> 11) * (1.0 / 9007199254740992.0) >= pf) for i in range(n)]
    return torch.tensor(keep, dtype=torch.float64) / (1.0 - pf)


def forward(P, ext, idx, tgt, p_drop):
    """ext: name -> tensor of the adapter tensors ("h.{l}...."); returns the mean CE loss."""
    x = P["wte.weight"][idx] + P["wpe.weight"][:T]
    mask = torch.tril(torch.ones(T, T, dtype=torch.bool))
    hs = C // NH

    def lin(l, site, inp, w, b):
        out = inp @ w + b
        a = ext.get(f"h.{l}.{site}.lora_A.weight")
        if a is not None:
            bb = ext[f"h.{l}.{site}.lora_B.weight"]
            xi = inp
            if p_drop > 0:
                s = l * 4 + SITES.index(site)
                xi = inp * dropout_mask(SEED, STEP, s, inp.numel(), p_drop).view(inp.shape)
            out = out + (ALPHA / R) * (xi @ a.t() @ bb.t())
        return out

    def bottleneck(l, k, h):
        pre = f"h.{l}.adapter_{k}."
        if pre + "down.weight" not in ext:
            return h
        z = h @ ext[pre + "down.weight"] + ext[pre + "down.bias"]
        return h + F.gelu(z, approximate="tanh") @ ext[pre + "up.weight"] + ext[pre + "up.bias"]

    for l in range(L):
        g = lambda n: P[f"h.{l}.{n}"]
        h = F.layer_norm(x, (C,), g("ln_1.weight"), g("ln_1.bias"), 1e-5)
        qkv = lin(l, "attn.c_attn", h, g("attn.c_attn.weight"), g("attn.c_attn.bias"))
        q, k, v = qkv.split(C, dim=2)
        q, k, v = [t.view(B, T, NH, hs).transpose(1, 2) for t in (q, k, v)]
        att = (q @ k.transpose(-2, -1)) / math.sqrt(hs)
        att = att.masked_fill(~mask, float("-inf")).softmax(dim=-1)
        y = (att @ v).transpose(1, 2).reshape(B, T, C)
        x = x + bottleneck(l, "attn", lin(l, "attn.c_proj", y, g("attn.c_proj.weight"), g("attn.c_proj.bias")))
        h = F.layer_norm(x, (C,), g("ln_2.weight"), g("ln_2.bias"), 1e-5)
        h = F.gelu(lin(l, "mlp.c_fc", h, g("mlp.c_fc.weight"), g("mlp.c_fc.bias")), approximate="tanh")
        x = x + bottleneck(l, "mlp", lin(l, "mlp.c_proj", h, g("mlp.c_proj.weight"), g("mlp.c_proj.bias")))
    x = F.layer_norm(x, (C,), P["ln_f.weight"], P["ln_f.bias"], 1e-5)
    logits = x @ P["wte.weight"].t()
    return F.cross_entropy(logits.reshape(-1, V), tgt.reshape(-1))


def case(out, name, kind, p_drop, seed):
    d = os.path.join(out, name)
    os.makedirs(d, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    P32 = {}
    for n, shp in param_shapes(L, C, V, Pn):
        if n.endswith("ln_1.weight") or n.endswith("ln_2.weight") or n == "ln_f.weight":
            t = 1.0 + 0.1 * torch.randn(shp, generator=g)
        elif n.endswith("bias"):
            t = 0.05 * torch.randn(shp, generator=g)
        else:
            t = 0.3 * torch.randn(shp, generator=g)
        P32[n] = t.float()
    E32 = {}
    for l in BLOCKS:
        if kind == "lora":
            for s in SITES:
                fin, fout = DIMS[s]
                E32[f"h.{l}.{s}.lora_A.weight"] = (0.3 * torch.randn(R, fin, generator=g)).float()
                E32[f"h.{l}.{s}.lora_B.weight"] = (0.3 * torch.randn(fout, R, generator=g)).float()
        elif kind == "bottleneck":
            for k in ("attn", "mlp"):
                pre = f"h.{l}.adapter_{k}."
                E32[pre + "down.weight"] = (0.3 * torch.randn(C, 4, generator=g)).float()
                E32[pre + "down.bias"] = (0.1 * torch.randn(4, generator=g)).float()
                E32[pre + "up.weight"] = (0.3 * torch.randn(4, C, generator=g)).float()
                E32[pre + "up.bias"] = (0.1 * torch.randn(C, generator=g)).float()
    idx = torch.randint(0, V, (B, T), generator=g)
    tgt = torch.randint(0, V, (B, T), generator=g)
    cfg = {"model_type": "gpt2", "n_layer": L, "n_head": NH, "n_embd": C, "vocab_size": V, "n_positions": Pn,
           "n_ctx": Pn, "layer_norm_epsilon": 1e-5, "activation_function": "gelu_new", "n_inner": None}
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f)
    write_safetensors(os.path.join(d, "model.safetensors"), {"transformer." + n: ("F32", t) for n, t in P32.items()})
    P = {n: t.double() for n, t in P32.items()}
    E = {n: t.double().requires_grad_(True) for n, t in E32.items()}
    train = list(E)
    if kind == "bitfit":
        for n in P:
            if n.endswith("bias") and any(n.startswith(f"h.{l}.") for l in BLOCKS):
                P[n] = P[n].clone().requires_grad_(True)
                train.append(n)
    loss = forward(P, E, idx, tgt, p_drop)
    loss.backward()
    ref = {"inputs": ("I32", idx.int()), "targets": ("I32", tgt.int()), "loss": ("F32", loss.detach().reshape(1))}
    for n, t in E32.items():
        ref["transformer." + n] = ("F32", t)
    for n in train:
        ref["grad.transformer." + n] = ("F32", (E[n] if n in E else P[n]).grad)
    write_safetensors(os.path.join(d, "ref.safetensors"), ref)


def main():
    out = sys.argv[1]
    case(out, "lora", "lora", 0.0, 11)
    case(out, "lora_drop", "lora", 0.25, 12)
    case(out, "bottleneck", "bottleneck", 0.0, 13)
    case(out, "bitfit", "bitfit", 0.0, 14)


if __name__ == "__main__":
    main()

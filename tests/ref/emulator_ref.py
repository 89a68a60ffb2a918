#!/usr/bin/env python3
"""PyTorch float64 reference for the Offsite-Tuning emulator's distillation:
- kd/ref.safetensors: the hidden-state KD loss mean(((t - s) / rms(t))^2) and its gradient
  with respect to s, on random tensors;
- distill/: a tiny full model (checkpoint) and the loss (CE + 30 KD), its parts and the
  gradient of every trainable tensor of the emulator (bottom 2, top 2, keep 1 of the 2
  middle blocks) built from it: only the kept middle block trains.

Usage: emulator_ref.py OUT_DIR (Debian /usr/bin/python3 with python3-torch)
"""
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpt2_ref import block, param_shapes, write_safetensors  # noqa: E402

KD_EPS = 1e-6
KD_WEIGHT = 30.0


def kd_loss(s, t):
    rms = t.pow(2).mean(dim=-1, keepdim=True).sqrt() + KD_EPS
    return ((t - s) / rms).pow(2).mean()


def forward(P, blocks, idx, NH):
    """blocks: full-model block indices to run in order; returns hidden after each, logits."""
    T = idx.shape[1]
    C = P["wte.weight"].shape[1]
    x = P["wte.weight"][idx] + P["wpe.weight"][:T]
    hs = []
    for b in blocks:
        x = block(P, f"h.{b}.", x, NH)
        hs.append(x)
    x = F.layer_norm(x, (C,), P["ln_f.weight"], P["ln_f.bias"], 1e-5)
    return hs, x @ P["wte.weight"].t()


def kd_case(out):
    d = os.path.join(out, "kd")
    os.makedirs(d, exist_ok=True)
    g = torch.Generator().manual_seed(5)
    N, C = 11, 24
    t = (torch.randn(N, C, generator=g) * torch.linspace(0.2, 3.0, N).unsqueeze(1)).float()
    s = (t + 0.3 * torch.randn(N, C, generator=g)).float()
    sd = s.double().requires_grad_(True)
    loss = KD_WEIGHT * kd_loss(sd, t.double())
    loss.backward()
    write_safetensors(os.path.join(d, "ref.safetensors"),
                      {"s": ("F32", s), "t": ("F32", t), "kd": ("F32", (loss / KD_WEIGHT).detach().reshape(1)),
                       "grad_s": ("F32", sd.grad)})


def distill_case(out):
    d = os.path.join(out, "distill")
    os.makedirs(d, exist_ok=True)
    L, NH, C, V, Pn, B, T = 6, 2, 16, 256, 16, 2, 8  # V: the byte tokenizer of the package test
    g = torch.Generator().manual_seed(9)
    P32 = {}
    for n, shp in param_shapes(L, C, V, Pn):
        if n.endswith("ln_1.weight") or n.endswith("ln_2.weight") or n == "ln_f.weight":
            t = 1.0 + 0.1 * torch.randn(shp, generator=g)
        elif n.endswith("bias"):
            t = 0.05 * torch.randn(shp, generator=g)
        else:
            t = 0.3 * torch.randn(shp, generator=g)
        P32[n] = t.float()
    idx = torch.randint(0, V, (B, T), generator=g)
    tgt = torch.randint(0, V, (B, T), generator=g)
    cfg = {"model_type": "gpt2", "n_layer": L, "n_head": NH, "n_embd": C, "vocab_size": V, "n_positions": Pn,
           "n_ctx": Pn, "layer_norm_epsilon": 1e-5, "activation_function": "gelu_new", "n_inner": None}
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f)
    write_safetensors(os.path.join(d, "model.safetensors"), {"transformer." + n: ("F32", t) for n, t in P32.items()})

    P = {n: t.double() for n, t in P32.items()}
    with torch.no_grad():
        ht, _ = forward(P, range(L), idx, NH)
    h_teacher = ht[3]  # top of the middle: full block a+n-1 = 3
    # emulator: blocks 0, 1 (bottom), 2 (kept middle), 4, 5 (top); only block 2 trains
    S = dict(P)
    for n in list(S):
        if n.startswith("h.2."):
            S[n] = S[n].clone().requires_grad_(True)
    hs, logits = forward(S, [0, 1, 2, 4, 5], idx, NH)
    ce = F.cross_entropy(logits.reshape(-1, V), tgt.reshape(-1))
    kd = kd_loss(hs[2], h_teacher)
    loss = ce + KD_WEIGHT * kd
    loss.backward()
    ref = {"inputs": ("I32", idx.int()), "targets": ("I32", tgt.int()), "loss": ("F32", loss.detach().reshape(1)),
           "ce": ("F32", ce.detach().reshape(1)), "kd": ("F32", kd.detach().reshape(1))}
    for n in S:
        if n.startswith("h.2."):
            ref["grad.transformer." + n] = ("F32", S[n].grad)  # emulator block 2 = full block 2
    write_safetensors(os.path.join(d, "ref.safetensors"), ref)


def main():
    out = sys.argv[1]
    kd_case(out)
    distill_case(out)


if __name__ == "__main__":
    main()

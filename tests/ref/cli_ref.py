#!/usr/bin/env python3
"""PyTorch reference for the offtune-cloud command contracts (tests/test_cloud_cli.c):
the eval windowing and the finetune batch order. Writes a small byte-vocabulary model,
a token file, and the float64 results PyTorch computes. Usage: cli_ref.py OUT_DIR"""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpt2_ref import gpt2_loss, param_shapes, write_safetensors  # noqa: E402

L, NH, C, V, P = 2, 2, 32, 256, 32
N_TOKENS, EVAL_T = 200, 24
FT_B, FT_T, FT_STEPS, FT_LR, FT_TOKENS = 2, 8, 3, 0.05, 40


def eval_windows(params, ids, T):
    """Mean NLL over windows k: inputs ids[kT:kT+T], targets ids[kT+1:kT+T+1]."""
    total, count, k = 0.0, 0, 0
    while k * T + 1 < len(ids):
        x = ids[k * T: k * T + T]
        y = ids[k * T + 1: k * T + T + 1]
        x = x[: len(y)]
        loss = gpt2_loss(params, x.view(1, -1), y.view(1, -1), L, NH)
        total += loss.item() * len(y)
        count += len(y)
        k += 1
    return total / count, count


def main():
    out = sys.argv[1]
    model = os.path.join(out, "model")
    os.makedirs(model, exist_ok=True)
    g = torch.Generator().manual_seed(11)
    P32 = {}
    for n, shp in param_shapes(L, C, V, P):
        if n.endswith("weight") and ("ln_" in n):
            t = 1.0 + 0.1 * torch.randn(shp, generator=g)
        elif n.endswith("bias"):
            t = 0.05 * torch.randn(shp, generator=g)
        else:
            t = 0.08 * torch.randn(shp, generator=g)
        P32[n] = t.float()
    cfg = {"model_type": "gpt2", "n_layer": L, "n_head": NH, "n_embd": C, "vocab_size": V, "n_positions": P,
           "layer_norm_epsilon": 1e-5, "activation_function": "gelu_new"}
    with open(os.path.join(model, "config.json"), "w") as f:
        json.dump(cfg, f)
    with open(os.path.join(model, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "offtune-byte"}, f)
    write_safetensors(os.path.join(model, "model.safetensors"), {n: ("F32", t) for n, t in P32.items()})
    ids = torch.randint(0, V, (N_TOKENS,), generator=g)
    with open(os.path.join(out, "tokens.txt"), "w") as f:
        f.write(" ".join(str(int(i)) for i in ids) + "\n")

    Pd = {n: t.double() for n, t in P32.items()}
    with torch.no_grad():
        eval_loss, eval_count = eval_windows(Pd, ids, EVAL_T)

    # finetune: plain SGD over the sequential batch order, wrapping to 0
    ft = ids[:FT_TOKENS]
    Q = {n: t.double().clone().requires_grad_(True) for n, t in P32.items()}
    p = 0
    for _ in range(FT_STEPS):
        if FT_TOKENS - p < FT_B * FT_T + 1:
            p = 0
        chunk = ft[p: p + FT_B * FT_T + 1]
        x = chunk[:-1].view(FT_B, FT_T)
        y = chunk[1:].view(FT_B, FT_T)
        loss = gpt2_loss(Q, x, y, L, NH)
        for t in Q.values():
            t.grad = None
        loss.backward()
        with torch.no_grad():
            for t in Q.values():
                t -= FT_LR * t.grad
        p += FT_B * FT_T
    with open(os.path.join(out, "ft_tokens.txt"), "w") as f:
        f.write(" ".join(str(int(i)) for i in ft) + "\n")
    with torch.no_grad():
        ft_loss, _ = eval_windows({n: t.detach() for n, t in Q.items()}, ids, EVAL_T)
    json.dump({"eval_loss": eval_loss, "eval_tokens": eval_count, "eval_T": EVAL_T, "ft_B": FT_B, "ft_T": FT_T,
               "ft_steps": FT_STEPS, "ft_lr": FT_LR, "ft_eval_loss": ft_loss},
              open(os.path.join(out, "ref.json"), "w"))


if __name__ == "__main__":
    main()

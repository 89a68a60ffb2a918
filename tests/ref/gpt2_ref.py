#!/usr/bin/env python3
"""Independent PyTorch reference for offtune's GPT-2: writes, for each case, a
Hugging Face style checkpoint (config.json + model.safetensors, written by hand here)
and the float64 results PyTorch computes on it: logits, loss, the gradient of every
parameter, and the losses of a few AdamW / SGD steps.

Run with Debian's /usr/bin/python3 (python3-torch). Usage: gpt2_ref.py OUT_DIR
"""
import json
import math
import os
import struct
import sys

import torch
import torch.nn.functional as F

# name, n_layer, n_head, n_embd, vocab, n_positions, B, T, seed, ignore_some_targets
CASES = [
    ("tiny", 2, 2, 16, 37, 16, 2, 5, 1, False),
    ("onehead", 2, 1, 24, 50, 32, 3, 13, 2, True),
    ("manyheads", 3, 8, 64, 97, 64, 2, 31, 3, False),
    ("wide", 2, 4, 96, 256, 80, 2, 67, 4, True),
]
DT = {"F32": (torch.float32, 4), "F16": (torch.float16, 2), "BF16": (torch.bfloat16, 2), "I32": (torch.int32, 4)}


def write_safetensors(path, tensors, metadata=None):
    header, blobs, off = {}, [], 0
    if metadata:
        header["__metadata__"] = metadata
    for name, (dtype, t) in tensors.items():
        t = t.detach().to(DT[dtype][0]).contiguous().cpu()
        raw = t.view(torch.int16).numpy().tobytes() if DT[dtype][1] == 2 else t.numpy().tobytes()
        header[name] = {"dtype": dtype, "shape": list(t.shape), "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    h = json.dumps(header).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


def param_shapes(L, C, V, P):
    s = [("wte.weight", (V, C)), ("wpe.weight", (P, C))]
    for l in range(L):
        p = f"h.{l}."
        s += [(p + "ln_1.weight", (C,)), (p + "ln_1.bias", (C,)),
              (p + "attn.c_attn.weight", (C, 3 * C)), (p + "attn.c_attn.bias", (3 * C,)),
              (p + "attn.c_proj.weight", (C, C)), (p + "attn.c_proj.bias", (C,)),
              (p + "ln_2.weight", (C,)), (p + "ln_2.bias", (C,)),
              (p + "mlp.c_fc.weight", (C, 4 * C)), (p + "mlp.c_fc.bias", (4 * C,)),
              (p + "mlp.c_proj.weight", (4 * C, C)), (p + "mlp.c_proj.bias", (C,))]
    s += [("ln_f.weight", (C,)), ("ln_f.bias", (C,))]
    return s


def block(P, pre, x, NH, eps=1e-5):
    """One GPT-2 block whose tensors are P[pre + name] (pre = "h.{l}.")."""
    B, T, C = x.shape
    hs = C // NH
    g = lambda n: P[pre + n]
    mask = torch.tril(torch.ones(T, T, dtype=torch.bool))
    h = F.layer_norm(x, (C,), g("ln_1.weight"), g("ln_1.bias"), eps)
    qkv = h @ g("attn.c_attn.weight") + g("attn.c_attn.bias")
    q, k, v = qkv.split(C, dim=2)
    q, k, v = [t.view(B, T, NH, hs).transpose(1, 2) for t in (q, k, v)]
    att = (q @ k.transpose(-2, -1)) / math.sqrt(hs)
    att = att.masked_fill(~mask, float("-inf")).softmax(dim=-1)
    y = (att @ v).transpose(1, 2).reshape(B, T, C)
    x = x + y @ g("attn.c_proj.weight") + g("attn.c_proj.bias")
    h = F.layer_norm(x, (C,), g("ln_2.weight"), g("ln_2.bias"), eps)
    h = F.gelu(h @ g("mlp.c_fc.weight") + g("mlp.c_fc.bias"), approximate="tanh")
    return x + h @ g("mlp.c_proj.weight") + g("mlp.c_proj.bias")


def gpt2_loss(P, idx, targets, L, NH, eps=1e-5, want_logits=False):
    B, T = idx.shape
    C = P["wte.weight"].shape[1]
    x = P["wte.weight"][idx] + P["wpe.weight"][:T]
    for l in range(L):
        x = block(P, f"h.{l}.", x, NH, eps)
    x = F.layer_norm(x, (C,), P["ln_f.weight"], P["ln_f.bias"], eps)
    logits = x @ P["wte.weight"].t()
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-1)
    return (loss, logits) if want_logits else loss


def make_case(out, name, L, NH, C, V, Pn, B, T, seed, ignore):
    d = os.path.join(out, name)
    os.makedirs(d, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    shapes = param_shapes(L, C, V, Pn)
    P32 = {}
    for n, shp in shapes:
        if n.endswith("ln_1.weight") or n.endswith("ln_2.weight") or n == "ln_f.weight":
            t = 1.0 + 0.1 * torch.randn(shp, generator=g)
        elif n.endswith("bias"):
            t = 0.05 * torch.randn(shp, generator=g)
        else:
            t = 0.08 * torch.randn(shp, generator=g)
        P32[n] = t.float()
    idx = torch.randint(0, V, (B, T), generator=g)
    tgt = torch.randint(0, V, (B, T), generator=g)
    if ignore:
        tgt[0, : T // 3] = -1
    cfg = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_layer": L, "n_head": NH, "n_embd": C,
           "vocab_size": V, "n_positions": Pn, "n_ctx": Pn, "layer_norm_epsilon": 1e-5,
           "activation_function": "gelu_new", "n_inner": None}
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f)
    # Plain GPT2Model names (no "transformer." prefix) as in the original hub files, with
    # the causal-mask buffers those files carry (h.N.attn.bias [1,1,P,P], masked_bias).
    st = {n: ("F32", t) for n, t in P32.items()}
    for l in range(L):
        st[f"h.{l}.attn.bias"] = ("F32", torch.tril(torch.ones(Pn, Pn)).view(1, 1, Pn, Pn))
        st[f"h.{l}.attn.masked_bias"] = ("F32", torch.tensor(-1e4))
    write_safetensors(os.path.join(d, "model.safetensors"), st, {"format": "pt"})
    # The same weights rounded to half precisions, each scored by PyTorch on the rounded values.
    extra = {}
    for dt in ("F16", "BF16"):
        sub = os.path.join(d, dt.lower())
        os.makedirs(sub, exist_ok=True)
        with open(os.path.join(sub, "config.json"), "w") as f:
            json.dump(cfg, f)
        # GPT2LMHeadModel names; the bf16 file also carries the tied lm_head.weight
        half = {"transformer." + n: (dt, t) for n, t in P32.items()}
        if dt == "BF16":
            half["lm_head.weight"] = (dt, P32["wte.weight"])
        write_safetensors(os.path.join(sub, "model.safetensors"), half)
        Pr = {n: t.to(DT[dt][0]).double() for n, t in P32.items()}
        with torch.no_grad():
            extra["loss_" + dt.lower()] = gpt2_loss(Pr, idx, tgt, L, NH).reshape(1)

    P = {n: t.double().requires_grad_(True) for n, t in P32.items()}
    loss, logits = gpt2_loss(P, idx, tgt, L, NH, want_logits=True)
    loss.backward()
    ref = {"inputs": ("I32", idx.int()), "targets": ("I32", tgt.int()),
           "logits": ("F32", logits.detach()), "loss": ("F32", loss.detach().reshape(1))}
    for n, t in extra.items():
        ref[n] = ("F32", t)
    for n, _ in shapes:
        ref["grad." + n] = ("F32", P[n].grad)

    # Optimizer trajectories: 4 steps each on the float64 model.
    def run_opt(make, clip):
        Q = {n: t.double().clone().requires_grad_(True) for n, t in P32.items()}
        decay = [Q[n] for n, s in shapes if len(s) == 2 and n != "wpe.weight"]
        nodecay = [Q[n] for n, s in shapes if not (len(s) == 2 and n != "wpe.weight")]
        opt = make([{"params": decay}, {"params": nodecay, "weight_decay": 0.0}])
        losses = []
        for _ in range(4):
            opt.zero_grad()
            l = gpt2_loss(Q, idx, tgt, L, NH)
            l.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(list(Q.values()), clip)
            opt.step()
            losses.append(l.item())
        with torch.no_grad():
            losses.append(gpt2_loss(Q, idx, tgt, L, NH).item())
        return torch.tensor(losses, dtype=torch.float64)

    ref["adamw_losses"] = ("F32", run_opt(
        lambda g_: torch.optim.AdamW(g_, lr=3e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1), 0.5))
    ref["sgd_losses"] = ("F32", run_opt(
        lambda g_: torch.optim.SGD(g_, lr=0.05, momentum=0.9, weight_decay=0.01), 0.0))
    write_safetensors(os.path.join(d, "ref.safetensors"), ref,
                      {"n_layer": str(L), "B": str(B), "T": str(T), "adamw_lr": "3e-3", "adamw_wd": "0.1",
                       "adamw_clip": "0.5", "sgd_lr": "0.05", "sgd_momentum": "0.9", "sgd_wd": "0.01"})


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

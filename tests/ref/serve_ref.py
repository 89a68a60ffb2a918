#!/usr/bin/env python3
"""PyTorch float64 reference for the serving engine's LoRA-per-segment batches.

Reads OUT_DIR/serve_rows.json (written by tests/test_serve.c: each row's token ids, prompt
length and adapter name, "" = base), the base model OUT_DIR/base (config.json +
model.safetensors) and the PEFT adapters OUT_DIR/<name>/ (adapter_config.json +
adapter_model.safetensors), checks each adapter's base_model_digest, and runs ONE batch of all
rows (right-padded; causal attention keeps padding out of real positions) in which every row
gets its own adapter's LoRA: out = x W + b + (alpha/r) (x A_row^T) B_row^T, the adapters stacked
and gathered per row (Punica's BGMV). Writes OUT_DIR/serve_ref.safetensors with logits.<i>
[generated, vocab]: the logits of row i at positions n_prompt-1 .. len-2, the ones the engine
sampled from.

Usage: serve_ref.py OUT_DIR (Debian /usr/bin/python3 with python3-torch)
"""
import hashlib
import json
import math
import os
import struct
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpt2_ref import write_safetensors  # noqa: E402

SITES = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
DT = {"F32": torch.float32}


def read_safetensors(path):
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    data = raw[8 + n:]
    out = {}
    for name, v in header.items():
        if name == "__metadata__":
            continue
        a, b = v["data_offsets"]
        t = torch.frombuffer(bytearray(data[a:b]), dtype=DT[v["dtype"]]).reshape(v["shape"])
        out[name] = t.to(torch.float64)
    return out


def main():
    out = sys.argv[1]
    spec = json.load(open(os.path.join(out, "serve_rows.json")))
    cfg = json.load(open(os.path.join(out, "base", "config.json")))
    L, NH, C = cfg["n_layer"], cfg["n_head"], cfg["n_embd"]
    eps = cfg.get("layer_norm_epsilon", 1e-5)
    P = {k.removeprefix("transformer."): v for k, v in read_safetensors(os.path.join(out, "base", "model.safetensors")).items()}
    rows = spec["rows"]
    names = sorted({r["adapter"] for r in rows if r["adapter"]})
    # stacked LoRA tensors per (layer, site): index 0 = no adapter (zeros)
    R = 0
    ads = {}
    for nm in names:
        d = os.path.join(out, nm)
        ac = json.load(open(os.path.join(d, "adapter_config.json")))  # PEFT's keys
        meta = json.load(open(os.path.join(d, "offtune_adapter.json")))  # offtune's
        assert meta["base_model_digest"] == spec["digest"], f"{nm}: adapter for another base"
        st_path = os.path.join(d, "adapter_model.safetensors")
        assert hashlib.blake2b(open(st_path, "rb").read(), digest_size=32).hexdigest() == meta["adapter_digest"]
        ads[nm] = (ac, read_safetensors(st_path))
        R = max(R, ac["r"])
    dims = {"attn.c_attn": (C, 3 * C), "attn.c_proj": (C, C), "mlp.c_fc": (C, 4 * C), "mlp.c_proj": (4 * C, C)}
    A, Bm = {}, {}
    for l in range(L):
        for s in SITES:
            i, o = dims[s]
            A[l, s] = torch.zeros(len(names) + 1, R, i, dtype=torch.float64)
            Bm[l, s] = torch.zeros(len(names) + 1, o, R, dtype=torch.float64)
            for j, nm in enumerate(names):
                ac, t = ads[nm]
                key = f"base_model.model.transformer.h.{l}.{s}.lora_A.weight"
                if key in t:
                    r = ac["r"]
                    A[l, s][j + 1, :r] = t[key]
                    Bm[l, s][j + 1, :, :r] = t[key.replace("lora_A", "lora_B")] * (ac["lora_alpha"] / r)
    sel = torch.tensor([names.index(r["adapter"]) + 1 if r["adapter"] else 0 for r in rows])
    T = max(len(r["ids"]) for r in rows)
    idx = torch.zeros(len(rows), T, dtype=torch.long)
    for b, r in enumerate(rows):
        idx[b, :len(r["ids"])] = torch.tensor(r["ids"])
    Bn = len(rows)
    hs = C // NH
    mask = torch.tril(torch.ones(T, T, dtype=torch.bool))

    def lin(l, s, x, w, b):
        shrink = torch.einsum("bti,bri->btr", x, A[l, s][sel])  # x A^T per row's adapter
        return x @ w + b + torch.einsum("btr,bor->bto", shrink, Bm[l, s][sel])

    x = P["wte.weight"][idx] + P["wpe.weight"][:T]
    for l in range(L):
        g = lambda n: P[f"h.{l}.{n}"]
        h = F.layer_norm(x, (C,), g("ln_1.weight"), g("ln_1.bias"), eps)
        qkv = lin(l, "attn.c_attn", h, g("attn.c_attn.weight"), g("attn.c_attn.bias"))
        q, k, v = [t.view(Bn, T, NH, hs).transpose(1, 2) for t in qkv.split(C, dim=2)]
        att = ((q @ k.transpose(-2, -1)) / math.sqrt(hs)).masked_fill(~mask, float("-inf")).softmax(dim=-1)
        y = (att @ v).transpose(1, 2).reshape(Bn, T, C)
        x = x + lin(l, "attn.c_proj", y, g("attn.c_proj.weight"), g("attn.c_proj.bias"))
        h = F.layer_norm(x, (C,), g("ln_2.weight"), g("ln_2.bias"), eps)
        h = F.gelu(lin(l, "mlp.c_fc", h, g("mlp.c_fc.weight"), g("mlp.c_fc.bias")), approximate="tanh")
        x = x + lin(l, "mlp.c_proj", h, g("mlp.c_proj.weight"), g("mlp.c_proj.bias"))
    x = F.layer_norm(x, (C,), P["ln_f.weight"], P["ln_f.bias"], eps)
    logits = x @ P["wte.weight"].t()
    res = {}
    for b, r in enumerate(rows):
        n, m = r["n_prompt"], len(r["ids"])
        res[f"logits.{b}"] = ("F32", logits[b, n - 1:m - 1])
    write_safetensors(os.path.join(out, "serve_ref.safetensors"), res)


if __name__ == "__main__":
    main()

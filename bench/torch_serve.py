#!/usr/bin/env python3
"""PyTorch competitor for bench_serve: GPT-2 generation with a KV cache (Hugging Face's
past_key_values scheme: per layer keys/values concatenated step by step), greedy, for
- R requests on one LoRA adapter in one batch (one_adapter_batch);
- R LoRA adapters one at a time, batch 1 each (lora_one_at_a_time);
- R offsite adapters (their own bottom 2 and top 2 blocks) one at a time (offsite_one_at_a_time),
which is how a server without cross-adapter batching serves many adapters. Random weights of
the same shapes as bench_serve; prints "<scenario> <tokens/s>" lines (best of --reps, and of 1 and
--threads threads).

Usage: torch_serve.py --layers 6 --embd 384 --heads 6 --vocab 50257 --requests 32 --prompt 16
       --gen 32 --rank 8 --threads 2 (Debian /usr/bin/python3 with python3-torch)
"""
import argparse
import math
import time

import torch
import torch.nn.functional as F


def make_block(C, g):
    def w(*s):
        return torch.randn(*s, generator=g) * 0.02

    return {"ln1w": torch.ones(C), "ln1b": torch.zeros(C), "qkvw": w(C, 3 * C), "qkvb": torch.zeros(3 * C),
            "projw": w(C, C), "projb": torch.zeros(C), "ln2w": torch.ones(C), "ln2b": torch.zeros(C),
            "fcw": w(C, 4 * C), "fcb": torch.zeros(4 * C), "fc2w": w(4 * C, C), "fc2b": torch.zeros(C)}


def make_lora(C, r, g):
    dims = {"qkv": (C, 3 * C), "proj": (C, C), "fc": (C, 4 * C), "fc2": (4 * C, C)}
    return {s: (torch.randn(r, i, generator=g) / math.sqrt(i), torch.randn(o, r, generator=g) * 0.02 * 2.0)
            for s, (i, o) in dims.items()}


class Model:
    def __init__(self, L, C, NH, V, P, g):
        self.L, self.C, self.NH = L, C, NH
        self.wte = torch.randn(V, C, generator=g) * 0.02
        self.wpe = torch.randn(P, C, generator=g) * 0.01
        self.blocks = [make_block(C, g) for _ in range(L)]
        self.lnfw, self.lnfb = torch.ones(C), torch.zeros(C)

    def forward(self, ids, pos0, cache, blocks, lora):
        """ids [B, T]; cache: per layer (k, v) [B, NH, t, hs] or None; lora: layer -> site -> (A, B)."""
        B, T = ids.shape
        C, NH = self.C, self.NH
        hs = C // NH
        x = self.wte[ids] + self.wpe[pos0:pos0 + T]

        def lin(l, site, h, w, b):
            out = torch.addmm(b, h.reshape(-1, h.shape[-1]), w).view(B, T, -1)
            ab = lora.get(l, {}).get(site) if lora else None
            if ab is not None:
                out = out + (h @ ab[0].t()) @ ab[1].t()
            return out

        for l in range(self.L):
            p = blocks[l]
            h = F.layer_norm(x, (C,), p["ln1w"], p["ln1b"], 1e-5)
            q, k, v = lin(l, "qkv", h, p["qkvw"], p["qkvb"]).split(C, dim=2)
            q, k, v = [t.view(B, T, NH, hs).transpose(1, 2) for t in (q, k, v)]
            if cache[l] is not None:
                k = torch.cat([cache[l][0], k], dim=2)
                v = torch.cat([cache[l][1], v], dim=2)
            cache[l] = (k, v)
            att = (q @ k.transpose(-2, -1)) / math.sqrt(hs)
            if T > 1:
                S = k.shape[2]
                mask = torch.ones(T, S, dtype=torch.bool).tril(S - T)
                att = att.masked_fill(~mask, float("-inf"))
            y = (att.softmax(dim=-1) @ v).transpose(1, 2).reshape(B, T, C)
            x = x + lin(l, "proj", y, p["projw"], p["projb"])
            h = F.layer_norm(x, (C,), p["ln2w"], p["ln2b"], 1e-5)
            h = F.gelu(lin(l, "fc", h, p["fcw"], p["fcb"]), approximate="tanh")
            x = x + lin(l, "fc2", h, p["fc2w"], p["fc2b"])
        x = F.layer_norm(x[:, -1], (C,), self.lnfw, self.lnfb, 1e-5)
        return x @ self.wte.t()

    def generate(self, prompt, gen, blocks=None, lora=None):
        blocks = blocks or self.blocks
        cache = [None] * self.L
        ids = prompt
        logits = self.forward(ids, 0, cache, blocks, lora)
        pos = ids.shape[1]
        out = []
        for _ in range(gen):
            nxt = logits.argmax(dim=-1, keepdim=True)
            out.append(nxt)
            if len(out) == gen:
                break
            logits = self.forward(nxt, pos, cache, blocks, lora)
            pos += 1
        return torch.cat(out, dim=1)


def main():
    ap = argparse.ArgumentParser()
    for k, d in [("layers", 6), ("embd", 384), ("heads", 6), ("vocab", 50257), ("requests", 32), ("prompt", 16),
                 ("gen", 32), ("rank", 8), ("threads", 2), ("reps", 2)]:
        ap.add_argument("--" + k, type=int, default=d)
    a = ap.parse_args()
    torch.set_grad_enabled(False)
    g = torch.Generator().manual_seed(0)
    L, R = a.layers, a.requests
    m = Model(L, a.embd, a.heads, a.vocab, a.prompt + a.gen, g)
    adapter_blocks = [0, 1, L - 2, L - 1]
    loras = [{l: make_lora(a.embd, a.rank, g) for l in adapter_blocks} for _ in range(R)]
    offsite = []
    for _ in range(R):
        bl = list(m.blocks)
        for l in adapter_blocks:
            bl[l] = make_block(a.embd, g)
        offsite.append(bl)
    prompt = (torch.arange(a.prompt) * 7919 % a.vocab).view(1, -1)
    best = {}

    def timed(name, fn):
        t0 = time.perf_counter()
        fn()
        tps = R * a.gen / (time.perf_counter() - t0)
        best[name] = max(best.get(name, 0.0), tps)

    # PyTorch's thread pool is slower with 2 threads than with 1 on a busy 2-core VM (barrier waits
    # on preempted threads): every scenario keeps its best over 1 and --threads threads
    for nt in sorted({1, a.threads}):
        torch.set_num_threads(nt)
        m.generate(prompt, 2, lora=loras[0])  # warm-up
        for _ in range(a.reps):
            timed("one_adapter_batch", lambda: m.generate(prompt.repeat(R, 1), a.gen, lora=loras[0]))
            timed("lora_one_at_a_time", lambda: [m.generate(prompt, a.gen, lora=lo) for lo in loras])
            timed("offsite_one_at_a_time", lambda: [m.generate(prompt, a.gen, blocks=bl) for bl in offsite])
    for k, v in best.items():
        print(f"{k} {v:.1f}", flush=True)


if __name__ == "__main__":
    main()

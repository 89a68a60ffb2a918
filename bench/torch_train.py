#!/usr/bin/env python3
"""PyTorch on the same GPT-2 training work as bench_train.c (float32, AdamW, same B, T,
random tokens); prints one JSON line. Run with Debian's /usr/bin/python3."""
import argparse
import json
import math
import resource
import time

import torch
import torch.nn.functional as F


class Block(torch.nn.Module):
    def __init__(s, C, H):
        super().__init__()
        s.H = H
        s.ln_1, s.ln_2 = torch.nn.LayerNorm(C), torch.nn.LayerNorm(C)
        s.c_attn, s.c_proj = torch.nn.Linear(C, 3 * C), torch.nn.Linear(C, C)
        s.c_fc, s.mlp_proj = torch.nn.Linear(C, 4 * C), torch.nn.Linear(4 * C, C)

    def forward(s, x):
        B, T, C = x.shape
        q, k, v = s.c_attn(s.ln_1(x)).split(C, dim=2)
        q, k, v = [t.view(B, T, s.H, C // s.H).transpose(1, 2) for t in (q, k, v)]
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(C // s.H))
        att = att.masked_fill(torch.ones(T, T, dtype=torch.bool).tril().logical_not(), float("-inf")).softmax(-1)
        x = x + s.c_proj((att @ v).transpose(1, 2).reshape(B, T, C))
        return x + s.mlp_proj(F.gelu(s.c_fc(s.ln_2(x)), approximate="tanh"))


class GPT(torch.nn.Module):
    def __init__(s, L, H, C, V, P):
        super().__init__()
        s.wte, s.wpe = torch.nn.Embedding(V, C), torch.nn.Embedding(P, C)
        s.h = torch.nn.ModuleList([Block(C, H) for _ in range(L)])
        s.ln_f = torch.nn.LayerNorm(C)

    def forward(s, idx, tgt):
        x = s.wte(idx) + s.wpe(torch.arange(idx.shape[1]))
        for b in s.h:
            x = b(x)
        logits = s.ln_f(x) @ s.wte.weight.t()
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), tgt.view(-1))


def main():
    a = argparse.ArgumentParser()
    for n, d in [("layers", 12), ("heads", 12), ("embd", 768), ("vocab", 50257), ("ctx", 1024), ("batch", 4),
                 ("seq-len", 64), ("steps", 5), ("warmup", 1), ("threads", 2)]:
        a.add_argument("--" + n, type=int, default=d)
    o = a.parse_args()
    torch.set_num_threads(o.threads)
    torch.manual_seed(0)
    m = GPT(o.layers, o.heads, o.embd, o.vocab, o.ctx)
    with torch.no_grad():  # GPT-2 init, as bench_train.c
        for n, p in m.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.02)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4, weight_decay=0.0)
    idx = torch.randint(0, o.vocab, (o.batch, o.seq_len))
    tgt = torch.randint(0, o.vocab, (o.batch, o.seq_len))
    for i in range(o.warmup + o.steps):
        if i == o.warmup:
            t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = m(idx, tgt)
        loss.backward()
        opt.step()
    dt = (time.perf_counter() - t0) / o.steps
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print(json.dumps({"impl": "pytorch " + torch.__version__, "step_s": round(dt, 4),
                      "tokens_per_s": round(o.batch * o.seq_len / dt, 1), "peak_rss_mib": round(rss, 1),
                      "loss": round(loss.item(), 4)}))


if __name__ == "__main__":
    main()

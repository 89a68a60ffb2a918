#!/usr/bin/env python3
"""PyTorch on the same GPT-2 or LLaMA training work as bench_train.c (float32, AdamW, same
B, T, random tokens); prints one JSON line. The LLaMA is a plain one in Hugging Face's
formulation (RMSNorm, rotate-half RoPE, SwiGLU, grouped-query attention by repeating k/v). Run with Debian's /usr/bin/python3 on the CPU;
on a GPU (--device cuda) any python with a CUDA build of torch. --bf16 runs the matrix
products under bf16 autocast (fp32 master weights, like OT_CUDA_BF16=1); --sdpa uses
torch's fused causal attention (flash) instead of the explicit softmax."""
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

    sdpa = False

    def forward(s, x):
        B, T, C = x.shape
        q, k, v = s.c_attn(s.ln_1(x)).split(C, dim=2)
        q, k, v = [t.view(B, T, s.H, C // s.H).transpose(1, 2) for t in (q, k, v)]
        if Block.sdpa:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(C // s.H))
            mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril().logical_not()
            y = att.masked_fill(mask, float("-inf")).softmax(-1) @ v
        x = x + s.c_proj(y.transpose(1, 2).reshape(B, T, C))
        return x + s.mlp_proj(F.gelu(s.c_fc(s.ln_2(x)), approximate="tanh"))


class GPT(torch.nn.Module):
    def __init__(s, L, H, C, V, P):
        super().__init__()
        s.wte, s.wpe = torch.nn.Embedding(V, C), torch.nn.Embedding(P, C)
        s.h = torch.nn.ModuleList([Block(C, H) for _ in range(L)])
        s.ln_f = torch.nn.LayerNorm(C)

    def forward(s, idx, tgt):
        x = s.wte(idx) + s.wpe(torch.arange(idx.shape[1], device=idx.device))
        for b in s.h:
            x = b(x)
        logits = s.ln_f(x) @ s.wte.weight.t()
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), tgt.view(-1))


class RMSNorm(torch.nn.Module):
    def __init__(s, C, eps):
        super().__init__()
        s.weight, s.eps = torch.nn.Parameter(torch.ones(C)), eps

    def forward(s, x):
        return s.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + s.eps))


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


class LlamaBlock(torch.nn.Module):
    def __init__(s, C, H, K, F_, eps):
        super().__init__()
        s.H, s.K, s.D = H, K, C // H
        s.input_layernorm, s.post_attention_layernorm = RMSNorm(C, eps), RMSNorm(C, eps)
        s.q_proj = torch.nn.Linear(C, H * s.D, bias=False)
        s.k_proj = torch.nn.Linear(C, K * s.D, bias=False)
        s.v_proj = torch.nn.Linear(C, K * s.D, bias=False)
        s.o_proj = torch.nn.Linear(H * s.D, C, bias=False)
        s.gate_proj, s.up_proj = torch.nn.Linear(C, F_, bias=False), torch.nn.Linear(C, F_, bias=False)
        s.down_proj = torch.nn.Linear(F_, C, bias=False)

    def forward(s, x, cos, sin):
        B, T, C = x.shape
        h = s.input_layernorm(x)
        q = s.q_proj(h).view(B, T, s.H, s.D).transpose(1, 2)
        k = s.k_proj(h).view(B, T, s.K, s.D).transpose(1, 2)
        v = s.v_proj(h).view(B, T, s.K, s.D).transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        k, v = k.repeat_interleave(s.H // s.K, dim=1), v.repeat_interleave(s.H // s.K, dim=1)
        if Block.sdpa:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(s.D))
            mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril().logical_not()
            y = att.masked_fill(mask, float("-inf")).softmax(-1) @ v
        x = x + s.o_proj(y.transpose(1, 2).reshape(B, T, s.H * s.D))
        h = s.post_attention_layernorm(x)
        return x + s.down_proj(F.silu(s.gate_proj(h)) * s.up_proj(h))


class Llama(torch.nn.Module):
    def __init__(s, L, H, K, C, F_, V, theta, tied, eps=1e-5):
        super().__init__()
        s.embed_tokens = torch.nn.Embedding(V, C)
        s.layers = torch.nn.ModuleList([LlamaBlock(C, H, K, F_, eps) for _ in range(L)])
        s.norm = RMSNorm(C, eps)
        s.lm_head = None if tied else torch.nn.Linear(C, V, bias=False)
        D = C // H
        s.inv_freq = 1.0 / (theta ** (torch.arange(0, D, 2, dtype=torch.float32) / D))

    def forward(s, idx, tgt):
        T = idx.shape[1]
        f = torch.outer(torch.arange(T, dtype=torch.float32, device=idx.device), s.inv_freq.to(idx.device))
        emb = torch.cat((f, f), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        x = s.embed_tokens(idx)
        for b in s.layers:
            x = b(x, cos, sin)
        x = s.norm(x)
        logits = x @ s.embed_tokens.weight.t() if s.lm_head is None else s.lm_head(x)
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), tgt.view(-1))


def main():
    a = argparse.ArgumentParser()
    for n, d in [("layers", 12), ("heads", 12), ("embd", 768), ("vocab", 50257), ("ctx", 1024), ("batch", 4),
                 ("seq-len", 64), ("steps", 5), ("warmup", 1), ("threads", 2)]:
        a.add_argument("--" + n, type=int, default=d)
    a.add_argument("--device", default="cpu")
    a.add_argument("--arch", default="gpt2", choices=["gpt2", "llama"])
    a.add_argument("--kv-heads", type=int, default=0)
    a.add_argument("--ff", type=int, default=0)
    a.add_argument("--tied", type=int, default=1)
    a.add_argument("--rope-theta", type=float, default=10000.0)
    a.add_argument("--bf16", action="store_true")
    a.add_argument("--sdpa", action="store_true")
    o = a.parse_args()
    torch.set_num_threads(o.threads)
    torch.manual_seed(0)
    dev = torch.device(o.device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("torch_train.py: --device cuda but torch sees no CUDA device")
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32, as in offtune
        torch.backends.cudnn.allow_tf32 = False
    if o.sdpa and not hasattr(F, "scaled_dot_product_attention"):
        raise SystemExit("torch_train.py: --sdpa needs torch >= 2.0 (this is %s)" % torch.__version__)
    Block.sdpa = o.sdpa
    if o.arch == "llama":
        ff = o.ff or (8 * o.embd // 3 + 15) // 16 * 16
        m = Llama(o.layers, o.heads, o.kv_heads or o.heads, o.embd, ff, o.vocab, o.rope_theta, o.tied).to(dev)
    else:
        m = GPT(o.layers, o.heads, o.embd, o.vocab, o.ctx).to(dev)
    with torch.no_grad():  # GPT-2 init, as bench_train.c
        for n, p in m.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.02)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4, weight_decay=0.0)
    idx = torch.randint(0, o.vocab, (o.batch, o.seq_len), device=dev)
    tgt = torch.randint(0, o.vocab, (o.batch, o.seq_len), device=dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    for i in range(o.warmup + o.steps):
        if i == o.warmup:
            sync()
            t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=o.bf16):
            loss = m(idx, tgt)
        loss.backward()
        opt.step()
    sync()
    dt = (time.perf_counter() - t0) / o.steps
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    r = {"impl": "pytorch " + torch.__version__, "step_s": round(dt, 4),
         "tokens_per_s": round(o.batch * o.seq_len / dt, 1), "peak_rss_mib": round(rss, 1),
         "loss": round(loss.item(), 4)}
    if dev.type == "cuda":
        r["gpu_peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    print(json.dumps(r))


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Independent PyTorch scoring of task items and supervised examples for test_task.

Writes into OUT_DIR: model/ (a random GPT-2 with offtune's byte tokenizer, ids = bytes),
task.jsonl (multiple_choice, cloze and generate items, a context longer than the window,
contexts ending in a space), task_ref.json (per item: log-likelihoods, predictions, greedy
flags and generated text; the aggregate metrics and standard errors), examples.jsonl
(prompt/completion, chat messages, text) and examples_ref.json (the mean NLL over the
completion tokens after packing into rows of T, as docs/data.md describes it).

Everything is recomputed here from the documented rules, in float64.
Usage: task_ref.py OUT_DIR
"""
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpt2_ref import gpt2_loss, param_shapes, write_safetensors  # noqa: E402

L, NH, C, V, P = 3, 2, 32, 256, 48
ROW_T = 16  # rows of the examples check


def make_model(d, g):
    os.makedirs(d, exist_ok=True)
    Pm = {}
    for n, shp in param_shapes(L, C, V, P):
        if n.endswith("ln_1.weight") or n.endswith("ln_2.weight") or n == "ln_f.weight":
            t = 1.0 + 0.1 * torch.randn(shp, generator=g)
        elif n.endswith("bias"):
            t = 0.05 * torch.randn(shp, generator=g)
        elif n == "wte.weight":
            t = 0.5 * torch.randn(shp, generator=g)  # peaked next-byte distributions: no near-ties
        else:
            t = 0.15 * torch.randn(shp, generator=g)
        Pm[n] = t.float()
    cfg = {"model_type": "gpt2", "n_layer": L, "n_head": NH, "n_embd": C, "vocab_size": V, "n_positions": P,
           "n_ctx": P, "layer_norm_epsilon": 1e-5, "activation_function": "gelu_new"}
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f)
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "offtune-byte", "vocab_size": 256}, f)
    write_safetensors(os.path.join(d, "model.safetensors"), {n: ("F32", t) for n, t in Pm.items()})
    return {n: t.double() for n, t in Pm.items()}


def logprobs(Pm, ids):
    """log-softmax [len(ids), V] of the next byte after each prefix (ids within the window)."""
    x = torch.tensor([ids])
    _, logits = gpt2_loss(Pm, x, torch.full_like(x, -1), L, NH, want_logits=True)
    return torch.log_softmax(logits[0], dim=-1)


def enc(s):
    return list(s.encode("utf-8"))


def score(Pm, ctx, cont):
    """lm-evaluation-harness: trailing whitespace of the context moves to the continuation;
    the inputs (ctx + cont)[:-1] keep their last P tokens."""
    keep = len(ctx.rstrip(" \t\n\r"))
    ctx, cont = ctx[:keep], ctx[keep:] + cont
    c, t = enc(ctx), enc(cont)
    whole = c + t
    inputs = whole[:-1]
    drop = max(0, len(inputs) - P)
    inputs = inputs[drop:]
    lp = logprobs(Pm, inputs)
    ll, greedy, gap = 0.0, True, float("inf")
    for k, tok in enumerate(t):
        pos = len(c) - 1 - drop + k
        row = lp[pos]
        ll += row[tok].item()
        top2 = torch.topk(row, 2).values
        gap = min(gap, (top2[0] - top2[1]).item())
        greedy &= int(torch.argmax(row)) == tok
    return ll, greedy, gap


def greedy_gen(Pm, ctx, n):
    ids, gap = enc(ctx), float("inf")
    out = []
    for _ in range(n):
        row = logprobs(Pm, ids[-P:])[-1]
        top2 = torch.topk(row, 2).values
        gap = min(gap, (top2[0] - top2[1]).item())
        nxt = int(torch.argmax(row))
        ids.append(nxt)
        out.append(nxt)
    return out, gap


def printable(bs):
    return all(32 <= b < 127 for b in bs)


def stat(xs):
    n = len(xs)
    p = sum(xs) / n
    return p, (math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else 0.0)


def main():
    out = sys.argv[1]
    g = torch.Generator().manual_seed(16)
    Pm = make_model(os.path.join(out, "model"), g)
    words = ["the", "river", "stone", "quiet", "bright", "seven", "garden", "under", "paper", "wind"]

    def phrase(k):
        return " ".join(words[int(i)] for i in torch.randint(0, len(words), (k,), generator=g))

    items = []
    # multiple choice: 2-4 choices, a context that ends in a space, one longer than the window
    for i in range(8):
        n_ch = 2 + i % 3
        ctx = phrase(3 + i % 4) + (" " if i % 3 == 1 else "")
        if i == 5:
            ctx = phrase(14)  # > P bytes: left truncation
        choices = []
        while len(choices) < n_ch:  # distinct choices: no exact ties
            c = (" " if not ctx.endswith(" ") else "") + phrase(1 + (len(choices) + i) % 2)
            if c not in choices:
                choices.append(c)
        items.append({"type": "multiple_choice", "context": ctx, "choices": choices, "label": i % n_ch})
    # cloze: targets that are the greedy continuation (acc 1) and targets that are not
    found = 0
    for _ in range(200):
        if found == 3:
            break
        ctx = phrase(4)
        nxt, gap = greedy_gen(Pm, ctx, 2)
        if printable(nxt) and gap > 1e-3:
            items.append({"type": "cloze", "context": ctx, "target": bytes(nxt).decode()})
            found += 1
    items.append({"type": "cloze", "context": phrase(5), "target": " river"})
    items.append({"type": "cloze", "context": phrase(70 // 6), "target": "stone"})
    # generate: greedy outputs of 4 printable bytes, as the target (match) and altered (no match)
    found = 0
    for _ in range(400):
        if found == 3:
            break
        ctx = phrase(3)
        gen, gap = greedy_gen(Pm, ctx, 4)
        if printable(gen) and gap > 1e-3 and bytes(gen).strip():
            target = bytes(gen).decode() if found != 1 else bytes(gen).decode() + "x"
            items.append({"type": "generate", "context": ctx, "target": target, "max_tokens": 4,
                          "stop": ["\n"]})
            found += 1
    assert found == 3, "no printable greedy generations found"

    ref, mc_acc, mc_norm, cz, em = [], [], [], [], []
    for it in items:
        if it["type"] == "multiple_choice":
            sc = [score(Pm, it["context"], c) for c in it["choices"]]
            lls = [s[0] for s in sc]
            norm = [ll / len(c.encode()) for ll, c in zip(lls, it["choices"])]
            pred = max(range(len(lls)), key=lambda j: (lls[j], -j))
            pred_norm = max(range(len(norm)), key=lambda j: (norm[j], -j))
            srt, srn = sorted(lls), sorted(norm)
            ref.append({"type": "multiple_choice", "loglik": lls, "pred": pred, "pred_norm": pred_norm,
                        "margin": min(srt[-1] - srt[-2], srn[-1] - srn[-2])})
            mc_acc.append(int(pred == it["label"]))
            mc_norm.append(int(pred_norm == it["label"]))
        elif it["type"] == "cloze":
            ll, greedy, gap = score(Pm, it["context"], it["target"])
            ref.append({"type": "cloze", "loglik": ll, "greedy": greedy, "margin": gap})
            cz.append(int(greedy))
        else:
            gen, gap = greedy_gen(Pm, it["context"], it["max_tokens"])
            text = bytes(gen).decode()
            ref.append({"type": "generate", "output": text, "margin": gap})
            em.append(int(text.strip() == it["target"].strip()))
    with open(os.path.join(out, "task.jsonl"), "w") as f:
        for it in items:
            f.write(json.dumps(it) + "\n")
    summary = {"n": len(items)}
    summary["acc"], summary["acc_stderr"] = stat(mc_acc)
    summary["acc_norm"], summary["acc_norm_stderr"] = stat(mc_norm)
    summary["cloze_acc"], summary["cloze_acc_stderr"] = stat(cz)
    summary["exact_match"], summary["exact_match_stderr"] = stat(em)
    with open(os.path.join(out, "task_ref.json"), "w") as f:
        json.dump({"items": ref, "summary": summary}, f, indent=1)

    # supervised examples: rendered, packed into rows of ROW_T + 1, loss on completions only
    ex = [
        {"prompt": "Q: " + phrase(3) + "\nA:", "completion": " " + phrase(2) + "\n"},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": phrase(2)},
                      {"role": "assistant", "content": phrase(2)}, {"role": "user", "content": "more"},
                      {"role": "assistant", "content": phrase(1)}]},
        {"text": phrase(2) + "."},
        {"prompt": phrase(9), "completion": " " + phrase(2)},  # longer than a row: keeps its end
        {"prompt": "x", "completion": "y"},
    ]
    seqs = []  # (ids, target flags)
    for e in ex:
        if "text" in e:
            pieces = [(e["text"], 1)]
        elif "prompt" in e:
            pieces = [(e["prompt"], 0), (e["completion"], 1)]
        else:
            head = {"system": "System:", "user": "User:", "assistant": "Assistant:"}
            pieces = []
            for m in e["messages"]:
                a = m["role"] == "assistant"
                pieces += [(head[m["role"]], 0), (" " + m["content"], a), ("\n", a)]
        ids, fl = [], []
        for text, t in pieces:
            b = enc(text)
            ids += b
            fl += [t] * len(b)
        seqs.append((ids, fl))
    W = ROW_T + 1
    rows, cur = [], []
    for ids, fl in seqs:
        if len(ids) > W:
            ids, fl = ids[-W:], fl[-W:]
        if cur and len(cur) + len(ids) > W:
            rows.append(cur)
            cur = []
        cur += [(tok, f and k > 0) for k, (tok, f) in enumerate(zip(ids, fl))]
    rows.append(cur)
    inp = torch.zeros((len(rows), ROW_T), dtype=torch.long)
    tgt = torch.full((len(rows), ROW_T), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        for p, (tok, f) in enumerate(row):
            if p < ROW_T:
                inp[r, p] = tok
            if p > 0 and f:
                tgt[r, p - 1] = tok
    _, logits = gpt2_loss(Pm, inp, tgt, L, NH, want_logits=True)
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, V), tgt.reshape(-1), ignore_index=-1,
                                            reduction="sum")
    count = int((tgt >= 0).sum())
    with open(os.path.join(out, "examples.jsonl"), "w") as f:
        for e in ex:
            f.write(json.dumps(e) + "\n")
    with open(os.path.join(out, "examples_ref.json"), "w") as f:
        json.dump({"loss": nll.item() / count, "tokens": count, "rows": len(rows), "T": ROW_T}, f)


if __name__ == "__main__":
    main()

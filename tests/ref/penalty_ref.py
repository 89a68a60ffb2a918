#!/usr/bin/env python3
"""OpenAI's logit adjustments (presence/frequency penalties over the completion's tokens,
logit_bias) computed with PyTorch, the reference for serve/ot_serve_penalty.c:
  logits[j] += bias[j] - frequency * count[j] - presence * (count[j] > 0)
Reads OUT_DIR/penalty_in.json, writes OUT_DIR/penalty_out.json."""
import json
import os
import sys

import torch

d = sys.argv[1]
with open(os.path.join(d, "penalty_in.json")) as f:
    cases = json.load(f)
out = []
for c in cases:
    logits = torch.tensor(c["logits"], dtype=torch.float64)
    V = logits.numel()
    counts = torch.bincount(torch.tensor(c["completion"], dtype=torch.long), minlength=V).to(torch.float64)
    adj = logits - c["frequency"] * counts - c["presence"] * (counts > 0).to(torch.float64)
    for tok, b in c["bias"]:
        adj[tok] += b
    out.append(adj.tolist())
with open(os.path.join(d, "penalty_out.json"), "w") as f:
    json.dump(out, f)

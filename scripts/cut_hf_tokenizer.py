#!/usr/bin/env python3
"""Cuts a SentencePiece-style BPE tokenizer.json (Llama 2's format: byte fallback, "▁") down
to a small vocabulary, the way the GPT-2 default keeps GPT-2's first merges.

Kept, in the original id order (so ids stay dense and the specials and the 256 byte tokens
keep theirs): every added token, every <0xNN> byte token, the single-character pieces of
Latin script (code points below U+0250, and "▁"), then the results of the original merges in
their order, a merge kept only when both its parts are kept, until the vocabulary has --vocab
entries. Every other character falls back to its bytes, as it does in the original for
characters outside the vocabulary. Normalizer, decoder, post-processor and added tokens are
the original's; tokenizer_config.json is copied (with --chat-template, its chat_template set).
--no-bos: add_bos_token false and no <s> in the post-processor's template (for a model trained
on running text without <s>; Hugging Face's LlamaTokenizerFast rebuilds the template from
add_bos_token, other readers take the template as written, so both are changed).

usage: cut_hf_tokenizer.py SRC_DIR OUT_DIR --vocab N [--chat-template FILE] [--no-bos]
"""
import argparse
import json
import os
import sys


def cut(tok, vocab_size):
    model = tok["model"]
    if model.get("type") != "BPE" or not model.get("byte_fallback"):
        raise SystemExit("only SentencePiece-style BPE with byte_fallback is supported")
    vocab = model["vocab"]
    merges = [m.split(" ") if isinstance(m, str) else m for m in model["merges"]]
    keep = {t["content"] for t in tok.get("added_tokens", [])}
    keep |= {s for s in vocab if len(s) == 6 and s.startswith("<0x") and s.endswith(">")}
    keep |= {s for s in vocab if len(s) == 1 and (ord(s) < 0x250 or s == "\u2581")}
    if len(keep) >= vocab_size:
        raise SystemExit(f"--vocab {vocab_size} leaves no room for merges ({len(keep)} base pieces)")
    kept_merges = []
    for a, b in merges:
        if len(keep) >= vocab_size:
            break
        if a in keep and b in keep and a + b in vocab:
            kept_merges.append((a, b))
            keep.add(a + b)
    order = sorted(keep, key=lambda s: vocab[s])
    new_vocab = {s: i for i, s in enumerate(order)}
    for t in tok.get("added_tokens", []):
        if new_vocab[t["content"]] != t["id"]:
            raise SystemExit(f"added token {t['content']!r} would move from id {t['id']}")
    model["vocab"] = new_vocab
    model["merges"] = [f"{a} {b}" for a, b in kept_merges]
    return len(new_vocab), len(kept_merges)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src")
    ap.add_argument("out")
    ap.add_argument("--vocab", type=int, required=True)
    ap.add_argument("--chat-template")
    ap.add_argument("--no-bos", action="store_true")
    a = ap.parse_args()
    with open(os.path.join(a.src, "tokenizer.json"), encoding="utf-8") as f:
        tok = json.load(f)
    n, m = cut(tok, a.vocab)
    with open(os.path.join(a.src, "tokenizer_config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    if a.no_bos:
        bos = cfg.get("bos_token")
        bos = bos.get("content") if isinstance(bos, dict) else bos
        pp = tok.get("post_processor") or {}
        if pp.get("type") != "TemplateProcessing":
            raise SystemExit("--no-bos needs a TemplateProcessing post-processor")
        for part in ("single", "pair"):
            pp[part] = [x for x in pp[part] if x.get("SpecialToken", {}).get("id") != bos]
        pp["special_tokens"].pop(bos, None)
        cfg["add_bos_token"] = False
    if a.chat_template:
        with open(a.chat_template, encoding="utf-8") as f:
            cfg["chat_template"] = f.read()
    os.makedirs(a.out, exist_ok=True)
    for name, obj in (("tokenizer.json", tok), ("tokenizer_config.json", cfg)):
        tmp = os.path.join(a.out, name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps(obj, indent=1, ensure_ascii=False) + "\n")
        os.replace(tmp, os.path.join(a.out, name))
    print(f"wrote {a.out}/tokenizer.json: vocabulary {n}, {m} merges", file=sys.stderr)


if __name__ == "__main__":
    main()

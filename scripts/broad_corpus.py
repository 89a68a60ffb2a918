#!/usr/bin/env python3
"""Broad public text for the base model's pre-training (scripts/make_default_model.sh), from
Debian packages that are none of the quality harness's held-out domains (bench/quality/corpora.py:
the Bible, The Devil's Dictionary, GCIDE/Webster 1913, the Debian Policy Manual, the Jargon File).
It gives the base some of the kinds of text those domains are (dictionary prose, technical
documentation, aphorisms) without their text, as a broad corpus does for the paper's base models.

  foldoc     Free On-line Dictionary of Computing (dict-foldoc)
  wordnet    WordNet 3.0 glosses (dict-wn)
  manpages   Linux man-pages, sections 2, 3, 5 and 7, rendered as text (manpages, manpages-dev)
  fortunes   fortune-mod's English collections (fortunes, fortunes-min), less the files and
             entries that quote Bierce or the Bible

Each source is capped at CAP bytes (evenly spaced blocks of whole lines) and normalised as the
held-out domains are. Usage: broad_corpus.py OUT.txt [--cap BYTES]"""
import argparse
import glob
import gzip
import os
import re
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench", "quality"))
import corpora  # noqa: E402  the held-out domains' reader and normaliser

FORTUNES = "/usr/share/games/fortunes"
# fortune files that quote a held-out text: "definitions" is largely The Devil's Dictionary
FORTUNE_SKIP = {"definitions"}
HELD_OUT_MARKS = re.compile(r"Bierce|Devil's Dictionary|Bible|\b[1-3]? ?[A-Z][a-z]+ \d+:\d+")


def fortunes_text():
    out = []
    for path in sorted(glob.glob(os.path.join(FORTUNES, "*"))):
        name = os.path.basename(path)
        if "." in name or name in FORTUNE_SKIP or os.path.isdir(path):
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            for entry in f.read().split("\n%\n"):
                if entry.strip() and not HELD_OUT_MARKS.search(entry):
                    out.append(entry.strip())
    return "\n\n".join(out)


def man_text():
    pages = []
    for sec in ("2", "3", "5", "7"):
        pages += sorted(glob.glob("/usr/share/man/man%s/*.%s*.gz" % (sec, sec)))
    out = []
    env = dict(os.environ, MANWIDTH="80", LC_ALL="C.UTF-8")
    for p in pages:
        with gzip.open(p, "rt", encoding="utf-8", errors="replace") as f:
            if f.read(64).startswith(".so "):  # a link to another page
                continue
        r = subprocess.run(["man", "-l", p], capture_output=True, text=True, env=env)
        if r.returncode == 0:
            out.append(re.sub(r".\x08", "", r.stdout))
    return "\n\n".join(out)


SOURCES = {
    "foldoc": ("dict-foldoc", lambda: corpora.dictd_text("/usr/share/dictd/foldoc.dict.dz")),
    "wordnet": ("dict-wn", lambda: corpora.dictd_text("/usr/share/dictd/wn.dict.dz")),
    "manpages": ("manpages, manpages-dev", man_text),
    "fortunes": ("fortunes, fortunes-min", fortunes_text),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--cap", type=int, default=1_500_000)
    a = ap.parse_args()
    parts = []
    for name, (pkg, read) in SOURCES.items():
        try:
            text = corpora.normalise(read())
        except (OSError, subprocess.CalledProcessError) as e:
            sys.exit("broad_corpus.py: %s (%s): %s; apt-get install %s" % (name, pkg, e, pkg.replace(",", "")))
        text = "".join(corpora.spread(corpora.blocks(text), a.cap))
        print("%-9s %-24s %8d bytes" % (name, pkg, len(text.encode())))
        parts.append(text)
    with open(a.out + ".tmp", "w", encoding="utf-8") as f:
        f.write("\n\n".join(parts) + "\n")
    os.replace(a.out + ".tmp", a.out)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Fails when a source file includes a project header from a layer it may not use
(docs/architecture.md: includes go downward only). Prints every crossing it finds.

  python3 scripts/check_layers.py [REPO_ROOT]
"""
import os
import re
import sys

# folder -> the folders whose headers it may include (itself always)
MAY_USE = {
    "kernels": set(),
    "common": set(),
    "protocol": {"common"},
    "fed": {"common", "protocol"},
    "model": {"common", "kernels"},
    "peft": {"common", "kernels", "model"},
    "emulator": {"common", "kernels", "model", "peft"},
    "serve": {"common", "kernels", "model", "peft", "protocol"},
    "cloud": {"common", "kernels", "model", "protocol", "fed", "peft", "emulator", "serve"},
    "device": {"common", "kernels", "model", "protocol", "fed", "peft", "emulator"},
}
# the error codes and their thread-local detail: the one header every layer shares, kernels/
# included (it depends on nothing)
BASE = {"ot_error.h"}
# generated from protocol/*.proto; built next to their users
GENERATED = {"offtune.pb-c.h": "protocol", "session.pb-c.h": "protocol", "secagg.pb-c.h": "protocol",
             "serve.pb-c.h": "protocol"}
# Crossings that exist today and are scheduled to go (issue 11: the model layer).
# (file, header): why
KNOWN = {}
SOURCES = (".c", ".h", ".cu", ".cuh")


def main():
    root = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), ".."))
    owner = dict(GENERATED)  # header name -> folder
    files = []
    for layer in MAY_USE:
        for dirpath, _, names in os.walk(os.path.join(root, layer)):
            for n in names:
                if n.endswith(SOURCES):
                    path = os.path.relpath(os.path.join(dirpath, n), root)
                    files.append((layer, path))
                    if n.endswith((".h", ".cuh")):
                        owner.setdefault(n, layer)
    bad, known_seen = [], set()
    inc = re.compile(r'^\s*#\s*include\s+"([^"]+)"')
    for layer, path in sorted(files):
        with open(os.path.join(root, path), encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, 1):
                m = inc.match(line)
                if not m:
                    continue
                header = os.path.basename(m.group(1))
                target = owner.get(header)
                if target is None or target == layer or target in MAY_USE[layer] or header in BASE:
                    continue
                if (path, header) in KNOWN:
                    known_seen.add((path, header))
                    continue
                bad.append(f"{path}:{lineno}: {layer}/ includes {header} from {target}/")
    for k in sorted(set(KNOWN) - known_seen):
        bad.append(f"{k[0]}: the known crossing to {k[1]} is gone: remove it from KNOWN in {__file__}")
    if bad:
        print("layer check: includes that cross a layer the wrong way (docs/architecture.md):")
        print("\n".join("  " + b for b in bad))
        return 1
    print(f"layer check: {len(files)} files, no include crosses a layer upward "
          f"({len(KNOWN)} known crossings, scheduled to go)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

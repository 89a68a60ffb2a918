#!/usr/bin/env python3
"""Rewrites a .cu file for the CPU emulation (cuda_emu.h): every launch
`kernel<<<config>>>(args)` becomes `ot_emu_launch(config, kernel, args)`.
Usage: cu2cpp.py IN.cu OUT.cpp"""
import re
import sys


def balanced(s, i, open_c, close_c):
    """index just past the bracket group starting at s[i] == open_c"""
    depth = 0
    for j in range(i, len(s)):
        if s[j] == open_c:
            depth += 1
        elif s[j] == close_c:
            depth -= 1
            if depth == 0:
                return j + 1
    raise SystemExit("cu2cpp: unbalanced %s at offset %d" % (open_c, i))


def kernel_start(s, i):
    """start of `name` or `name<targs>` ending at s[i-1]"""
    j = i
    if s[j - 1] == ">":  # template arguments
        depth = 0
        while True:
            j -= 1
            if s[j] == ">":
                depth += 1
            elif s[j] == "<":
                depth -= 1
                if depth == 0:
                    break
    while j > 0 and (s[j - 1].isalnum() or s[j - 1] == "_"):
        j -= 1
    return j


def main():
    src = open(sys.argv[1]).read()
    out, pos = [], 0
    for m in re.finditer(r"<<<", src):
        if m.start() < pos:
            continue
        k0 = kernel_start(src, m.start())
        end_cfg = src.index(">>>", m.end())
        lp = end_cfg + 3
        while src[lp].isspace():
            lp += 1
        rp = balanced(src, lp, "(", ")")
        kernel, cfg, args = src[k0:m.start()], src[m.end():end_cfg], src[lp + 1:rp - 1]
        out.append(src[pos:k0])
        out.append("ot_emu_launch(%s, %s%s)" % (cfg, kernel, ", " + args if args.strip() else ""))
        pos = rp
    out.append(src[pos:])
    open(sys.argv[2], "w").write('#line 1 "%s"\n' % sys.argv[1] + "".join(out))


if __name__ == "__main__":
    main()

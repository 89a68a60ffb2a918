#!/usr/bin/env python3
"""Rewrites a safetensors file with every F32 tensor stored as F16 (round to nearest even,
as numpy does); other tensors and the metadata are kept. Refuses values F16 cannot hold.

  st_to_f16.py IN OUT
"""
import json
import os
import struct
import sys

import numpy as np


def main():
    src, dst = sys.argv[1], sys.argv[2]
    with open(src, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    meta = header.pop("__metadata__", None)
    out_header, blobs, off = {}, [], 0
    for name in sorted(header, key=lambda k: header[k]["data_offsets"][0]):
        t = header[name]
        a, b = t["data_offsets"]
        raw = data[a:b]
        dtype = t["dtype"]
        if dtype == "F32":
            x = np.frombuffer(raw, dtype="<f4")
            if not np.all(np.isfinite(x)) or np.max(np.abs(x), initial=0) > 65504:
                sys.exit(f"{src}: tensor {name} does not fit in F16")
            raw = x.astype("<f2").tobytes()
            dtype = "F16"
        out_header[name] = {"dtype": dtype, "shape": t["shape"], "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    if meta is not None:
        out_header["__metadata__"] = meta
    hj = json.dumps(out_header, separators=(",", ":")).encode()
    hj += b" " * ((8 - len(hj) % 8) % 8)
    tmp = dst + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(hj)))
        f.write(hj)
        for raw in blobs:
            f.write(raw)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, dst)


if __name__ == "__main__":
    main()

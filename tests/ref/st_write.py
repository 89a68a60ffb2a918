#!/usr/bin/env python3
"""Independent safetensors reference for tests/test_safetensors.c.

Writes and reads the format by hand (struct + json), with numpy and torch doing the
fp16/bf16 rounding, so the C code is checked against code that shares nothing with it.

  st_write.py write DIR   writes DIR/ref.safetensors and DIR/ref.txt (what it holds),
                          plus DIR/conv.txt (fp32 -> fp16/bf16 rounding cases)
  st_write.py dump FILE OUT
                          validates a safetensors FILE strictly and dumps it to OUT

Dump format, one record a line:
  meta KEY VALUE
  tensor NAME DTYPE NDIM DIMS... NUMEL VALUES...   (floats as float.hex of the fp32 value)
  conv F32BITS F16BITS BF16BITS                    (hex, as torch/numpy round them)
"""
import json
import struct
import sys

import numpy as np
import torch

NP_DTYPES = {
    "F32": np.float32, "F16": np.float16, "I8": np.int8, "U8": np.uint8,
    "I32": np.int32, "I64": np.int64,
}


def fmt_value(dtype, v):
    if dtype in ("F32", "F16", "BF16"):
        return float(v).hex()
    return str(int(v))


def to_f32(dtype, raw):
    """Decodes raw little-endian bytes to a flat list of Python numbers."""
    if dtype == "BF16":
        bits = np.frombuffer(raw, dtype="<u2").astype(np.int32)
        t = torch.from_numpy(bits.astype(np.int16)).view(torch.bfloat16)
        return t.float().tolist()
    arr = np.frombuffer(raw, dtype=np.dtype(NP_DTYPES[dtype]).newbyteorder("<"))
    if dtype == "F16":
        return arr.astype(np.float32).tolist()
    return arr.tolist()


def dump_lines(header, data):
    lines = []
    meta = header.get("__metadata__") or {}
    for k, v in meta.items():
        lines.append(f"meta {k} {v}")
    entries = sorted(((k, v) for k, v in header.items() if k != "__metadata__"),
                     key=lambda kv: tuple(kv[1]["data_offsets"]))
    for name, e in entries:
        b, end = e["data_offsets"]
        vals = to_f32(e["dtype"], data[b:end])
        shape = e["shape"]
        lines.append(" ".join(["tensor", name, e["dtype"], str(len(shape))] + [str(d) for d in shape]
                              + [str(len(vals))] + [fmt_value(e["dtype"], v) for v in vals]))
    return lines


def write(outdir):
    rng = np.random.default_rng(1234)
    f16_vals = np.array([0.0, -0.0, 1.0, -2.5, 65504.0, -65504.0, 6.103515625e-05,  # max, min normal
                         5.960464477539063e-08, -5.960464477539063e-08, 3.0517578125e-05,  # subnormals
                         np.inf, -np.inf, 0.333251953125, 1000.5], dtype=np.float16)
    bf16 = torch.tensor([0.0, -0.0, 1.0, -3.140625, 3.3895313892515355e38, 1.1754943508222875e-38,
                         9.183549615799121e-41, float("inf"), float("-inf"), 1e-3, 7.0, -0.15625],
                        dtype=torch.float32).to(torch.bfloat16).reshape(3, 4)
    bf16_bytes = bf16.view(torch.int16).numpy().astype("<i2").tobytes()
    tensors = [  # (name, dtype, shape, raw bytes); data order differs from header key order on purpose
        ("transformer.wte.weight", "F32", [3, 4], rng.standard_normal(12).astype("<f4").tobytes()),
        ("h.0.f16", "F16", [2, 7], f16_vals.astype("<f2").tobytes()),
        ("h.0.bf16", "BF16", [3, 4], bf16_bytes),
        ("ids.i64", "I64", [4], np.array([-1, 0, 2**40 + 3, -(2**62)], dtype="<i8").tobytes()),
        ("ids.i32", "I32", [2, 1, 2], np.array([-7, 2**31 - 1, -(2**31), 5], dtype="<i4").tobytes()),
        ("bytes.i8", "I8", [3], np.array([-128, 0, 127], dtype="<i1").tobytes()),
        ("bytes.u8", "U8", [5], np.array([0, 1, 128, 254, 255], dtype="<u1").tobytes()),
        ("scalar", "F32", [], np.array([42.5], dtype="<f4").tobytes()),
        ("empty", "F32", [0, 3], b""),
    ]
    header = {"__metadata__": {"format": "pt", "source": "st_write.py"}}
    data = b""
    for name, dtype, shape, raw in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    # Python's json with its default ", " and ": " separators and keys sorted, as many writers do.
    hjson = json.dumps(header, sort_keys=True).encode()
    hjson += b" " * (-len(hjson) % 8)
    with open(f"{outdir}/ref.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(hjson)) + hjson + data)
    with open(f"{outdir}/ref.txt", "w") as f:
        f.write("\n".join(dump_lines(header, data)) + "\n")

    # Rounding cases: random bit patterns over the fp16 range, exact ties, and edges.
    cases = []
    for lo, hi in ((-30, 17), (-150, 128)):
        e = rng.integers(lo, hi, size=3000)
        m = rng.random(3000) + 1.0
        s = rng.choice([-1.0, 1.0], size=3000)
        cases.append((s * m * np.exp2(e)).astype(np.float32))
    h = np.arange(0, 0x7c00, 7, dtype=np.uint16).view(np.float16).astype(np.float32)
    nxt = np.nextafter(h, np.float32(np.inf))
    cases.append(((h + (np.nextafter(h.astype(np.float16), np.float16(np.inf)).astype(np.float32))) / 2)
                 .astype(np.float32))  # fp16 ties (exact in fp32)
    cases.append(nxt)
    bf_base = np.arange(0, 0x7f80, 3, dtype=np.uint32) << 16
    cases.append((bf_base | 0x8000).view(np.float32))          # bf16 ties
    cases.append((bf_base | 0x8001).view(np.float32))          # just above a tie
    cases.append(np.array([0.0, -0.0, 65504.0, 65519.99, 65520.0, 65536.0, 1e-8, 2.98e-8, 2.9802322e-8,
                           2.9802326e-8, 5.9604645e-8, 8.940697e-8, 6.1035156e-05, 6.1031e-05, np.inf,
                           -np.inf, 3.4028235e38, 1.4e-45], dtype=np.float32))
    allf = np.concatenate(cases).astype(np.float32)
    with np.errstate(over="ignore"):
        f16 = allf.astype(np.float16).view(np.uint16)
    bf = torch.from_numpy(allf.copy()).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    with open(f"{outdir}/conv.txt", "w") as f:
        for x, a, b in zip(allf.view(np.uint32), f16, bf):
            f.write(f"conv {int(x):08x} {int(a):04x} {int(b):04x}\n")


def dump(path, out):
    with open(path, "rb") as f:
        blob = f.read()
    (n,) = struct.unpack("<Q", blob[:8])
    assert n % 8 == 0, f"header length {n} is not a multiple of 8"
    raw = blob[8:8 + n]
    assert raw.rstrip(b" ").endswith(b"}"), "header is not a JSON object padded with spaces"
    assert len(raw) - len(raw.rstrip(b" ")) < 8, "more padding than needed"
    header = json.loads(raw.decode("utf-8"))
    data = blob[8 + n:]
    pos = 0
    for name, e in header.items():  # the C writer keeps insertion order, contiguous
        if name == "__metadata__":
            assert all(isinstance(v, str) for v in e.values())
            continue
        b, end = e["data_offsets"]
        assert b == pos, f"{name}: offset {b}, expected {pos}"
        numel = int(np.prod(e["shape"])) if e["shape"] else 1
        size = 2 if e["dtype"] in ("F16", "BF16") else np.dtype(NP_DTYPES[e["dtype"]]).itemsize
        assert end - b == numel * size, f"{name}: size mismatch"
        pos = end
    assert pos == len(data), "data section has trailing bytes"
    with open(out, "w") as f:
        f.write("\n".join(dump_lines(header, data)) + "\n")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "write":
        write(sys.argv[2])
    elif len(sys.argv) == 4 and sys.argv[1] == "dump":
        dump(sys.argv[2], sys.argv[3])
    else:
        sys.exit(__doc__)

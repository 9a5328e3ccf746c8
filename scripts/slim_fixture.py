#!/usr/bin/env python3
"""Slim copy of the tiny-qwen-vl fixture for a GPU machine, and back.

Python 3 standard library only (runs where the Rust toolchain is and on the
GPU machine). safetensors is an 8-byte little-endian header length, a JSON
header {name: {dtype, shape, data_offsets}} and the raw data.

  slim SRC_DIR OUT_DIR [--rows N]   write OUT_DIR (see below) from the fixture
  expand SLIM_DIR OUT_DIR           rebuild a full-shape checkpoint from it
  compare LOGITS.safetensors EXPECTED_SLIM.safetensors NAME [--row R] [--tol T]
                                    last row of `logits`[:N] vs NAME (row R);
                                    prints the relative L2 error, exit 1 above T

The slim directory holds config.json, generation_config.json, qwen.tiktoken,
the images, quantize_config.json where the fixture is int4, prompts.json (the text and image prompts' input ids and greedy
ids), expected_slim.safetensors (the reference logits' first N columns) and
model_slim.safetensors: every weight unchanged except the two 151936-row
tables, `transformer.wte.weight` (only the rows of token ids the prompts
use, with their ids in `transformer.wte.weight#rows`) and `lm_head.weight`
(rows 0..N). `expand` writes zeros for the rows left out, so the logits of
tokens below N are exactly the full checkpoint's.
"""

import json
import os
import shutil
import struct
import sys

WTE = "transformer.wte.weight"
LM = "lm_head.weight"
SIZES = {"BF16": 2, "F16": 2, "F32": 4, "I32": 4, "I64": 8}


def read_st(path):
    """Header dict (without __metadata__) and the data bytes."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    header.pop("__metadata__", None)
    return header, data


def tensor_bytes(header, data, name):
    a, b = header[name]["data_offsets"]
    return data[a:b]


def write_st(path, tensors):
    """tensors: list of (name, dtype, shape, bytes)."""
    header, off = {}, 0
    for name, dtype, shape, raw in tensors:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + len(raw)]}
        off += len(raw)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for _, _, _, raw in tensors:
            f.write(raw)


def rows_of(header, data, name, rows):
    shape = header[name]["shape"]
    width = shape[1] * SIZES[header[name]["dtype"]]
    raw = tensor_bytes(header, data, name)
    return b"".join(raw[r * width:(r + 1) * width] for r in rows)


def slim(src, out, n_rows):
    os.makedirs(out, exist_ok=True)
    exp = json.load(open(os.path.join(src, "expected.json")))
    prompts, ids = {}, set()
    for case in ("text", "img1"):
        e = exp["chat"][case]
        prompts[case] = {"input_ids": e["input_ids"], "greedy": e["greedy"]["ids"]}
        ids.update(e["input_ids"])
        ids.update(e["greedy"]["ids"])
    with open(os.path.join(out, "prompts.json"), "w") as f:
        json.dump(prompts, f)
    copy_files(src, out)

    header, data = read_st(os.path.join(src, "model.safetensors"))
    vocab = header[LM]["shape"][0]
    n_rows = min(n_rows, vocab)
    keep = sorted(ids)
    tensors = []
    for name in sorted(header):
        h = header[name]
        if name == WTE:
            raw = rows_of(header, data, name, keep)
            tensors.append((WTE, h["dtype"], [len(keep), h["shape"][1]], raw))
            tensors.append((WTE + "#rows", "I32", [len(keep)], struct.pack("<%di" % len(keep), *keep)))
        elif name == LM:
            tensors.append((LM, h["dtype"], [n_rows, h["shape"][1]], rows_of(header, data, name, range(n_rows))))
        else:
            tensors.append((name, h["dtype"], h["shape"], tensor_bytes(header, data, name)))
    write_st(os.path.join(out, "model_slim.safetensors"), tensors)
    with open(os.path.join(out, "slim.json"), "w") as f:
        json.dump({"vocab": vocab, "lm_head_rows": n_rows, "wte_rows": len(keep)}, f)

    # Reference logits, first n_rows columns: the text prompt's last row and
    # the image prompt's greedy step rows (row 0 = the prefill's last row).
    eh, ed = read_st(os.path.join(src, "expected.safetensors"))
    slices = []
    # The int4 fixture has the image prompt's last row only.
    image = "chat/img1/greedy_step_logits" if "chat/img1/greedy_step_logits" in eh else "chat/img1/last_logits"
    for name in ("chat/text/last_logits", image):
        shape = eh[name]["shape"]
        cols = shape[-1]
        rows = 1 if len(shape) == 1 else shape[0]
        raw = tensor_bytes(eh, ed, name)
        part = b"".join(raw[r * cols * 4:(r * cols + n_rows) * 4] for r in range(rows))
        slices.append((name, "F32", [rows, n_rows], part))
    write_st(os.path.join(out, "expected_slim.safetensors"), slices)


def copy_files(src, out):
    """The checkpoint's small files (quantize_config.json where it is int4)."""
    for name in ("config.json", "generation_config.json", "qwen.tiktoken", "shapes.png", "photo.jpg", "quantize_config.json"):
        if name != "quantize_config.json" or os.path.exists(os.path.join(src, name)):
            shutil.copyfile(os.path.join(src, name), os.path.join(out, name))


def expand(slim_dir, out):
    os.makedirs(out, exist_ok=True)
    copy_files(slim_dir, out)
    meta = json.load(open(os.path.join(slim_dir, "slim.json")))
    header, data = read_st(os.path.join(slim_dir, "model_slim.safetensors"))
    vocab = meta["vocab"]
    tensors = []
    for name in sorted(header):
        h = header[name]
        raw = tensor_bytes(header, data, name)
        if name == WTE + "#rows":
            continue
        width = h["shape"][1] * SIZES[h["dtype"]] if len(h["shape"]) == 2 else 0
        if name == WTE:
            rows = struct.unpack("<%di" % h["shape"][0], tensor_bytes(header, data, WTE + "#rows"))
            full = bytearray(vocab * width)
            for i, r in enumerate(rows):
                full[r * width:(r + 1) * width] = raw[i * width:(i + 1) * width]
            tensors.append((name, h["dtype"], [vocab, h["shape"][1]], bytes(full)))
        elif name == LM:
            full = raw + bytes((vocab - h["shape"][0]) * width)
            tensors.append((name, h["dtype"], [vocab, h["shape"][1]], full))
        else:
            tensors.append((name, h["dtype"], h["shape"], raw))
    write_st(os.path.join(out, "model.safetensors"), tensors)


def f32s(raw):
    return struct.unpack("<%df" % (len(raw) // 4), raw)


def compare(got_path, exp_path, name, row, tol):
    gh, gd = read_st(got_path)
    rows, vocab = gh["logits"]["shape"]
    eh, ed = read_st(exp_path)
    n = eh[name]["shape"][1]
    raw = tensor_bytes(gh, gd, "logits")
    got = f32s(raw[(rows - 1) * vocab * 4:((rows - 1) * vocab + n) * 4])
    want = f32s(tensor_bytes(eh, ed, name)[row * n * 4:(row + 1) * n * 4])
    num = sum((g - w) ** 2 for g, w in zip(got, want))
    den = sum(w * w for w in want)
    err = (num / den) ** 0.5 if den > 0 else float("inf")
    if any(g != g for g in got):
        err = float("inf")
    print("%.3e" % err)
    return err <= tol


def main(argv):
    if len(argv) >= 3 and argv[0] == "slim":
        n = int(argv[argv.index("--rows") + 1]) if "--rows" in argv else 65536
        slim(argv[1], argv[2], n)
    elif len(argv) == 3 and argv[0] == "expand":
        expand(argv[1], argv[2])
    elif len(argv) >= 4 and argv[0] == "compare":
        row = int(argv[argv.index("--row") + 1]) if "--row" in argv else 0
        tol = float(argv[argv.index("--tol") + 1]) if "--tol" in argv else 2e-2
        return 0 if compare(argv[1], argv[2], argv[3], row, tol) else 1
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

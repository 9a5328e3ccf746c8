#!/usr/bin/env python3
"""Write a full-width Qwen-VL-Chat decoder "slice" as a GGUF file for llama.cpp, without torch.

Architecture "qwen" (llama.cpp's LLM_ARCH_QWEN, Qwen v1, which is Qwen-VL's decoder): hidden 4096,
32 heads x 128, MLP width 11008 (Qwen's config says intermediate_size 22016 and llama.cpp's
`qwen.feed_forward_length` stores that number; the tensors are half of it), vocabulary 151936,
NeoX rotary over all 128 dims (base 10000), RMSNorm eps 1e-6, untied lm_head, and only
--layers decoder layers. Weights are random normal (std 0.02, fixed seed) because only the
shapes matter for speed; norms are ones and stay F32 (as convert_hf_to_gguf.py writes 1-D tensors).

The vocabulary is a minimal valid gpt2-style byte-level BPE vocabulary of the real size: the 256
byte tokens, one merge, filler tokens, and Qwen's <|endoftext|> (151643) as a control token.
It only exists so llama.cpp loads the file; llama-bench feeds random token ids.

Tensors are generated and written one at a time (random numbers in 64 MiB blocks), so memory stays
around one 16-bit copy of the largest tensor (the 151936 x 4096 embedding, 1.2 GB) for any --layers.

Needs only numpy and the `gguf` package from PyPI (pip install gguf numpy).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

try:
    import gguf
except ImportError:  # explain instead of a bare traceback: this is a tool for humans
    sys.exit("make_gguf.py needs the `gguf` package from PyPI: pip install gguf numpy")

HIDDEN = 4096
HEADS = 32
HEAD_DIM = HIDDEN // HEADS
MLP = 11008  # Qwen's intermediate_size (22016) / 2
VOCAB = 151936
ENDOFTEXT = 151643  # Qwen's <|endoftext|>
CTX = 8192  # Qwen-VL-Chat's seq_length is 2048; larger only changes the default context, not the weights
EPS = 1e-6
ROPE_BASE = 10000.0
STD = 0.02


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (as in HF tokenizers / convert_hf_to_gguf)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def vocab() -> tuple[list[str], list[int], list[str]]:
    byte_tokens = list(bytes_to_unicode().values())
    space = bytes_to_unicode()[ord(" ")]
    tokens = byte_tokens + [space + space]
    merges = [f"{space} {space}"]
    types = [gguf.TokenType.NORMAL] * len(tokens)
    while len(tokens) < VOCAB:
        i = len(tokens)
        if i == ENDOFTEXT:
            tokens.append("<|endoftext|>")
            types.append(gguf.TokenType.CONTROL)
        else:
            tokens.append(f"<|slice_filler_{i}|>")
            # Fillers are "unused" so llama.cpp never matches them as text; they only pad the vocabulary.
            types.append(gguf.TokenType.UNUSED)
    return tokens, [int(t) for t in types], merges


def tensor_plan(layers: int) -> list[tuple[str, tuple[int, ...], bool]]:
    """(name, numpy shape [rows, cols] = ggml ne reversed, is_matrix) in file order."""
    plan: list[tuple[str, tuple[int, ...], bool]] = [("token_embd.weight", (VOCAB, HIDDEN), True)]
    for i in range(layers):
        p = f"blk.{i}."
        plan += [
            (p + "attn_norm.weight", (HIDDEN,), False),
            (p + "attn_qkv.weight", (3 * HIDDEN, HIDDEN), True),
            (p + "attn_qkv.bias", (3 * HIDDEN,), False),
            (p + "attn_output.weight", (HIDDEN, HIDDEN), True),
            (p + "ffn_norm.weight", (HIDDEN,), False),
            (p + "ffn_up.weight", (MLP, HIDDEN), True),
            (p + "ffn_gate.weight", (MLP, HIDDEN), True),
            (p + "ffn_down.weight", (HIDDEN, MLP), True),
        ]
    plan += [("output_norm.weight", (HIDDEN,), False), ("output.weight", (VOCAB, HIDDEN), True)]
    return plan


def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns, round to nearest even (no NaNs occur in normal samples)."""
    u = x.view(np.uint32)
    return ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)


def make_tensor(rng: np.random.Generator, name: str, shape: tuple[int, ...], matrix: bool, dtype: str) -> np.ndarray:
    if name.endswith("norm.weight"):
        return np.ones(shape, dtype=np.float32)
    if not matrix:  # the qkv bias
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(STD)
    out = np.empty(shape, dtype=np.float16 if dtype == "f16" else np.uint16)
    step = max(1, (1 << 24) // shape[1])  # ~64 MiB of f32 at a time
    for r in range(0, shape[0], step):
        block = rng.standard_normal((min(step, shape[0] - r), shape[1]), dtype=np.float32)
        block *= np.float32(STD)
        out[r : r + block.shape[0]] = block.astype(np.float16) if dtype == "f16" else to_bf16_bits(block)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("output", type=Path, help="GGUF file to write")
    ap.add_argument("--layers", type=int, default=2, help="decoder layers (the real model has 32)")
    ap.add_argument("--dtype", choices=["f16", "bf16"], default="f16", help="type of the 2-D weights")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="overwrite OUTPUT if it exists")
    args = ap.parse_args()
    if args.layers < 1:
        ap.error("--layers must be at least 1")
    if args.output.exists() and not args.force:
        ap.error(f"{args.output} exists (use --force to overwrite)")

    w = gguf.GGUFWriter(str(args.output), "qwen")
    w.add_name(f"qwen-vl-chat-decoder-slice-{args.layers}l-{args.dtype}")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if args.dtype == "f16" else gguf.LlamaFileType.MOSTLY_BF16)
    w.add_context_length(CTX)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(args.layers)
    w.add_feed_forward_length(2 * MLP)  # llama.cpp's qwen loader halves this (n_ff/2)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_rope_freq_base(ROPE_BASE)
    w.add_head_count(HEADS)
    w.add_layer_norm_rms_eps(EPS)

    tokens, types, merges = vocab()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(ENDOFTEXT)
    w.add_eos_token_id(ENDOFTEXT)
    w.add_unk_token_id(ENDOFTEXT)
    w.add_add_bos_token(False)

    plan = tensor_plan(args.layers)
    for name, shape, matrix in plan:
        n = int(np.prod(shape))
        if not matrix:
            w.add_tensor_info(name, shape, np.dtype(np.float32), 4 * n)
        elif args.dtype == "f16":
            w.add_tensor_info(name, shape, np.dtype(np.float16), 2 * n)
        else:
            w.add_tensor_info(name, shape, np.dtype(np.uint16), 2 * n, raw_dtype=gguf.GGMLQuantizationType.BF16)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(args.seed)
    total = 0
    for k, (name, shape, matrix) in enumerate(plan):
        t = make_tensor(rng, name, shape, matrix, args.dtype)
        w.write_tensor_data(t)
        total += t.nbytes
        print(f"\r[{k + 1}/{len(plan)}] {name} {total / 2**30:.2f} GiB", end="", file=sys.stderr, flush=True)
    w.close()
    print(
        f"\nwrote {args.output} ({total / 2**30:.2f} GiB of tensors, {args.layers} layers, {args.dtype})",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()

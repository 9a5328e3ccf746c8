"""Time Qwen-VL's vision tower in PyTorch fp32 on the CPU, at full width, with N ViT layers.

What a CPU user of the official code runs: the reference's visual.py computes in fp32
on a CPU. This is the same computation written out in plain torch (conv1 14x14/14 ->
1024 tokens, ln_pre, N pre-norm blocks of width 1664 with 16 heads and MLP 8192 with
exact-erf GELU, the 256-query resampler with 32 heads of 128, ln_post, @ proj), with
random weights, so that it can be timed against `qvc bench --synthetic qwen-vl-chat
--vit-layers N --llm-layers 0 --device cpu` on the same machine and thread count.

    python vision.py --layers 4 --threads 2 --repeat 3
prints one JSON line: {"layers", "threads", "ms_best", "ms_all", "torch"}.
"""
import argparse
import json
import time

import torch
import torch.nn.functional as F

W, HEADS, MLP, D, QUERIES, GRID, PATCH = 1664, 16, 8192, 4096, 256, 32, 14


def block(x, p):
    t, w = x.shape
    h = F.layer_norm(x, (w,), p["ln1w"], p["ln1b"], 1e-6)
    qkv = F.linear(h, p["inw"], p["inb"]).view(t, HEADS, 3 * (W // HEADS))
    q, k, v = qkv.split(W // HEADS, dim=-1)
    a = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1))
    x = x + F.linear(a.transpose(0, 1).reshape(t, w), p["outw"], p["outb"])
    h = F.layer_norm(x, (w,), p["ln2w"], p["ln2b"], 1e-6)
    return x + F.linear(F.gelu(F.linear(h, p["fcw"], p["fcb"])), p["pw"], p["pb"])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    r = lambda *s: torch.randn(*s) * 0.02
    one = lambda n: torch.ones(n)
    zero = lambda n: torch.zeros(n)
    conv = r(W, 3, PATCH, PATCH)
    pos = r(GRID * GRID, W)
    blocks = [
        dict(ln1w=one(W), ln1b=zero(W), inw=r(3 * W, W), inb=zero(3 * W), outw=r(W, W), outb=zero(W),
             ln2w=one(W), ln2b=zero(W), fcw=r(MLP, W), fcb=zero(MLP), pw=r(W, MLP), pb=zero(W))
        for _ in range(a.layers)
    ]
    query, qpos, kpos, kvw = r(QUERIES, D), r(QUERIES, D), r(GRID * GRID, D), r(D, W)
    pool = torch.nn.MultiheadAttention(D, D // 128)
    proj = r(D, D)
    img = torch.randn(1, 3, GRID * PATCH, GRID * PATCH)

    def run():
        x = F.conv2d(img, conv, stride=PATCH).flatten(2).transpose(1, 2)[0] + pos
        x = F.layer_norm(x, (W,), eps=1e-6)
        for p in blocks:
            x = block(x, p)
        kv = F.layer_norm(F.linear(x, kvw), (D,), eps=1e-6)
        q = F.layer_norm(query, (D,), eps=1e-6)
        o, _ = pool(q + qpos, kv + kpos, kv, need_weights=False)
        return F.layer_norm(o, (D,), eps=1e-6) @ proj

    times = []
    with torch.inference_mode():
        run()  # warm-up: allocator, oneDNN primitives
        for _ in range(a.repeat):
            t0 = time.perf_counter()
            run()
            times.append((time.perf_counter() - t0) * 1e3)
    print(json.dumps({"layers": a.layers, "threads": a.threads, "ms_best": min(times),
                      "ms_all": [round(t, 1) for t in times], "torch": torch.__version__}))


if __name__ == "__main__":
    main()

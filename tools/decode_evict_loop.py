"""A decode + evict loop over the raw operators, for compute-sanitizer and smoke checks.

Writes one new token per step into fixed buffers, runs ``attention_with_scores`` with
rolling RoPE and scores, and calls ``compact_`` every ``window`` steps once over budget:
exactly what a layer of the inf_mllm policy does, with no model around it. Checks at the
end that the output is finite and the length never exceeded capacity.

    python tools/decode_evict_loop.py [--device cuda] [--steps 200] [--dtype bfloat16]
"""
from __future__ import annotations

import argparse

import torch

import inf_mllm.ops as ops


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--hkv", type=int, default=2)
    p.add_argument("--group", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--budget", type=int, default=96)
    p.add_argument("--window", type=int, default=8)
    p.add_argument("--n-sink", type=int, default=4)
    p.add_argument("--n-recent", type=int, default=16)
    args = p.parse_args(argv)

    dev, dt = torch.device(args.device), getattr(torch, args.dtype)
    B, Hkv, G, D = args.batch, args.hkv, args.group, args.head_dim
    C = args.budget + args.window
    g = torch.Generator(device="cpu").manual_seed(0)
    k = torch.randn(B, Hkv, C, D, generator=g).to(dev, dt)
    v = torch.randn(B, Hkv, C, D, generator=g).to(dev, dt)
    scores = torch.zeros(B, Hkv, C, device=dev)
    # ragged start: rows begin with different lengths
    length = torch.tensor([1 + 3 * b for b in range(B)], dtype=torch.int32, device=dev)
    pos = torch.arange(C, dtype=torch.float32, device=dev)
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2, dtype=torch.float32, device=dev) / D))
    ang = torch.cat([pos[:, None] * inv[None]] * 2, dim=-1)
    cos, sin = ang.cos(), ang.sin()
    rows = torch.arange(B, device=dev)
    since_evict = 0
    max_len = 0
    for step in range(args.steps):
        # write the new token at slot length[b] of every row, then attend
        slot = length.long()
        k[rows, :, slot] = torch.randn(B, Hkv, D, generator=g).to(dev, dt)
        v[rows, :, slot] = torch.randn(B, Hkv, D, generator=g).to(dev, dt)
        length += 1
        q = torch.randn(B, Hkv * G, 1, D, generator=g).to(dev, dt)
        out = ops.attention_with_scores(q, k, v, length, scores, window=args.window, bias=1e-3, cos=cos, sin=sin)
        since_evict += 1
        max_len = max(max_len, int(length.max()))
        if since_evict >= args.window and int(length.max()) > args.budget:
            ops.compact_(k, v, scores, length, budget=args.budget, n_sink=args.n_sink, n_recent=args.n_recent)
            since_evict = 0
        if not torch.isfinite(out.float()).all():
            raise SystemExit(f"non-finite output at step {step}")
    if dev.type == "cuda":
        torch.cuda.synchronize()
    assert max_len <= C, (max_len, C)
    print(f"decode_evict_loop: {args.steps} steps on {dev} ({args.dtype}), max length {max_len} <= C={C}, ok")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

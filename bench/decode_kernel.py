"""One decode step of ``attention_with_scores`` on the CPU: the fused native kernel against the
PyTorch path it replaces and against SDPA, interleaved, best of several repetitions.

    python bench/decode_kernel.py [--threads 1] [--reps 15] [--isa base|avx2|avx512] [--n 1]

Shapes: SmolLM2-135M's decode step (B=1, Hkv=3, G=3, D=64, C=1280, L=1056) and the CPU issue's
(B=1, Hkv=8, G=4, D=128, C=L=4096). Rows (us per call):

* ``op native`` / ``op torch``: the public ``inf_mllm.ops.attention_with_scores`` (argument checks
  included) with the fused kernel / with the PyTorch path (``_torch_path._NATIVE_DECODE = False``);
  scores + RoPE on load (rolling mode), window 32, bias 1e-3; ``noscores``: ``window=0``.
* ``raw native``: ``torch.ops.inf_mllm.attention_decode`` alone (no Python checks).
* ``--cold``: caches evicted before each call (what a layer of a model sees), one call per timing.
* ``sdpa gqa`` / ``sdpa stacked``: ``F.scaled_dot_product_attention`` over keys cached already
  rotated (transformers' case: no RoPE, no scores), with ``enable_gqa=True`` / with the ``G``
  query heads of a KV head stacked as rows.
"""
import argparse
import os
import sys
import time

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--threads", type=int, default=1)
p.add_argument("--reps", type=int, default=15)
p.add_argument("--isa", default=None, help="cap the native kernel's instruction set (INF_MLLM_CPU_ISA)")
p.add_argument("--n", type=int, default=1, help="new queries per call")
p.add_argument("--dtype", default="float32")
p.add_argument("--shapes", default="smollm2,issue")
p.add_argument("--cold", action="store_true",
               help="write a 64 MiB buffer before every call (as a model's weights evict the caches between "
                    "layers), one call per timing")
args = p.parse_args()
if args.isa:
    os.environ["INF_MLLM_CPU_ISA"] = args.isa

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import inf_mllm._torch_path as tp  # noqa: E402
import inf_mllm.ops as ops  # noqa: E402

torch.set_num_threads(args.threads)
dtype = getattr(torch, args.dtype)
SHAPES = {
    "smollm2": dict(B=1, Hkv=3, G=3, D=64, C=1280, L=1056),
    "issue": dict(B=1, Hkv=8, G=4, D=128, C=4096, L=4096),
}


def tables(C, D):
    pos = torch.arange(C, dtype=torch.float64)[:, None]
    inv = 1.0 / (10000.0 ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    emb = torch.cat([pos * inv, pos * inv], dim=-1)
    return emb.cos().float().contiguous(), emb.sin().float().contiguous()


def bench(shape):
    B, Hkv, G, D, C, L = (shape[k] for k in ("B", "Hkv", "G", "D", "C", "L"))
    n, Hq = args.n, Hkv * G
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(B, Hq, n, D, generator=gen).to(dtype)
    k = torch.randn(B, Hkv, C, D, generator=gen).to(dtype)
    v = torch.randn(B, Hkv, C, D, generator=gen).to(dtype)
    length = torch.full((B,), L, dtype=torch.int32)
    scores = torch.zeros(B, Hkv, C)
    cos, sin = tables(C, D)
    kr, vr = k[:, :, :L].contiguous(), v[:, :, :L].contiguous()
    qs = q.view(B, Hkv, G * n, D)

    def op(window):
        return lambda: ops.attention_with_scores(q, k, v, length, scores, window=window, bias=1e-3, cos=cos, sin=sin,
                                                 check_values=False)

    def torch_path(fn):
        def run():
            tp._NATIVE_DECODE = False
            try:
                return fn()
            finally:
                tp._NATIVE_DECODE = None

        return run

    causal = n > 1
    variants = {
        "op native": op(32),
        "op torch": torch_path(op(32)),
        "op native noscores": op(0),
        "op torch noscores": torch_path(op(0)),
        "raw native": lambda: torch.ops.inf_mllm.attention_decode(q, k, v, length, scores, D ** -0.5, 32, 1e-3, cos,
                                                                  sin, "absolute", 1.0),
        "sdpa gqa": lambda: F.scaled_dot_product_attention(q, kr, vr, enable_gqa=True, is_causal=False),
        "sdpa stacked": lambda: F.scaled_dot_product_attention(qs, kr, vr),
    }
    if causal:  # the stacked form would need a tiled mask; keep the comparison to n = 1
        variants.pop("sdpa stacked")
        variants.pop("sdpa gqa")
    inner = 1 if args.cold else max(1, int(2e5 / (Hkv * L * D)))  # ~ equal work per timing
    for fn in variants.values():
        fn()
    best = {name: float("inf") for name in variants}
    junk = torch.zeros(64 << 20, dtype=torch.uint8) if args.cold else None
    for r in range(args.reps):
        names = list(variants) if r % 2 == 0 else list(variants)[::-1]
        for name in names:
            fn = variants[name]
            if args.cold:
                junk.add_(1)
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            best[name] = min(best[name], (time.perf_counter() - t0) / inner)
    return best


print(f"torch {torch.__version__}, threads {args.threads}, dtype {args.dtype}, n {args.n}, "
      f"native ISA {torch.ops.inf_mllm.cpu_isa()}, best of {args.reps} interleaved reps"
      f"{', cold caches' if args.cold else ''}", file=sys.stderr)
for name in args.shapes.split(","):
    best = bench(SHAPES[name])
    base = best.get("sdpa stacked")
    print(f"## {name} {SHAPES[name]}")
    for k, t in best.items():
        extra = f"  ({t / base:.2f}x sdpa stacked, {t / best['sdpa gqa']:.2f}x sdpa gqa)" if base else ""
        print(f"{k:22s} {1e6 * t:9.1f} us{extra}")

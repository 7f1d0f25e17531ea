"""Micro-benchmark of ``attention_with_scores`` (SPEC §4.1).

Three implementations on the same random shapes (never zeros):

* ``inf_mllm``: :func:`inf_mllm.ops.attention_with_scores` (Triton on CUDA, the vectorised
  torch path on the CPU), scoring the last ``window`` queries, with or without RoPE on load
  (from the rotary frequencies, as the cache calls it);
* ``inf_mllm_table``: the same with RoPE from cos/sin tables by slot (the fallback form);
* ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` on the valid slots, no scores
  (the floor: what attention costs without scoring; GQA via ``enable_gqa`` where available);
* ``sdpa_stacked``: the same SDPA with the ``G`` query heads of a KV head stacked as ``G * n``
  rows of one problem (no ``enable_gqa``, no K/V copy), a lower floor on the CPU, where
  ``enable_gqa`` measured up to 2x slower for decode;
* ``eager_scores``: matmul + softmax + sum materialising the attention weights, i.e. what an
  H2O-style accumulation costs in plain PyTorch.

Rows report the median time, the bytes of K/V that must be read (``2 * B * Hkv * L * D *
itemsize``) and the achieved bandwidth on them, plus an attention TFLOP/s figure
(``4 * B * Hq * n * L * D``, causal savings ignored).

The CLI wraps :func:`bench_attention`; this module only returns rows.
"""
from __future__ import annotations

import functools
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from .. import ops

__all__ = ["bench_attention", "time_fn"]


def time_fn(fn: Callable[[], object], device: torch.device, warmup: int = 10, reps: int = 50) -> float:
    """Median wall time of ``fn()`` in milliseconds (CUDA: ``triton.testing.do_bench`` or CUDA
    events; CPU: ``time.perf_counter``)."""
    if device.type == "cuda":
        try:
            import triton.testing

            return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
        except Exception:  # pragma: no cover - triton missing or old
            for _ in range(warmup):
                fn()
            torch.cuda.synchronize(device)
            times = []
            for _ in range(reps):
                a = torch.cuda.Event(enable_timing=True)
                b = torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b))
            return statistics.median(times)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _inv_freq(D: int, device) -> torch.Tensor:
    # a normal tensor even under inference mode, as the cache's snapshot of the rotary frequencies is
    # (the CPU path keeps one table per frequency tensor, keyed by its version counter)
    with torch.inference_mode(False):
        return 1.0 / (10000.0 ** (torch.arange(0, D, 2, dtype=torch.float32, device=device) / D))


def _rope(C: int, D: int, device) -> tuple:
    pos = torch.arange(C, dtype=torch.float32, device=device)[:, None]
    inv = _inv_freq(D, device)
    emb = torch.cat([pos * inv, pos * inv], dim=-1)
    return emb.cos(), emb.sin()


def _sdpa_fn(q, k, v, n: int, G: int):
    """SDPA over the valid slots, causal aligned bottom-right (query i at slot L - n + i)."""
    kw = {}
    try:
        F.scaled_dot_product_attention(q[:1, :, :1], k[:1, :, :1], v[:1, :, :1], enable_gqa=True)
        kw["enable_gqa"] = True
        kk, vv = k, v
    except TypeError:  # torch < 2.5
        kk, vv = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
    mask = None
    if n > 1:
        try:
            from torch.nn.attention.bias import causal_lower_right

            mask = causal_lower_right(n, k.shape[2])
        except Exception:  # pragma: no cover
            L = k.shape[2]
            j = torch.arange(L, device=q.device)
            mask = j[None, :] <= (L - n + torch.arange(n, device=q.device))[:, None]
    return lambda: F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask, **kw)


def _sdpa_stacked_fn(q, k, v, n: int, G: int):
    """SDPA with the GQA group stacked into the query rows: ``[B, Hkv, G * n, D]`` against the
    shared K/V, bottom-right causal mask tiled over the group."""
    B, Hq, _, D = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    qs = q.reshape(B, Hkv, G * n, D)
    mask = None
    if n > 1:
        mask = torch.ones(n, L, dtype=torch.bool, device=q.device).tril(L - n).repeat(G, 1)
    return lambda: F.scaled_dot_product_attention(qs, k, v, attn_mask=mask)


def _eager_scores_fn(q, k, v, scores, n: int, G: int, window: int, bias: float):
    """Materialise the attention weights, then H2O/Inf-MLLM style column sums."""
    B, Hq, _, D = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    scale = D ** -0.5
    j = torch.arange(L, device=q.device)
    causal = j[None, :] <= (L - n + torch.arange(n, device=q.device))[:, None]
    w = min(window, n)
    count = (L - j).clamp(0, w).float()

    def fn():
        kk = k.repeat_interleave(G, dim=1)
        vv = v.repeat_interleave(G, dim=1)
        logits = torch.matmul(q, kk.transpose(-1, -2)).float() * scale
        logits = logits.masked_fill(~causal, float("-inf"))
        p = torch.softmax(logits, dim=-1)
        out = torch.matmul(p.to(q.dtype), vv)
        col = p[:, :, n - w:].view(B, Hkv, G, w, L).sum(dim=3).mean(dim=2)
        scores[:, :, :L] += col + bias * j * count
        return out

    return fn


def bench_attention(
    device="cuda",
    dtype: torch.dtype = torch.bfloat16,
    contexts: Sequence[int] = (1024, 4096, 16384),
    B: int = 8,
    Hkv: int = 8,
    G: int = 4,
    D: int = 128,
    n: int = 1,
    window: int = 32,
    bias: float = 1e-3,
    rope: bool = True,
    impls: Sequence[str] = ("inf_mllm", "sdpa", "sdpa_stacked", "eager_scores"),
    warmup: int = 10,
    reps: int = 50,
    seed: int = 0,
) -> List[Dict]:
    """Time ``attention_with_scores`` against SDPA (no scores) and an eager scoring path.

    ``n=1`` benchmarks decode; ``n>1`` a prefill chunk of ``n`` new tokens on top of
    ``context - n`` cached ones. Each context ``L`` is a full buffer (``C = length = L``).
    Returns one dict per (context, implementation).
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    gen = torch.Generator(device="cpu").manual_seed(seed)
    Hq = Hkv * G
    rows: List[Dict] = []
    for L in contexts:
        if L < n:
            continue
        q = torch.randn(B, Hq, n, D, generator=gen).to(device=device, dtype=dtype)
        k = torch.randn(B, Hkv, L, D, generator=gen).to(device=device, dtype=dtype)
        v = torch.randn(B, Hkv, L, D, generator=gen).to(device=device, dtype=dtype)
        length = torch.full((B,), L, dtype=torch.int32, device=device)
        scores = (torch.rand(B, Hkv, L, generator=gen) + 0.5).to(device)
        cos, sin = _rope(L, D, device) if rope and "inf_mllm_table" in impls else (None, None)
        rope_kw = dict(inv_freq=_inv_freq(D, device)) if rope else {}
        kv_bytes = 2 * B * Hkv * L * D * k.element_size()
        flops = 4.0 * B * Hq * n * L * D
        for impl in impls:
            if impl == "inf_mllm":  # RoPE from the frequencies, as the cache calls it
                fn = functools.partial(ops.attention_with_scores, q, k, v, length, scores, window=window, bias=bias,
                                       check_values=False, **rope_kw)
            elif impl == "inf_mllm_table":  # the fallback: RoPE from cos/sin tables by slot
                fn = functools.partial(ops.attention_with_scores, q, k, v, length, scores, window=window, bias=bias,
                                       cos=cos, sin=sin, check_values=False)
            elif impl == "sdpa":
                fn = _sdpa_fn(q, k, v, n, G)
            elif impl == "sdpa_stacked":
                fn = _sdpa_stacked_fn(q, k, v, n, G)
            elif impl == "eager_scores":
                fn = _eager_scores_fn(q, k, v, scores, n, G, window, bias)
            else:
                raise ValueError(f"unknown impl {impl!r}")
            ms = time_fn(fn, device, warmup=warmup, reps=reps)
            rows.append(
                dict(
                    op="attention_with_scores",
                    impl=impl,
                    device=str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
                    dtype=str(dtype).replace("torch.", ""),
                    B=B, Hq=Hq, Hkv=Hkv, G=G, D=D, n=n, context=L,
                    window=window if impl not in ("sdpa", "sdpa_stacked") else 0,
                    rope=(("table" if impl == "inf_mllm_table" else "freq") if rope and impl.startswith("inf_mllm")
                          else False),
                    scores=impl not in ("sdpa", "sdpa_stacked"),
                    time_ms=ms,
                    kv_bytes=kv_bytes,
                    gbps=kv_bytes / (ms * 1e-3) / 1e9,
                    tflops=flops / (ms * 1e-3) / 1e12,
                )
            )
        del q, k, v, scores, cos, sin, rope_kw
    return rows


def _main(argv: Optional[Sequence[str]] = None) -> None:  # pragma: no cover - quick manual run
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    small = dev == "cpu"
    for n in (1, 64 if small else 512):
        for r in bench_attention(dev, torch.float32 if small else torch.bfloat16,
                                 contexts=(256, 1024) if small else (1024, 4096, 16384),
                                 B=1 if small else 8, n=n, reps=5 if small else 50, warmup=2 if small else 10):
            print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()})


if __name__ == "__main__":  # pragma: no cover
    _main()

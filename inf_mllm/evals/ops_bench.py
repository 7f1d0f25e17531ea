"""Operator benchmarks (``inf-mllm bench ops``).

Wraps ``inf_mllm.benchmarks.attention.bench_attention`` and
``inf_mllm.benchmarks.compact.bench_compact`` (the kernel engineers' benchmark functions)
over cache sizes, and adds bandwidth figures: bytes/s from each row's byte count and, on
GPU, the fraction of a measured device-to-device copy bandwidth (one large ``copy_``,
bytes read + written).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch

from ..benchmarks.attention import time_fn
from .common import progress, record

__all__ = ["copy_bandwidth", "run_ops_bench"]


def copy_bandwidth(device: str, nbytes: Optional[int] = None) -> Dict[str, float]:
    """Device copy bandwidth: ``dst.copy_(src)`` of ``nbytes``; counts bytes read + written."""
    cuda = str(device).startswith("cuda")
    if nbytes is None:
        nbytes = (1 << 30) if cuda else (256 << 20)
    n = nbytes // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    med = time_fn(lambda: dst.copy_(src), torch.device(device), warmup=2, reps=10 if cuda else 5) / 1e3
    del src, dst
    return {"bytes": n * 4, "seconds": med, "GBps": 2 * n * 4 / med / 1e9}


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, (getattr(torch, "OutOfMemoryError", MemoryError), MemoryError)) or "out of memory" in str(e).lower()


def _free(device) -> None:
    import gc

    gc.collect()
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()


def run_ops_bench(
    *,
    sizes: Sequence[int],
    device: str,
    dtype: torch.dtype,
    B: int = 1,
    Hq: int = 32,
    Hkv: int = 8,
    D: int = 128,
    prefill_chunk: int = 256,
    window: int = 32,
    which: Sequence[str] = ("attention", "compact"),
) -> Dict[str, Any]:
    """Rows of :func:`bench_attention` (decode, prefill chunk) and :func:`bench_compact` per cache
    size, each with ``median_ms``, ``GBps`` and, on GPU, ``frac_copy_bw`` (of the measured copy)."""
    from ..benchmarks.attention import bench_attention
    from ..benchmarks.compact import bench_compact

    # refuse shapes the operators would reject (or divide by) before any allocation
    for name, val in (("B", B), ("Hq", Hq), ("Hkv", Hkv), ("D", D), ("prefill_chunk", prefill_chunk)):
        if not isinstance(val, int) or isinstance(val, bool) or val < 1:
            raise ValueError(f"bench ops: {name} must be a positive int, got {val!r}")
    if Hq % Hkv:
        raise ValueError(f"bench ops: {Hq} query heads are not a multiple of {Hkv} key/value heads")
    if D % 2:
        raise ValueError(f"bench ops: the head dim must be even (RoPE), got {D}")
    if not isinstance(window, int) or isinstance(window, bool) or window < 0:
        raise ValueError(f"bench ops: window must be a non-negative int, got {window!r}")
    if not sizes or any(not isinstance(c, int) or c < 1 for c in sizes):
        raise ValueError(f"bench ops: cache sizes must be positive ints, got {list(sizes)!r}")
    unknown = set(which) - {"attention", "compact"}
    if unknown:
        raise ValueError(f"bench ops: unknown operator(s) {sorted(unknown)}; known: attention, compact")

    cuda = str(device).startswith("cuda")
    bw = copy_bandwidth(device)
    reps = {} if cuda else {"warmup": 3, "reps": 10}
    rows: List[Dict[str, Any]] = []
    if "attention" in which:
        bar = progress(2 * len(sizes), "bench attention", unit="cfg")
        for mode, n in (("decode", 1), ("prefill", prefill_chunk)):
            for C in sizes:
                # one call per (size, impl): an out-of-memory eager path loses only its own row
                impls = ("inf_mllm", "inf_mllm_table") if cuda else ("inf_mllm",)  # the table fallback: GPU only
                for impl in impls + ("sdpa", "sdpa_stacked", "eager_scores"):
                    try:
                        got = bench_attention(device, dtype, contexts=(C,), B=B, Hkv=Hkv, G=Hq // Hkv, D=D, n=n,
                                              window=window, impls=(impl,), **reps)
                    except Exception as e:  # noqa: BLE001
                        if not _is_oom(e):
                            raise
                        got = [{"impl": impl, "error": "out of memory"}]
                        _free(device)
                    rows += [dict(r, op="attention", mode=mode, C=C) for r in got]
                    for r in rows[-len(got):]:
                        record("row", r)
                bar.update(1)
        bar.close()
    if "compact" in which:
        bar = progress(len(sizes), "bench compact_", unit="cfg")
        for C in sizes:
            # a full buffer C = L + slack, evicting the slack (1/8 of C, like a prefill chunk)
            L = C - max(1, C // 8)
            try:
                got = bench_compact(device, dtype, B=B, Hkv=Hkv, C=C, budget=L, D=D, n_recent=min(256, L // 4), **reps)
            except Exception as e:  # noqa: BLE001
                if not _is_oom(e):
                    raise
                got = [{"impl": "inf_mllm", "error": "out of memory"}]
                _free(device)
            rows += [dict(r, op="compact_", mode=f"L={L}", C=C) for r in got]
            for r in rows[-len(got):]:
                record("row", r)
            bar.update(1)
        bar.close()
    for r in rows:
        if "time_ms" in r:
            r["median_ms"], r["GBps"] = r["time_ms"], r["gbps"]
            if cuda:
                r["frac_copy_bw"] = r["GBps"] / bw["GBps"]
    return {"rows": rows, "copy_bandwidth": bw,
            "sources": {"attention": "inf_mllm.benchmarks.attention.bench_attention",
                        "compact": "inf_mllm.benchmarks.compact.bench_compact"},
            "shape": {"B": B, "Hq": Hq, "Hkv": Hkv, "D": D, "prefill_chunk": prefill_chunk, "window": window,
                      "dtype": str(dtype)}}

"""Operator benchmarks (``inf-mllm bench ops``).

Wraps ``inf_mllm.benchmarks.attention.bench_attention`` and
``inf_mllm.benchmarks.compact.bench_compact`` (the kernel engineers' benchmark functions)
over cache sizes, and adds bandwidth figures: bytes/s from each row's byte count and, on
GPU, the fraction of a measured device-to-device copy bandwidth (one large ``copy_``,
bytes read + written). Where those functions are missing, a small built-in benchmark of
the public ops is used instead (same row format) so the command always runs.
"""
from __future__ import annotations

import importlib
import inspect
import statistics
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from .common import progress

__all__ = ["copy_bandwidth", "run_ops_bench", "time_fn"]


def time_fn(fn: Callable[[], Any], device: str, *, warmup: int = 3, reps: int = 20, max_seconds: float = 2.0) -> List[float]:
    """Wall-clock seconds of ``fn()`` (CUDA events on GPU), ``reps`` samples after warm-up."""
    cuda = str(device).startswith("cuda")
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    out = []
    t_start = time.perf_counter()
    for _ in range(reps):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            out.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
        if len(out) >= 3 and time.perf_counter() - t_start > max_seconds:
            break
    return out


def copy_bandwidth(device: str, nbytes: Optional[int] = None) -> Dict[str, float]:
    """Device copy bandwidth: ``dst.copy_(src)`` of ``nbytes``; counts bytes read + written."""
    cuda = str(device).startswith("cuda")
    if nbytes is None:
        nbytes = (1 << 30) if cuda else (256 << 20)
    n = nbytes // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ts = time_fn(lambda: dst.copy_(src), device, warmup=2, reps=10 if cuda else 5, max_seconds=5.0)
    med = statistics.median(ts)
    del src, dst
    return {"bytes": n * 4, "seconds": med, "GBps": 2 * n * 4 / med / 1e9}


# --------------------------------------------------------------------------------------
# The kernel engineers' benchmark functions
# --------------------------------------------------------------------------------------


def _external(modname: str, fname: str) -> Optional[Callable]:
    try:
        mod = importlib.import_module(modname)
    except ImportError:
        return None
    return getattr(mod, fname, None)


def _call(fn: Callable, **kw):
    """Call ``fn`` with the keyword arguments it accepts (aliases for the size list)."""
    sig = inspect.signature(fn)
    params = sig.parameters
    has_var = any(p.kind is p.VAR_KEYWORD for p in params.values())
    aliases = {"sizes": ["sizes", "contexts", "cache_sizes", "capacities", "Cs", "C", "lengths"],
               "contexts": ["contexts", "sizes", "cache_sizes"]}
    out = {}
    for k, v in kw.items():
        for name in aliases.get(k, [k]):
            if name in params:
                out[name] = v
                break
        else:
            if has_var:
                out[k] = v
    return fn(**out)


# --------------------------------------------------------------------------------------
# Built-in fallback (same row format)
# --------------------------------------------------------------------------------------


def _attn_rows(sizes, device, dtype, B, Hq, Hkv, D, prefill_chunk, window, progress_bar) -> List[Dict[str, Any]]:
    import torch.nn.functional as F

    from .. import ops

    rows = []
    esize = torch.tensor([], dtype=dtype).element_size()
    for C in sizes:
        for mode, n in (("decode", 1), ("prefill", prefill_chunk)):
            if n > C:
                continue
            g = torch.Generator(device="cpu").manual_seed(C)
            q = torch.randn(B, Hq, n, D, generator=g).to(device, dtype)
            k = torch.randn(B, Hkv, C, D, generator=g).to(device, dtype)
            v = torch.randn(B, Hkv, C, D, generator=g).to(device, dtype)
            length = torch.full((B,), C, dtype=torch.int32, device=device)
            scores = torch.zeros(B, Hkv, C, dtype=torch.float32, device=device)
            kv_bytes = 2 * B * Hkv * C * D * esize
            io = kv_bytes + 2 * B * Hq * n * D * esize + 2 * B * Hkv * C * 4
            G = Hq // Hkv
            # causal mask for the n new queries at the last n slots
            mask = None
            if n > 1:
                qpos = torch.arange(C - n, C, device=device)[:, None]
                mask = torch.arange(C, device=device)[None, :] <= qpos

            def ours():
                ops.attention_with_scores(q, k, v, length, scores, window=window, bias=1e-3)

            def sdpa():
                kk = k.repeat_interleave(G, 1) if G > 1 else k
                vv = v.repeat_interleave(G, 1) if G > 1 else v
                F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask)

            def eager():
                kk = k.repeat_interleave(G, 1) if G > 1 else k
                vv = v.repeat_interleave(G, 1) if G > 1 else v
                w = (q @ kk.transpose(-1, -2)).float() * D ** -0.5
                if mask is not None:
                    w = w.masked_fill(~mask, float("-inf"))
                p = torch.softmax(w, -1)
                out = p.to(dtype) @ vv
                s = p[:, :, -min(window, n):].sum(2).view(B, Hkv, G, C).mean(2)  # noqa: F841
                return out

            for impl, fn in (("inf_mllm", ours), ("sdpa (no scores)", sdpa), ("eager (weights)", eager)):
                try:
                    ts = time_fn(fn, device)
                except Exception as e:  # noqa: BLE001
                    rows.append({"op": "attention", "mode": mode, "C": C, "n": n, "impl": impl, "error": str(e)[:200]})
                    continue
                rows.append({"op": "attention", "mode": mode, "C": C, "n": n, "impl": impl,
                             "median_ms": statistics.median(ts) * 1e3, "bytes": io})
            if progress_bar is not None:
                progress_bar.update(1)
    return rows


def _compact_rows(sizes, device, dtype, B, Hkv, D, progress_bar) -> List[Dict[str, Any]]:
    from .. import ops

    rows = []
    esize = torch.tensor([], dtype=dtype).element_size()
    for C in sizes:
        L = max(8, C * 3 // 4)
        n_sink, n_recent = 4, min(256, L // 4)
        g = torch.Generator(device="cpu").manual_seed(C)
        k0 = torch.randn(B, Hkv, C, D, generator=g).to(device, dtype)
        v0 = torch.randn(B, Hkv, C, D, generator=g).to(device, dtype)
        s0 = torch.rand(B, Hkv, C, generator=g).to(device)
        k, v, s = k0.clone(), v0.clone(), s0.clone()
        length = torch.full((B,), C, dtype=torch.int32, device=device)
        io = 2 * B * Hkv * C * D * esize + 2 * B * Hkv * L * D * esize + 2 * B * Hkv * C * 4

        def reset():
            k.copy_(k0), v.copy_(v0), s.copy_(s0), length.fill_(C)

        for impl, f in (("inf_mllm", ops.compact_), ("reference", ops.compact_ref_)):
            def run():
                reset()
                f(k, v, s, length, budget=L, n_sink=n_sink, n_recent=n_recent)

            ts = time_fn(run, device, reps=10)
            ts_reset = time_fn(reset, device, reps=10)
            med = max(statistics.median(ts) - statistics.median(ts_reset), 1e-9)
            rows.append({"op": "compact_", "mode": f"L={L}", "C": C, "impl": impl, "median_ms": med * 1e3, "bytes": io})
        if progress_bar is not None:
            progress_bar.update(1)
    return rows


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, (getattr(torch, "OutOfMemoryError", MemoryError), MemoryError)) or "out of memory" in str(e).lower()


def _free(device) -> None:
    import gc

    gc.collect()
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()


def _normalise(r: Dict[str, Any], op: str, mode: Optional[str]) -> Dict[str, Any]:
    """Map a row of the kernel engineers' benchmarks onto this table's columns."""
    r = dict(r)
    r["op"] = op
    if mode is not None:
        r.setdefault("mode", mode)
    elif "mode" not in r:
        r["mode"] = f"L={r['budget']}" if "budget" in r else ""
    for k in ("C", "context", "capacity", "size", "L"):
        if k in r:
            r.setdefault("C", r[k])
            break
    if "median_ms" not in r:
        for k, f in (("time_ms", 1.0), ("ms", 1.0), ("median_s", 1e3), ("time_s", 1e3), ("median_us", 1e-3), ("time_us", 1e-3)):
            if r.get(k) is not None:
                r["median_ms"] = r[k] * f
                break
    if "bytes" not in r:
        for k in ("io_bytes", "bytes_moved", "kv_bytes"):
            if r.get(k) is not None:
                r["bytes"] = r[k]
                break
    if "GBps" not in r:
        for k in ("gbps", "GB/s", "gb_s"):
            if r.get(k) is not None:
                r["GBps"] = r[k]
                break
    return r


# --------------------------------------------------------------------------------------


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
    builtin: bool = False,
) -> Dict[str, Any]:
    cuda = str(device).startswith("cuda")
    bw = copy_bandwidth(device)
    rows: List[Dict[str, Any]] = []
    sources = {}
    if "attention" in which:
        fn = None if builtin else _external("inf_mllm.benchmarks.attention", "bench_attention")
        if fn is not None:
            sources["attention"] = "inf_mllm.benchmarks.attention.bench_attention"
            reps = {} if cuda else {"warmup": 3, "reps": 10}
            bar = progress(2 * len(sizes), "bench attention", unit="cfg")
            for mode, n in (("decode", 1), ("prefill", prefill_chunk)):
                for C in sizes:
                    # one call per (size, impl): an out-of-memory eager path loses only its own row
                    for impl in ("inf_mllm", "sdpa", "eager_scores"):
                        try:
                            got = _call(fn, device=device, dtype=dtype, contexts=[C], impls=[impl], B=B, Hkv=Hkv,
                                        G=Hq // Hkv, D=D, n=n, window=window, **reps)
                        except Exception as e:  # noqa: BLE001
                            if not _is_oom(e):
                                raise
                            got = [{"context": C, "impl": impl, "error": "out of memory"}]
                            _free(device)
                        rows += [_normalise(r, "attention", mode) for r in got]
                    bar.update(1)
            bar.close()
        else:
            sources["attention"] = "built-in (inf_mllm.evals.ops_bench)"
            bar = progress(2 * len(sizes), "bench attention", unit="cfg")
            rows += _attn_rows(list(sizes), device, dtype, B, Hq, Hkv, D, prefill_chunk, window, bar)
            bar.close()
    if "compact" in which:
        fn = None if builtin else _external("inf_mllm.benchmarks.compact", "bench_compact")
        if fn is not None:
            sources["compact"] = "inf_mllm.benchmarks.compact.bench_compact"
            reps = {} if cuda else {"warmup": 3, "reps": 10}
            bar = progress(len(sizes), "bench compact_", unit="cfg")
            for C in sizes:
                # a full buffer C = L + slack, evicting the slack (1/8 of C, like a prefill chunk)
                L = C - max(1, C // 8)
                try:
                    got = _call(fn, device=device, dtype=dtype, C=C, budget=L, n_recent=min(256, L // 4), B=B, Hkv=Hkv,
                                D=D, **reps)
                except Exception as e:  # noqa: BLE001
                    if not _is_oom(e):
                        raise
                    got = [{"C": C, "impl": "inf_mllm", "error": "out of memory"}]
                    _free(device)
                rows += [_normalise(dict(r, mode=f"L={L}"), "compact_", None) for r in got]
                bar.update(1)
            bar.close()
        else:
            sources["compact"] = "built-in (inf_mllm.evals.ops_bench)"
            bar = progress(len(sizes), "bench compact_", unit="cfg")
            rows += _compact_rows(list(sizes), device, dtype, B, Hkv, D, bar)
            bar.close()
    for r in rows:
        ms = r.get("median_ms")
        if ms is None and r.get("median_s") is not None:
            ms = r["median_ms"] = r["median_s"] * 1e3
        if ms is None and r.get("median_us") is not None:
            ms = r["median_ms"] = r["median_us"] / 1e3
        nb = r.get("bytes")
        if ms and nb and "GBps" not in r:
            r["GBps"] = nb / (ms / 1e3) / 1e9
        if cuda and r.get("GBps"):
            r["frac_copy_bw"] = r["GBps"] / bw["GBps"]
    return {"rows": rows, "copy_bandwidth": bw, "sources": sources,
            "shape": {"B": B, "Hq": Hq, "Hkv": Hkv, "D": D, "prefill_chunk": prefill_chunk, "window": window,
                      "dtype": str(dtype)}}

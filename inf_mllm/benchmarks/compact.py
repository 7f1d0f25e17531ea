"""Micro-benchmark of ``compact_`` (SPEC §4.2).

Two implementations on the same random inputs (never zeros):

* ``inf_mllm``: :func:`inf_mllm.ops.compact_`, the native C++ (CPU) / CUDA operator (the
  reference-backed fallback op if the native library was not built: see ``native`` in the rows);
* ``reference``: :func:`inf_mllm.reference.compact_ref_` (sort and gather per row and head).

compact_ works in place, so every timed run starts from the same pristine inputs copied into
the working buffers first; only the operator call is timed (CUDA events on the GPU,
``time.perf_counter`` on the CPU). Rows report the median time, the fastest run, the bytes the compaction
must move (read + write of every kept slot that changes place, over k, v, the extras and the
scores, from the kept indices) and the achieved bandwidth on them.

The CLI wraps :func:`bench_compact`; this module only returns rows.
"""
from __future__ import annotations

import statistics
import time
from typing import Dict, List, Optional, Sequence

import torch

from .. import ops
from ..reference import compact_ref_

__all__ = ["bench_compact"]


def _times_ms(run, restore, device: torch.device, warmup: int, reps: int) -> List[float]:
    """Times of ``reps`` calls of ``run()`` in ms, calling ``restore()`` (untimed) before each."""
    for _ in range(warmup):
        restore()
        run()
    times = []
    if device.type == "cuda":
        for _ in range(reps):
            restore()
            a = torch.cuda.Event(enable_timing=True)
            b = torch.cuda.Event(enable_timing=True)
            a.record()
            run()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
    else:
        for _ in range(reps):
            restore()
            t0 = time.perf_counter()
            run()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def bench_compact(
    device="cpu",
    dtype: torch.dtype = torch.bfloat16,
    B: int = 1,
    Hkv: int = 8,
    C: int = 4352,
    budget: int = 4096,
    D: int = 128,
    n_sink: int = 4,
    n_recent: int = 256,
    reset_scores: bool = True,
    extras: Sequence[torch.dtype] = (),
    return_indices: bool = False,
    impls: Sequence[str] = ("inf_mllm", "reference"),
    warmup: int = 3,
    reps: int = 20,
    seed: int = 0,
) -> List[Dict]:
    """Time ``compact_`` (native) against ``compact_ref_`` on full rows (``length = C``).

    ``extras`` lists the dtypes of per-slot metadata tensors ``[B, Hkv, C]`` moved alongside.
    Returns one dict per implementation, with ``speedup`` (reference time / this time).
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    gen = torch.Generator(device="cpu").manual_seed(seed)
    src = dict(
        k=(torch.randn(B, Hkv, C, D, generator=gen) + 3.0).to(device=device, dtype=dtype),
        v=(torch.randn(B, Hkv, C, D, generator=gen) - 3.0).to(device=device, dtype=dtype),
        scores=(torch.rand(B, Hkv, C, generator=gen) + 0.25).to(device),
        length=torch.full((B,), C, dtype=torch.int32, device=device),
        extras=[(torch.randint(1, 100, (B, Hkv, C), generator=gen)).to(device=device, dtype=dt) for dt in extras],
    )
    work = dict(
        k=src["k"].clone(), v=src["v"].clone(), scores=src["scores"].clone(), length=src["length"].clone(),
        extras=[e.clone() for e in src["extras"]],
    )

    def restore():
        for name in ("k", "v", "scores", "length"):
            work[name].copy_(src[name])
        for w, s in zip(work["extras"], src["extras"]):
            w.copy_(s)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    kw = dict(budget=budget, n_sink=n_sink, n_recent=n_recent, reset_scores=reset_scores)

    # Bytes that must move, from the kept indices: every kept slot i with keep[i] != i is read
    # and written once per tensor (k, v: D elements; extras: 1; scores: 1 float32 unless reset).
    restore()
    keep = compact_ref_(work["k"], work["v"], work["scores"], work["length"], extras=work["extras"],
                        return_indices=True, **kw)
    moved_slots = int((keep != torch.arange(budget, device=device)).sum())
    slot_bytes = 2 * D * src["k"].element_size() + sum(e.element_size() for e in src["extras"])
    slot_bytes += 0 if reset_scores else 4
    moved_bytes = 2 * moved_slots * slot_bytes
    if reset_scores:
        moved_bytes += B * Hkv * C * 4  # the zeroed scores are written

    rows: List[Dict] = []
    for impl in impls:
        if impl == "inf_mllm":
            def run():
                ops.compact_(work["k"], work["v"], work["scores"], work["length"], extras=work["extras"],
                             return_indices=return_indices, check_values=False, **kw)
        elif impl == "reference":
            def run():
                compact_ref_(work["k"], work["v"], work["scores"], work["length"], extras=work["extras"],
                             return_indices=return_indices, **kw)
        else:
            raise ValueError(f"unknown impl {impl!r}")
        times = _times_ms(run, restore, device, warmup, reps)
        ms = statistics.median(times)
        rows.append(
            dict(
                op="compact_",
                impl=impl,
                native=ops.native_available() if impl == "inf_mllm" else False,
                device=str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
                threads=torch.get_num_threads() if device.type == "cpu" else None,
                dtype=str(dtype).replace("torch.", ""),
                B=B, Hkv=Hkv, C=C, budget=budget, D=D, n_sink=n_sink, n_recent=n_recent,
                reset_scores=reset_scores,
                extras=[str(dt).replace("torch.", "") for dt in extras],
                time_ms=ms,
                min_ms=min(times),
                moved_slots=moved_slots,
                bytes=moved_bytes,
                gbps=moved_bytes / (ms * 1e-3) / 1e9,
            )
        )
    ref = {r["impl"]: r["time_ms"] for r in rows}.get("reference")
    for r in rows:
        r["speedup"] = (ref / r["time_ms"]) if ref else None
    return rows


def _main(argv: Optional[Sequence[str]] = None) -> None:  # pragma: no cover - quick manual run
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    for dtype in (torch.bfloat16, torch.float32):
        for reset in (True, False):
            for r in bench_compact(dev, dtype, reset_scores=reset, extras=(torch.int8,)):
                print(
                    f"{r['impl']:>10} {r['dtype']:>8} reset={r['reset_scores']!s:5} "
                    f"{r['time_ms']:8.3f} ms {r['gbps']:7.1f} GB/s  x{r['speedup']:.1f}"
                )


if __name__ == "__main__":  # pragma: no cover
    _main()

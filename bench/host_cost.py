"""Host cost of one ``attention_with_scores`` call on the Triton path, with the kernel launches
stubbed (no GPU needed): what the launcher (and the ``ops`` wrapper with its argument checks)
spends in Python per call, i.e. the floor of an eager decode step's per-layer cost.

    python bench/host_cost.py [--calls 3000] [--repeats 5] [--out DIR]

Every ``JITFunction.run`` (what ``kernel[grid](...)`` calls) returns at once, so Triton's own
launch path (argument binding, cache lookup, the driver call: tens of microseconds more on a GPU)
is not counted; the tensors are CPU tensors (allocation costs differ from the CUDA caching
allocator's, but are of the same order). ``ops`` is measured as the model glue calls it
(``check_values=False``), routed to the Triton launcher instead of the CPU path. Cases: decode
(B=8, Hq=32, Hkv=8, D=128, C=4096, n=1, bf16, window 32: RoPE from the frequencies, from a
cos/sin table, none) and a prefill chunk (n=256). Reported: the best of ``--repeats`` means over
``--calls`` calls, in microseconds. Run it with ``PYTHONPATH`` at the checkout to measure.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)  # real JITFunction objects (their run is stubbed)

import torch  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

import inf_mllm.ops as ops  # noqa: E402
from inf_mllm.kernels import attention as kat  # noqa: E402


def _case(n, rope):
    B, Hkv, G, D, C = 8, 8, 4, 128, 4096
    dt = torch.bfloat16
    q = torch.randn(B, Hkv * G, n, D, dtype=dt)
    k = torch.randn(B, Hkv, C, D, dtype=dt)
    v = torch.randn(B, Hkv, C, D, dtype=dt)
    length = torch.full((B,), C, dtype=torch.int32)
    scores = torch.zeros(B, Hkv, C)
    inv = 1.0 / (1e6 ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
    kw = {}
    if rope == "freq":
        kw = dict(inv_freq=inv, rope_scale=1.0)
    elif rope == "table":
        ang = torch.arange(C, dtype=torch.float32)[:, None] * inv
        ang = torch.cat((ang, ang), -1)
        kw = dict(cos=ang.cos(), sin=ang.sin())
    return q, k, v, length, scores, kw


def _time(fn, calls, repeats):
    for _ in range(min(200, calls)):
        fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter_ns()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter_ns() - t0) / calls / 1e3)
    return best


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=3000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None, help="directory for host_cost.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    launches = []
    JITFunction.run = lambda self, *a, grid, warmup, **kw: launches.append(self.fn.__name__)
    ops.attention_with_scores_torch = kat.attention_with_scores_triton  # the CUDA branch of ops, on CPU tensors
    rows = []
    for name, n, rope in (("decode freq", 1, "freq"), ("decode table", 1, "table"), ("decode none", 1, None),
                          ("prefill freq n=256", 256, "freq")):
        q, k, v, length, scores, kw = _case(n, rope)
        cos, sin = kw.get("cos"), kw.get("sin")
        fkw = {key: val for key, val in kw.items() if key not in ("cos", "sin")}

        def launcher():
            kat.attention_with_scores_triton(q, k, v, length, scores, 128 ** -0.5, 32, 1e-3, cos, sin, "absolute", 1.0,
                                             **fkw)

        def through_ops():
            ops.attention_with_scores(q, k, v, length, scores, scale=128 ** -0.5, window=32, bias=1e-3,
                                      check_values=False, **kw)

        launches.clear()
        launcher()
        kernels = list(launches)
        row = dict(case=name, kernels=kernels, launcher_us=_time(launcher, args.calls, args.repeats),
                   ops_us=_time(through_ops, args.calls, args.repeats))
        rows.append(row)
        print(f"{name:20s} launcher {row['launcher_us']:7.1f} us   ops {row['ops_us']:7.1f} us   "
              f"({len(kernels)} launches stubbed: {', '.join(kernels)})", flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "host_cost.json"), "w") as f:
            json.dump(dict(kind="host_cost", torch=torch.__version__, argv=sys.argv, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Compile every Triton kernel variant our launcher would start, for real GPU targets, on a
machine without a GPU (Triton's compiler and ptxas need no device).

The interpreter (``TRITON_INTERPRET=1``) runs the kernels' Python semantics on the CPU but never
lowers them: shapes ``tl.dot`` refuses on a GPU, layouts that do not lower, shared memory beyond
the chip's limit, all pass there. Here the launcher ``attention_with_scores_triton`` is called
for many shapes with every ``JITFunction.run`` intercepted; each captured launch (kernel,
argument types, constexprs, num_warps) is compiled with ``triton.compile`` for sm_80 and sm_90
down to a cubin, and its static shared memory is checked against the target's limit.

    python tools/triton_aot_check.py [--archs 80,90] [--quick]

Must run with TRITON_INTERPRET unset (it refuses otherwise). Exit status 0 when all compile.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("triton_aot_check: unset TRITON_INTERPRET (the interpreter never compiles)")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

# opt-in dynamic shared memory per block (bytes): A100 (sm_80) 163 KiB, H100/H200 (sm_90) 227 KiB
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
_PTR = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16",
        torch.int32: "*i32", torch.int64: "*i64", torch.int8: "*i8"}


def capture_launches(cases):
    """Run the launcher on CPU tensors with every kernel launch recorded instead of run."""
    from inf_mllm.kernels.attention import attention_with_scores_triton

    launches = {}
    orig = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        sig, consts = {}, {}
        names = [p.name for p in self.params]
        bound = dict(zip(names, args))
        bound.update({k: v for k, v in kwargs.items() if k in names})
        for p in self.params:
            val = bound[p.name]
            if p.is_constexpr:
                sig[p.name] = "constexpr"
                consts[p.name] = val
            elif isinstance(val, torch.Tensor):
                sig[p.name] = _PTR[val.dtype]
            elif isinstance(val, bool):
                sig[p.name] = "i1"
            elif isinstance(val, int):
                sig[p.name] = "i32" if -(2**31) <= val < 2**31 else "i64"
            elif isinstance(val, float):
                sig[p.name] = "fp32"
            else:
                raise TypeError(f"{self.fn.__name__}: cannot type argument {p.name}={val!r}")
        opts = {k: v for k, v in kwargs.items() if k in ("num_warps", "num_stages")}
        key = (self.fn.__name__, tuple(sorted(sig.items())), tuple(sorted((k, str(v)) for k, v in consts.items())),
               tuple(sorted(opts.items())))
        launches.setdefault(key, (self, sig, consts, opts))
        return None

    JITFunction.run = record
    try:
        for (B, Hkv, G, D, n, C, dtype, rope, score, ns) in cases:
            q = torch.empty(B, Hkv * G, n, D, dtype=dtype)
            k = torch.empty(B, Hkv, C, D, dtype=dtype)
            v = torch.empty_like(k)
            length = torch.full((B,), C, dtype=torch.int32)
            scores = torch.empty(B, Hkv, C) if score else None
            cos = torch.empty(C, D) if rope else None
            sin = torch.empty(C, D) if rope else None
            attention_with_scores_triton(q, k, v, length, scores, D ** -0.5, 32, 1e-3, cos, sin, num_splits=ns)
    finally:
        JITFunction.run = orig
    return list(launches.values())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", default="80,90")
    ap.add_argument("--quick", action="store_true", help="fewer shapes (one dtype per precision path)")
    args = ap.parse_args(argv)
    archs = [int(a) for a in args.archs.split(",")]
    dtypes = [torch.bfloat16, torch.float32] if args.quick else [torch.bfloat16, torch.float16, torch.float32]
    cases = []
    for dtype, D, G, n, rope, score in itertools.product(dtypes, (64, 128), (1, 3, 4, 8), (1, 4, 64, 256),
                                                          (False, True), (False, True)):
        for ns in ((1, 64) if n * G <= 64 else (None,)):
            cases.append((2, 2, G, D, n, 512, dtype, rope, score, ns))
    launches = capture_launches(cases)
    failures = 0
    for arch in archs:
        target = GPUTarget("cuda", arch, 32)
        for jf, sig, consts, opts in launches:
            name = jf.fn.__name__
            desc = f"{name} sm_{arch} " + ",".join(f"{k}={consts[k]}" for k in sorted(consts) if k != "DT") \
                + (f",DT={consts['DT']}" if "DT" in consts else "") + f" {opts}"
            try:
                ck = triton.compile(ASTSource(fn=jf, signature=sig, constexprs=consts), target=target, options=opts)
                smem = int(ck.metadata.shared)
                if smem > SMEM_LIMIT[arch]:
                    failures += 1
                    print(f"FAIL {desc}: shared memory {smem} B > {SMEM_LIMIT[arch]} B")
                elif os.environ.get("VERBOSE"):
                    print(f"ok   {desc}: smem {smem} B")
            except Exception as e:  # report every failing variant, not just the first
                failures += 1
                msg = str(e).strip().splitlines()
                print(f"FAIL {desc}: {type(e).__name__}: {msg[-1] if msg else ''}")
    total = len(launches) * len(archs)
    print(f"triton_aot_check: {total - failures}/{total} kernel variants compiled "
          f"({len(launches)} launches x sm_{'/sm_'.join(map(str, archs))})")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())

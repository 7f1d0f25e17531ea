"""Compile every Triton kernel variant our launcher would start, for real GPU targets, on a
machine without a GPU (Triton's compiler and ptxas need no device).

The interpreter (``TRITON_INTERPRET=1``) runs the kernels' Python semantics on the CPU but never
lowers them: shapes ``tl.dot`` refuses on a GPU, layouts that do not lower, shared memory beyond
the chip's limit, all pass there. Here the launcher ``attention_with_scores_triton`` is called
for many shapes with every ``JITFunction.run`` intercepted; each captured launch (kernel,
argument types, constexprs, num_warps) is compiled with ``triton.compile`` for sm_80 and sm_90
down to a cubin, and its static shared memory is checked against the target's limit.

    python tools/triton_aot_check.py [--archs 80,90] [--quick | --smoke] [--only KERNEL] [--regs]

``--smoke`` (what ``tests/test_triton_compile.py`` runs, about a minute on sm_90): bf16 and
fp32, D=128, RoPE + scores, n=1 and n=64 (decode and prefill), plus the fp32 RoPE variants
that once overflowed shared memory (D=64/128, decode and prefill). Every scoring launch is
captured with both bias forms (``absolute``, ``relative``), a constexpr of the score kernels. ``--only`` keeps the
launches of the named kernel(s) (comma separated). ``--regs`` also runs ptxas -v on each
variant and prints its registers and spills. ``VERBOSE=1`` prints every variant that passes.

Must run with TRITON_INTERPRET unset (it refuses otherwise). The last line is always
``triton_aot_check: PASS|FAIL <ok>/<total> kernel variants compiled ...``; exit status 0
exactly when every variant compiled within the shared-memory limit.
"""
from __future__ import annotations

import argparse
import itertools
import os
import re
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
            # both bias forms (BIAS_REL is a constexpr: two variants of each scoring kernel)
            for bias_mode, bias, decay in (("absolute", 1e-3, 1.0), ("relative", 1.0, 0.5))[: 2 if score else 1]:
                attention_with_scores_triton(q, k, v, length, scores, D ** -0.5, 32, bias, cos, sin, bias_mode, decay,
                                             num_splits=ns)
    finally:
        JITFunction.run = orig
    return list(launches.values())


def _ptxas_usage(ck, arch: int) -> str:
    """Registers / spills of a compiled variant from ``ptxas -v`` on its PTX (Triton's ptxas)."""
    import subprocess
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ck.asm["ptx"])
        gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        r = subprocess.run([get_ptxas(arch).path, "-v", "--regAllocOptLevel=2", f"--gpu-name={gpu}", src,
                            "-o", os.path.join(tmp, "k.o")], capture_output=True, text=True)
    regs = re.search(r"Used (\d+) registers", r.stderr)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", r.stderr)
    return (f"regs {regs.group(1) if regs else '?'}"
            + (f", spills {spill.group(1)}/{spill.group(2)} B st/ld" if spill else ""))


def build_cases(mode: str):
    """(B, Hkv, G, D, n, C, dtype, rope, score, num_splits) shapes for the launcher."""
    cases = []
    if mode == "smoke":
        for dtype, G, n in itertools.product((torch.bfloat16, torch.float32), (1, 4), (1, 64)):
            cases.append((2, 2, G, 128, n, 512, dtype, True, True, None))
        # worst fp32 RoPE cases before the num_stages/BLOCK_N fix (up to 368 KiB on sm_90)
        cases += [(2, 2, 8, 64, 4, 512, torch.float32, True, True, None),   # decode D=64, BLOCK_R=32
                  (2, 2, 1, 64, 64, 512, torch.float32, True, False, 1),    # decode D=64, BLOCK_R=64
                  (2, 2, 8, 128, 4, 512, torch.float32, True, False, None),  # decode D=128, BLOCK_R=32
                  (2, 2, 4, 64, 64, 512, torch.float32, True, True, None)]   # prefill D=64
        return cases
    dtypes = [torch.bfloat16, torch.float32] if mode == "quick" else [torch.bfloat16, torch.float16, torch.float32]
    for dtype, D, G, n, rope, score in itertools.product(dtypes, (64, 128), (1, 3, 4, 8), (1, 4, 64, 256),
                                                          (False, True), (False, True)):
        for ns in ((1, 64) if n * G <= 64 else (None,)):
            cases.append((2, 2, G, D, n, 512, dtype, rope, score, ns))
    return cases


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", default="80,90")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="fewer shapes (one dtype per precision path)")
    mode.add_argument("--smoke", action="store_true", help="representative subset for the test suite")
    ap.add_argument("--only", default=None, help="comma-separated kernel names to compile (e.g. _decode_stage1)")
    ap.add_argument("--regs", action="store_true", help="also print ptxas registers/spills per variant")
    args = ap.parse_args(argv)
    archs = [int(a) for a in args.archs.split(",")]
    unknown = [a for a in archs if a not in SMEM_LIMIT]
    if unknown:
        ap.error(f"unknown arch(s) {unknown}; known: {sorted(SMEM_LIMIT)}")
    launches = capture_launches(build_cases("smoke" if args.smoke else "quick" if args.quick else "full"))
    if args.only:
        keep = set(args.only.split(","))
        launches = [x for x in launches if x[0].fn.__name__ in keep]
        if not launches:
            print(f"triton_aot_check: FAIL no launches of {sorted(keep)} captured")
            return 1
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
                elif os.environ.get("VERBOSE") or args.regs:
                    print(f"ok   {desc}: smem {smem} B" + (f", {_ptxas_usage(ck, arch)}" if args.regs else ""))
            except Exception as e:  # report every failing variant, not just the first
                failures += 1
                msg = str(e).strip().splitlines()
                print(f"FAIL {desc}: {type(e).__name__}: {msg[-1] if msg else ''}")
    total = len(launches) * len(archs)
    print(f"triton_aot_check: {'FAIL' if failures else 'PASS'} {total - failures}/{total} kernel variants compiled "
          f"within shared memory ({len(launches)} launches x sm_{'/sm_'.join(map(str, archs))}, "
          f"{failures} failed)", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())

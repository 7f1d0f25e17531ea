"""Compile what the Triton launcher launches, for real GPU targets, on a machine without a GPU,
and report what each variant costs: shared memory, registers, spills, programs per SM, and the
global-memory bytes per key slot of its key loops (from the PTX).

The interpreter (``TRITON_INTERPRET=1``) runs the kernels' Python semantics on the CPU but never
lowers them: shapes ``tl.dot`` refuses on a GPU, layouts that do not lower, shared memory beyond
the chip's limit, all pass there. Here the launcher ``attention_with_scores_triton`` is called on
CPU tensors with the launch heuristics of a target GPU (``kernels.attention.TARGET_OVERRIDE``: its
SM count, hence the split count, its shared memory, hence block sizes and stages) and every
``JITFunction.run`` intercepted. Each captured launch is specialised exactly as the JIT does it
(the CUDA backend's binder: ``tt.divisibility=16`` on pointers and ints the JIT would mark,
ints equal to 1 as constants, the constexprs) and compiled with ``triton.compile`` down to a
cubin for that target: A100 (sm_80), RTX 4090 D (sm_89), H200 (sm_90) (``KNOWN_TARGETS``).

    python tools/triton_aot_check.py [--archs 80,89,90] [--smoke | --quick] [--only KERNEL]
                                     [--regs] [--json FILE] [-v]

Per variant: ``smem`` (bytes per program, against the target's opt-in limit per block),
``progs/SM`` (resident programs per SM by shared memory, threads and, with ``--regs``,
registers), ``regs``/``spills`` (``ptxas -v`` on the variant's PTX, ``--regs``), and per key loop
the bytes that ``ld.global``/``cp.async`` load and ``st.global`` stores per trip, times the
threads, over the key block: bytes per key slot. This is a static count: masked lanes and cache
hits are not modelled; the pipeline's prologue copies (``cp.async`` before the loop: the first
trips' K/V) are counted as the loop's; loads of libdevice's 24-byte constant table of the
Payne-Hanek reduction (``__cudart_i2opi_f``: sin/cos of angles beyond 105615 rad, a branch
that runs only there) are reported apart, not as K/V traffic.

Per decode call (the issue's shape unless changed: B=8, Hkv=8, G=4, n=1, C=4096, window 32, all
slots valid): the stage-1 key loop's loads per slot, and the whole call's global traffic per slot
(stage-1 loop loads and stores, the workspace and q traffic outside the loops over all
programs, the reduce's split loop and its score loop), each as a multiple of the K+V bytes per
slot (``2 * D * itemsize``).

``--smoke`` (what ``tests/test_triton_compile.py`` runs, about 40 variants): the decode calls of
``traffic_calls`` (sm_89: bf16/fp16, D=64/128, with and without scores, RoPE from the
frequencies; sm_80/sm_90: a bf16 subset), plus the prefill kernels and the RoPE table/position
and fp32 variants nearest the shared-memory limits (most of them on sm_89, the smallest limit);
the full run (no flag) compiles every dtype, D, G, n, RoPE form and bias form. Checks (exit status 1 if any
fails): every variant compiles within its target's shared memory; with ``--smoke``, the decode
key loop loads at most ``KEYLOOP_BOUND`` (1.15) x K+V per slot and the whole call moves at most
``CALL_BOUND`` (1.3) x. Compiles are cached in-process (a variant shared by two cases compiles
once) and by Triton's on-disk cache. Must run with TRITON_INTERPRET unset (it refuses otherwise).
The last line is always ``triton_aot_check: PASS|FAIL ...``.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("triton_aot_check: unset TRITON_INTERPRET (the interpreter never compiles)")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

from inf_mllm.kernels import attention as kat  # noqa: E402

KEYLOOP_BOUND = 1.15  # decode key loop: bytes loaded per slot / (K+V bytes per slot)
CALL_BOUND = 1.3  # the whole decode call (stage 1 + reduce, workspaces and scores)
ISSUE_SHAPE = dict(B=8, Hkv=8, G=4, n=1, C=4096)

_SZ = {"b8": 1, "u8": 1, "s8": 1, "b16": 2, "u16": 2, "s16": 2, "f16": 2, "bf16": 2, "b32": 4, "u32": 4, "s32": 4,
       "f32": 4, "b64": 8, "u64": 8, "s64": 8, "f64": 8, "b128": 16}
_DT = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# --------------------------------------------------------------------------------------
# capture: what the launcher launches on a target
# --------------------------------------------------------------------------------------

class Launch:
    """One captured launch, specialised as the JIT would."""

    def __init__(self, jf, sig, consts, attrs, options, grid):
        self.jf, self.sig, self.consts, self.attrs, self.options, self.grid = jf, sig, consts, attrs, options, grid
        self.name = jf.fn.__name__

    def key(self, arch):
        return (self.name, arch, tuple(sorted(self.sig.items())), tuple(sorted((str(k), str(v)) for k, v in self.consts.items())),
                tuple(sorted((str(k), str(v)) for k, v in self.attrs.items())),
                tuple(sorted((k, str(v)) for k, v in self.options.__dict__.items())))

    def named_consts(self):
        names = [p.name for p in self.jf.params]
        return {names[k[0]]: v for k, v in self.consts.items()}

    def desc(self):
        c = self.named_consts()
        keep = ["DT", "HEAD_DIM", "ROPE", "NSEC", "SCORE", "WRITE_LSE", "BIAS_REL", "BLOCK_R", "BLOCK_M", "BLOCK_N",
                "BLOCK_SR", "n", "nw"]
        parts = [f"{k}={c[k]}" for k in keep if k in c]
        return " ".join(parts) + f" w{self.options.num_warps} s{self.options.num_stages}"


def _specialise(jf, backend, args, kwargs):
    binder = create_function_from_signature(jf.signature, jf.params, backend)
    bound, specialization, opts = binder(*args, **kwargs)
    options, sig, consts, attrs = jf._pack_args(backend, kwargs, bound, specialization, opts)
    return sig, consts, attrs, options


def capture(call, target):
    """The launches of one launcher call ``call`` (a dict) under ``target``'s heuristics."""
    gt = GPUTarget("cuda", target.arch, 32)
    backend = make_backend(gt)
    out = []
    orig = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        sig, consts, attrs, options = _specialise(self, backend, args, kwargs)
        out.append(Launch(self, sig, consts, attrs, options, grid))

    B, Hkv, G, D, n, C = (call[k] for k in ("B", "Hkv", "G", "D", "n", "C"))
    dt = _DT[call["dtype"]]
    q = torch.empty(B, Hkv * G, n, D, dtype=dt)
    k = torch.empty(B, Hkv, C, D, dtype=dt)
    v = torch.empty_like(k)
    length = torch.full((B,), C, dtype=torch.int32)
    scores = torch.empty(B, Hkv, C) if call["score"] else None
    cos = sin = None
    kw = {}
    rope = call["rope"]
    if rope == "table":
        cos, sin = torch.empty(C, D), torch.empty(C, D)
    elif rope in ("freq", "pos"):
        kw["inv_freq"] = torch.empty(D // 2)
        if rope == "pos":
            kw["rope_pos"] = torch.zeros(3, B, Hkv, C, dtype=torch.int32)
            kw["rope_sections"] = torch.zeros(D // 2, dtype=torch.int32)
    if call.get("path"):
        kw["path"] = call["path"]
    if call.get("ns"):
        kw["num_splits"] = call["ns"]
    JITFunction.run = record
    prev = kat.TARGET_OVERRIDE
    kat.TARGET_OVERRIDE = target
    try:
        kat.attention_with_scores_triton(q, k, v, length, scores, D ** -0.5, call.get("window", 32), 1e-3, cos, sin,
                                         call.get("bias_mode", "absolute"), 1.0, **kw)
    finally:
        JITFunction.run = orig
        kat.TARGET_OVERRIDE = prev
    return out


# --------------------------------------------------------------------------------------
# compile and analyse
# --------------------------------------------------------------------------------------

_COMPILED: dict = {}
_REGS: dict = {}


def compile_launch(lc: Launch, arch: int):
    key = lc.key(arch)
    if key not in _COMPILED:
        try:
            ck = triton.compile(ASTSource(lc.jf, lc.sig, lc.consts, lc.attrs), target=GPUTarget("cuda", arch, 32),
                                options=lc.options.__dict__)
            _COMPILED[key] = (ck, analyse_ptx(ck.asm["ptx"]), None)
        except Exception as e:  # report every failing variant, not just the first
            msg = str(e).strip().splitlines()
            _COMPILED[key] = (None, None, f"{type(e).__name__}: {msg[-1] if msg else ''}")
    return _COMPILED[key]


def ptxas_usage(ck, arch: int, key) -> dict:
    """Registers, spills and stack of a variant from ``ptxas -v`` on its PTX (Triton's ptxas)."""
    if key in _REGS:
        return _REGS[key]
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ck.asm["ptx"])
        gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        r = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name={gpu}", src, "-o", os.path.join(tmp, "k.o")],
                           capture_output=True, text=True)
    regs = re.search(r"Used (\d+) registers", r.stderr)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", r.stderr)
    stack = re.search(r"(\d+) bytes stack frame", r.stderr)
    _REGS[key] = dict(regs=int(regs.group(1)) if regs else None,
                      spill_st=int(spill.group(1)) if spill else None, spill_ld=int(spill.group(2)) if spill else None,
                      stack=int(stack.group(1)) if stack else None)
    return _REGS[key]


_MEM = re.compile(r"^(?:@!?%\w+\s+)?(ld|st)\.global(?:\.[\w:]+)*?(?:\.v(\d))?\.(b\d+|[usf]\d+|bf16)\s+(.*)$")
_CPASYNC = re.compile(r"^(?:@!?%\w+\s+)?cp\.async\.\w+\.shared\.global(?:\.\w+)*\s*\[[^\]]*\],\s*\[\s*(%\w+)[^\]]*\],\s*"
                      r"(0x[0-9a-fA-F]+|\d+)")


def analyse_ptx(ptx: str) -> dict:
    """Global loads/stores per thread, in and outside the outermost loops of the PTX.

    Returns ``loops``: ``[{"ld", "st", "cp", "trig_ld", "lines"}]`` per outermost loop in PTX
    order (bytes per thread per trip; ``cp`` is the part of ``ld`` from ``cp.async``), and
    ``outside``: the same outside every loop, without the pipeline prologue's ``cp.async``
    (``outside_cp``)."""
    lines = [ln.strip() for ln in ptx.splitlines()]
    labels, ranges = {}, []
    for i, s in enumerate(lines):
        m = re.match(r"(\$\w+):", s)
        if m:
            labels[m.group(1)] = i
        m = re.search(r"\bbra(?:\.uni)?\s+(\$\w+);", s)
        if m and m.group(1) in labels and labels[m.group(1)] < i:
            ranges.append((labels[m.group(1)], i))
    # merge back edges of one loop and keep the outermost loops
    ranges.sort()
    outer = []
    for a, b in ranges:
        if outer and a <= outer[-1][1]:
            outer[-1] = (outer[-1][0], max(outer[-1][1], b))
        else:
            outer.append((a, b))
    # registers holding addresses into libdevice's Payne-Hanek table
    trig = set()
    for s in lines:
        m = re.match(r"mov\.(?:b|u)64\s+(%\w+),\s*__cudart_i2opi_f", s)
        if m:
            trig.add(m.group(1))
    changed = True
    while changed:
        changed = False
        for s in lines:
            m = re.match(r"(?:add|sub|mov|cvta\.\w+)\.(?:s|u|b)64\s+(%\w+),\s*(.*);", s)
            if m and m.group(1) not in trig and any(r in trig for r in re.findall(r"%\w+", m.group(2))):
                trig.add(m.group(1))
                changed = True

    def count(lo, hi, skip_cp=False):
        c = dict(ld=0, st=0, cp=0, trig_ld=0, lines=hi - lo)
        for s in lines[lo:hi]:
            m = _MEM.match(s)
            if m:
                op, vec, ty, rest = m.groups()
                nbytes = int(vec or 1) * _SZ.get(ty, 4)
                addr = re.search(r"\[\s*(%\w+)", rest)
                if op == "ld" and addr and addr.group(1) in trig:
                    c["trig_ld"] += nbytes
                else:
                    c[op] += nbytes
                continue
            m = _CPASYNC.match(s)
            if m:
                if not skip_cp:
                    c["ld"] += int(m.group(2), 0)
                    c["cp"] += int(m.group(2), 0)
                else:
                    c["skipped_cp"] = c.get("skipped_cp", 0) + int(m.group(2), 0)
        return c

    loops = [dict(count(a, b + 1), start=a) for a, b in outer]
    inside = set()
    for a, b in outer:
        inside.update(range(a, b + 1))
    outside = dict(ld=0, st=0, cp=0, trig_ld=0, lines=0, skipped_cp=0)
    i = 0
    while i < len(lines):  # contiguous stretches outside loops
        if i in inside:
            i += 1
            continue
        j = i
        while j < len(lines) and j not in inside:
            j += 1
        c = count(i, j, skip_cp=True)
        for key in outside:
            outside[key] += c.get(key, 0)
        i = j
    return dict(loops=loops, outside=outside)


def _key_loop(name, an):
    """The key loop of a kernel: stage 1 and the prefill forward, their largest loop; the reduce,
    its loop that stores (the score pass; its split loop only loads)."""
    loops = an["loops"]
    if not loops:
        return None
    if name == "_decode_reduce":
        st = [lp for lp in loops if lp["st"] > 0]
        return st[-1] if st else None
    if name in ("_decode_stage1", "_prefill_fwd"):
        return max(loops, key=lambda lp: lp["lines"])
    return None


def programs_per_sm(target, smem, warps, regs=None):
    threads = 32 * warps
    by = [target.blocks_sm, target.threads_sm // threads, target.smem_sm // (smem + 1024)]
    if regs:
        by.append(target.regs_sm // (regs * threads))
    return max(0, min(by))


# --------------------------------------------------------------------------------------
# cases
# --------------------------------------------------------------------------------------

def _call(D, dtype, rope, score, G=4, n=1, C=4096, B=8, Hkv=8, **kw):
    return dict(B=B, Hkv=Hkv, G=G, D=D, n=n, C=C, dtype=dtype, rope=rope, score=score, **kw)


def traffic_calls(arch: int, mode: str = "full"):
    """The decode calls whose traffic is reported (and bounded with ``--smoke``), at the issue's
    shape: bf16 and fp16, D=64/128, with and without scores, RoPE from the frequencies. The smoke
    run keeps the full set for sm_89 (the card's target) and a bf16 subset elsewhere (sm_80: D=128
    with scores; sm_90: also D=64, and D=128 without): each variant costs seconds to compile."""
    full = [_call(D, dt, "freq", sc) for dt, D, sc in itertools.product(("bf16", "fp16"), (128, 64), (True, False))]
    if mode != "smoke" or arch == 89:
        return full
    keep = [("bf16", 128, True)] + ([("bf16", 64, True), ("bf16", 128, False)] if arch == 90 else [])
    return [c for c in full if (c["dtype"], c["D"], c["score"]) in keep]


def build_calls(mode: str, arch: int):
    calls = list(traffic_calls(arch, mode))
    if mode == "smoke":
        # shared memory: the variants nearest the limit (sm_89's 99 KiB is the smallest), every form of RoPE,
        # fp32 (FMA dots through shared memory), both prefill kernels
        calls += [
            _call(128, "bf16", "table", True),
            _call(128, "bf16", "freq", True, n=256, C=1024, B=2, Hkv=2),   # prefill
        ]
        if arch != 90:
            calls += [_call(128, "fp32", "freq", True)]
        if arch == 89:
            calls += [_call(128, "bf16", "pos", True, bias_mode="relative"),
                      _call(128, "bf16", "table", True, n=256, C=1024, B=2, Hkv=2),
                      _call(128, "fp32", "freq", True, n=64, C=512, B=2, Hkv=2)]
        return calls
    dtypes = ("bf16", "fp32") if mode == "quick" else ("bf16", "fp16", "fp32")
    for dt, D, G, n, rope, sc in itertools.product(dtypes, (64, 128), (1, 4, 8), (1, 4, 64, 256),
                                                   ("none", "freq", "pos", "table"), (False, True)):
        if mode == "quick" and rope == "pos" and dt != "bf16":
            continue
        C = 4096 if G * n <= kat.DECODE_MAX_ROWS else 1024
        for bm in (("absolute", "relative") if sc else ("absolute",)):
            calls.append(_call(D, dt, rope, sc, G=G, n=n, C=C, B=2, Hkv=2, bias_mode=bm))
    return calls


def kv_bytes(call):
    return 2 * call["D"] * _DT[call["dtype"]].itemsize


def decode_call_traffic(call, launches, arch, threads_of):
    """Per-slot bytes of one decode call: the stage-1 key loop's loads, and the whole call."""
    slots = call["B"] * call["Hkv"] * call["C"]
    s1 = next(lc for lc in launches if lc.name == "_decode_stage1")
    red = next(lc for lc in launches if lc.name == "_decode_reduce")
    res = {}
    whole = 0.0
    for lc in (s1, red):
        ck, an, err = compile_launch(lc, arch)
        if err:
            return None
        c = lc.named_consts()
        thr = threads_of(lc)
        progs = lc.grid[0] * lc.grid[1]
        kl = _key_loop(lc.name, an)
        bn = c["BLOCK_N"]
        if kl is not None:
            per = (kl["ld"] + kl["st"]) * thr / bn
            whole += per
            if lc.name == "_decode_stage1":
                res["keyloop_ld"] = kl["ld"] * thr / bn
                res["keyloop_st"] = kl["st"] * thr / bn
                res["trig_ld"] = kl["trig_ld"] * thr / bn
            else:
                res["reduce_keyloop"] = per
        out = an["outside"]
        other = (out["ld"] + out["st"]) * thr * progs
        for lp in an["loops"]:
            if lp is not kl and lc.name == "_decode_reduce":  # the split loop: NS trips, split 0 only
                other += (lp["ld"] + lp["st"]) * thr * lc.grid[0] * lc.grid[1]
        whole += other / slots
        res[f"{lc.name}_outside"] = other / slots
    res["whole"] = whole
    kv = kv_bytes(call)
    res["keyloop_x"] = res["keyloop_ld"] / kv
    res["whole_x"] = whole / kv
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", default="80,89,90")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="fewer shapes (one dtype per precision path)")
    mode.add_argument("--smoke", action="store_true", help="the test suite's subset, with the traffic bounds")
    ap.add_argument("--only", default=None, help="comma-separated kernel names to compile (e.g. _decode_stage1)")
    ap.add_argument("--regs", action="store_true", help="also run ptxas -v per variant (registers, spills)")
    ap.add_argument("--json", default=None, help="write every variant's figures to this file")
    ap.add_argument("-v", "--verbose", action="store_true", help="print every variant, not only failures")
    args = ap.parse_args(argv)
    archs = [int(a) for a in args.archs.split(",")]
    unknown = [a for a in archs if a not in kat.KNOWN_TARGETS]
    if unknown:
        ap.error(f"unknown arch(s) {unknown}; known: {sorted(kat.KNOWN_TARGETS)}")
    mode_name = "smoke" if args.smoke else "quick" if args.quick else "full"
    keep = set(args.only.split(",")) if args.only else None
    failures, variants, report_calls = 0, {}, []
    verbose = args.verbose or os.environ.get("VERBOSE")
    for arch in archs:
        target = kat.KNOWN_TARGETS[arch]
        for call in build_calls(mode_name, arch):
            try:
                launches = capture(call, target)
            except Exception as e:  # the launcher refused the call
                failures += 1
                print(f"FAIL launcher sm_{arch} {call}: {type(e).__name__}: {e}", flush=True)
                continue
            for lc in launches:
                if keep and lc.name not in keep:
                    continue
                key = lc.key(arch)
                if key in variants:
                    continue
                ck, an, err = compile_launch(lc, arch)
                row = dict(kernel=lc.name, arch=arch, target=target.name, variant=lc.desc(),
                           grid=list(lc.grid), call={k: v for k, v in call.items()})
                if err:
                    failures += 1
                    row["error"] = err
                    print(f"FAIL {lc.name} sm_{arch} {lc.desc()}: {err}", flush=True)
                    variants[key] = row
                    continue
                smem = int(ck.metadata.shared)
                warps = lc.options.num_warps
                row.update(smem=smem, smem_limit=target.smem_block, num_warps=warps,
                           num_stages=lc.options.num_stages)
                if args.regs:
                    row.update(ptxas_usage(ck, arch, key))
                row["progs_per_sm"] = programs_per_sm(target, smem, warps, row.get("regs"))
                kl = _key_loop(lc.name, an)
                bn = lc.named_consts().get("BLOCK_N")
                if kl is not None and bn:
                    thr = 32 * warps
                    row.update(keyloop_ld_per_slot=kl["ld"] * thr / bn, keyloop_st_per_slot=kl["st"] * thr / bn,
                               keyloop_trig_ld_per_slot=kl["trig_ld"] * thr / bn,
                               kv_per_slot=kv_bytes(call))
                ok = smem <= target.smem_block
                if not ok:
                    failures += 1
                variants[key] = row
                if not ok or verbose:
                    extra = ""
                    if "regs" in row:
                        extra += f", regs {row['regs']}, spills {row['spill_st']}/{row['spill_ld']} B"
                    if "keyloop_ld_per_slot" in row:
                        extra += (f", key loop ld {row['keyloop_ld_per_slot']:.0f} st {row['keyloop_st_per_slot']:.0f}"
                                  f" B/slot ({row['keyloop_ld_per_slot'] / row['kv_per_slot']:.2f}x K+V)")
                    print(f"{'ok  ' if ok else 'FAIL'} {lc.name} sm_{arch} {lc.desc()}: smem {smem} B"
                          f"{'' if ok else f' > {target.smem_block} B'}, {row['progs_per_sm']} progs/SM{extra}",
                          flush=True)
            if call in traffic_calls(arch, mode_name) and not keep and any(lc.name == "_decode_stage1" for lc in launches):
                tr = decode_call_traffic(call, launches, arch, lambda lc: 32 * lc.options.num_warps)
                if tr is None:
                    continue
                ok = tr["keyloop_x"] <= KEYLOOP_BOUND and tr["whole_x"] <= CALL_BOUND
                checked = args.smoke
                if checked and not ok:
                    failures += 1
                report_calls.append(dict(arch=arch, call=call, ok=ok, **tr))
                if verbose:
                    print("     " + ", ".join(f"{k} {v:.1f}" for k, v in tr.items()))
                print(f"{'call' if ok or not checked else 'FAIL'} sm_{arch} decode {call['dtype']} D={call['D']} "
                      f"RoPE={call['rope']} {'scores' if call['score'] else 'no scores'}: key loop "
                      f"{tr['keyloop_ld']:.0f} B/slot loaded = {tr['keyloop_x']:.2f}x K+V (bound {KEYLOOP_BOUND}), "
                      f"whole call {tr['whole']:.0f} B/slot = {tr['whole_x']:.2f}x (bound {CALL_BOUND})"
                      + (f"; trig-table loads {tr['trig_ld']:.0f} B/slot (static, apart)" if tr["trig_ld"] else ""),
                      flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(kind="triton_aot_check", mode=mode_name, triton=triton.__version__,
                           variants=list(variants.values()), calls=report_calls), f, indent=1)
    total = len(variants)
    print(f"triton_aot_check: {'FAIL' if failures else 'PASS'} {total} kernel variants compiled for "
          f"sm_{'/sm_'.join(map(str, archs))} ({mode_name}), {failures} failed "
          f"(shared memory{', decode traffic' if args.smoke else ''})", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())

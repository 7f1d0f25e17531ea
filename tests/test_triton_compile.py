"""The Triton kernels, compiled as the JIT compiles what the launcher launches on an A100 (sm_80),
an RTX 4090 D (sm_89) and an H200 (sm_90), fit each target's shared memory, and the decode call
moves little more than K and V.

The interpreter tests never lower the kernels, so a block size or pipeline depth that overflows
shared memory, or a ``tl.dot`` shape that does not lower, passes there. This runs
``tools/triton_aot_check.py --smoke --json`` once per target (concurrently), in subprocesses without ``TRITON_INTERPRET``
(``triton.compile`` down to a cubin needs no GPU; each variant compiles once), and checks its
figures: every variant within its target's shared memory per block; the decode key loop (RoPE
from the frequencies, the issue's shape B=8, Hkv=8, G=4, n=1, C=4096; on sm_89 bf16 and fp16,
D=64/128, with and without scores, a bf16 subset elsewhere) loads at most 1.15 x the K+V bytes
per slot, and the whole call (stage 1 and reduce, workspaces and scores) at most 1.3 x. About
two minutes on a cold Triton cache (a few seconds per variant), seconds warm.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
pytest.importorskip("triton.backends.nvidia.compiler", reason="Triton without its CUDA backend")

TOOL = Path(__file__).resolve().parents[1] / "tools" / "triton_aot_check.py"
ARCHS = (80, 89, 90)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """One run of the tool per target, concurrently (compiling is CPU-bound), merged."""
    tmp = tmp_path_factory.mktemp("aot")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    procs = {a: subprocess.Popen([sys.executable, str(TOOL), "--smoke", "--archs", str(a), "--json", str(tmp / f"{a}.json")],
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for a in ARCHS}
    data = dict(variants=[], calls=[], summary=[], rc=0, stdout="")
    for a, p in procs.items():
        out, _ = p.communicate(timeout=1800)
        data["stdout"] += out
        data["rc"] |= p.returncode
        data["summary"] += [ln for ln in out.splitlines() if ln.startswith("triton_aot_check:")]
        if not (tmp / f"{a}.json").exists():
            pytest.fail(f"no report for sm_{a} (rc={p.returncode}):\n{out[-4000:]}")
        part = json.loads((tmp / f"{a}.json").read_text())
        data["variants"] += part["variants"]
        data["calls"] += part["calls"]
    return data


def test_compile_check_passes(report):
    fails = [ln for ln in report["stdout"].splitlines() if ln.startswith("FAIL")]
    assert report["rc"] == 0 and len(report["summary"]) == len(ARCHS), "\n".join(fails + report["summary"])
    assert all(ln.startswith("triton_aot_check: PASS") for ln in report["summary"]), "\n".join(fails + report["summary"])


@pytest.mark.parametrize("arch", ARCHS)
def test_every_variant_compiles_within_shared_memory(report, arch):
    rows = [v for v in report["variants"] if v["arch"] == arch]
    assert rows, f"no variant compiled for sm_{arch}"
    errors = [f"{v['kernel']} {v['variant']}: {v['error']}" for v in rows if "error" in v]
    assert not errors, "\n".join(errors)
    over = [f"{v['kernel']} {v['variant']}: {v['smem']} B > {v['smem_limit']} B" for v in rows if v["smem"] > v["smem_limit"]]
    assert not over, "\n".join(over)
    # every kernel of both paths was compiled for this target
    assert {"_decode_stage1", "_decode_reduce", "_prefill_fwd", "_prefill_scores"} <= {v["kernel"] for v in rows}


def _calls(report, arch):
    calls = [c for c in report["calls"] if c["arch"] == arch]
    got = {(c["call"]["dtype"], c["call"]["D"], c["call"]["score"]) for c in calls}
    if arch == 89:  # the card's target: bf16 and fp16, D=64 and 128, with and without scores
        assert got == {(dt, D, sc) for dt in ("bf16", "fp16") for D in (64, 128) for sc in (True, False)}
    else:
        assert ("bf16", 128, True) in got
    return calls


@pytest.mark.parametrize("arch", ARCHS)
def test_decode_key_loop_loads_little_more_than_k_and_v(report, arch):
    bad = [f"{c['call']['dtype']} D={c['call']['D']} scores={c['call']['score']}: {c['keyloop_ld']:.0f} B/slot = "
           f"{c['keyloop_x']:.2f}x" for c in _calls(report, arch) if c["keyloop_x"] > 1.15]
    assert not bad, "decode key loop loads > 1.15 x K+V per slot:\n" + "\n".join(bad)


@pytest.mark.parametrize("arch", ARCHS)
def test_whole_decode_call_moves_little_more_than_k_and_v(report, arch):
    bad = [f"{c['call']['dtype']} D={c['call']['D']} scores={c['call']['score']}: {c['whole']:.0f} B/slot = "
           f"{c['whole_x']:.2f}x" for c in _calls(report, arch) if c["whole_x"] > 1.3]
    assert not bad, "whole decode call > 1.3 x K+V per slot:\n" + "\n".join(bad)


def test_split_count_follows_the_target(report):
    """The launch heuristics see each target's SM count: the decode grid of the issue's shape
    (B * Hkv = 64 programs per split) is about two waves of the target's SMs."""
    grids = {c["arch"]: c for c in report["variants"] if c["kernel"] == "_decode_stage1"
             and c["call"]["B"] * c["call"]["Hkv"] == 64 and c["call"]["n"] == 1}
    sms = {80: 108, 89: 114, 90: 132}
    for arch, v in grids.items():
        assert v["grid"][1] == -(-2 * sms[arch] // 64), (arch, v["grid"])
    assert set(grids) == set(ARCHS)

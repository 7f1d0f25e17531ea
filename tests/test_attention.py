"""attention_with_scores (SPEC §4.1): public op (CPU torch path), Triton kernels (interpreter on
CPU, real on CUDA), argument checks, opcheck and torch.compile.

Tolerances follow flash-attention's rule: the error of the fast path against a float64
reference must be at most about twice the error of the plain PyTorch reference run in the
same dtype, plus a small epsilon.
"""
from __future__ import annotations

import math

import pytest
import torch

import inf_mllm.ops as ops
from inf_mllm.reference import attention_with_scores_ref

# small epsilon per dtype, relative to max(1, |reference|). Scores are computed in float32
# whatever the input dtype (the fast paths read the same rounded inputs as the float64
# reference), so their epsilon is float32's; the 2x same-dtype term covers the rest.
_EPS = {torch.float32: 2e-5, torch.float16: 1e-3, torch.bfloat16: 4e-3}
_EPS_SCORES = 2e-5


def _rope_tables(C: int, D: int, dtype=torch.float32):
    pos = torch.arange(C, dtype=torch.float64)[:, None]
    inv = 1.0 / (10000.0 ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    emb = torch.cat([pos * inv, pos * inv], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def make_inputs(B, Hkv, G, D, n, C, lens, dtype, rope=False, with_scores=True, poison="nan", seed=0, device="cpu",
                rope_dtype=torch.float32):
    """Random inputs (never zeros). Slots >= length are poisoned in k and v: ``nan`` or a huge
    finite value; a kernel that reads them produces NaN/garbage."""
    gen = torch.Generator().manual_seed(seed)
    Hq = Hkv * G
    q = torch.randn(B, Hq, n, D, generator=gen).to(dtype)
    k = torch.randn(B, Hkv, C, D, generator=gen).to(dtype)
    v = torch.randn(B, Hkv, C, D, generator=gen).to(dtype)
    bad = float("nan") if poison == "nan" else torch.finfo(dtype).max / 4
    for b, L in enumerate(lens):
        k[b, :, L:] = bad
        v[b, :, L:] = bad
    length = torch.tensor(lens, dtype=torch.int32)
    scores = torch.rand(B, Hkv, C, generator=gen) + 0.5 if with_scores else None
    cos = sin = None
    if rope:
        cos, sin = _rope_tables(C + 3, D, rope_dtype)  # more rows than C is allowed
    mv = lambda t: None if t is None else t.to(device)  # noqa: E731
    return mv(q), mv(k), mv(v), mv(length), mv(scores), mv(cos), mv(sin)


def _ref(q, k, v, length, scores, window, bias, cos, sin, dtype, bias_mode="absolute", decay=1.0):
    """Reference in ``dtype`` (float64 for the gold one), on the CPU."""
    c = lambda t: None if t is None else t.detach().cpu().to(dtype)  # noqa: E731
    sc = None if scores is None else scores.detach().cpu().to(torch.float64 if dtype == torch.float64 else torch.float32).clone()
    out = attention_with_scores_ref(
        c(q), c(k), c(v), length.cpu(), sc, scale=q.shape[-1] ** -0.5, window=window, bias=bias, cos=c(cos), sin=c(sin),
        bias_mode=bias_mode, decay=decay,
    )
    return out, sc


def _err(a, ref):
    a = a.detach().cpu().double()
    ref = ref.double()
    return (a - ref).abs().max().item()


def _check_close(name, got, gold, same_dtype_ref, dtype, eps=None):
    err = _err(got, gold)
    ref_err = _err(same_dtype_ref, gold) if same_dtype_ref is not None else 0.0
    scale = max(1.0, gold.abs().max().item())
    tol = 2.0 * ref_err + (_EPS[dtype] if eps is None else eps) * scale
    assert math.isfinite(err), f"{name}: non-finite values (read a poisoned slot or an unwritten element?)"
    assert err <= tol, f"{name}: max error {err:.3g} > tol {tol:.3g} (same-dtype reference error {ref_err:.3g})"


def _compare(fn, case, device="cpu", poison="nan"):
    B, Hkv, G, D, n, C, lens, window, bias, rope, with_scores, dtype = (
        case[k] for k in ("B", "Hkv", "G", "D", "n", "C", "lens", "window", "bias", "rope", "scores", "dtype")
    )
    q, k, v, length, scores, cos, sin = make_inputs(
        B, Hkv, G, D, n, C, lens, dtype, rope=rope, with_scores=with_scores, poison=poison, device=device,
        rope_dtype=case.get("rope_dtype", torch.float32),
    )
    # gold reference in float64 on the clean (un-poisoned beyond length) view: the reference only
    # reads slots < length, so the poison does not reach it either.
    mode, decay = case.get("bias_mode", "absolute"), case.get("decay", 1.0)
    out64, sc64 = _ref(q, k, v, length, scores, window, bias, cos, sin, torch.float64, mode, decay)
    if dtype != torch.float32:
        outd, scd = _ref(q, k, v, length, scores, window, bias, cos, sin, dtype, mode, decay)
    else:
        outd, scd = None, None
    scores_in = None if scores is None else scores.clone()
    out = fn(q, k, v, length, scores_in, window, bias, cos, sin, bias_mode=mode, decay=decay)
    assert out.shape == q.shape and out.dtype == q.dtype and out.device == q.device
    _check_close("out", out, out64, outd, dtype)
    if scores is not None:
        # compare the increments, so the random initial scores do not inflate the tolerance
        s0 = scores.detach().cpu().double()
        _check_close("scores", scores_in.detach().cpu().double() - s0, sc64 - s0,
                     None if scd is None else scd.double() - s0, dtype, eps=_EPS_SCORES)
        # slots past a row's length are never touched (exactly: no decay, no bias, no NaN)
        for b, L in enumerate(lens):
            assert torch.equal(scores_in[b, :, L:].cpu(), scores[b, :, L:].cpu()), f"row {b}: scores past length changed"


def _case(B=2, Hkv=2, G=1, D=64, n=1, C=160, lens=None, window=32, bias=1e-3, rope=True, scores=True,
          dtype=torch.float32, path=None, num_splits=None, rope_dtype=torch.float32, bias_mode="absolute", decay=1.0,
          id=""):
    if lens is None:
        lens = [C, max(n, C // 2 - 7)][:B] + [C - 3] * max(0, B - 2)
    return pytest.param(dict(B=B, Hkv=Hkv, G=G, D=D, n=n, C=C, lens=lens, window=window, bias=bias, rope=rope,
                             scores=scores, dtype=dtype, path=path, num_splits=num_splits, rope_dtype=rope_dtype,
                             bias_mode=bias_mode, decay=decay), id=id)


f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16

# Representative (not the full cross product: the interpreter is slow).
KERNEL_CASES = [
    # decode, n = 1
    _case(G=1, D=64, n=1, dtype=f32, num_splits=3, id="dec-mha-d64-f32-rope-3splits"),
    _case(G=3, D=64, n=1, dtype=f16, bias=0.0, window=8, num_splits=2, id="dec-gqa3-d64-f16-rope-bias0"),
    _case(G=4, D=128, n=1, dtype=bf16, rope=False, scores=False, id="dec-gqa4-d128-bf16-noscores"),
    _case(G=8, D=128, n=1, dtype=f32, rope=False, bias=1e-2, C=300, lens=[300, 1], id="dec-gqa8-d128-f32-len1"),
    # decode, small n (window smaller / larger than n, window 0)
    _case(G=8, D=128, n=5, dtype=f32, window=2, bias=1e-2, num_splits=4, id="dec-gqa8-d128-n5-w2"),
    _case(G=3, D=64, n=5, dtype=bf16, window=40, id="dec-gqa3-d64-n5-w40-bf16"),
    _case(G=3, D=64, n=5, dtype=f16, window=0, id="dec-gqa3-d64-n5-w0"),
    # prefill chunk
    _case(G=3, D=64, n=64, C=200, dtype=bf16, window=16, id="pre-gqa3-d64-n64-bf16-rope"),
    _case(G=1, D=128, n=64, C=200, dtype=f32, window=100, rope=False, bias=1e-2, path="prefill",
          id="pre-mha-d128-n64-w100"),
    _case(G=4, D=64, n=64, C=128, dtype=f16, scores=False, lens=[128, 64], id="pre-gqa4-d64-n64-noscores"),
    _case(G=8, D=64, n=5, dtype=f32, window=3, path="prefill", id="pre-gqa8-n5-forced"),
    _case(B=3, G=4, D=128, n=16, C=96, dtype=f32, window=4, bias=1e-2, path="decode", num_splits=2,
          lens=[96, 16, 50], id="dec-gqa4-n16-forced-ragged3"),
    # head dim not a power of two (padded with masks), several query blocks in prefill
    _case(G=3, D=96, n=1, C=200, dtype=f16, window=32, num_splits=2, rope_dtype=bf16, id="dec-gqa3-d96-rope-bf16tables"),
    _case(B=2, G=3, D=96, n=150, C=256, dtype=f32, window=20, bias=1e-3, lens=[256, 151], rope_dtype=torch.float64,
          id="pre-gqa3-d96-n150-2mblocks"),
    # relative bias (SPEC §5) and decay of the old scores, fused into the score pass
    _case(B=3, G=3, D=64, n=1, C=200, dtype=f32, window=32, bias=2.0, bias_mode="relative", decay=0.75,
          num_splits=3, lens=[200, 1, 77], id="dec-gqa3-n1-rel-decay-ragged3"),
    _case(G=4, D=64, n=5, C=160, dtype=f16, window=3, bias=1.5, bias_mode="relative", decay=0.5, num_splits=2,
          id="dec-gqa4-n5-w3-rel-decay-f16"),
    _case(G=2, D=64, n=5, C=96, dtype=bf16, window=40, bias=0.7, bias_mode="absolute", decay=0.9,
          lens=[96, 5], id="dec-gqa2-n5-w40-abs-decay-bf16"),
    _case(B=3, G=3, D=64, n=64, C=200, dtype=f32, window=16, bias=3.0, bias_mode="relative", decay=0.6,
          lens=[200, 64, 131], id="pre-gqa3-n64-w16-rel-decay-ragged3"),
    _case(G=2, D=64, n=40, C=128, dtype=f16, window=100, bias=1.0, bias_mode="relative", decay=0.8,
          path="prefill", rope=False, id="pre-gqa2-n40-w100-rel-decay-f16"),
]

# The vectorised CPU path is cheap: a wider matrix.
OP_CASES = [
    _case(G=G, D=D, n=n, C=C, dtype=dt, window=w, bias=bias, rope=rope, scores=sc, id=f"G{G}-D{D}-n{n}-{str(dt)[6:]}-w{w}-b{bias}-rope{int(rope)}-sc{int(sc)}")
    for (G, D, n, C) in [(1, 64, 1, 96), (3, 64, 5, 96), (4, 128, 64, 160), (8, 128, 1, 96), (8, 64, 64, 128)]
    for dt in (f32, f16, bf16)
    for (w, bias, rope, sc) in [(32, 1e-3, True, True), (3, 0.0, False, True), (0, 1e-2, True, True), (8, 1e-3, False, False)]
] + [
    # relative bias and decay (SPEC §5); w < n, w > n, w = 0 (no decay then), ragged rows
    _case(B=B, G=G, D=D, n=n, C=C, dtype=dt, window=w, bias=bias, bias_mode=mode, decay=decay, rope=rope, lens=lens,
          id=f"G{G}-D{D}-n{n}-{str(dt)[6:]}-w{w}-{mode}{bias}-decay{decay}-rope{int(rope)}")
    for (B, G, D, n, C, lens) in [(3, 3, 64, 1, 96, [96, 1, 40]), (2, 4, 128, 64, 160, [160, 70]),
                                  (3, 8, 64, 5, 96, [96, 5, 50])]
    for dt in (f32, bf16)
    for (w, bias, mode, decay, rope) in [(32, 2.0, "relative", 0.7, True), (3, 1.0, "relative", 0.5, False),
                                         (8, 1e-2, "absolute", 0.25, True), (0, 2.0, "relative", 0.5, True)]
]


# --------------------------------------------------------------------------------------
# public op on the CPU (vectorised torch path)
# --------------------------------------------------------------------------------------


def _op(q, k, v, length, scores, window, bias, cos, sin, bias_mode="absolute", decay=1.0):
    return ops.attention_with_scores(q, k, v, length, scores, window=window, bias=bias, cos=cos, sin=sin,
                                     bias_mode=bias_mode, decay=decay)


@pytest.mark.parametrize("case", OP_CASES)
def test_op_cpu(case):
    # huge finite values beyond length (see test_op_cpu_nan_beyond_length for NaN)
    _compare(_op, case, poison="huge")


@pytest.mark.parametrize("case", [
    _case(G=3, D=64, n=5, dtype=f32, id="window-only"),
    _case(B=3, G=3, D=64, n=40, C=120, window=6, dtype=f32, lens=[120, 40, 77], bias_mode="relative", bias=2.0,
          decay=0.5, id="fused-head-and-window"),
    _case(B=3, G=4, D=64, n=40, C=120, scores=False, dtype=bf16, lens=[41, 120, 41], id="fused-only"),
])
def test_op_cpu_nan_beyond_length(case):
    # NaN in slots >= length of ragged rows must not leak (0 * NaN = NaN otherwise), in the
    # fused (SDPA) part of a chunk as in its explicit window part
    _compare(_op, case, poison="nan")


def test_op_float64_matches_reference():
    q, k, v, length, scores, cos, sin = make_inputs(2, 2, 3, 64, 5, 64, [64, 20], torch.float64, rope=True, poison="huge")
    out = ops.attention_with_scores(q, k, v, length, None, window=4, bias=1e-3, cos=cos, sin=sin)
    ref = attention_with_scores_ref(q, k, v, length, None, window=4, bias=1e-3, cos=cos.double(), sin=sin.double())
    torch.testing.assert_close(out, ref)


# --------------------------------------------------------------------------------------
# Triton kernels (interpreter on CPU; real on CUDA)
# --------------------------------------------------------------------------------------


@pytest.fixture
def poisoned_workspaces(monkeypatch):
    from inf_mllm.kernels import attention as kat

    monkeypatch.setattr(kat, "POISON", True)
    return kat


def _triton_fn(case):
    from inf_mllm.kernels.attention import attention_with_scores_triton

    def fn(q, k, v, length, scores, window, bias, cos, sin, bias_mode="absolute", decay=1.0):
        return attention_with_scores_triton(
            q, k, v, length, scores, q.shape[-1] ** -0.5, window, bias, cos, sin, bias_mode, decay,
            path=case["path"], num_splits=case["num_splits"],
        )

    return fn


@pytest.mark.parametrize("case", KERNEL_CASES)
def test_triton_kernel_cpu_interpreter(case, poisoned_workspaces):
    _compare(_triton_fn(case), case, device="cpu", poison="nan")


@pytest.mark.parametrize("case", [c for c in KERNEL_CASES if c.values[0]["dtype"] == f16])
def test_triton_kernel_cpu_interpreter_lowp_matmuls(case, poisoned_workspaces, monkeypatch):
    """The GPU's fp16 tensor-core branch (operands cast to fp16, fp32 accumulation) run in the
    interpreter (its bf16 arithmetic is not faithful, so fp16 only)."""
    monkeypatch.setattr(poisoned_workspaces, "_FORCE_LOWP", True)
    _compare(_triton_fn(case), case, device="cpu", poison="nan")


@pytest.mark.gpu
@pytest.mark.parametrize("case", KERNEL_CASES)
def test_triton_kernel_gpu(case, gpu_device, poisoned_workspaces):
    _compare(_triton_fn(case), case, device=gpu_device, poison="nan")


@pytest.mark.gpu
@pytest.mark.parametrize("case", [
    _case(B=4, Hkv=4, G=4, D=128, n=1, C=4096, lens=[4096, 1000, 4000, 37], dtype=bf16, id="gpu-dec-long-bf16"),
    _case(B=2, Hkv=3, G=3, D=64, n=1, C=2048, lens=[2048, 513], dtype=f16, id="gpu-dec-smollm-f16"),
    _case(B=2, Hkv=2, G=4, D=128, n=256, C=1024, lens=[1024, 300], dtype=bf16, window=32, id="gpu-pre-256-bf16"),
])
def test_triton_kernel_gpu_large(case, gpu_device, poisoned_workspaces):
    _compare(_triton_fn(case), case, device=gpu_device, poison="nan")


@pytest.mark.gpu
def test_public_op_gpu_dispatches_to_triton(gpu_device):
    case = _case(G=3, D=64, n=5, dtype=bf16).values[0]
    _compare(_op, case, device=gpu_device, poison="nan")


@pytest.mark.gpu
@pytest.mark.parametrize("n", [1, 64])
def test_cuda_graph_capture(gpu_device, n):
    """No host reads of length: the op captures in a CUDA graph and replays with new lengths."""
    q, k, v, length, scores, cos, sin = make_inputs(2, 2, 4, 128, n, 512, [512, 300], bf16, rope=True,
                                                    poison="huge", device=gpu_device)
    s0 = scores.clone()

    def call():
        return ops.attention_with_scores(q, k, v, length, scores, window=8, bias=1e-3, cos=cos, sin=sin)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call()
    for lens in ([400, 77], [511, 299]):  # new lengths, still short of the poisoned slots (>= 300 in row 1)
        length.copy_(torch.tensor(lens, dtype=torch.int32))
        q.normal_()
        scores.copy_(s0)
        graph.replay()
        torch.cuda.synchronize()
        sc_ref = s0.double().cpu().clone()
        ref = attention_with_scores_ref(q.double().cpu(), k.double().cpu(), v.double().cpu(), length.cpu(), sc_ref,
                                        scale=128 ** -0.5, window=8, bias=1e-3, cos=cos.double().cpu(),
                                        sin=sin.double().cpu())
        torch.testing.assert_close(out.double().cpu(), ref, rtol=0, atol=3e-2, msg=lambda m: f"lengths {lens}: {m}")
        torch.testing.assert_close(scores.double().cpu(), sc_ref, rtol=1e-4, atol=1e-3,
                                   msg=lambda m: f"lengths {lens}: {m}")


def test_triton_decode_splits_agree():
    """The number of splits changes only rounding (and empty splits are harmless)."""
    from inf_mllm.kernels.attention import attention_with_scores_triton

    q, k, v, length, scores, cos, sin = make_inputs(1, 1, 4, 64, 1, 256, [200], f32, rope=True)
    res = []
    for ns in (1, 7):
        sc = scores.clone()
        out = attention_with_scores_triton(q, k, v, length, sc, 0.125, 32, 1e-3, cos, sin, path="decode", num_splits=ns)
        res.append((out, sc))
    torch.testing.assert_close(res[0][0], res[1][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(res[0][1], res[1][1], rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------
# argument checks of the public op
# --------------------------------------------------------------------------------------


def _good():
    q, k, v, length, scores, cos, sin = make_inputs(2, 2, 2, 64, 3, 32, [32, 10], f32, rope=True, poison="huge")
    return dict(q=q, k=k, v=v, length=length, scores=scores, cos=cos, sin=sin)


def _bad(**changes):
    a = _good()
    for key, fn in changes.items():
        a[key] = fn(a)
    return a


BAD = [
    pytest.param(lambda: _bad(q=lambda a: a["q"][0]), ValueError, "q must be 4-D", id="q-3d"),
    pytest.param(lambda: _bad(v=lambda a: a["v"][:, :, :16].contiguous()), ValueError, "same shape", id="kv-shape"),
    pytest.param(lambda: _bad(v=lambda a: a["v"].half()), TypeError, "same dtype", id="kv-dtype"),
    pytest.param(lambda: _bad(q=lambda a: a["q"].half()), TypeError, "differs from k/v dtype", id="q-dtype"),
    pytest.param(lambda: _bad(q=lambda a: a["q"][:, :, :, :32].contiguous()), ValueError, "head dim", id="q-headdim"),
    pytest.param(lambda: _bad(q=lambda a: a["q"][:1]), ValueError, "batch size", id="q-batch"),
    pytest.param(lambda: _bad(q=lambda a: a["q"][:, :3].contiguous()), ValueError, "not a multiple", id="hq-not-multiple"),
    pytest.param(lambda: _bad(length=lambda a: torch.tensor([33, 10], dtype=torch.int32)), ValueError,
                 "exceeds the buffer capacity", id="length-above-C"),
    pytest.param(lambda: _bad(length=lambda a: torch.tensor([32, 2], dtype=torch.int32)), ValueError,
                 "smaller than the number of new tokens", id="length-below-n"),
    pytest.param(lambda: _bad(length=lambda a: a["length"].long()), TypeError, "length must be int32", id="length-int64"),
    pytest.param(lambda: _bad(length=lambda a: a["length"][:1]), ValueError, "length must have shape", id="length-shape"),
    pytest.param(lambda: _bad(scores=lambda a: a["scores"].double()), TypeError, "scores must be float32", id="scores-dtype"),
    pytest.param(lambda: _bad(scores=lambda a: a["scores"][:, :1].contiguous()), ValueError, "scores must have shape",
                 id="scores-shape"),
    pytest.param(lambda: _bad(sin=lambda a: None), ValueError, "cos and sin must be given together", id="cos-no-sin"),
    pytest.param(lambda: _bad(cos=lambda a: a["cos"][:8]), ValueError, "cos must have shape", id="cos-short"),
    pytest.param(lambda: _bad(k=lambda a: a["k"].transpose(2, 3).contiguous().transpose(2, 3)), ValueError,
                 "contiguous", id="k-noncontiguous"),
    pytest.param(lambda: _bad(k=lambda a: a["k"].to("meta"), v=lambda a: a["v"].to("meta")), ValueError,
                 "is on", id="device-mismatch"),
]


@pytest.mark.parametrize("make,exc,msg", BAD)
def test_bad_inputs(make, exc, msg):
    a = make()
    with pytest.raises(exc, match=msg):
        ops.attention_with_scores(a["q"], a["k"], a["v"], a["length"], a["scores"], cos=a["cos"], sin=a["sin"])


def test_bad_window():
    a = _good()
    with pytest.raises(ValueError, match="window"):
        ops.attention_with_scores(a["q"], a["k"], a["v"], a["length"], a["scores"], window=-1)


# --------------------------------------------------------------------------------------
# torch.library integration
# --------------------------------------------------------------------------------------


def test_opcheck():
    for rope, with_scores, extra in ((True, True, ()), (False, False, ()), (True, True, ("relative", 0.5)),
                                     (False, True, ("absolute", 0.25))):
        q, k, v, length, scores, cos, sin = make_inputs(2, 2, 3, 64, 4, 32, [32, 9], f32, rope=rope,
                                                        with_scores=with_scores, poison="huge")
        torch.library.opcheck(
            torch.ops.inf_mllm.attention_with_scores.default,
            (q, k, v, length, scores, 0.125, 3, 1e-3, cos, sin) + extra,
        )


@pytest.mark.parametrize("bias_mode, bias, decay", [("absolute", 1e-3, 1.0), ("relative", 2.0, 0.5)])
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile(backend, bias_mode, bias, decay):
    q, k, v, length, scores, cos, sin = make_inputs(2, 2, 3, 64, 2, 48, [48, 20], f32, rope=True, poison="huge")

    def f(q, k, v, length, scores, cos, sin):
        out = ops.attention_with_scores(q, k, v, length, scores, window=2, bias=bias, cos=cos, sin=sin,
                                        bias_mode=bias_mode, decay=decay)
        return out * 2.0

    torch._dynamo.reset()
    fc = torch.compile(f, backend=backend, fullgraph=True)
    sc = scores.clone()
    try:
        out = fc(q, k, v, length, sc, cos, sin)
    except Exception as e:  # inductor needs a working C++ toolchain
        if backend == "inductor":
            pytest.skip(f"inductor unavailable here: {type(e).__name__}: {str(e)[:200]}")
        raise
    ref_sc = scores.double().clone()
    ref = attention_with_scores_ref(q.double(), k.double(), v.double(), length, ref_sc, scale=0.125, window=2,
                                    bias=bias, cos=cos.double(), sin=sin.double(), bias_mode=bias_mode, decay=decay)
    torch.testing.assert_close(out.double(), 2 * ref, rtol=1e-5, atol=1e-5)
    assert not torch.equal(sc, scores), "the in-place score update did not happen under torch.compile"
    torch.testing.assert_close(sc.double(), ref_sc, rtol=1e-5, atol=1e-5)


def test_bench_attention_cpu_smoke():
    from inf_mllm.benchmarks.attention import bench_attention

    rows = bench_attention("cpu", torch.float32, contexts=(32, 64), B=1, Hkv=2, G=2, D=64, n=4, window=2,
                           warmup=1, reps=2)
    assert len(rows) == 8
    assert {r["impl"] for r in rows} == {"inf_mllm", "sdpa", "sdpa_stacked", "eager_scores"}
    assert all(r["time_ms"] > 0 and r["gbps"] > 0 and r["kv_bytes"] == 2 * 2 * r["context"] * 64 * 4 for r in rows)


def test_check_values_switch():
    # check_values=True catches a bad length even with the global checks off; False skips the check
    q, k, v, length, scores, cos, sin = make_inputs(1, 2, 2, 64, 1, 16, [16], torch.float32, rope=False, poison="huge")
    bad = torch.tensor([17], dtype=torch.int32)
    old = ops.value_checks()
    try:
        ops.value_checks(False)
        with pytest.raises(ValueError, match="exceeds the buffer capacity"):
            ops.attention_with_scores(q, k, v, bad, check_values=True)
        ops.value_checks(True)
        with pytest.raises(ValueError, match="exceeds the buffer capacity"):
            ops.attention_with_scores(q, k, v, bad)
        out = ops.attention_with_scores(q, k, v, length, check_values=False)
        assert torch.isfinite(out).all()
    finally:
        ops.value_checks(old)


@pytest.mark.parametrize("kw, match", [
    (dict(window=True), "window must be a non-negative int"),
    (dict(bias=float("nan")), "bias must be a finite number"),
    (dict(scale=float("inf")), "scale must be a positive finite number"),
    (dict(scale=-1.0), "scale must be a positive finite number"),
    (dict(bias_mode="slot"), "bias_mode must be one of"),
    (dict(bias_mode=None), "bias_mode must be one of"),
    (dict(decay=0.0), "decay must be a finite number in \\(0, 1\\]"),
    (dict(decay=1.5), "decay must be a finite number in \\(0, 1\\]"),
    (dict(decay=-0.5), "decay must be a finite number in"),
    (dict(decay=float("nan")), "decay must be a finite number in"),
    (dict(decay=float("inf")), "decay must be a finite number in"),
    (dict(decay=True), "decay must be a finite number in"),
])
def test_bad_scalar_arguments(kw, match):
    q, k, v, length, scores, cos, sin = make_inputs(1, 2, 2, 64, 1, 16, [16], torch.float32, poison="huge")
    with pytest.raises(ValueError, match=match):
        ops.attention_with_scores(q, k, v, length, scores, **kw)


# --------------------------------------------------------------------------------------
# scores over several calls: decay + bias, against a plain recomputation (SPEC §5)
# --------------------------------------------------------------------------------------


def _stream_scores_plain(q_calls, k, length0, calls, G, window, bias, bias_mode, decays, s_init, cos, sin):
    """Scores after the calls, recomputed from the definition in float64: every window query's
    softmax row from scratch, the contribution of call ``c`` multiplied by the decays of the
    calls after it, the initial scores by all of them."""
    B, Hkv, C, D = k.shape
    out = torch.zeros(B, Hkv, C, dtype=torch.float64)
    kd, cd, sd = k.double(), cos.double(), sin.double()
    for b in range(B):
        L = int(length0[b])
        total = s_init[b].double().clone()
        total[:, L:] = 0.0  # slots not yet written start at zero (the test fills them so)
        for c, n in enumerate(calls):
            L += n
            total[:, :L] *= decays[c]
            for i in range(max(0, n - window), n):
                t = L - n + i
                for h in range(Hkv):
                    kr = kd[b, h, : t + 1] * cd[: t + 1] + torch.cat([-kd[b, h, : t + 1, D // 2:], kd[b, h, : t + 1, : D // 2]], -1) * sd[: t + 1]
                    acc = torch.zeros(t + 1, dtype=torch.float64)
                    for g in range(G):
                        x = q_calls[c][b, h * G + g, i].double()
                        xr = x * cd[t] + torch.cat([-x[D // 2:], x[: D // 2]]) * sd[t]
                        acc += torch.softmax((kr @ xr) * D ** -0.5, dim=0)
                    jj = torch.arange(t + 1, dtype=torch.float64)
                    b_ij = bias * jj if bias_mode == "absolute" else bias * (jj + 1) / (t + 1) ** 2
                    total[h, : t + 1] += acc / G + b_ij
        out[b] = total
    return out


def _stream_impls():
    yield pytest.param("op-cpu", "cpu", id="op-cpu")
    yield pytest.param("triton", "cpu", id="triton-interpreter")
    yield pytest.param("op-gpu", "cuda", marks=pytest.mark.gpu, id="op-gpu")


@pytest.mark.parametrize("bias_mode, bias", [("relative", 2.0), ("absolute", 1e-2)])
@pytest.mark.parametrize("impl, device", list(_stream_impls()))
def test_scores_over_calls_with_decay_match_plain_recomputation(impl, device, bias_mode, bias):
    """A prefill chunk (prefill path), decode steps and a small chunk (decode path), each with
    its own decay, on ragged rows with NaN past length: the scores equal the definition."""
    from inf_mllm.kernels.attention import attention_with_scores_triton

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    gen = torch.Generator().manual_seed(7)
    B, Hkv, G, D, C, window = 2, 2, 3, 32, 64, 4
    calls = [32, 1, 1, 6, 1]  # G * 32 = 96 rows: prefill path; the others decode
    decays = [1.0, 0.5, 0.9, 0.75, 0.3]
    length0 = [0, 10]
    k = torch.randn(B, Hkv, C, D, generator=gen)
    v = torch.randn(B, Hkv, C, D, generator=gen)
    cos, sin = _rope_tables(C, D)
    s_init = torch.rand(B, Hkv, C, generator=gen) + 0.5
    q_calls = [torch.randn(B, Hkv * G, n, D, generator=gen) for n in calls]
    want = _stream_scores_plain(q_calls, k, length0, calls, G, window, bias, bias_mode, decays, s_init, cos, sin)

    kb, vb = k.clone(), v.clone()
    scores = s_init.clone()
    for b, L in enumerate(length0):
        scores[b, :, L:] = 0.0
    lens = list(length0)
    for c, n in enumerate(calls):
        lens = [L + n for L in lens]
        # the stream so far: slots past each row's length hold NaN (never written yet)
        for b, L in enumerate(lens):
            kb[b, :, L:] = float("nan")
            vb[b, :, L:] = float("nan")
            kb[b, :, :L] = k[b, :, :L]
            vb[b, :, :L] = v[b, :, :L]
        length = torch.tensor(lens, dtype=torch.int32)
        args = [t.to(device) for t in (q_calls[c], kb, vb, length)]
        sc_dev = scores.to(device)
        if impl == "triton":
            out = attention_with_scores_triton(*args, sc_dev, D ** -0.5, window, bias, cos, sin, bias_mode, decays[c])
        else:
            out = ops.attention_with_scores(*args, sc_dev, window=window, bias=bias, cos=cos.to(device),
                                            sin=sin.to(device), bias_mode=bias_mode, decay=decays[c])
        assert torch.isfinite(out).all()
        scores = sc_dev.cpu()
    for b, L in enumerate(lens):
        assert torch.equal(scores[b, :, L:], torch.zeros_like(scores[b, :, L:])), "slots past length changed"
    torch.testing.assert_close(scores.double(), want, rtol=1e-5, atol=2e-5)


# --------------------------------------------------------------------------------------
# RoPE helper of the CPU path: native one-pass kernel and the PyTorch fallback
# --------------------------------------------------------------------------------------


@pytest.mark.skipif(not hasattr(torch.ops.inf_mllm, "rope"), reason="native library built without inf_mllm::rope")
@pytest.mark.parametrize("dtype", [f32, bf16, f16, torch.float64], ids=lambda d: str(d)[6:])
def test_native_rope_matches_reference(dtype):
    from inf_mllm.reference import apply_rope

    gen = torch.Generator().manual_seed(3)
    C, L, D = 50, 37, 96
    buf = torch.randn(2, 3, C, D, generator=gen).to(dtype)
    x = buf[:, :, :L]  # the valid slots of a buffer: leading dims strided
    assert not x.is_contiguous()
    tab = torch.float64 if dtype == torch.float64 else f32
    cos, sin = (t[:L].to(tab).contiguous() for t in _rope_tables(C, D, torch.float64))
    got = torch.ops.inf_mllm.rope(x, cos, sin)
    assert got.dtype == tab and got.is_contiguous() and got.shape == x.shape
    want = apply_rope(x.to(tab), cos, sin)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12 if tab == torch.float64 else 2e-6)
    with pytest.raises(RuntimeError, match="cos and sin must be"):
        torch.ops.inf_mllm.rope(x, cos[:-1], sin[:-1])
    with pytest.raises(RuntimeError, match="last two dims"):
        torch.ops.inf_mllm.rope(torch.randn(2, 3, L, 2 * D).to(dtype)[..., ::2], cos, sin)


def test_op_cpu_without_native_rope(monkeypatch):
    """The PyTorch fallback of the key rotation (a library built without inf_mllm::rope)."""
    import inf_mllm._torch_path as tp

    monkeypatch.setattr(tp, "_NATIVE_ROPE", False)
    case = _case(B=3, G=3, D=64, n=40, C=120, window=6, dtype=bf16, lens=[120, 40, 77], bias_mode="relative",
                 bias=2.0, decay=0.5).values[0]
    _compare(_op, case, poison="nan")


@pytest.mark.parametrize("kw, match", [
    (dict(Hq=32, Hkv=7), "not a multiple"),
    (dict(D=0), "D must be a positive int"),
    (dict(D=63), "head dim must be even"),
    (dict(Hkv=0), "Hkv must be a positive int"),
    (dict(sizes=[]), "cache sizes"),
    (dict(sizes=[-5]), "cache sizes"),
    (dict(window=-1), "window"),
    (dict(which=("attn",)), "unknown operator"),
])
def test_ops_bench_refuses_bad_shapes(kw, match):
    """``inf-mllm bench ops`` arguments are checked before anything is allocated or timed (issue 13)."""
    from inf_mllm.evals.ops_bench import run_ops_bench

    args = dict(sizes=[64], device="cpu", dtype=torch.float32, B=1, Hq=4, Hkv=2, D=32, prefill_chunk=8, window=4)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        run_ops_bench(**args)


# --------------------------------------------------------------------------------------
# Fused native decode kernel (csrc/attention_cpu.cpp): the CPU path of a decode step
# --------------------------------------------------------------------------------------

import inf_mllm._torch_path as tp  # noqa: E402

needs_native_decode = pytest.mark.skipif(not tp.native_decode_available(),
                                         reason="native library built without inf_mllm::attention_decode")


def _native(q, k, v, length, scores, window, bias, cos, sin, bias_mode="absolute", decay=1.0):
    """The raw native op (no Python checks), tables converted to float32 as the CPU path does."""
    if cos is not None:
        cos, sin = cos.float().contiguous(), sin.float().contiguous()
    return torch.ops.inf_mllm.attention_decode(q.contiguous(), k, v, length, scores, q.shape[-1] ** -0.5, window,
                                               bias, cos, sin, bias_mode, decay)


def _native_cases():
    """GQA 1/3/4/8 (3: a group that is not a power of two), D 64/96/128 and each dtype, every
    combination of the other settings rotated through them so each value meets several shapes:
    bias modes, decay, window < n / > n / 0, ragged rows (length n, mid, C), RoPE and scores on
    and off, bf16/float64 tables."""
    settings = [  # (n, window, bias, bias_mode, decay, rope, scores)
        (1, 32, 1e-3, "absolute", 1.0, True, True),
        (5, 2, 2.0, "relative", 0.5, True, True),      # window < n
        (3, 40, 0.7, "absolute", 0.9, False, True),    # window > n
        (8, 8, 1.5, "relative", 0.75, True, True),     # window == n, largest native n
        (4, 0, 1e-2, "absolute", 0.5, True, True),     # window 0: no scoring, no decay
        (2, 1, 0.0, "relative", 0.3, False, True),     # no bias
        (6, 32, 1e-3, "absolute", 1.0, True, False),   # no scores
        (1, 32, 3.0, "relative", 0.6, False, True),
    ]
    cases, c = [], 0
    for G in (1, 3, 4, 8):
        for D in (64, 96, 128):
            for dt in (f32, bf16, f16):
                n, w, bias, mode, decay, rope, sc = settings[c % len(settings)]
                rope_dtype = (f32, bf16, torch.float64)[c % 3]
                C = 96 + 17 * (c % 3)  # slot counts that are not multiples of the vector width
                lens = [C, n, C // 2 + 3][: 2 + c % 2]
                cases.append(_case(B=len(lens), Hkv=2 + c % 2, G=G, D=D, n=n, C=C, lens=lens, dtype=dt, window=w,
                                   bias=bias, bias_mode=mode, decay=decay, rope=rope, scores=sc, rope_dtype=rope_dtype,
                                   id=f"G{G}-D{D}-{str(dt)[6:]}-n{n}-w{w}-{mode}{bias}-decay{decay}-rope{int(rope)}"
                                      f"-sc{int(sc)}"))
                c += 1
    # head dims that are not a multiple of the vector width (zero-padded copies in the kernel)
    cases += [_case(B=3, G=3, D=D, n=n, C=77, lens=[77, n, 40], dtype=dt, window=3, bias=0.5, bias_mode="relative",
                    decay=0.8, id=f"G3-D{D}-{str(dt)[6:]}-n{n}-oddD") for D, n, dt in ((72, 1, f32), (36, 4, bf16),
                                                                                     (40, 2, f16), (2, 1, f32))]
    return cases


@needs_native_decode
@pytest.mark.parametrize("poison", ["nan", "huge"])
@pytest.mark.parametrize("case", _native_cases())
def test_native_decode_matches_reference(case, poison):
    _compare(_native, case, poison=poison)


@needs_native_decode
@pytest.mark.parametrize("case", [c for c in OP_CASES if c.values[0]["n"] <= tp.NATIVE_DECODE_MAX_N])
def test_op_cpu_decode_torch_fallback(case, monkeypatch):
    """The PyTorch path still serves decode calls where the native kernel is missing."""
    monkeypatch.setattr(tp, "_NATIVE_DECODE", False)
    _compare(_op, case, poison="nan")


@needs_native_decode
def test_public_op_uses_native_decode(monkeypatch):
    """Decode calls (n <= NATIVE_DECODE_MAX_N, float32/bf16/fp16) go to the native kernel; a
    prefill chunk and float64 stay on the PyTorch path."""
    calls = []
    real = torch.ops.inf_mllm.attention_decode

    class _Spy:
        def __call__(self, *a):
            calls.append(a[0].shape[2])
            return real(*a)

    monkeypatch.setattr(torch.ops.inf_mllm, "attention_decode", _Spy())
    for n, dt in ((1, f32), (tp.NATIVE_DECODE_MAX_N, bf16), (tp.NATIVE_DECODE_MAX_N + 1, f32), (1, torch.float64)):
        q, k, v, length, scores, cos, sin = make_inputs(1, 2, 3, 64, n, 40, [40], dt, rope=True, poison="huge")
        ops.attention_with_scores(q, k, v, length, scores, window=4, cos=cos, sin=sin)
    assert calls == [1, tp.NATIVE_DECODE_MAX_N]


@needs_native_decode
def test_native_decode_equals_torch_path():
    """Same call, native kernel against the PyTorch path (float32): equal up to rounding."""
    q, k, v, length, scores, cos, sin = make_inputs(3, 3, 3, 64, 3, 300, [300, 3, 123], f32, rope=True, poison="nan")
    res = []
    for native in (None, False):
        tp._NATIVE_DECODE = native
        try:
            sc = scores.clone()
            out = ops.attention_with_scores(q, k, v, length, sc, window=2, bias=0.5, cos=cos, sin=sin,
                                            bias_mode="relative", decay=0.5)
        finally:
            tp._NATIVE_DECODE = None
        res.append((out, sc))
    torch.testing.assert_close(res[0][0], res[1][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(res[0][1], res[1][1], rtol=1e-5, atol=1e-5)


@needs_native_decode
def test_native_decode_opcheck():
    for dt, rope, with_scores, window in ((f32, True, True, 3), (bf16, False, True, 8), (f16, True, False, 0),
                                          (f32, False, True, 0)):
        q, k, v, length, scores, cos, sin = make_inputs(2, 2, 3, 64, 4, 32, [32, 9], dt, rope=rope,
                                                        with_scores=with_scores, poison="huge")
        torch.library.opcheck(torch.ops.inf_mllm.attention_decode.default,
                              (q, k, v, length, scores, 0.125, window, 1e-3, cos, sin, "relative", 0.5))


@needs_native_decode
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_native_decode_torch_compile(backend):
    """Under torch.compile(fullgraph=True): the raw op (its fake kernel and the mutation of
    scores) and the public op on a decode step (which reaches the kernel at run time)."""
    q, k, v, length, scores, cos, sin = make_inputs(2, 3, 3, 64, 1, 48, [48, 20], f32, rope=True, poison="huge")

    def raw(q, k, v, length, scores, cos, sin):
        return torch.ops.inf_mllm.attention_decode(q, k, v, length, scores, 0.125, 4, 1e-3, cos, sin, "absolute",
                                                   0.5) * 2.0

    def public(q, k, v, length, scores, cos, sin):
        return ops.attention_with_scores(q, k, v, length, scores, window=4, bias=1e-3, cos=cos, sin=sin,
                                         decay=0.5, scale=0.125) * 2.0

    ref_sc = scores.double().clone()
    ref = attention_with_scores_ref(q.double(), k.double(), v.double(), length, ref_sc, scale=0.125, window=4,
                                    bias=1e-3, cos=cos.double(), sin=sin.double(), decay=0.5)
    for f in (raw, public):
        torch._dynamo.reset()
        sc = scores.clone()
        try:
            out = torch.compile(f, backend=backend, fullgraph=True)(q, k, v, length, sc, cos, sin)
        except Exception as e:  # inductor needs a working C++ toolchain
            if backend == "inductor":
                pytest.skip(f"inductor unavailable here: {type(e).__name__}: {str(e)[:200]}")
            raise
        torch.testing.assert_close(out.double(), 2 * ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sc.double(), ref_sc, rtol=1e-5, atol=1e-5)


@needs_native_decode
@pytest.mark.parametrize("change, match", [
    (dict(length=torch.tensor([33, 9], dtype=torch.int32)), "outside"),
    (dict(length=torch.tensor([32, 2], dtype=torch.int32)), "outside"),  # length < n = 3
    (dict(q=lambda a: a["q"].double(), k=lambda a: a["k"].double(), v=lambda a: a["v"].double()), "not supported"),
    (dict(cos=lambda a: a["cos"].double(), sin=lambda a: a["sin"].double()), "float32"),
    (dict(cos=lambda a: a["cos"][:8]), "float32"),
    (dict(scores=lambda a: a["scores"][:, :1].contiguous()), "scores"),
    (dict(k=lambda a: a["k"].transpose(2, 3).contiguous().transpose(2, 3)), "contiguous"),
    (dict(q=lambda a: a["q"][:, :3].contiguous()), "shapes"),
])
def test_native_decode_refuses_bad_arguments(change, match):
    a = _good()
    for key, val in change.items():
        a[key] = val(a) if callable(val) else val
    with pytest.raises(RuntimeError, match=match):
        torch.ops.inf_mllm.attention_decode(a["q"], a["k"], a["v"], a["length"], a["scores"], 0.125, 2, 0.0, a["cos"],
                                            a["sin"], "absolute", 1.0)
    with pytest.raises(RuntimeError, match="bias_mode"):
        b = _good()
        torch.ops.inf_mllm.attention_decode(b["q"], b["k"], b["v"], b["length"], b["scores"], 0.125, 2, 0.0, None,
                                            None, "slot", 1.0)


@needs_native_decode
@pytest.mark.parametrize("isa", ["base", "avx2", "avx512"])
def test_native_decode_each_isa(isa):
    """The kernel is built once per instruction set (csrc/attention_cpu_isa.cpp); the tests above
    run the one this CPU picks. Here each other build runs a subset of them in a subprocess with
    INF_MLLM_CPU_ISA capping the choice (skipped where the CPU or the build lacks it)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, INF_MLLM_CPU_ISA=isa)
    probe = subprocess.run([sys.executable, "-c", "import inf_mllm.ops, torch; print(torch.ops.inf_mllm.cpu_isa())"],
                           env=env, capture_output=True, text=True, timeout=300)
    assert probe.returncode == 0, probe.stderr[-2000:]
    got = probe.stdout.strip().splitlines()[-1]
    if got != isa:
        pytest.skip(f"{isa} not available here (runs {got})")
    if got == torch.ops.inf_mllm.cpu_isa():
        pytest.skip(f"{isa} is this process's ISA: the tests above ran it")
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__, "-k",
                          "test_native_decode_matches_reference and (nan or oddD) or test_native_decode_equals_torch_path"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert " passed" in res.stdout


@needs_native_decode
def test_native_decode_strided_length():
    """A strided ``length`` view (the kernel reads a contiguous copy of it) gives the same result."""
    q, k, v, length, scores, cos, sin = make_inputs(2, 2, 3, 64, 2, 48, [48, 17], f32, rope=True, poison="nan")
    strided = torch.stack([length, torch.zeros_like(length)], 1).reshape(-1)[::2]
    assert not strided.is_contiguous()
    res = []
    for ln in (length, strided):
        sc = scores.clone()
        res.append((_native(q, k, v, ln, sc, 2, 0.5, cos, sin), sc))
    torch.testing.assert_close(res[0][0], res[1][0], rtol=0, atol=0)
    torch.testing.assert_close(res[0][1], res[1][1], rtol=0, atol=0)

"""RoPE inside the Triton kernels (SPEC §3, §4.1) under ``TRITON_INTERPRET=1`` (or on a GPU):
the frequency form (angle addition inside key blocks, ``reference.rope_cos_sin_blocked``, no
per-key table), the per-slot multimodal positions (``rope_pos`` with ``rope_sections``) and the
table fallback, each against the float64 reference, in fp32/fp16/bf16, decode and prefill, GQA
1/4/8, D 64/128, with and without scores, ragged rows, NaN-poisoned slots past each row's length.

Tolerances as in ``test_attention.py``: the kernel's error against the float64 reference may be
at most twice that of the plain PyTorch reference run in the input dtype, plus a small epsilon.
Shapes are small: the interpreter is slow.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from inf_mllm import reference  # noqa: E402
from inf_mllm.reference import attention_with_scores_ref, rope_cos_sin_blocked  # noqa: E402

from test_attention import _EPS_SCORES, _check_close, make_inputs  # noqa: E402

f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16


def _inv_freq(D, base=10000.0):
    return 1.0 / (base ** (torch.arange(0, D, 2, dtype=torch.float32) / D))


def _sections(D):
    return torch.tensor([i % 3 for i in range(D // 2)], dtype=torch.int32)  # interleaved (Qwen3-VL)


@pytest.fixture
def kat(monkeypatch):
    from inf_mllm.kernels import attention as kat

    monkeypatch.setattr(kat, "POISON", True)  # unwritten outputs / workspace entries show up as NaN
    return kat


def _run(kat, mode, B, Hkv, G, D, n, C, lens, dtype, scores, window=8, bias=1e-3, bias_mode="absolute", decay=1.0,
         path=None, num_splits=None, rope_scale=1.0, device="cpu", seed=0):
    q, k, v, length, sc, _, _ = make_inputs(B, Hkv, G, D, n, C, lens, dtype, with_scores=scores, poison="nan",
                                            seed=seed, device=device)
    inv = _inv_freq(D)
    gen = torch.Generator().manual_seed(seed + 1)
    kw, ref_kw = {}, {}
    cos = sin = None
    if mode == "freq":  # the kernels' definition: the blocked form by slot, float32
        kw = dict(inv_freq=inv.to(device), rope_scale=rope_scale)
        cb, sb = rope_cos_sin_blocked(C, inv, rope_scale)
        ref_kw = dict(cos=cb, sin=sb)
    elif mode == "pos":
        pos = torch.randint(0, 3 * C, (3, B, Hkv, C), generator=gen, dtype=torch.int32)
        for b, L in enumerate(lens):
            pos[:, b, :, L:] = 2 ** 30  # never read
        kw = dict(inv_freq=inv.to(device), rope_scale=rope_scale, rope_pos=pos.to(device),
                  rope_sections=_sections(D).to(device))
        ref_kw = dict(inv_freq=inv, rope_scale=rope_scale, rope_pos=pos, rope_sections=_sections(D))
    elif mode == "table":
        # any table with >= C rows; halves that differ (a table need not repeat its first half)
        cb, sb = rope_cos_sin_blocked(C + 5, inv, rope_scale)
        c2, s2 = rope_cos_sin_blocked(C + 5, _inv_freq(D, 500.0), 0.9)
        H = D // 2
        cb, sb = torch.cat((cb[:, :H], c2[:, H:]), -1), torch.cat((sb[:, :H], s2[:, H:]), -1)
        cos, sin = cb.to(device), sb.to(device)
        ref_kw = dict(cos=cb, sin=sb)

    def ref(dt):
        c = lambda t: t.detach().cpu().to(dt)  # noqa: E731
        s = None if sc is None else sc.detach().cpu().to(f32 if dt != torch.float64 else dt).clone()
        rk = {key: (c(val) if key in ("cos", "sin") else val) for key, val in ref_kw.items()}
        if "inv_freq" in rk and dt == torch.float64:
            rk["inv_freq"] = rk["inv_freq"].double()
        o = attention_with_scores_ref(c(q), c(k), c(v), length.cpu(), s, scale=D ** -0.5, window=window, bias=bias,
                                      bias_mode=bias_mode, decay=decay, **rk)
        return o, s

    def ref_pos_dtype(dt):
        # per-slot positions: the reference computes the angles in its input dtype, which in
        # fp16/bf16 would make the bound meaninglessly loose; rotate in float32 instead, round the
        # rotated q and k to the dtype, and attend in the dtype
        kc, ks = reference.rope_cos_sin(ref_kw["rope_pos"], inv, rope_scale, ref_kw["rope_sections"])  # [B,Hkv,C,D]
        kr = reference.apply_rope(k.cpu().float(), kc, ks)
        t = torch.stack([torch.arange(L - n, L) for L in lens])  # [B, n] query slots
        qc = torch.stack([kc[b][:, t[b]] for b in range(B)]).repeat_interleave(G, 1)  # [B, Hq, n, D]
        qs = torch.stack([ks[b][:, t[b]] for b in range(B)]).repeat_interleave(G, 1)
        qr = reference.apply_rope(q.cpu().float(), qc, qs)
        s = None if sc is None else sc.detach().cpu().clone()
        o = attention_with_scores_ref(qr.to(dt), kr.to(dt), v.cpu(), length.cpu(), s, scale=D ** -0.5, window=window,
                                      bias=bias, bias_mode=bias_mode, decay=decay)
        return o, s

    out64, sc64 = ref(torch.float64)
    outd, scd = (ref_pos_dtype(dtype) if mode == "pos" else ref(dtype)) if dtype != f32 else (None, None)
    sc_in = None if sc is None else sc.clone()
    out = kat.attention_with_scores_triton(q, k, v, length, sc_in, D ** -0.5, window, bias, cos, sin, bias_mode, decay,
                                           path=path, num_splits=num_splits, **kw)
    assert out.shape == q.shape and out.dtype == q.dtype
    _check_close("out", out, out64, outd, dtype)
    if sc is not None:
        s0 = sc.detach().cpu().double()
        _check_close("scores", sc_in.detach().cpu().double() - s0, sc64 - s0,
                     None if scd is None else scd.double() - s0, dtype, eps=_EPS_SCORES)
        for b, L in enumerate(lens):
            assert torch.equal(sc_in[b, :, L:].cpu(), sc[b, :, L:].cpu()), f"row {b}: scores past length changed"


def _c(mode, G, D, n, dtype, scores=True, B=2, Hkv=2, C=160, lens=None, **kw):
    lens = lens or [C, max(n, 77)][:B] + [n + 3] * max(0, B - 2)
    name = f"{mode}-G{G}-D{D}-n{n}-{str(dtype)[6:]}-{'sc' if scores else 'nosc'}" + "".join(
        f"-{k}{v}" for k, v in kw.items())
    return pytest.param(mode, dict(B=B, Hkv=Hkv, G=G, D=D, n=n, C=C, lens=lens, dtype=dtype, scores=scores, **kw),
                        id=name)


CASES = [
    # the frequency form, decode (n=1 and a few queries) and prefill chunks
    _c("freq", 1, 64, 1, f32, num_splits=3),
    _c("freq", 4, 128, 1, bf16, rope_scale=1.3),
    _c("freq", 8, 64, 1, f16, scores=False, B=3, lens=[160, 1, 99]),
    _c("freq", 4, 64, 5, bf16, window=3, bias_mode="relative", bias=2.0, decay=0.5, num_splits=2),
    _c("freq", 8, 128, 4, f32, scores=False),
    _c("freq", 1, 64, 64, f16, C=192, lens=[192, 64], window=16),
    _c("freq", 4, 128, 40, bf16, C=128, lens=[128, 70], path="prefill"),
    _c("freq", 8, 64, 20, f32, C=128, scores=False, path="prefill", rope_scale=0.8),
    # per-slot positions (M-RoPE): a sin/cos per key
    _c("pos", 1, 128, 1, bf16, num_splits=2),
    _c("pos", 4, 64, 1, f32, B=3, lens=[160, 1, 61], rope_scale=1.1),
    _c("pos", 8, 64, 3, f16, scores=False),
    _c("pos", 4, 64, 64, bf16, C=128, lens=[128, 64], window=8),
    _c("pos", 1, 128, 24, f32, C=96, lens=[96, 30], path="prefill", bias_mode="relative", bias=1.0, decay=0.7),
    # the table fallback (halves loaded once, no partner reload)
    _c("table", 4, 128, 1, bf16),
    _c("table", 8, 64, 1, f32, scores=False, num_splits=4),
    _c("table", 1, 64, 40, f16, C=128, lens=[128, 50]),
]


@pytest.mark.parametrize("mode, case", CASES)
def test_rope_kernels_match_reference(kat, mode, case):
    _run(kat, mode, **case)


@pytest.mark.gpu
@pytest.mark.parametrize("mode, case", CASES + [
    _c("freq", 4, 128, 1, bf16, C=4096, lens=[4096, 1000], B=2),
    _c("pos", 8, 128, 1, bf16, C=2048, lens=[2048, 77], B=2),
    _c("freq", 4, 128, 256, bf16, C=1024, lens=[1024, 300], window=32),
])
def test_rope_kernels_gpu(kat, gpu_device, mode, case):
    """The same cases compiled for the GPU (bf16/fp16 dots on tensor cores), and longer buffers."""
    _run(kat, mode, device=gpu_device, **case)


@pytest.mark.parametrize("mode, case", [
    _c("freq", 4, 64, 1, f16, num_splits=2, lens=[160, 129]),
    _c("freq", 3, 64, 40, f16, C=128, lens=[128, 41], path="prefill"),
    _c("pos", 4, 64, 1, f16, num_splits=2),
])
def test_rope_kernels_lowp_matmuls(kat, monkeypatch, mode, case):
    """The GPU's fp16 tensor-core branch (rotated halves cast to fp16, two dots) in the interpreter."""
    monkeypatch.setattr(kat, "_FORCE_LOWP", True)
    _run(kat, mode, **case)


@pytest.mark.parametrize("mode, case", [
    _c("freq", 4, 64, 1, f32, num_splits=2, lens=[160, 100]),
    _c("freq", 1, 128, 64, bf16, C=192, lens=[192, 65]),
])
def test_rope_kernels_key_block_of_the_gpu(kat, monkeypatch, mode, case):
    """Key blocks of exactly ROPE_BLOCK slots (the GPU's; the interpreter's default is two of them)."""
    monkeypatch.setattr(kat, "_INTERP_BLOCK_N", kat.ROPE_BLOCK)
    _run(kat, mode, **case)


def test_rope_block_is_the_reference_block():
    from inf_mllm.kernels import attention as kat

    assert kat.ROPE_BLOCK == reference.ROPE_BLOCK


def test_frequency_form_needs_no_table(kat, monkeypatch):
    """The frequency path builds no table by slot on the host (the launcher allocates nothing of
    size C x D): every tensor it passes to a kernel is an input, an output or a workspace."""
    B, Hkv, G, D, n, C = 1, 2, 4, 64, 1, 256
    q, k, v, length, sc, _, _ = make_inputs(B, Hkv, G, D, n, C, [200], f32)
    inv = _inv_freq(D)
    seen = []

    def record(self, *args, grid, warmup, **kwargs):
        seen.extend(a for a in args if isinstance(a, torch.Tensor))

    monkeypatch.setattr(type(kat._decode_stage1), "run", record)  # JITFunction, or the interpreter's
    kat.attention_with_scores_triton(q, k, v, length, sc, 0.125, 8, 0.0, None, None, inv_freq=inv)
    assert seen and not any(t.dim() == 2 and t.shape == (C, D) for t in seen)


def test_launcher_plans_once_and_reuses_its_workspaces(kat):
    """Host cost: the launch configuration is computed once per shape key and the workspaces are
    allocated once (per stream); results stay exact call after call with new values."""
    B, Hkv, G, D, n, C = 2, 2, 4, 64, 1, 160
    inv = _inv_freq(D)
    kat._PLANS.clear()
    seen = []
    for seed in (0, 1):
        q, k, v, length, sc, _, _ = make_inputs(B, Hkv, G, D, n, C, [160, 90], f32, seed=seed)
        ref_sc = sc.double().clone()
        cb, sb = rope_cos_sin_blocked(C, inv)
        ref = attention_with_scores_ref(q.double(), k.double(), v.double(), length, ref_sc, scale=D ** -0.5, window=8,
                                        bias=1e-3, cos=cb.double(), sin=sb.double())
        out = kat.attention_with_scores_triton(q, k, v, length, sc, D ** -0.5, 8, 1e-3, None, None, inv_freq=inv)
        torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(sc.double(), ref_sc, rtol=1e-4, atol=1e-5)
        (plan,) = kat._PLANS.values()
        seen.append([t.data_ptr() for t in plan.workspaces(q.device)])
    assert len(kat._PLANS) == 1 and seen[0] == seen[1]


@pytest.mark.gpu
def test_launcher_workspaces_are_per_stream(kat, gpu_device):
    B, Hkv, G, D, n, C = 2, 2, 4, 64, 1, 256
    q, k, v, length, sc, _, _ = make_inputs(B, Hkv, G, D, n, C, [256, 100], torch.bfloat16, device=gpu_device)
    inv = _inv_freq(D).to(gpu_device)
    kat._PLANS.clear()
    outs = []
    for stream in (torch.cuda.current_stream(), torch.cuda.Stream()):
        with torch.cuda.stream(stream):
            outs.append(kat.attention_with_scores_triton(q, k, v, length, sc.clone(), D ** -0.5, 8, 0.0, None, None,
                                                         inv_freq=inv))
        torch.cuda.synchronize()
    (plan,) = kat._PLANS.values()
    assert len(plan.ws) == 2
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)

"""compact_ (SPEC §4.2): the native operator (C++ on the CPU, CUDA on GPUs) against the
PyTorch reference ``compact_ref_``, argument checks, opcheck and torch.compile.

Compaction is a copy, so every comparison is bit-exact: k, v, extras, scores, length and
the returned kept indices. Inputs are random and never zero, so an untouched row or a slot
that was not moved is told apart from one that was written.
"""
from __future__ import annotations

import pytest
import torch

import inf_mllm.ops as ops
from inf_mllm.reference import compact_ref_

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
KV_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make_inputs(B, H, C, D, lens, dtype=torch.float32, device="cpu", seed=0, extras=("int8", "int32", "float32"),
                score_levels=None):
    """Random k/v/scores/extras (never zero). ``score_levels``: quantise scores to that many
    values, which makes many ties."""
    gen = torch.Generator().manual_seed(seed)
    k = (torch.randn(B, H, C, D, generator=gen) + 3.0).to(dtype)  # no zeros
    v = (torch.randn(B, H, C, D, generator=gen) - 3.0).to(dtype)
    if score_levels is None:
        scores = torch.rand(B, H, C, generator=gen) + 0.25
    else:
        scores = torch.randint(1, score_levels + 1, (B, H, C), generator=gen).float() / score_levels
    ex = []
    for kind in extras:
        if kind == "int8":
            ex.append(torch.randint(1, 127, (B, H, C), generator=gen, dtype=torch.int8))
        elif kind == "int32":
            ex.append(torch.randint(1, 2**30, (B, H, C), generator=gen, dtype=torch.int32))
        elif kind == "int64":
            ex.append(torch.randint(1, 2**40, (B, H, C), generator=gen, dtype=torch.int64))
        elif kind == "float32":
            ex.append(torch.randn(B, H, C, generator=gen) + 5.0)
        else:
            raise ValueError(kind)
    length = torch.tensor(lens, dtype=torch.int32)
    mv = lambda t: t.to(device)  # noqa: E731
    return mv(k), mv(v), mv(scores), mv(length), [mv(e) for e in ex]


def _clone(k, v, scores, length, extras):
    return k.clone(), v.clone(), scores.clone(), length.clone(), [e.clone() for e in extras]


def run_both(inputs, budget, n_sink, n_recent, reset_scores, return_indices=True):
    """Run the native op and the reference on copies; return both results and the originals."""
    orig = _clone(*inputs)
    got = _clone(*inputs)
    exp = _clone(*inputs)
    kw = dict(budget=budget, n_sink=n_sink, n_recent=n_recent, reset_scores=reset_scores)
    idx = ops.compact_(*got[:4], extras=got[4], return_indices=return_indices, **kw)
    ref_idx = compact_ref_(*exp[:4], extras=exp[4], return_indices=True, **kw)
    return orig, got, idx, exp, ref_idx


def assert_same(got, exp, what=""):
    names = ["k", "v", "scores", "length"]
    for name, a, b in zip(names, got[:4], exp[:4]):
        assert a.dtype == b.dtype and a.shape == b.shape
        # bit-exact (a copy); view as integers so that NaN payloads and -0.0 count too
        if a.is_floating_point():
            ia = a.view(torch.int16 if a.element_size() == 2 else torch.int32 if a.element_size() == 4 else torch.int64)
            ib = b.view(ia.dtype)
            assert torch.equal(ia, ib), f"{what}: {name} differs"
        else:
            assert torch.equal(a, b), f"{what}: {name} differs"
    for i, (a, b) in enumerate(zip(got[4], exp[4])):
        assert torch.equal(a, b), f"{what}: extras[{i}] ({a.dtype}) differs"


def assert_kept_sets(idx, ref_idx, lens, budget, n_sink, n_recent):
    """Kept-index sets, compared apart from the values moved; plus the structural rules."""
    B, H, _ = idx.shape
    for b in range(B):
        L = lens[b]
        for h in range(H):
            got = idx[b, h].tolist()
            assert set(got) == set(ref_idx[b, h].tolist()), f"kept set differs at row {b} head {h}"
            assert got == sorted(got) and len(set(got)) == budget  # increasing, original order
            if L <= budget:
                assert got == list(range(budget))
            else:
                assert set(range(n_sink)) <= set(got)
                assert set(range(L - n_recent, L)) <= set(got)
                assert max(got) < L


# (B, H, C, D, lens, budget, n_sink, n_recent)
SHAPES = [
    (1, 1, 64, 64, [64], 32, 4, 8),
    (1, 8, 4352, 128, [4352], 4096, 4, 256),  # the benchmark shape
    (2, 4, 1000, 64, [1000, 513], 512, 4, 64),
    (3, 2, 700, 128, [700, 100, 301], 300, 0, 50),  # ragged: one row under budget; no sinks
    (4, 3, 257, 64, [257, 200, 129, 256], 128, 8, 0),  # no recent window
    (2, 5, 300, 64, [300, 290], 40, 8, 32),  # budget == n_sink + n_recent: no middle kept
    (1, 2, 2500, 128, [2400], 1000, 0, 0),  # pure top-k
    (2, 8, 96, 128, [96, 96], 96, 4, 16),  # budget == C: nothing to do
    (4, 1, 130, 64, [131 - 1, 128, 0, 129], 128, 1, 1),  # empty row and length == budget
    (2, 3, 3000, 64, [3000, 2999], 1, 0, 1),  # budget 1
    (1, 4, 3000, 64, [2999], 1, 1, 0),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", KV_DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("reset_scores", [True, False], ids=["reset", "move"])
@pytest.mark.parametrize("case", range(len(SHAPES)))
def test_matches_reference(case, reset_scores, dtype, device):
    B, H, C, D, lens, budget, n_sink, n_recent = SHAPES[case]
    inputs = make_inputs(B, H, C, D, lens, dtype, device, seed=case)
    orig, got, idx, exp, ref_idx = run_both(inputs, budget, n_sink, n_recent, reset_scores)
    assert idx.dtype == torch.int64 and tuple(idx.shape) == (B, H, budget) and idx.device == got[0].device
    assert_same(got, exp, f"case {case}")
    assert torch.equal(idx, ref_idx)
    assert_kept_sets(idx.cpu(), ref_idx.cpu(), lens, budget, n_sink, n_recent)
    # rows within budget: untouched bit for bit (k, v, scores, extras, length)
    for b, L in enumerate(lens):
        if L <= budget:
            for a, o in zip(list(got[:3]) + got[4], list(orig[:3]) + orig[4]):
                assert torch.equal(a[b], o[b])
            assert int(got[3][b]) == L
        else:
            assert int(got[3][b]) == budget


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("levels", [1, 2, 5])
@pytest.mark.parametrize("reset_scores", [True, False], ids=["reset", "move"])
def test_ties_go_to_lower_slot(levels, reset_scores, device):
    B, H, C, D = 2, 3, 600, 64
    lens = [600, 450]
    budget, n_sink, n_recent = 200, 4, 32
    inputs = make_inputs(B, H, C, D, lens, torch.float16, device, seed=levels, score_levels=levels)
    _, got, idx, exp, ref_idx = run_both(inputs, budget, n_sink, n_recent, reset_scores)
    assert_same(got, exp, f"ties levels={levels}")
    assert torch.equal(idx, ref_idx)
    if levels == 1:  # all equal: the lowest middle slots win
        n_mid = budget - n_sink - n_recent
        want = list(range(n_sink + n_mid)) + list(range(600 - n_recent, 600))
        assert idx[0, 0].tolist() == want


@pytest.mark.parametrize("device", DEVICES)
def test_special_scores(device):
    """NaN ranks above everything (torch.sort order), +-inf, -0.0 == +0.0, denormals."""
    B, H, C, D = 1, 4, 400, 64
    k, v, scores, length, extras = make_inputs(B, H, C, D, [400], torch.bfloat16, device, seed=3)
    s = scores.cpu()
    s[0, 0, 10:20] = float("nan")
    s[0, 1, 10:200:3] = float("inf")
    s[0, 1, 11:200:3] = float("-inf")
    s[0, 2, :] = 0.0
    s[0, 2, 1::2] = -0.0
    s[0, 3, :] = 1e-40  # denormal
    s[0, 3, 50:60] = 2e-40
    s[0, 3, 60:300:7] = -1e-40
    scores = s.to(device)
    _, got, idx, exp, ref_idx = run_both((k, v, scores, length, extras), 100, 2, 10, False)
    assert_same(got, exp, "special scores")
    assert torch.equal(idx, ref_idx)


@pytest.mark.parametrize("device", DEVICES)
def test_no_indices_and_no_extras(device):
    inputs = make_inputs(2, 2, 300, 64, [300, 250], torch.float32, device, extras=())
    _, got, idx, exp, _ = run_both(inputs, 200, 4, 16, True, return_indices=False)
    assert idx is None
    assert_same(got, exp)
    raw = torch.ops.inf_mllm.compact_(*_clone(*inputs)[:4], [], 200, 4, 16, True, False)
    assert raw.dtype == torch.int64 and tuple(raw.shape) == (0,)


@pytest.mark.parametrize("device", DEVICES)
def test_many_extras_of_all_dtypes(device):
    kinds = ("int8", "int32", "int64", "float32") * 5  # 20 extras
    inputs = make_inputs(2, 2, 256, 64, [256, 256], torch.float16, device, extras=kinds)
    inputs[4].append(torch.randn(2, 2, 256, dtype=torch.float64, device=device) + 7)
    inputs[4].append(torch.randint(1, 100, (2, 2, 256), dtype=torch.int16, device=device))
    inputs[4].append(torch.rand(2, 2, 256, device=device).to(torch.bfloat16) + 1)
    inputs[4].append(torch.rand(2, 2, 256, device=device) > 0.5)
    _, got, idx, exp, ref_idx = run_both(inputs, 100, 4, 16, False)
    assert_same(got, exp, "many extras")
    assert torch.equal(idx, ref_idx)


def test_float64_cpu():
    inputs = make_inputs(2, 3, 500, 64, [500, 300], torch.float64, "cpu")
    _, got, idx, exp, ref_idx = run_both(inputs, 301, 4, 20, False)
    assert_same(got, exp, "float64")
    assert torch.equal(idx, ref_idx)


@pytest.mark.parametrize("device", DEVICES)
def test_repeated_compaction(device):
    """A stream: append, compact, append, compact ... stays equal to the reference."""
    B, H, C, D, budget = 2, 2, 160, 64, 128
    k, v, scores, length, extras = make_inputs(B, H, C, D, [160, 140], torch.bfloat16, device, extras=("int32",))
    a = _clone(k, v, scores, length, extras)
    r = _clone(k, v, scores, length, extras)
    gen = torch.Generator().manual_seed(7)
    for step in range(4):
        ops.compact_(*a[:4], budget=budget, n_sink=4, n_recent=16, reset_scores=False, extras=a[4])
        compact_ref_(*r[:4], budget=budget, n_sink=4, n_recent=16, reset_scores=False, extras=r[4])
        assert_same(a, r, f"step {step}")
        new = torch.rand(B, H, C - budget, generator=gen).to(device)
        for t in (a, r):
            t[2][:, :, budget:] = new  # fresh scores for appended slots
            t[3].fill_(C)


# ---------------------------------------------------------------------------------------
# argument checks through inf_mllm.ops.compact_
# ---------------------------------------------------------------------------------------


def _good(device="cpu"):
    k, v, scores, length, extras = make_inputs(2, 2, 64, 32, [64, 40], torch.float32, device, extras=("int32",))
    return dict(k=k, v=v, scores=scores, length=length, extras=extras, budget=32, n_sink=4, n_recent=8)


def _call(args):
    a = dict(args)
    return ops.compact_(a.pop("k"), a.pop("v"), a.pop("scores"), a.pop("length"), **a)


BAD = {
    "budget below sinks+recent": (lambda a: a.update(budget=10), r"n_sink \+ n_recent"),
    "budget above C": (lambda a: a.update(budget=65), r"exceeds the buffer capacity"),
    "budget zero": (lambda a: a.update(budget=0, n_sink=0, n_recent=0), r"at least 1"),
    "negative n_sink": (lambda a: a.update(n_sink=-1), r"n_sink must be >= 0"),
    "float budget": (lambda a: a.update(budget=32.0), r"budget must be an int"),
    "scores float16": (lambda a: a.update(scores=a["scores"].half()), r"scores must be float32"),
    "scores wrong shape": (lambda a: a.update(scores=a["scores"][:, :, :60].contiguous()), r"scores must have shape"),
    "scores 2-D": (lambda a: a.update(scores=a["scores"][0]), r"scores must be 3-D"),
    "k 3-D": (lambda a: a.update(k=a["k"][0]), r"k must be 4-D"),
    "k/v shape mismatch": (lambda a: a.update(v=a["v"][:, :, :60].contiguous()), r"same shape"),
    "k/v dtype mismatch": (lambda a: a.update(v=a["v"].half()), r"same dtype"),
    "k int dtype": (lambda a: a.update(k=a["k"].int(), v=a["v"].int()), r"not supported"),
    "k non-contiguous": (lambda a: a.update(k=a["k"].transpose(2, 3).contiguous().transpose(2, 3)), r"contiguous"),
    "scores non-contiguous": (lambda a: a.update(scores=a["scores"].transpose(0, 1).contiguous().transpose(0, 1)), r"contiguous"),
    "length int64": (lambda a: a.update(length=a["length"].long()), r"length must be int32"),
    "length wrong size": (lambda a: a.update(length=a["length"][:1]), r"length must have shape"),
    "length above C": (lambda a: a["length"].__setitem__(0, 65), r"exceeds the buffer capacity"),
    "length negative": (lambda a: a["length"].__setitem__(1, -1), r"non-negative"),
    "extras wrong shape": (lambda a: a.update(extras=[a["extras"][0][:, :, :10].contiguous()]), r"extras\[0\] must have shape"),
    "extras 4-D": (lambda a: a.update(extras=[a["k"]]), r"extras\[0\] must be 3-D"),
    "extras non-contiguous": (lambda a: a.update(extras=[a["extras"][0].transpose(0, 1).contiguous().transpose(0, 1)]), r"contiguous"),
    "extras not a tensor": (lambda a: a.update(extras=[[1, 2, 3]]), r"torch.Tensor"),
    "k not a tensor": (lambda a: a.update(k=None), r"torch.Tensor"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_inputs_raise(name):
    args = _good()
    mutate, pattern = BAD[name]
    mutate(args)
    before = [t.clone() for t in (args["k"], args["v"], args["scores"], args["length"]) if isinstance(t, torch.Tensor)]
    with pytest.raises((ValueError, TypeError), match=pattern):
        _call(args)
    after = [t for t in (args["k"], args["v"], args["scores"], args["length"]) if isinstance(t, torch.Tensor)]
    for x, y in zip(before, after):  # nothing was modified
        if x.shape == y.shape and x.dtype == y.dtype:
            assert torch.equal(x, y)


ALIASED = {
    "k is v": (lambda a: a.update(v=a["k"]), r"k and v share memory"),
    "extras (pos, pos)": (lambda a: a.update(extras=[a["extras"][0], a["extras"][0]]),
                          r"extras\[0\] and extras\[1\] share memory"),
    "extra aliases scores": (lambda a: a.update(extras=[a["scores"].view(torch.int32)]), r"scores and extras\[0\] share memory"),
    "extra aliases k": (lambda a: a.update(extras=[a["k"].view(-1)[: a["scores"].numel()].view(a["scores"].shape)]),
                        r"k and extras\[0\] share memory"),
    "v overlaps k partly": (lambda a: _overlapping_kv(a), r"k and v share memory"),
}


def _overlapping_kv(a):
    n = a["k"].numel()
    big = torch.randn(n + 32)
    a.update(k=big[:n].view(a["k"].shape), v=big[32:].view(a["k"].shape))


@pytest.mark.parametrize("name", list(ALIASED))
def test_aliased_buffers_refused(name):
    """compact_ moves every buffer in place: buffers sharing memory would be moved twice
    (issue 13). Refused by the wrapper, and by the raw op, before anything is written."""
    args = _good()
    args["length"][1] = 64  # both rows over budget
    mutate, pattern = ALIASED[name]
    mutate(args)
    before = [t.clone() for t in (args["k"], args["v"], args["scores"], args["length"])]
    with pytest.raises(ValueError, match=pattern):
        _call(args)
    with pytest.raises(RuntimeError, match="share memory"):
        torch.ops.inf_mllm.compact_(args["k"], args["v"], args["scores"], args["length"], list(args["extras"]),
                                    32, 4, 8, False, False)
    for x, y in zip(before, (args["k"], args["v"], args["scores"], args["length"])):
        assert torch.equal(x.view(torch.int32) if x.is_floating_point() else x,
                           y.view(torch.int32) if y.is_floating_point() else y)


def test_disjoint_views_of_one_storage_allowed():
    """k and v as the two halves of one allocation (no overlap) are fine."""
    k, v, scores, length, extras = make_inputs(2, 2, 64, 32, [64, 40], torch.float32, extras=("int32",))
    kv = torch.stack([k, v])
    got = (kv[0], kv[1], scores.clone(), length.clone(), [extras[0].clone()])
    exp = _clone(k, v, scores, length, extras)
    ops.compact_(*got[:4], budget=32, n_sink=4, n_recent=8, reset_scores=False, extras=got[4])
    compact_ref_(*exp[:4], budget=32, n_sink=4, n_recent=8, reset_scores=False, extras=exp[4])
    assert_same(got, exp, "k/v halves of one storage")


@pytest.mark.gpu
def test_bad_inputs_mixed_devices(gpu_device):
    for key in ("v", "scores", "length"):
        args = _good()
        args[key] = args[key].to(gpu_device)
        with pytest.raises((ValueError, TypeError), match=r"is on|are on"):
            _call(args)
    args = _good()
    args["extras"] = [args["extras"][0].to(gpu_device)]
    with pytest.raises(ValueError, match=r"extras\[0\] is on"):
        _call(args)


def test_mixed_devices_meta():
    """Device mismatch without a GPU: a meta tensor stands in for the other device."""
    args = _good()
    args["scores"] = args["scores"].to("meta")
    with pytest.raises(ValueError, match=r"scores is on meta"):
        _call(args)
    args = _good()
    args["extras"] = [args["extras"][0].to("meta")]
    with pytest.raises(ValueError, match=r"extras\[0\] is on meta"):
        _call(args)


def test_raw_op_checks_too():
    """The raw torch.ops entry point refuses what would read out of bounds."""
    a = _good()
    a["length"][0] = 100  # > C
    with pytest.raises(RuntimeError, match="length"):
        torch.ops.inf_mllm.compact_(a["k"], a["v"], a["scores"], a["length"], a["extras"], 32, 4, 8, True, True)
    a = _good()
    with pytest.raises(RuntimeError, match="budget"):
        torch.ops.inf_mllm.compact_(a["k"], a["v"], a["scores"], a["length"], a["extras"], 65, 4, 8, True, True)
    with pytest.raises(RuntimeError, match="scores"):
        torch.ops.inf_mllm.compact_(a["k"], a["v"], a["scores"].double(), a["length"], a["extras"], 32, 4, 8, True, True)


# ---------------------------------------------------------------------------------------
# build, opcheck, torch.compile
# ---------------------------------------------------------------------------------------


def test_native_library_loaded():
    assert ops.native_available(), "inf_mllm/_C*.so was not built or not loaded"
    assert torch.ops.inf_mllm.compact_.default._schema is not None
    # the CPU kernel is the native one, not the Python fallback
    assert torch._C._dispatch_has_kernel_for_dispatch_key("inf_mllm::compact_", "CPU")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("return_indices", [True, False])
def test_opcheck(device, return_indices):
    k, v, scores, length, extras = make_inputs(2, 2, 96, 32, [96, 50], torch.float16, device, extras=("int8", "float32"))
    torch.library.opcheck(
        torch.ops.inf_mllm.compact_.default,
        (k, v, scores, length, extras, 64, 4, 8, False, return_indices),
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile(device, backend):
    torch._dynamo.reset()

    def step(k, v, scores, length, tag):
        idx = ops.compact_(k, v, scores, length, budget=64, n_sink=4, n_recent=8, reset_scores=False,
                           extras=[tag], return_indices=True)
        return idx + 0, scores.sum()

    compiled = torch.compile(step, backend=backend, fullgraph=True)
    inputs = make_inputs(2, 2, 96, 32, [96, 70], torch.bfloat16, device, extras=("int32",))
    a = _clone(*inputs)
    r = _clone(*inputs)
    idx, total = compiled(*a[:4], a[4][0])
    ref_idx = compact_ref_(*r[:4], budget=64, n_sink=4, n_recent=8, reset_scores=False, extras=r[4], return_indices=True)
    assert torch.equal(idx, ref_idx)
    assert_same(a, r, "torch.compile")  # moved values and indices: bit-exact
    # a float reduction: inductor may sum in another order (threads, vector width) than eager
    torch.testing.assert_close(total, r[2].sum(), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------
# GPU only: large C (multi-pass radix select), CUDA graphs (no host sync)
# ---------------------------------------------------------------------------------------


@pytest.mark.gpu
# 40000: keys cached in opt-in shared memory (> 48 KiB); 65536 / 70000: too many keys to cache
@pytest.mark.parametrize("C,budget,levels", [(40000, 20000, None), (65536, 32768, None), (70000, 4096, 3), (20000, 19999, None)])
def test_large_capacity(gpu_device, C, budget, levels):
    inputs = make_inputs(1, 2, C, 64, [C], torch.bfloat16, gpu_device, extras=("int8",), score_levels=levels)
    _, got, idx, exp, ref_idx = run_both(inputs, budget, 4, 256, True)
    assert_same(got, exp, f"C={C}")
    assert torch.equal(idx, ref_idx)


@pytest.mark.gpu
def test_cuda_graph_capture(gpu_device):
    inputs = make_inputs(2, 4, 512, 128, [512, 300], torch.float16, gpu_device)
    a = _clone(*inputs)
    r = _clone(*inputs)
    static = _clone(*inputs)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        with torch.cuda.graph(g):
            torch.ops.inf_mllm.compact_(*static[:4], static[4], 400, 4, 32, False, False)
    for t_static, t_in in zip(list(static[:4]) + static[4], list(a[:4]) + a[4]):
        t_static.copy_(t_in)
    g.replay()
    torch.cuda.synchronize()
    compact_ref_(*r[:4], budget=400, n_sink=4, n_recent=32, reset_scores=False, extras=r[4])
    assert_same(static, r, "cuda graph")

"""bench/per_head_budget.py, the per-head budget emulation behind method.md §9.2's finding: its
masked attention is SPEC §4.1 on each head's own slots, its control is ``inf_mllm``, and a shared
cut over the heads leaves the heads different lengths with the layer's total fixed."""
import importlib.util
import os

import pytest
import torch

import inf_mllm
from inf_mllm import ops
from inf_mllm.buffers import OWNER_ATTR

from _model import tiny_llama

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "per_head_budget.py")


@pytest.fixture(scope="module")
def ph():
    spec = importlib.util.spec_from_file_location("per_head_budget", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def model():
    return tiny_llama(n_layers=2)


def test_masked_attention_is_each_heads_own_buffer(ph):
    """With holes at the front of heads 1 and 2, output and scores equal the operator's on a buffer
    holding only that head's valid slots (RoPE sees distances only)."""
    g = torch.Generator().manual_seed(0)
    Hkv, G, C, D, n, L = 3, 3, 40, 16, 6, 30
    q = torch.randn(1, Hkv * G, n, D, generator=g)
    k, v = torch.randn(1, Hkv, C, D, generator=g), torch.randn(1, Hkv, C, D, generator=g)
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    buf = type("Buf", (), {})()
    buf.k, buf.hole = k, torch.tensor([[0, 5, 11]])
    layer = type("Layer", (), {})()
    layer.buf = buf
    setattr(k, OWNER_ATTR, layer)
    scores = torch.zeros(1, Hkv, C)
    out = ph.masked_attention(q, k, v, torch.tensor([L], dtype=torch.int32), scores, window=4, inv_freq=inv)
    for h in range(Hkv):
        lo = int(buf.hole[0, h])
        kh, vh = torch.zeros(1, 1, C, D), torch.zeros(1, 1, C, D)
        kh[0, 0, : L - lo], vh[0, 0, : L - lo] = k[0, h, lo:L], v[0, h, lo:L]
        sh = torch.zeros(1, 1, C)
        ref = ops.attention_with_scores(q[:, h * G : (h + 1) * G], kh, vh, torch.tensor([L - lo], dtype=torch.int32), sh,
                                        window=4, inv_freq=inv)
        torch.testing.assert_close(out[:, h * G : (h + 1) * G], ref, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(scores[0, h, lo:L], sh[0, 0, : L - lo], atol=1e-5, rtol=1e-4)
        assert not bool(scores[0, h, :lo].any())  # holes gain nothing


def _stream(model, ph, alloc, ids):
    kw = dict(budget=24, n_recent=4, window=4, chunk=8)
    if alloc is None:
        cache = inf_mllm.enable(model, "inf_mllm", **kw)
    else:
        cache = inf_mllm.enable(model, ph.HeadwiseInfMLLM(alloc=alloc, head_cap=48, **kw))
    saved, ops.attention_with_scores = ops.attention_with_scores, ph.masked_attention
    try:
        logits = inf_mllm.stream(model, ids, cache=cache)
    finally:
        ops.attention_with_scores = saved
    return cache, logits


def test_uniform_control_is_inf_mllm_and_shared_cut_keeps_the_total(model, ph):
    ids = torch.randint(0, 128, (1, 120), generator=torch.Generator().manual_seed(1))
    base, lb = _stream(model, ph, None, ids)
    ctrl, lc = _stream(model, ph, "uniform", ids)
    torch.testing.assert_close(lb, lc)
    for a, b in zip(base.layers, ctrl.layers):
        assert a.buf.lengths == b.buf.lengths
        L = a.buf.lengths[0]
        assert torch.equal(a.buf.position[0, :, :L], b.buf.position[0, :, :L])
        assert not bool(ph.HeadwiseInfMLLM.holes(b.buf).any())
    shared, _ = _stream(model, ph, "raw", ids)
    uneven = False
    for layer in shared.layers:
        buf = layer.buf
        held = [buf.lengths[0] - int(x) for x in buf.hole[0]]
        assert sum(held) <= buf.heads * 24 and max(held) <= 48
        uneven |= len(set(held)) > 1
        for h in range(buf.heads):  # each head's tokens in stream order, its newest the row's newest
            pos = buf.position[0, h, int(buf.hole[0, h]) : buf.lengths[0]]
            assert bool((pos[1:] > pos[:-1]).all()) and int(pos[-1]) == 119
    assert uneven, "the shared cut never gave the heads different lengths"

"""bench/kvzip_stream.py and bench/kvzip_select.py, behind method.md §9.2's KVzip rows: a score fixed
at insertion streams exactly (the kept set equals the one-shot best of the same scores), the masked
attention is SPEC §4.1 over the slots not dropped, and the selections keep the budget they name."""
import importlib.util
import os
import sys

import pytest
import torch

import inf_mllm
from inf_mllm import ops
from inf_mllm.buffers import OWNER_ATTR
from inf_mllm.cache import StreamingLayer

from _model import tiny_llama

_BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(_BENCH, name + ".py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def kzs():
    return _load("kvzip_stream")


@pytest.fixture(scope="module")
def sel(kzs):
    sys.path.insert(0, _BENCH)
    try:
        return _load("kvzip_select")
    finally:
        sys.path.remove(_BENCH)


def _stream(kzs, budget, ids, monkeypatch):
    model = tiny_llama(n_layers=2)
    kw = dict(budget=budget, n_recent=4, n_sink=0, window=4, chunk=8)
    cache = inf_mllm.enable(model, kzs.KVzipStream(**kw))
    monkeypatch.setattr(StreamingLayer, "_probe", kzs.kz_probe)
    inf_mllm.stream(model, ids, cache=cache)
    return cache


def test_fixed_insertion_score_streams_exactly(kzs, monkeypatch):
    """Layer 0's probe sees only the tokens (its softmax: sinks + chunk + probe), so with no sinks (whose
    rolling distance to the chunk moves with evictions) its scores do not depend on what was
    evicted: streamed at budget 20, layer 0 keeps per head exactly the best of the scores that a
    run with no eviction gives every token, and each kept token carries its own score."""
    ids = torch.randint(0, 128, (1, 96), generator=torch.Generator().manual_seed(3))
    full = _stream(kzs, 256, ids, monkeypatch).layers[0].buf
    kept = _stream(kzs, 20, ids, monkeypatch).layers[0].buf
    assert full.lengths[0] == 96 and kept.evictions > 0
    T, L = full.lengths[0], kept.lengths[0]
    for h in range(full.heads):
        mid = full.kz[0, h, : T - 4]
        assert bool((mid > 0).all())  # every middle token was scored by its chunk's probe
        n_mid = 20 - 4
        best = torch.sort(mid, descending=True, stable=True).indices[:n_mid]
        want = sorted(best.tolist())
        pos = kept.position[0, h, :L].tolist()
        got = [p for p in pos if p < T - 4]
        assert sorted(got) == want, h
        torch.testing.assert_close(kept.kz[0, h, :L], full.kz[0, h, torch.tensor(pos)])


def test_prompt_goes_before_every_probe_and_nowhere_else(kzs, monkeypatch):
    """``--prompt``: the probe forwards get KVzip's instruction in front of the chunk (found by the
    cache keyword of the installed transformers); the forwards that feed the stream do not."""
    model = tiny_llama(n_layers=2)
    seen = []
    cls = type(model)
    orig = cls.forward

    def record(self, input_ids=None, **kw):
        seen.append((input_ids.shape[1], kw[inf_mllm._compat.CACHE_KW]._probing is not None))
        return orig(self, input_ids=input_ids, **kw)

    monkeypatch.setattr(cls, "forward", kzs.with_prompt(record))
    monkeypatch.setitem(kzs._prompt_ids, model.config.name_or_path, torch.tensor([[5, 6, 7]]))
    monkeypatch.setattr(StreamingLayer, "_probe", kzs.kz_probe)
    cache = inf_mllm.enable(model, kzs.KVzipStream(budget=20, n_recent=4, n_sink=0, window=4, chunk=8,
                                                  prompt_len=3))
    inf_mllm.stream(model, torch.randint(0, 128, (1, 32), generator=torch.Generator().manual_seed(0)), cache=cache)
    assert seen == [(8, False), (11, True)] * 4


def test_dropped_attention_is_attention_over_the_kept_slots(sel):
    """Without RoPE, dropping middle slots of one head equals the operator on that head's buffer with
    those slots removed; the other heads equal the operator on the whole buffer."""
    g = torch.Generator().manual_seed(0)
    Hkv, G, C, D, n, L = 2, 2, 32, 8, 3, 24
    q = torch.randn(1, Hkv * G, n, D, generator=g)
    k, v = torch.randn(1, Hkv, C, D, generator=g), torch.randn(1, Hkv, C, D, generator=g)
    buf = type("Buf", (), {})()
    buf.k = k
    buf.drop = torch.zeros(1, Hkv, C, dtype=torch.bool)
    buf.drop[0, 1, [3, 7, 8, 15]] = True
    layer = type("Layer", (), {})()
    layer.buf = buf
    setattr(k, OWNER_ATTR, layer)
    length = torch.tensor([L], dtype=torch.int32)
    out = sel.dropped_attention(q, k, v, length)
    ref = ops.attention_with_scores(q[:, :G], k[:, :1], v[:, :1], length, None, window=0)
    torch.testing.assert_close(out[:, :G], ref, atol=1e-5, rtol=1e-4)
    keep = [j for j in range(L) if not bool(buf.drop[0, 1, j])]
    kh, vh = torch.zeros(1, 1, C, D), torch.zeros(1, 1, C, D)
    kh[0, 0, : len(keep)], vh[0, 0, : len(keep)] = k[0, 1, keep], v[0, 1, keep]
    ref1 = ops.attention_with_scores(q[:, G:], kh, vh, torch.tensor([len(keep)], dtype=torch.int32), None, window=0)
    torch.testing.assert_close(out[:, G:], ref1, atol=1e-5, rtol=1e-4)


def test_selections_keep_their_budget(sel):
    """uniform: ``mid`` middle slots per head; layer: ``heads x mid`` per layer; global: ``layers x
    heads x mid`` in all, given to the heads whose scores run highest; layerbudget: the global cut's
    count per layer, split equally over its heads; sinks and recent are never dropped."""
    g = torch.Generator().manual_seed(1)
    nl, H, T, mid = 2, 3, 40, 5
    bufs = []
    for li in range(nl):
        b = type("Buf", (), {})()
        b.kz = torch.rand(1, H, 48, generator=g)
        b.scores = torch.zeros(1, H, 48)
        bufs.append(b)
    bufs[1].kz[0, 2] += 1.0  # one head scores above all others
    keep = sel.select(bufs, "uniform", T, 2, 4, mid)
    assert keep.sum(-1).eq(mid).all()
    keep = sel.select(bufs, "global", T, 2, 4, mid)
    assert int(keep.sum()) == nl * H * mid
    assert int(keep[1, 2].sum()) == nl * H * mid  # that head takes every slot (it has 34 candidates)
    keep = sel.select(bufs, "layer", T, 2, 4, mid)
    assert keep.sum((-1, -2)).eq(H * mid).all() and int(keep[1, 2].sum()) == H * mid
    keep = sel.select(bufs, "layerbudget", T, 2, 4, mid)  # layer 1 holds the whole global cut
    assert int(keep[0].sum()) == 0 and keep[1].sum(-1).eq(nl * mid).all()
    bufs[1].kz[0, 2] -= 1.0
    for seed in range(5):  # counts per layer not divisible by the heads: the remainders still fill the budget
        for b in bufs:
            b.kz = torch.rand(1, H, 48, generator=g)
        keep = sel.select(bufs, "layerbudget", T, 2, 4, mid)
        per_head = keep.sum(-1)
        assert int(keep.sum()) == nl * H * mid and (per_head == per_head[:, :1]).all()
    for b in bufs:
        assert not bool(b.drop[0, :, :2].any()) and not bool(b.drop[0, :, T - 4 :].any())


def test_streamed_cut_keeps_the_pooled_budget_and_never_readmits(sel):
    """--stream: after every chunk the middle slots still there are cut to ``layers x heads x mid``
    over all heads and layers; a dropped slot stays dropped even when its score is the best later."""
    g = torch.Generator().manual_seed(2)
    nl, H, mid, n_sink, n_recent = 2, 3, 4, 2, 3
    bufs = []
    for _ in range(nl):
        b = type("Buf", (), {})()
        b.kz = torch.zeros(1, H, 64)
        b.scores = torch.zeros(1, H, 64)
        bufs.append(b)
    T = 0
    for step in range(4):
        T += 8
        for b in bufs:
            b.kz[0, :, T - 8 : T] = torch.rand(H, 8, generator=g)
        dropped = [b.drop.clone() for b in bufs] if step else None
        sel.cut_stream(bufs, T, n_sink, n_recent, mid)
        alive = torch.stack([~b.drop[0, :, n_sink : T - n_recent] for b in bufs])
        assert int(alive.sum()) == min(nl * H * mid, nl * H * (T - n_sink - n_recent))
        for b in bufs:
            assert not bool(b.drop[0, :, :n_sink].any()) and not bool(b.drop[0, :, T - n_recent :].any())
        if dropped is not None:
            for b, d in zip(bufs, dropped):
                assert bool(b.drop[d].all())
                b.kz[d] = 10.0  # a dropped slot's score rises above all: it still does not come back

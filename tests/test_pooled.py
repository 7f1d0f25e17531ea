"""The budget pooled over every layer and KV head (inf_mllm.pooled, policy ``kvzip``)."""
import pytest
import torch

import inf_mllm
from inf_mllm import pooled, reference
from inf_mllm._compat import CACHE_KW

from _model import tiny_llama


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return tiny_llama()


def _ids(n, seed=0):
    return torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(seed))


def _kvzip(model, budget=32, chunk=16, n_recent=4, **kw):
    return inf_mllm.enable(model, "kvzip", budget=budget, chunk=chunk, n_recent=n_recent, instruct=False, **kw)


def _heads(cache):
    return [(layer.buf, h) for layer in cache.layers for h in range(layer.buf.heads)]


def _held_positions(cache, b=0):
    pool = cache._pool
    return [pool.position[b, st.table[b, h, :st.lens[b][h]]].tolist() for st, h in _heads(cache)]


def test_pool_slots_are_conserved_and_fixed(model):
    cache = _kvzip(model)
    inf_mllm.stream(model, _ids(200), cache=cache, chunk=16)
    pool = cache._pool
    ptr = pool.k.data_ptr()
    n_heads = len(_heads(cache))
    assert pool.slots == n_heads * (32 + cache.policy.head_room)
    for t in range(5):
        model(_ids(1, seed=t), **{CACHE_KW: cache})
        held = sum(st.lens[0][h] for st, h in _heads(cache))
        assert held + len(pool.free[0]) == pool.slots  # every slot held by one head or free, once
        used = [int(s) for st, h in _heads(cache) for s in st.table[0, h, :st.lens[0][h]]]
        assert len(set(used)) == len(used) and not set(used) & set(pool.free[0])
    assert pool.k.data_ptr() == ptr  # never reallocated


def test_cut_keeps_the_pooled_budget_sinks_recent_and_the_best(model):
    """After every chunk (and its probe): n_layers * Hkv * budget slots in all; each head its
    n_sink first and n_recent last tokens; every middle token kept scores at least as high as
    every one dropped by that cut."""
    budget, n_sink, n_recent = 32, 4, 4
    cache = _kvzip(model, budget=budget, n_recent=n_recent)
    ids = _ids(240, seed=1)
    shares = set()
    for s in range(0, 240, 16):
        inf_mllm.stream(model, ids[:, s:s + 16], cache=cache, chunk=16)
        seen = s + 16
        heads = _heads(cache)
        lens = [st.lens[0][h] for st, h in heads]
        assert sum(lens) == min(seen, budget) * len(heads)
        shares.add(tuple(lens))
        for pos in _held_positions(cache):
            assert pos == sorted(pos)  # stream order
            assert pos[:n_sink] == list(range(n_sink))
            assert pos[-n_recent:] == list(range(seen - n_recent, seen))
    assert any(len(set(s)) > 1 for s in shares)  # the heads' shares differ: the budget is pooled

    # the cut itself, on the state it cuts (scores set by hand)
    pool, states = cache._pool, [layer.buf for layer in cache.layers]
    model(_ids(1, seed=5), **{CACHE_KW: cache})  # (a decode step: cut to budget again)
    with cache.deferred_eviction():  # 16 more tokens, not cut until the block ends
        model(_ids(16, seed=6), **{CACHE_KW: cache})
        before = [(st, h, st.table[0, h, :st.lens[0][h]].clone()) for st, h in _heads(cache)]
        g = torch.Generator().manual_seed(3)
        pool.score[0] = torch.rand(pool.slots, generator=g)
    kept = {int(x) for st, h in _heads(cache) for x in st.table[0, h, :st.lens[0][h]]}
    lo_kept, hi_dropped = 2.0, -1.0
    for st, h, slots in before:
        mid = slots[n_sink : len(slots) - n_recent].tolist()
        assert set(slots[:n_sink].tolist()) <= kept and set(slots[len(slots) - n_recent:].tolist()) <= kept
        for x in mid:
            v = float(pool.score[0, x])
            if x in kept:
                lo_kept = min(lo_kept, v)
            else:
                hi_dropped = max(hi_dropped, v)
    assert hi_dropped >= 0 and lo_kept >= hi_dropped
    assert sum(st.lens[0][h] for st, h in _heads(cache)) == budget * len(_heads(cache))


def test_equals_full_below_budget_with_probes_and_instruction(model):
    ids = _ids(70, seed=2)
    full = inf_mllm.enable(model, "full", budget=128)
    ref = inf_mllm.stream(model, ids[:, :60], cache=full, chunk=16, return_nll=True)
    cache = inf_mllm.enable(model, "kvzip", budget=128, chunk=16, n_recent=8, instruct=False)
    cache.instruction_ids = [5, 6, 7]  # (the tiny model has no tokenizer)
    out = inf_mllm.stream(model, ids[:, :60], cache=cache, chunk=16, return_nll=True)
    torch.testing.assert_close(out[0], ref[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out[1], ref[1], atol=1e-4, rtol=1e-4)
    for t in range(60, 70):
        a = model(ids[:, t:t + 1], **{CACHE_KW: cache}).logits
        b = model(ids[:, t:t + 1], **{CACHE_KW: full}).logits
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert cache.lengths() == [70] and cache.get_seq_length() == 70


@pytest.mark.parametrize("roll", [True, False])
def test_attention_over_the_pool_is_the_operator_per_head(roll):
    """pooled.attend equals SPEC §4.1's reference run on each head's own contiguous buffer
    (its tokens gathered in table order; rolling positions by slot, or ``roll=False`` the stream
    positions), and the new tokens' scores are their peak probability over the forward's queries
    and heads of the group."""
    g = torch.Generator().manual_seed(0)
    B, Hkv, G, D = 2, 3, 2, 16
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    rope = dict(inv_freq=inv_freq, rope_scale=1.0)
    pool = pooled.Pool(B, 400, D, torch.float32, "cpu")
    st = pooled.PooledLayerState(None, B, Hkv, D, torch.float32, "cpu", 8)
    for step, n in enumerate((20, 20, 20)):
        kn, vn = torch.randn(B, Hkv, n, D, generator=g), torch.randn(B, Hkv, n, D, generator=g)
        q = torch.randn(B, Hkv * G, n, D, generator=g)
        out = pooled.attend(st, pool, q, kn, vn, 0.3, rope, [20 * step] * B, probe=False, roll=roll)
        for b in range(B):
            for h in range(Hkv):
                L = st.lens[b][h]
                sl = st.table[b, h, :L]
                k, v = pool.k[b, sl][None, None], pool.v[b, sl][None, None]
                qh = q[b:b + 1, h * G:(h + 1) * G]
                length = torch.tensor([L], dtype=torch.int32)
                at = dict(rope)
                if not roll:
                    assert pool.position[b, sl].tolist()[-n:] == list(range(20 * step, 20 * step + n))
                    at.update(rope_pos=pool.position[b, sl].to(torch.int32).view(1, 1, 1, L),
                              rope_sections=torch.zeros(D // 2, dtype=torch.int32))
                want = reference.attention_with_scores_ref(qh, k, v, length, None, scale=0.3, window=0, **at)
                torch.testing.assert_close(out[b:b + 1, h * G:(h + 1) * G], want, atol=1e-5, rtol=1e-5)
                peak = reference.probe_attention_max(qh, k, length, scale=0.3, **at)[0, 0]
                torch.testing.assert_close(pool.score[b, sl[L - n:]], peak[L - n:])
        # uneven shares: cut with random scores so that the heads hold different numbers
        pool.score[:, :] = torch.rand(B, 400, generator=g)
        pooled.cut([st], pool, budget=18, n_sink=2, n_recent=3)
        assert all(sum(r) == 18 * Hkv for r in st.lens)
    assert any(len(set(r)) > 1 for r in st.lens)


def test_probe_scores_its_chunk_and_leaves_nothing(model):
    cache = _kvzip(model, budget=64)
    inf_mllm.stream(model, _ids(48, seed=3), cache=cache, chunk=16)
    pool = cache._pool
    lens = [list(layer.buf.lens[0]) for layer in cache.layers]
    free = len(pool.free[0])
    st = cache.layers[0].buf
    slots = st.table[0, 0, :st.lens[0][0]]
    before = pool.score[0, slots].clone()
    with cache.deferred_eviction():
        model(_ids(16, seed=4), **{CACHE_KW: cache})
        mid = pool.score[0].clone()
        with cache.probing():
            model(_ids(19, seed=5), **{CACHE_KW: cache})
    assert [list(layer.buf.lens[0]) for layer in cache.layers] == [[L + 16 for L in r] for r in lens]
    assert len(pool.free[0]) == free - 16 * len(_heads(cache))  # the probe's slots are free again
    assert torch.equal(pool.score[0, slots], before)  # tokens probed before keep their scores
    new = st.table[0, 0, st.lens[0][0] - 16:st.lens[0][0]]
    assert bool((mid[new] == 0).all())  # a chunk fed before its probe is not scored twice
    assert bool((pool.score[0, new] > 0).all()) and bool((pool.score[0, new] <= 1).all())  # the probe's
    assert cache.get_seq_length() == 64
    model(_ids(1, seed=6), **{CACHE_KW: cache})  # a step outside a probe: scored by its own query
    last = st.table[0, 0, st.lens[0][0] - 1]
    assert 0 < float(pool.score[0, last]) <= 1


def test_the_instruction_goes_before_every_probe(model, monkeypatch):
    cache = _kvzip(model, budget=64)
    cache.instruction_ids = [9, 8, 7]
    seen = []
    orig = pooled.attend

    def spy(state, pool, q, kn, vn, scaling, rope, first_pos, probe, **kw):
        if state.owner.layer_idx == 0:
            seen.append((probe, q.shape[2]))
        return orig(state, pool, q, kn, vn, scaling, rope, first_pos, probe, **kw)

    monkeypatch.setattr(pooled, "attend", spy)
    inf_mllm.stream(model, _ids(40, seed=6), cache=cache, chunk=16)
    assert seen == [(False, 16), (True, 19), (False, 16), (True, 19), (False, 8), (True, 11)]


def test_refusals_say_why(model, tmp_path):
    with pytest.raises(ValueError, match="tokenizer"):
        inf_mllm.enable(model, "kvzip", budget=32, n_recent=4)
    with pytest.raises(ValueError, match="window and bias"):
        inf_mllm.enable(model, "kvzip", budget=32, n_recent=4, instruct=False, window=8)
    cache = _kvzip(model)
    inf_mllm.stream(model, _ids(100), cache=cache, chunk=16)
    with pytest.raises(NotImplementedError, match="save"):
        cache.save(tmp_path / "c.safetensors")
    with pytest.raises(NotImplementedError, match="beam search"):
        cache.reorder_cache(torch.tensor([0, 0]))
    with pytest.raises(NotImplementedError, match="planned"):
        cache.plan_decode_step()
    n = cache.policy.head_room + 1
    before = [list(layer.buf.lens[0]) for layer in cache.layers]
    with pytest.raises(ValueError, match="inf_mllm.stream"):
        model(_ids(n), **{CACHE_KW: cache})
    assert [list(layer.buf.lens[0]) for layer in cache.layers] == before  # nothing written
    pad = inf_mllm.enable(model, "kvzip", budget=32, n_recent=4, instruct=False, chunk=16)
    ids = _ids(20)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with pytest.raises(ValueError, match="padded"):
        model(ids, attention_mask=mask, **{CACHE_KW: pad})


def test_clone_is_independent(model):
    cache = _kvzip(model)
    inf_mllm.stream(model, _ids(120, seed=7), cache=cache, chunk=16)
    changed, twin = cache.clone(), cache.clone()
    inf_mllm.stream(model, _ids(48, seed=9), cache=changed, chunk=16)  # cuts the copy's pool, not the others'
    assert changed.get_seq_length() == cache.get_seq_length() + 48
    q = _ids(5, seed=8)
    a = model(q, **{CACHE_KW: cache}).logits
    b = model(q, **{CACHE_KW: twin}).logits
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert cache.stats() == twin.stats()

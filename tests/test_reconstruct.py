"""Reconstruction probing (``inf_mllm`` with ``reconstruct > 0``): the cache's probe mode and
deferred eviction, and what the policy does with a probe's attention."""
import pytest
import torch

import inf_mllm
from inf_mllm._compat import CACHE_KW

from _model import tiny_llama


@pytest.fixture(scope="module")
def model():
    return tiny_llama(n_layers=2)


def _ids(n, seed=0):
    return torch.randint(0, 128, (1, n), generator=torch.Generator().manual_seed(seed))


def _cache(model, budget=512, **kw):
    return inf_mllm.enable(model, "inf_mllm", budget=budget, n_recent=8, window=8, chunk=16, **kw)


def test_probe_below_budget_changes_only_the_scores(model):
    """Below budget nothing is evicted: with reconstruct=r the logits, keys, values and counters are
    those of r=0, and the scores differ by r * window / n times the attention a second feed of the
    chunk gives the slots (measured with ``h2o``, which adds every query's attention, on a copy)."""
    ids = _ids(16)
    plain, probed = _cache(model), _cache(model, reconstruct=2.0)
    a = inf_mllm.stream(model, ids, cache=plain)
    b = inf_mllm.stream(model, ids, cache=probed)
    torch.testing.assert_close(a, b)
    assert probed.get_seq_length() == plain.get_seq_length() == 16
    assert probed.capacity == plain.capacity + 16  # room for the probe
    # the second feed, for real, into an h2o cache that has seen the chunk once
    ref = inf_mllm.enable(model, "h2o", budget=512, n_recent=8, chunk=16)
    inf_mllm.stream(model, ids, cache=ref)
    first = [layer.buf.scores[:, :, :16].clone() for layer in ref.layers]
    inf_mllm.stream(model, ids, cache=ref)
    for i, (lp, lq) in enumerate(zip(plain.layers, probed.layers)):
        p, q = lp.buf, lq.buf
        assert p.lengths == q.lengths == [16] and int(q.length[0]) == 16 and int(q.fed[0]) == 16
        torch.testing.assert_close(p.k[:, :, :16], q.k[:, :, :16])
        torch.testing.assert_close(p.v[:, :, :16], q.v[:, :, :16])
        assert q.evictions == p.evictions == 0
        gained = ref.layers[i].buf.scores[:, :, :16] - first[i]
        assert float(gained.abs().sum()) > 1.0
        torch.testing.assert_close(q.scores[:, :, :16] - p.scores[:, :, :16], 2.0 * 8 / 16 * gained, atol=1e-5, rtol=1e-4)
        assert not bool(q.scores[:, :, 16:].any())  # the probe's own slots left nothing behind
    # and the stream goes on as usual: a decode step gives the same logits
    step = _ids(1, seed=3)
    torch.testing.assert_close(model(step, **{CACHE_KW: plain}).logits, model(step, **{CACHE_KW: probed}).logits)


def test_probe_max_credits_each_slot_its_peak_probe_attention(model):
    """``probe="max"``: below budget the scores differ from r=0's by r times each slot's largest
    attention from any probe query and any query head of its GQA group. Checked against the model's
    own eager attention over the chunk fed twice (the probe's queries are the second copy's)."""
    ids = _ids(16)
    plain, probed = _cache(model), _cache(model, reconstruct=2.0, probe="max")
    torch.testing.assert_close(inf_mllm.stream(model, ids, cache=plain), inf_mllm.stream(model, ids, cache=probed))
    impl = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            att = model(torch.cat([ids, ids], 1), output_attentions=True, use_cache=False).attentions
    finally:
        model.set_attn_implementation(impl)
    G = model.config.num_attention_heads // model.config.num_key_value_heads
    for i, a in enumerate(att):
        B, Hq = a.shape[:2]
        peak = a[:, :, 16:, :16].reshape(B, Hq // G, G, 16, 16).amax(dim=(2, 3))
        assert float(peak.max()) > 0.5
        gained = probed.layers[i].buf.scores[:, :, :16] - plain.layers[i].buf.scores[:, :, :16]
        torch.testing.assert_close(gained, 2.0 * peak, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="probe must be one of"):
        _cache(model, reconstruct=1.0, probe="mean")


def test_probe_over_budget_evicts_after_the_probe(model):
    """Over budget: the same number of evictions and slots as without probing, the chunk's tokens
    are evicted only after the probe (the capacity holds chunk + probe), the choice of kept tokens
    changes, and generation works after it."""
    ids = _ids(160, seed=1)
    plain, probed = _cache(model, budget=48), _cache(model, budget=48, reconstruct=4.0)
    seen_by_probe = []
    probed_hook = probed.policy.probed
    probed.policy.probed = lambda buf, rows, gained, n: (seen_by_probe.append(list(buf.lengths)),
                                                         probed_hook(buf, rows, gained, n))
    inf_mllm.stream(model, ids, cache=plain)
    inf_mllm.stream(model, ids, cache=probed)
    # per chunk and layer; from the 4th chunk on the probe sees budget + the un-evicted chunk
    assert seen_by_probe == [[min(16 * (c + 1), 48 + 16)] for c in range(10) for _ in range(2)]
    assert probed.capacity == plain.capacity + 16
    differ = False
    for lp, lq in zip(plain.layers, probed.layers):
        assert lq.buf.lengths == lp.buf.lengths == [48]
        assert lq.buf.evictions == lp.buf.evictions > 0
        assert not lq.deferred
        kept_p = lp.buf.position[0, :, :48].sort(-1).values
        kept_q = lq.buf.position[0, :, :48].sort(-1).values
        assert int(kept_q.max()) == 159
        differ |= not torch.equal(kept_p, kept_q)
    assert differ, "the probe's scores never changed what was kept"
    out = inf_mllm.generate(model, _ids(4, seed=2), cache=probed, max_new_tokens=5)
    assert out.shape[-1] >= 5


def test_probe_refusals(model):
    """Clear errors: a padded batch, nested blocks, a probe that does not fit, a bad weight."""
    cache = _cache(model, reconstruct=1.0)
    ids = torch.cat([_ids(20), _ids(20, seed=5)])
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, :4] = 0
    with pytest.raises(ValueError, match="padded"):
        inf_mllm.stream(model, ids, cache=cache, attention_mask=mask)
    cache = _cache(model, reconstruct=1.0)
    with pytest.raises(RuntimeError, match="has seen tokens"):
        with cache.probing():
            pass
    inf_mllm.stream(model, _ids(16), cache=cache)
    with pytest.raises(RuntimeError, match="do not nest"):
        with cache.deferred_eviction():
            with cache.deferred_eviction():
                pass
    with pytest.raises(RuntimeError, match="does not fit"):
        with cache.probing():
            model(_ids(cache.capacity), **{CACHE_KW: cache})
    assert cache.get_seq_length() == 16 and cache.lengths() == [16]  # the failed probe left nothing
    with pytest.raises(ValueError, match="reconstruct"):
        _cache(model, reconstruct=-1.0)

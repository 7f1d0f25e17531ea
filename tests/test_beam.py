"""Beam search with a StreamingCache: transformers' ``generate(num_beams=...)`` reorders the cache's
rows (``reorder_cache``); below budget the beams equal plain transformers', under eviction each
beam row behaves as that row alone."""
import pytest
import torch

import inf_mllm
from inf_mllm._compat import CACHE_KW

from _model import policy_kwargs, tiny_llama


@pytest.fixture(scope="module")
def model():
    return tiny_llama(n_layers=2)


def _ids(n, seed=0, rows=1):
    return torch.randint(0, 128, (rows, n), generator=torch.Generator().manual_seed(seed))


def _sdpa_generate(model, ids, **kw):
    """Plain transformers: SDPA attention and its own DynamicCache."""
    from inf_mllm.evals.engine import plain_attention

    with plain_attention(model):
        return model.generate(ids, attention_mask=torch.ones_like(ids), **kw)


@pytest.mark.parametrize("policy", ["inf_mllm", "h2o", "snapkv"])
def test_beams_equal_transformers_below_budget(model, policy):
    ids = _ids(20, rows=2)
    kw = dict(num_beams=3, max_new_tokens=10, do_sample=False, return_dict_in_generate=True, output_scores=True,
              pad_token_id=0)
    ref = _sdpa_generate(model, ids, **kw)
    cache = inf_mllm.enable(model, policy, **policy_kwargs(policy, budget=128, chunk=16))
    out = model.generate(ids, attention_mask=torch.ones_like(ids), **{CACHE_KW: cache}, **kw)
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(out.sequences_scores, ref.sequences_scores, atol=1e-4, rtol=1e-4)
    assert cache.lengths() == [29] * 6  # 3 beams per row, 20 + 10 - 1 tokens each


def test_generate_helper_beams_after_a_stream(model):
    ids = _ids(60, seed=1)
    ref = _sdpa_generate(model, ids, num_beams=2, max_new_tokens=8, do_sample=False, pad_token_id=0)[:, 60:]
    cache = inf_mllm.enable(model, "streaming_llm", budget=128, chunk=16)
    inf_mllm.stream(model, ids[:, :40], cache=cache)
    new = inf_mllm.generate(model, ids[:, 40:], cache=cache, num_beams=2, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(new, ref)
    assert len(cache.lengths()) == 2  # the running beams


@pytest.mark.parametrize("policy", ["inf_mllm", "h2o", "snapkv", "streaming_llm"])
def test_each_beam_row_behaves_as_that_row_alone(model, policy):
    """Rows repeated, fed different tokens and reordered (as beam search does) across evictions:
    each row equals a one-row cache that lived that row's history (kept tokens exactly, logits
    closely: a batch of rows may sum in another order)."""
    kw = policy_kwargs(policy, budget=24, chunk=8)
    prompt = _ids(70, seed=2)
    cache = inf_mllm.enable(model, policy, **kw)
    inf_mllm.stream(model, prompt, cache=cache)
    singles = [cache.clone(), cache.clone()]
    cache.batch_repeat_interleave(2)
    toks = _ids(30, seed=3, rows=2)
    orders = [[1, 0], [0, 0], [1, 1], [0, 1], [1, 0]]
    ev0 = cache.stats()["evictions"]
    for s in range(toks.shape[1]):
        lg = model(toks[:, s : s + 1], **{CACHE_KW: cache}).logits[:, -1]
        for r in range(2):
            one = model(toks[r : r + 1, s : s + 1], **{CACHE_KW: singles[r]}).logits[0, -1]
            torch.testing.assert_close(lg[r], one, atol=1e-4, rtol=1e-4)
        order = orders[s % len(orders)]
        cache.reorder_cache(torch.tensor(order))
        singles = [singles[i].clone() for i in order]
    assert cache.stats()["evictions"] > ev0
    for li, layer in enumerate(cache.layers):
        for r in range(2):
            one = singles[r].layers[li].buf
            L = one.lengths[0]
            assert layer.buf.lengths[r] == L and layer.buf.state == cache.policy.select_state(layer.buf.state, [0, 1])
            assert torch.equal(layer.buf.position[r, :, :L], one.position[0, :, :L])
            assert int(layer.buf.fed[r]) == int(one.fed[0])
            if isinstance(one.state, list):
                assert layer.buf.state[r] == one.state[0]


def test_beam_search_under_eviction_stays_within_capacity(model):
    cache = inf_mllm.enable(model, "inf_mllm", **policy_kwargs("inf_mllm", budget=16, chunk=8))
    out = model.generate(_ids(20, rows=2), **{CACHE_KW: cache}, num_beams=3, max_new_tokens=30, do_sample=False,
                         pad_token_id=0)
    assert out.shape == (2, 50)
    assert max(cache.lengths()) <= cache.capacity and cache.stats()["evictions"] > 0

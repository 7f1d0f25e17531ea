"""TOVA: the newest query's attention decides what stays."""
import pytest
import torch

import inf_mllm
from inf_mllm.policies import available_policies, make_policy

from _buffers import filled_buffers
from _model import tiny_llama


def test_registered_with_its_defaults():
    assert "tova" in available_policies()
    pol = make_policy("tova", budget=64)
    assert (pol.n_sink, pol.n_recent, pol.window, pol.rolling) == (0, 0, 1, False)
    with pytest.raises(ValueError, match="window=1"):
        make_policy("tova", window=4)


def test_scores_restart_every_call_and_top_k_stays():
    pol = make_policy("tova", budget=6, chunk=4)
    buf = filled_buffers(B=2, H=1, lengths=(12, 5), C=16, policy=pol)
    sc = pol.scoring(buf, 4, "prefill", [0, 1])
    assert sc.window == 1 and sc.restart == (0, 1) and sc.decay == 1.0
    buf.scores.zero_()
    buf.scores[0, 0, [2, 3, 7, 8, 10, 11]] = torch.tensor([0.3, 0.1, 0.9, 0.2, 0.5, 0.4])
    pol.evict(buf, pol.due(buf, 4, "prefill", [0, 1]))
    assert buf.lengths == [6, 5]  # the row under budget is untouched
    assert buf.position[0, 0, :6].tolist() == [2, 3, 7, 8, 10, 11]


def test_streams_in_fixed_memory_with_a_model():
    m = tiny_llama(n_layers=2)
    ids = torch.randint(0, 128, (1, 120), generator=torch.Generator().manual_seed(0))
    ref = inf_mllm.stream(m, ids[:, :40], cache=inf_mllm.enable(m, "full", chunk=8), chunk=8)
    cache = inf_mllm.enable(m, "tova", budget=48, chunk=8)
    torch.testing.assert_close(inf_mllm.stream(m, ids[:, :40], cache=cache, chunk=8), ref, atol=1e-4, rtol=1e-4)
    inf_mllm.stream(m, ids[:, 40:], cache=cache, chunk=8)
    assert max(cache.lengths()) <= 48 and cache.stats()["evictions"] > 0

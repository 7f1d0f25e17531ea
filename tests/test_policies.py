"""Policy selection on synthetic buffers (no model) and argument checking."""
import pytest
import torch

import inf_mllm
from inf_mllm import ops
from inf_mllm.modality import IMAGE, TEXT
from inf_mllm.policies import Policy, available_policies, make_policy, register_policy, select_keep
from inf_mllm.policies.look_m import merge_row_

ALL = ["full", "window", "streaming_llm", "h2o", "snapkv", "look_m", "inf_mllm"]


class FakeLayer:
    """The part of StreamingLayer a policy uses."""

    def __init__(self, B=2, H=2, C=32, D=4, lengths=(32, 20), seed=0):
        g = torch.Generator().manual_seed(seed)
        self.k = torch.randn(B, H, C, D, generator=g)
        self.v = torch.randn(B, H, C, D, generator=g)
        self.scores = torch.rand(B, H, C, generator=g)
        self.length = torch.tensor(lengths, dtype=torch.int32)
        self.len_host = list(lengths)
        self.modality = torch.zeros(B, H, C, dtype=torch.int8)
        self.position = torch.arange(C, dtype=torch.int32).expand(B, H, C).contiguous()
        self.state = {}
        self.C = C

    def max_length(self):
        return max(self.len_host)

    def compact(self, budget, n_sink, n_recent, reset_scores=True, rows=None):
        rows = range(len(self.len_host)) if rows is None else rows
        for b in rows:
            if self.len_host[b] <= budget:
                continue
            g = slice(b, b + 1)
            ops.compact_(self.k[g], self.v[g], self.scores[g], self.length[g], budget=budget, n_sink=n_sink,
                         n_recent=n_recent, reset_scores=reset_scores, extras=(self.modality[g], self.position[g]))
            self.len_host[b] = budget

    @property
    def rows(self):
        return list(range(len(self.len_host)))


def test_registry_lists_all():
    assert set(ALL) <= set(available_policies())


def test_select_keep_matches_compact():
    for seed in range(5):
        lay = FakeLayer(seed=seed, lengths=(32, 27))
        lay.scores[:, :, 5:9] = 0.5  # ties
        keeps = [select_keep(lay.scores[b], lay.len_host[b], 16, 2, 3) for b in range(2)]
        idx = ops.compact_(lay.k, lay.v, lay.scores.clone(), lay.length.clone(), budget=16, n_sink=2, n_recent=3,
                           return_indices=True)
        for b in range(2):
            for h in range(2):
                assert keeps[b][h].nonzero()[:, 0].tolist() == idx[b, h].tolist()


@pytest.mark.parametrize("name", ["window", "streaming_llm"])
def test_window_and_streaming_keep_recent(name):
    pol = make_policy(name, budget=12, n_sink=0 if name == "window" else 3, chunk=4)
    lay = FakeLayer(lengths=(32, 10), C=32)
    pol.after_attention(lay, 4, "prefill", lay.rows)
    assert lay.len_host == [12, 10]
    pos = lay.position[0, 0, :12].tolist()
    expect = list(range(20, 32)) if name == "window" else [0, 1, 2] + list(range(23, 32))
    assert pos == expect
    assert lay.position[1, 0, :10].tolist() == list(range(10))  # row under budget untouched


def test_h2o_cumulative_scores_move_with_tokens():
    pol = make_policy("h2o", budget=8, n_recent=3, chunk=4)
    assert pol.score_window(None, 5, "prefill") == 5 and pol.n_sink == 0
    lay = FakeLayer(lengths=(32, 32))
    lay.scores.zero_()
    lay.scores[:, :, [3, 7, 11, 13, 20]] = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0])
    pol.after_attention(lay, 1, "decode", lay.rows)
    assert lay.position[0, 0, :8].tolist() == [3, 7, 11, 13, 20, 29, 30, 31]
    assert lay.scores[0, 0, :5].tolist() == [5.0, 4.0, 3.0, 2.0, 1.0]  # never reset


def test_inf_mllm_eviction_timing():
    pol = make_policy("inf_mllm", budget=16, n_sink=2, n_recent=4, window=4, chunk=8)
    assert pol.capacity == 24 and pol.rolling and pol.bias == 1e-3
    lay = FakeLayer(B=1, lengths=(20,), C=24)
    pol.after_attention(lay, 8, "prefill", lay.rows)  # after every prefill chunk
    assert lay.len_host == [16] and float(lay.scores.abs().sum()) == 0.0  # reset
    for step in range(1, 5):
        lay.len_host[0] += 1
        lay.length += 1
        pol.after_attention(lay, 1, "decode", lay.rows)
        assert lay.len_host == ([16 + step] if step < 4 else [16])


def test_snapkv_pooled_selection():
    pol = make_policy("snapkv", budget=10, window=4, chunk=8)
    assert pol.n_recent == 4 and not pol.rolling
    lay = FakeLayer(B=1, H=1, lengths=(30,), C=32)
    lay.scores.zero_()
    lay.scores[0, 0, 10] = 1.0  # one peak: pooling (kernel 7) spreads it over 7..13
    pol.before_attention(lay, 8, "prefill", lay.rows)
    lay.scores[0, 0, 10] = 1.0
    pol.before_attention(lay, 1, "decode", lay.rows)  # end of prefill -> compress once
    assert lay.position[0, 0, :10].tolist() == [7, 8, 9, 10, 11, 12, 26, 27, 28, 29]
    lay.len_host = [10]
    pol.before_attention(lay, 1, "decode", lay.rows)  # no second compression
    assert lay.len_host == [10]


def test_compress_once_never_exceeds_capacity():
    pol = make_policy("snapkv", budget=10, window=4, chunk=8)
    lay = FakeLayer(B=1, H=1, lengths=(18,), C=18)
    pol.make_room(lay, 1, lay.rows)  # buffer full during decode: evict back to budget
    assert lay.len_host == [10]


def test_look_m_text_prior_and_merge():
    pol = make_policy("look_m", budget=8, n_recent=2, merge="average", chunk=4)
    lay = FakeLayer(B=1, H=1, lengths=(16,), C=16)
    lay.modality[0, 0, :12] = IMAGE
    lay.modality[0, 0, 12:] = TEXT
    lay.scores[0, 0] = torch.arange(16.0).flip(0)  # images score higher, text lower
    k0, v0 = lay.k.clone(), lay.v.clone()
    pol.compress(lay, lay.rows)
    pos = lay.position[0, 0, :8].tolist()
    # text (12..15, incl. the 2 recent) first, then the best images (0..3)
    assert pos == [0, 1, 2, 3, 12, 13, 14, 15]
    # average merge: each kept key = mean of itself and the evicted keys assigned to it
    keep = torch.zeros(1, 16, dtype=torch.bool)
    keep[0, pos] = True
    ke, kk = k0[0, 0, ~keep[0]], k0[0, 0, keep[0]]
    sim = torch.nn.functional.normalize(ke, dim=-1) @ torch.nn.functional.normalize(kk, dim=-1).T
    tgt = sim.argmax(-1)
    for j in range(8):
        members = torch.cat([kk[j : j + 1], ke[tgt == j]])
        torch.testing.assert_close(lay.k[0, 0, j], members.mean(0))
        vm = torch.cat([v0[0, 0, keep[0]][j : j + 1], v0[0, 0, ~keep[0]][tgt == j]])
        torch.testing.assert_close(lay.v[0, 0, j], vm.mean(0))


@pytest.mark.parametrize("mode", ["pivotal", "weighted"])
def test_merge_modes(mode):
    k = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.2], [1.0, -0.2]]])  # evict 2, 3 -> both into slot 0
    v = torch.tensor([[[1.0, 1.0], [2.0, 2.0], [3.0, 3.0], [5.0, 5.0]]])
    keep = torch.tensor([[True, True, False, False]])
    merge_row_(k, v, keep, mode)
    if mode == "pivotal":
        torch.testing.assert_close(v[0, 0], torch.tensor([(1 + 4) / 2, (1 + 4) / 2]))
    else:
        s = 1 / (1.04 ** 0.5)
        torch.testing.assert_close(v[0, 0], torch.full((2,), (1 + s * 3 + s * 5) / (1 + 2 * s)))
    torch.testing.assert_close(v[0, 1], torch.tensor([2.0, 2.0]))  # untouched


def test_new_policy_is_one_class():
    @register_policy
    class KeepFirst(Policy):
        name = "_test_keep_first"
        defaults = dict(budget=8, n_sink=8, n_recent=0, window=0, bias=0.0)

        def after_attention(self, layer, n, phase, rows):
            self.evict(layer, self.over_budget(layer, rows))

    pol = make_policy("_test_keep_first", chunk=4)
    lay = FakeLayer(lengths=(20, 5))
    pol.after_attention(lay, 4, "prefill", lay.rows)
    assert lay.position[0, 0, :8].tolist() == list(range(8))


@pytest.mark.parametrize(
    "name,kw,exc,msg",
    [
        ("inf_mllm", dict(budget=100, n_sink=4, n_recent=200), ValueError, r"smaller than n_sink \+ n_recent"),
        ("nope", {}, ValueError, "unknown policy 'nope'"),
        ("inf_mllm", dict(window=-1), ValueError, "window must be >= 0"),
        ("inf_mllm", dict(window=0), ValueError, "window >= 1"),
        ("inf_mllm", dict(bias=-1.0), ValueError, "bias must be >= 0"),
        ("inf_mllm", dict(budget=1.5), TypeError, "budget must be an int"),
        ("inf_mllm", dict(merge="pivotal"), TypeError, "unknown argument"),
        ("look_m", dict(merge="median"), ValueError, "merge must be one of"),
        ("h2o", dict(n_sink=4), ValueError, "no sinks"),
        ("snapkv", dict(kernel=4), ValueError, "odd"),
    ],
)
def test_bad_arguments(name, kw, exc, msg):
    with pytest.raises(exc, match=msg):
        make_policy(name, **kw)


def test_defaults_match_spec():
    p = make_policy("inf_mllm")
    assert (p.budget, p.n_recent, p.window, p.bias, p.n_sink) == (2048, 256, 32, 1e-3, 4)
    assert p.capacity == 2048 + max(32, p.chunk)
    assert make_policy("h2o", budget=100).n_recent == 50
    assert make_policy("streaming_llm", budget=100, n_sink=4).n_recent == 96


def test_inf_mllm_scores_one_period():
    # scores at an eviction come from the last scoring period only (a prefill chunk or `window`
    # decode steps), not from everything since the last eviction
    pol = make_policy("inf_mllm", budget=16, n_sink=2, n_recent=4, window=4, chunk=8)
    lay = FakeLayer(B=1, lengths=(10,), C=24)
    lay.scores.fill_(7.0)  # left over from an earlier period
    pol.before_attention(lay, 8, "prefill", lay.rows)
    assert float(lay.scores.abs().sum()) == 0.0
    lay.scores.fill_(3.0)
    pol.before_attention(lay, 2, "prefill", lay.rows)  # chunk shorter than the window: keeps adding
    assert float(lay.scores.min()) == 3.0
    pol.before_attention(lay, 1, "decode", lay.rows)  # first decode step starts a period
    assert float(lay.scores.abs().sum()) == 0.0
    for _ in range(4):
        lay.scores += 1.0
        pol.after_attention(lay, 1, "decode", lay.rows)  # under budget: no eviction
        pol.before_attention(lay, 1, "decode", lay.rows)
    assert float(lay.scores.abs().sum()) == 0.0  # a new period began after `window` steps


def test_compress_once_early_not_twice():
    pol = make_policy("snapkv", budget=10, window=4, chunk=8)
    lay = FakeLayer(B=1, H=1, lengths=(18,), C=18)
    pol.before_attention(lay, 8, "prefill", lay.rows)
    calls = []
    orig = pol.compress
    pol.compress = lambda layer, rows: (calls.append(list(rows)), orig(layer, rows))
    pol.make_room(lay, 8, lay.rows)  # prompt longer than the buffer: compressed early
    lay.len_host = [16]
    pol.before_attention(lay, 1, "decode", lay.rows)
    assert calls == [[0]]


@pytest.mark.parametrize("name", ["window", "streaming_llm"])
def test_window_policies_refuse_n_recent(name):
    with pytest.raises(ValueError, match="n_recent does not apply"):
        make_policy(name, budget=64, n_recent=16)

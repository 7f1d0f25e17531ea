"""Policy selection on real ``KVBuffers`` (no model) and argument checking."""
import pytest
import torch

from inf_mllm import ops
from inf_mllm.modality import IMAGE, TEXT
from inf_mllm.policies import Policy, Scoring, available_policies, make_policy, register_policy, select_keep
from inf_mllm.policies.look_m import merge_row_

from _buffers import filled_buffers


def rows(buf):
    return list(range(buf.batch))


def after_call(pol, buf, n, phase):
    """What the cache does right after a call of ``n`` tokens: evict the rows that are due."""
    pol.evict(buf, pol.due(buf, n, phase, rows(buf)))


def test_registry_finds_every_policy_module():
    import pkgutil

    import inf_mllm.policies as pkg

    modules = {m.name for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_") and m.name != "base"}
    names = set(available_policies())
    assert {"full", "window", "streaming_llm", "h2o", "snapkv", "look_m", "inf_mllm"} <= names
    assert len(names) >= len(modules)  # every module registers (at least) one policy


def test_select_keep_matches_compact():
    for seed in range(5):
        lay = filled_buffers(seed=seed, lengths=(32, 27))
        lay.scores[:, :, 5:9] = 0.5  # ties
        keeps = [select_keep(lay.scores[b], lay.lengths[b], 16, 2, 3) for b in range(2)]
        idx = ops.compact_(lay.k, lay.v, lay.scores.clone(), lay.length.clone(), budget=16, n_sink=2, n_recent=3,
                           return_indices=True)
        for b in range(2):
            for h in range(2):
                assert keeps[b][h].nonzero()[:, 0].tolist() == idx[b, h].tolist()


@pytest.mark.parametrize("name", ["window", "streaming_llm"])
def test_window_and_streaming_keep_recent(name):
    pol = make_policy(name, budget=12, n_sink=0 if name == "window" else 3, chunk=4)
    lay = filled_buffers(lengths=(32, 10), C=32, policy=pol)
    after_call(pol, lay, 4, "prefill")
    assert lay.lengths == [12, 10]
    pos = lay.position[0, 0, :12].tolist()
    expect = list(range(20, 32)) if name == "window" else [0, 1, 2] + list(range(23, 32))
    assert pos == expect
    assert lay.position[1, 0, :10].tolist() == list(range(10))  # row under budget untouched


def test_h2o_cumulative_scores_move_with_tokens():
    pol = make_policy("h2o", budget=8, n_recent=3, chunk=4)
    lay = filled_buffers(lengths=(32, 32), policy=pol)
    assert pol.scoring(lay, 5, "prefill", rows(lay)) == Scoring(window=5) and pol.n_sink == 0
    lay.scores.zero_()
    lay.scores[:, :, [3, 7, 11, 13, 20]] = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0])
    after_call(pol, lay, 1, "decode")
    assert lay.position[0, 0, :8].tolist() == [3, 7, 11, 13, 20, 29, 30, 31]
    assert lay.scores[0, 0, :5].tolist() == [5.0, 4.0, 3.0, 2.0, 1.0]  # never reset


def test_inf_mllm_eviction_timing():
    pol = make_policy("inf_mllm", budget=16, n_sink=2, n_recent=4, window=4, chunk=8, h_life=0)
    assert pol.capacity == 24 and pol.rolling
    lay = filled_buffers(B=1, lengths=(20,), C=24, policy=pol)
    after_call(pol, lay, 8, "prefill")  # after every prefill chunk
    assert lay.lengths == [16] and float(lay.scores.abs().sum()) == 0.0  # reset
    for step in range(1, 5):
        lay.append(torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4), TEXT)
        after_call(pol, lay, 1, "decode")
        assert lay.lengths == ([16 + step] if step < 4 else [16])


def test_snapkv_pooled_selection():
    pol = make_policy("snapkv", budget=10, window=4, chunk=8)
    assert pol.n_recent == 4 and not pol.rolling
    lay = filled_buffers(B=1, H=1, lengths=(30,), C=32, policy=pol)
    lay.scores.zero_()
    assert pol.due(lay, 8, "prefill", rows(lay)) == []  # a prefill call: compression pending, not now
    assert pol.scoring(lay, 8, "prefill", rows(lay)).restart == (0,)  # a chunk >= window restarts the scores
    assert pol.scoring(lay, 2, "prefill", rows(lay)).restart == ()  # a shorter one adds to them
    lay.scores[0, 0, 10] = 1.0  # one peak: pooling (kernel 7) spreads it over 7..13
    pol.before(lay, 1, "decode", rows(lay))  # end of prefill -> compress once
    assert lay.position[0, 0, :10].tolist() == [7, 8, 9, 10, 11, 12, 26, 27, 28, 29]
    assert lay.scores[0, 0, 3] == 1.0  # the scores (not the pooled ranking) move with their tokens
    pol.before(lay, 1, "decode", rows(lay))  # no second compression
    assert lay.lengths == [10] and lay.evictions == 1


def test_compress_once_never_exceeds_capacity():
    pol = make_policy("snapkv", budget=10, window=4, chunk=8)
    lay = filled_buffers(B=1, H=1, lengths=(18,), C=18, policy=pol)
    pol.make_room(lay, 1, rows(lay))  # buffer full during decode: evict back to budget
    assert lay.lengths == [10]


def test_look_m_text_prior_and_merge():
    pol = make_policy("look_m", budget=8, n_recent=2, merge="average", chunk=4)
    lay = filled_buffers(B=1, H=1, lengths=(16,), C=16, policy=pol)
    lay.modality[0, 0, :12] = IMAGE
    lay.modality[0, 0, 12:] = TEXT
    lay.scores[0, 0] = torch.arange(16.0).flip(0)  # images score higher, text lower
    k0, v0 = lay.k.clone(), lay.v.clone()
    pol.compress(lay, rows(lay))
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

    pol = make_policy("_test_keep_first", chunk=4)
    lay = filled_buffers(lengths=(20, 5), policy=pol)
    after_call(pol, lay, 4, "prefill")
    assert lay.position[0, 0, :8].tolist() == list(range(8))
    assert "_test_keep_first" not in available_policies()  # names with "_" are private (tests)


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
        ("inf_mllm", dict(bias=float("inf")), ValueError, "finite"),
        ("inf_mllm", dict(bias_mode="linear"), ValueError, "bias_mode must be one of"),
        ("inf_mllm", dict(h_life=-1), ValueError, "h_life must be in"),
        ("inf_mllm", dict(h_life=float("nan")), ValueError, "h_life must be a finite number"),
        ("inf_mllm", dict(pool=4), ValueError, "pool must be odd"),
        ("inf_mllm", dict(accumulate="max"), ValueError, "accumulate must be one of"),
        ("inf_mllm", dict(key_signal="norm"), ValueError, "key_signal must be one of"),
        ("inf_mllm", dict(accumulate="peak", h_life=0), ValueError, "needs persistent scores"),
    ],
)
def test_bad_arguments(name, kw, exc, msg):
    with pytest.raises(exc, match=msg):
        make_policy(name, **kw)


def test_defaults():
    p = make_policy("inf_mllm")
    assert (p.budget, p.n_recent, p.window, p.n_sink) == (2048, 256, 32, 4)
    assert p.capacity == 2048 + max(32, p.chunk)
    assert make_policy("h2o", budget=100).n_recent == 50
    assert make_policy("streaming_llm", budget=100, n_sink=4).n_recent == 96


def test_inf_mllm_first_version_scores_one_period():
    # h_life=0: scores at an eviction come from the last scoring period only (a prefill chunk or
    # `window` decode steps), not from everything since the last eviction
    pol = make_policy("inf_mllm", budget=16, n_sink=2, n_recent=4, window=4, chunk=8, h_life=0)
    lay = filled_buffers(B=1, lengths=(10,), C=24, policy=pol)
    assert pol.scoring(lay, 8, "prefill", [0]).restart == (0,)
    assert pol.scoring(lay, 2, "prefill", [0]).restart == ()  # chunk shorter than the window: keeps adding
    assert pol.scoring(lay, 1, "decode", [0]).restart == (0,)  # first decode step starts a period
    for _ in range(3):
        assert pol.due(lay, 1, "decode", [0]) == []  # under budget: no eviction
        assert pol.scoring(lay, 1, "decode", [0]).restart == ()
    pol.due(lay, 1, "decode", [0])
    assert pol.scoring(lay, 1, "decode", [0]).restart == (0,)  # a new period began after `window` steps


def test_inf_mllm_persistent_scores_decay_and_move():
    pol = make_policy("inf_mllm", budget=16, n_sink=2, n_recent=4, window=4, chunk=8, h_life=64,
                      bias_mode="relative")
    lay = filled_buffers(B=1, H=1, lengths=(24,), C=24, policy=pol)
    sc = pol.scoring(lay, 16, "prefill", [0])
    assert sc.restart == () and sc.bias_mode == "relative" and sc.decay == pytest.approx(2 ** (-16 / 64))
    lay.scores.zero_()
    lay.scores[0, 0, [5, 9]] = torch.tensor([3.0, 2.0])
    after_call(pol, lay, 8, "prefill")
    assert lay.lengths == [16]
    kept = lay.position[0, 0, :16].tolist()
    assert 5 in kept and 9 in kept
    assert lay.scores[0, 0, kept.index(5)] == 3.0 and lay.scores[0, 0, kept.index(9)] == 2.0  # moved, not reset
    assert float(lay.scores[0, 0, 16:].abs().sum()) == 0.0


def test_inf_mllm_pooling_keeps_neighbours():
    pol = make_policy("inf_mllm", budget=8, n_sink=1, n_recent=2, window=4, chunk=8, h_life=64, pool=3, novelty=0,
                      accumulate="sum")
    lay = filled_buffers(B=1, H=1, lengths=(24,), C=24, policy=pol)
    lay.scores.zero_()
    lay.scores[0, 0, 10] = 1.0
    lay.scores[0, 0, 17] = 0.9
    pol.evict(lay, [0])
    assert lay.position[0, 0, :8].tolist() == [0, 9, 10, 11, 16, 17, 22, 23]


def test_compress_once_per_prompt_piece():
    # the buffer fills during a long prompt: compressed early; the prompt's tail is compressed once
    # more before the first decode step; decoding on does not compress again
    pol = make_policy("snapkv", budget=10, window=4, chunk=8)
    lay = filled_buffers(B=1, H=1, lengths=(18,), C=18, policy=pol)
    pol.due(lay, 8, "prefill", rows(lay))
    calls = []
    orig = pol.compress
    pol.compress = lambda buf, rows_: (calls.append(list(rows_)), orig(buf, rows_))
    pol.make_room(lay, 8, rows(lay))  # prompt longer than the buffer: compressed early
    assert calls == [[0]] and lay.lengths == [10]
    lay.append(torch.randn(1, 1, 6, 4), torch.randn(1, 1, 6, 4), TEXT)
    pol.due(lay, 6, "prefill", rows(lay))
    pol.before(lay, 1, "decode", rows(lay))
    assert calls == [[0], [0]] and lay.lengths == [10]
    lay.append(torch.randn(1, 1, 1, 4), torch.randn(1, 1, 1, 4), TEXT)
    pol.before(lay, 1, "decode", rows(lay))
    assert calls == [[0], [0]]


@pytest.mark.parametrize("name", ["window", "streaming_llm"])
def test_window_policies_refuse_n_recent(name):
    with pytest.raises(ValueError, match="n_recent does not apply"):
        make_policy(name, budget=64, n_recent=16)


@pytest.mark.parametrize("novelty_life", [0.0, 16.0])
def test_inf_mllm_novelty_ranking_equals_plain_recomputation(novelty_life):
    # rank = z(scores / lived) + w * z(-cos(k, mean direction)) * fade over the middle slots, then
    # max-pooled, lived = 1 - 2^(-(age + window) / h_life) (the default accumulate="mean"; 1 under
    # "sum"), fade = 2^(-age / novelty_life) (1 with novelty_life=0, the default)
    pol = make_policy("inf_mllm", budget=10, n_sink=2, n_recent=3, window=4, chunk=8, h_life=64, novelty=1.5, pool=3,
                      novelty_life=novelty_life)
    assert pol.params["accumulate"] == "mean"
    lay = filled_buffers(B=2, H=2, lengths=(24, 9), C=24, policy=pol, seed=3)
    got = pol.rank(lay, [0])
    k = lay.k[0, :, :24].double()
    kn = k / k.norm(dim=-1, keepdim=True)
    mean_dir = kn.mean(1, keepdim=True)
    nov = -(kn * mean_dir / mean_dir.norm(dim=-1, keepdim=True)).sum(-1)

    def z(x):
        m = x[:, 2:21]
        return (x - m.mean(-1, keepdim=True)) / m.std(-1, keepdim=True)

    age = 23 - torch.arange(24, dtype=torch.float64)  # positions 0..23, the newest 23
    fade = 2.0 ** (-age / novelty_life) if novelty_life else 1.0
    comb = z(lay.scores[0, :, :24].double() / (1 - 2.0 ** (-(age + 4) / 64))) + 1.5 * z(nov) * fade
    pooled = torch.stack([comb[:, max(0, j - 1) : j + 2].max(-1).values for j in range(24)], -1)
    torch.testing.assert_close(got[0, :, :24].double(), pooled, atol=1e-5, rtol=1e-5)
    # eviction keeps sinks, recent and the best 5 by that ranking
    order = torch.sort(pooled[:, 2:21], dim=-1, descending=True, stable=True).indices[:, :5] + 2
    pol.evict(lay, [0, 1])
    assert lay.lengths == [10, 9]
    for h in range(2):
        want = sorted([0, 1] + order[h].tolist() + [21, 22, 23])
        assert lay.position[0, h, :10].tolist() == want


def test_inf_mllm_peak_keeps_the_best_call_not_the_sum():
    """accumulate="peak": after a call a slot holds max(decayed old score, the call's attention per
    scoring query); "sum" adds them. Checked on the buffers with the operator's effect stood in for."""
    for mode in ("sum", "peak"):
        pol = make_policy("inf_mllm", budget=20, n_sink=1, n_recent=2, window=4, chunk=8, h_life=64, accumulate=mode)
        lay = filled_buffers(B=1, H=2, lengths=(12,), C=28, policy=pol)
        lay.scores.zero_()
        lay.scores[0, :, 3] = torch.tensor([2.0, 0.1])
        old = lay.scores.clone()
        sc = pol.scoring(lay, 8, "prefill", [0])
        d = 2 ** (-8 / 64)
        if mode == "peak":
            assert sc.restart == (0,) and sc.decay == 1.0
            lay.reset_scores(sc.restart)
        else:
            assert sc.restart == () and sc.decay == pytest.approx(d)
            lay.scores.mul_(sc.decay)
        call = torch.zeros_like(lay.scores)
        call[0, :, 3] = 4.0  # 4 scoring queries gave slot 3 a total of 4.0 (1.0 each) in both heads
        call[0, :, 7] = 2.0
        lay.scores += call
        assert pol.due(lay, 8, "prefill", [0]) == []  # under budget
        got = lay.scores[0, :, :12]
        want = torch.maximum(old * d, call / 4)[0, :, :12] if mode == "peak" else (old * d + call)[0, :, :12]
        torch.testing.assert_close(got, want)
    # the head where the old score was higher keeps it (decayed), the other takes the call's mean
    assert float(got[0, 3]) == pytest.approx(2.0 * d) and float(got[1, 3]) == pytest.approx(1.0)


def test_inf_mllm_mean_ranks_by_credit_per_call_not_by_age():
    """accumulate="mean": the ranking divides each slot's (unchanged) score by
    1 - 2^(-(age + window) / h_life), so a young slot with a high rate outranks an old slot whose
    larger sum only reflects the calls it lived through; "sum" keeps the old one."""
    kept = {}
    for mode in ("sum", "mean"):
        pol = make_policy("inf_mllm", budget=4, n_sink=1, n_recent=2, window=4, chunk=8, h_life=64, novelty=0,
                          pool=1, accumulate=mode)
        lay = filled_buffers(B=1, H=1, lengths=(6,), C=pol.capacity, policy=pol)
        lay.position[0, 0, :6] = torch.tensor([0, 10, 900, 1000, 1001, 1002], dtype=torch.int32)
        lay.scores[0, 0, :6] = torch.tensor([1.0, 3.0, 0.0, 0.5, 1.0, 1.0])  # slot 1: age 992, score 3; slot 3: age 2, 0.5
        before = lay.scores.clone()
        rank = pol.rank(lay, [0])
        if mode == "mean":
            age = torch.tensor([1002, 992, 102, 2, 1, 0], dtype=torch.float64)
            want = before[0, 0, :6].double() / (1 - 2.0 ** (-(age + 4) / 64))
            torch.testing.assert_close(rank[0, 0, :6].double(), want, rtol=1e-6, atol=0)
        else:
            assert rank is None  # novelty 0, pool 1: the scores as they are
        pol.evict(lay, [0])
        kept[mode] = lay.position[0, 0, :4].tolist()
        torch.testing.assert_close(lay.scores[0, 0, 1], before[0, 0, 1 if mode == "sum" else 3])  # scores unchanged
    assert kept == {"sum": [0, 10, 1001, 1002], "mean": [0, 1000, 1001, 1002]}
    # h_life=0 (the first version, scores restarted every period): nothing to normalise, as "sum"
    pol = make_policy("inf_mllm", budget=4, n_sink=1, n_recent=2, window=4, chunk=8, h_life=0, novelty=0, pool=1,
                      accumulate="mean")
    assert pol.rank(filled_buffers(B=1, H=1, lengths=(6,), C=pol.capacity, policy=pol), [0]) is None


def test_key_leverage_is_the_hat_diagonal_and_finds_the_odd_key():
    from inf_mllm.policies.inf_mllm import key_leverage

    g = torch.Generator().manual_seed(0)
    k = torch.randn(2, 50, 6, generator=g)
    k[1, 17] = 8.0 * torch.randn(6, generator=g)  # one key far off the others' span
    lev = key_leverage(k, ridge=0.0)
    kc = (k - k.mean(1, keepdim=True)).double()
    hat = kc @ torch.linalg.pinv(kc.transpose(1, 2) @ kc) @ kc.transpose(1, 2)
    torch.testing.assert_close(lev.double(), hat.diagonal(dim1=1, dim2=2), rtol=1e-6, atol=1e-6)
    assert float(lev[0].sum()) == pytest.approx(6.0, abs=1e-4)  # trace of the hat matrix = rank
    assert int(lev[1].argmax()) == 17


def test_inf_mllm_layer_slope_moves_slots_between_layers_with_the_total_fixed():
    pytest.importorskip("transformers")
    from inf_mllm.evals.engine import PolicyRunner, load_bundle

    bundle = load_bundle("tiny-random", device="cpu")
    ids = torch.randint(0, 200, (1, 300), generator=torch.Generator().manual_seed(0))
    got = {}
    for s in (0.0, 0.5, -0.5):
        r = PolicyRunner(bundle, "inf_mllm", dict(budget=64, n_recent=8, layer_slope=s), chunk=16)
        c = r.new_cache()
        r.feed(c, ids)
        got[s] = [L.buf.lengths[0] for L in c.layers]
        assert got[s] == [c.policy.layer_budget(L.buf) for L in c.layers]
        assert sum(got[s]) == 64 * len(c.layers)
        assert all(L.buf.capacity == c.policy.capacity for L in c.layers)
    assert got[0.0] == [64, 64] and got[0.5] == [90, 38] and got[-0.5] == [38, 90]  # mid 52 x (1 +- 0.5)

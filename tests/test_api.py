"""The public streaming API with the tiny model: misuse gives clear errors (issue 13's audit),
``generate`` after a stream, the one greedy loop, Session progress and stats, the cache keyword."""
import pytest
import torch

import inf_mllm
from _model import tiny_llama
from inf_mllm._compat import CACHE_KW, TRANSFORMERS_VERSION


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return tiny_llama(n_layers=2, vocab=128)


def _ids(n, seed=0, lo=3):
    return torch.randint(lo, 128, (1, n), generator=torch.Generator().manual_seed(seed))


# ---- stream(): inputs ------------------------------------------------------------------


def test_stream_takes_a_list_of_ids(model):
    ids = _ids(40)
    a = inf_mllm.stream(model, ids, cache=inf_mllm.enable(model, budget=64, n_recent=8, chunk=16))
    b = inf_mllm.stream(model, ids[0].tolist(), cache=inf_mllm.enable(model, budget=64, n_recent=8, chunk=16))
    c = inf_mllm.stream(model, [ids[0].tolist()], cache=inf_mllm.enable(model, budget=64, n_recent=8, chunk=16))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a, c, rtol=0, atol=0)


@pytest.mark.parametrize("bad,exc,words", [
    (None, ValueError, "exactly one of input_ids"),
    ("some text", TypeError, "not a string"),
    ([1.5, 2.5], TypeError, "integer token ids"),
    ([[[1, 2]]], ValueError, "[T] or [B, T]"),
    ([], ValueError, "empty input"),
    (object(), TypeError, "list of token ids"),
])
def test_stream_bad_input_is_a_clear_error(model, bad, exc, words):
    cache = inf_mllm.enable(model, budget=64, n_recent=8, chunk=16)
    with pytest.raises(exc, match=words.replace("[", r"\[").replace("]", r"\]")):
        inf_mllm.stream(model, bad, cache=cache)


def test_stream_all_zero_attention_mask_is_refused(model):
    ids = _ids(10).repeat(2, 1)
    cache = inf_mllm.enable(model, budget=64, n_recent=8, chunk=16)
    with pytest.raises(ValueError, match=r"row\(s\) \[0, 1\] are all zeros"):
        inf_mllm.stream(model, ids, cache=cache, attention_mask=torch.zeros_like(ids))
    mask = torch.ones_like(ids)
    mask[1] = 0
    with pytest.raises(ValueError, match=r"row\(s\) \[1\]"):
        inf_mllm.stream(model, ids, cache=cache, attention_mask=mask)
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        inf_mllm.stream(model, ids, cache=cache, attention_mask=torch.ones(2, 11, dtype=torch.long))


def test_stream_all_ones_mask_equals_no_mask(model):
    ids = _ids(50)
    a = inf_mllm.stream(model, ids, cache=inf_mllm.enable(model, budget=32, n_recent=8, chunk=16))
    b = inf_mllm.stream(model, ids, cache=inf_mllm.enable(model, budget=32, n_recent=8, chunk=16),
                        attention_mask=torch.ones_like(ids))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---- generate() after a stream, and the one greedy loop --------------------------------


@pytest.mark.parametrize("policy", ["full", "inf_mllm", "streaming_llm", "h2o"])
def test_generate_after_stream_equals_a_forward_loop(model, policy):
    ids = _ids(300)
    kw = dict(budget=512 if policy == "full" else 96, chunk=32)
    if policy in ("inf_mllm", "h2o"):
        kw["n_recent"] = 16
    # inf_mllm.generate: streams all but the last token, then model.generate
    c1 = inf_mllm.enable(model, policy, **kw)
    new = inf_mllm.generate(model, ids, cache=c1, max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    # by hand: the same stream, then a forward loop
    c2 = inf_mllm.enable(model, policy, **kw)
    inf_mllm.stream(model, ids[:, :-1], cache=c2)
    t, toks = ids[:, -1:], []
    for _ in range(8):
        t = model(t, **{CACHE_KW: c2}).logits[:, -1].argmax(-1, keepdim=True)
        toks.append(int(t))
    assert new.shape == (1, 8)
    assert new[0].tolist() == toks
    assert c1.get_seq_length() == c2.get_seq_length() == 300 + 7
    # a second question on the same stream: only the new ids are given
    more = inf_mllm.generate(model, _ids(5, seed=1), cache=c1, max_new_tokens=3, do_sample=False, pad_token_id=0,
                             eos_token_id=None)
    assert more.shape == (1, 3) and c1.get_seq_length() == 300 + 7 + 5 + 2


def test_generate_last_token_alone_fails_in_transformers_and_not_with_the_helper(model):
    """The failure issue 13 reports (and why the helper exists): generate slices input_ids by the
    cache position, so the last token alone leaves it nothing to feed."""
    ids = _ids(100)
    cache = inf_mllm.enable(model, budget=64, n_recent=8, chunk=16)
    inf_mllm.stream(model, ids, cache=cache)
    # the cache stops the forward of no token with a line naming the helper (issue 21; before it,
    # 5.24 failed with "cannot reshape tensor of 0 elements"); 5.0: an IndexError on the empty slice
    with pytest.raises((ValueError, IndexError)) as e:
        model.generate(ids[:, -1:], **{CACHE_KW: cache}, max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert e.type is IndexError or "inf_mllm.generate" in str(e.value)
    cache = inf_mllm.enable(model, budget=64, n_recent=8, chunk=16)
    inf_mllm.stream(model, ids, cache=cache)
    assert inf_mllm.generate(model, _ids(1, seed=2), cache=cache, max_new_tokens=2, do_sample=False,
                             pad_token_id=0).shape == (1, 2)


def test_generate_argument_errors(model):
    cache = inf_mllm.enable(model, budget=64, n_recent=8, chunk=16)
    with pytest.raises(TypeError, match="needs cache="):
        inf_mllm.generate(model, _ids(4), cache=None)
    with pytest.raises(ValueError, match="one row"):
        inf_mllm.generate(model, _ids(4).repeat(2, 1), cache=cache)
    with pytest.raises(TypeError, match="sets attention_mask itself"):
        inf_mllm.generate(model, _ids(4), cache=cache, attention_mask=torch.ones(1, 4))


def test_greedy_feeds_the_stop_token_and_does_not_return_it(model):
    ids = _ids(30)
    cache = inf_mllm.enable(model, budget=64, n_recent=8, chunk=16)
    logits = inf_mllm.stream(model, ids, cache=cache)
    free, _ = inf_mllm.greedy(model, cache, logits, 6)
    assert len(free) == 6
    stop = free[2]
    cache = inf_mllm.enable(model, budget=64, n_recent=8, chunk=16)
    logits = inf_mllm.stream(model, ids, cache=cache)
    out, _ = inf_mllm.greedy(model, cache, logits, 6, stop_ids=[stop])
    assert out == free[: free.index(stop)]
    assert cache.get_seq_length() == 30 + len(out) + 1  # the stop token is in the cache
    with pytest.raises(ValueError, match="max_new_tokens"):
        inf_mllm.greedy(model, cache, logits, -1)


# ---- Session ----------------------------------------------------------------------------


def test_session_misuse_is_a_clear_error(model):
    s = inf_mllm.Session(model, None, budget=64, n_recent=8, chunk=16, progress=False)
    with pytest.raises(TypeError, match="is None"):
        s.append(None)
    with pytest.raises(ValueError, match="no tokenizer"):
        s.append("text without a tokenizer")
    with pytest.raises(ValueError, match="batch size 1"):
        s.append(_ids(4).repeat(2, 1))
    with pytest.raises(TypeError, match="embeds must be a tensor"):
        s.append_embeds([1, 2, 3])
    s.append([5, 6, 7])
    s.append(torch.tensor([8, 9]))
    assert s.stats()["tokens_seen"] == 5


def test_session_stats_name_what_they_count(model):
    from inf_mllm.models import byte_tokenizer

    tok = byte_tokenizer()
    m = tiny_llama(n_layers=2, vocab=len(tok))
    s = inf_mllm.Session(m, tok, budget=64, n_recent=8, chunk=16, progress=False)
    s.append("hello there")
    s.append("and again")
    s.ask("what?", max_new_tokens=3)
    st = s.stats()
    assert st["appends"] == 3 and st["questions"] == 1  # ask's prompt is an append
    assert "rounds" not in st
    s.reset()
    assert s.stats()["appends"] == 0 and s.stats()["questions"] == 0 and s.stats()["tokens_seen"] == 0


def test_session_progress_on_long_appends_only(model, capsys):
    s = inf_mllm.Session(model, None, budget=64, n_recent=8, chunk=16)  # progress on by default
    s.append(_ids(8)[0].tolist())  # shorter than a chunk: no bar
    assert "inf_mllm[" not in capsys.readouterr().err
    s.append(_ids(200)[0].tolist())  # many chunks: a bar
    assert "inf_mllm[inf_mllm]" in capsys.readouterr().err
    quiet = inf_mllm.Session(model, None, budget=64, n_recent=8, chunk=16, progress=False)
    quiet.append(_ids(200)[0].tolist())
    assert "inf_mllm[" not in capsys.readouterr().err


# ---- defaults and the transformers keyword ----------------------------------------------


def test_one_chunk_default(model):
    from inf_mllm.api import DEFAULT_CHUNK
    from inf_mllm.policies import make_policy

    assert inf_mllm.enable(model).policy.chunk == DEFAULT_CHUNK == make_policy("inf_mllm").chunk


def test_cache_keyword_matches_the_installed_transformers(model, recwarn):
    assert CACHE_KW == ("cache" if TRANSFORMERS_VERSION >= (5, 24, 0) else "past_key_values")
    cache = inf_mllm.enable(model, budget=64, n_recent=8, chunk=16)
    inf_mllm.stream(model, _ids(20), cache=cache)
    inf_mllm.greedy(model, cache, torch.zeros(128), 2)
    assert not [w for w in recwarn if "deprecated" in str(w.message) and "cache" in str(w.message)]


def test_cache_enabled_and_streamed_under_inference_mode(model):
    """The evaluations enable and stream under ``torch.inference_mode``: the rotary snapshot and
    its frequency table must work there too (CI failed on 'Inference tensors do not track version
    counter'), and give what the same stream gives outside it."""
    ids = _ids(90, seed=3)
    ref = inf_mllm.stream(model, ids, cache=inf_mllm.enable(model, budget=48, n_recent=8, chunk=16))
    with torch.inference_mode():
        cache = inf_mllm.enable(model, budget=48, n_recent=8, chunk=16)
        got = inf_mllm.stream(model, ids, cache=cache)
    assert cache.stats()["evictions"] > 0
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)

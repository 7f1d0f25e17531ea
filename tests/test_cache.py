"""StreamingCache with tiny random transformers models (fast, CPU, offline)."""
import pytest
import torch

import inf_mllm
from inf_mllm._compat import CACHE_KW  # the cache keyword of the installed transformers
from inf_mllm.modality import TEXT
from inf_mllm.policies import available_policies, get_policy_class

from _model import policy_kwargs, tiny_llama

ALL = available_policies()
# every policy with fixed-size per-layer buffers (a budget pooled over layers and heads, ``kvzip``,
# has its own invariants: tests/test_pooled.py)
FIXED = [p for p in ALL if not get_policy_class(p).grows and not getattr(get_policy_class(p), "pooled", False)]


@pytest.fixture(scope="module")
def model():
    return tiny_llama(n_layers=2)


def _sdpa(m):
    m.set_attn_implementation("sdpa")
    return m


@pytest.mark.parametrize("policy", ALL)
def test_equals_full_below_budget(model, policy):
    ids = torch.randint(0, 128, (1, 50), generator=torch.Generator().manual_seed(1))
    ref = _sdpa(model)(ids).logits
    cache = inf_mllm.enable(model, policy, **policy_kwargs(policy, budget=64))
    # chunked prefill + decode, all below budget: identical to full attention
    out = inf_mllm.stream(model, ids[:, :40], cache=cache, chunk=16, return_nll=True)
    torch.testing.assert_close(out[0], ref[:, 39], atol=1e-4, rtol=1e-4)
    for t in range(40, 50):
        lg = model(ids[:, t : t + 1], **{CACHE_KW: cache}).logits[:, -1]
        torch.testing.assert_close(lg, ref[:, t], atol=1e-4, rtol=1e-4)
    assert cache.get_seq_length() == 50 and cache.lengths() == [50]
    nll = out[1]
    lp = torch.log_softmax(ref[0, :39].float(), -1)
    torch.testing.assert_close(nll[0], -lp.gather(-1, ids[0, 1:40, None])[:, 0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("policy", FIXED)
def test_small_budget_never_exceeds_capacity(model, policy):
    kw = policy_kwargs(policy, budget=32, chunk=8)
    cache = inf_mllm.enable(model, policy, **kw)
    pol = cache.policy
    ids = torch.randint(0, 128, (1, 400), generator=torch.Generator().manual_seed(2))
    inf_mllm.stream(model, ids[:, :300], cache=cache, chunk=8)
    for t in range(300, 400):
        for layer in cache.layers:
            assert max(layer.buf.lengths) <= pol.capacity
            assert layer.buf.k.shape[2] == pol.capacity  # allocated once, never grows
            assert int(layer.buf.length[0]) == layer.buf.lengths[0]
        model(ids[:, t : t + 1], **{CACHE_KW: cache})
    for layer in cache.layers:
        L = layer.buf.lengths[0]
        pos = layer.buf.position[0, :, :L]
        seen = 400
        # sinks never evicted
        if pol.n_sink:
            assert (pos[:, : pol.n_sink] == torch.arange(pol.n_sink, dtype=torch.int32)).all()
        # the recent window never evicted
        r = pol.n_recent
        if policy in ("snapkv", "look_m"):
            r = min(r, 1)  # compress-once: only the newest token is guaranteed after a decode-phase eviction
        assert (pos[:, L - r :] == torch.arange(seen - r, seen, dtype=torch.int32)).all()
        # kept tokens in stream order, no duplicates
        assert (pos[:, 1:] > pos[:, :-1]).all()
        assert (layer.buf.modality[0, :, :L] == TEXT).all()


@pytest.mark.parametrize("policy", ["streaming_llm", "window", "inf_mllm"])
def test_rolling_positions_exact_after_many_evictions(policy):
    # One layer: a key depends only on its token, so the cache after any number of evictions
    # must equal a fresh full-attention run over the kept tokens placed at their slots.
    m = tiny_llama(n_layers=1, seed=3)
    cache = inf_mllm.enable(m, policy, **policy_kwargs(policy, budget=24, chunk=8))
    ids = torch.randint(0, 128, (1, 600), generator=torch.Generator().manual_seed(4))
    inf_mllm.stream(m, ids[:, :500], cache=cache, chunk=8)
    for t in range(500, 599):
        m(ids[:, t : t + 1], **{CACHE_KW: cache})
    layer = cache.layers[0]
    assert layer.buf.evictions > 50
    L = layer.buf.lengths[0]
    pos = layer.buf.position[0, :, :L].long()  # [Hkv, L] original positions of the kept tokens
    # 1) stored keys are bit-for-bit what a fresh projection gives (un-rotated), values too
    attn = m.model.layers[0].self_attn
    with torch.no_grad():
        h = m.model.layers[0].input_layernorm(m.model.embed_tokens(ids))
        k = attn.k_proj(h).view(1, 600, -1, attn.head_dim).transpose(1, 2)
        v = attn.v_proj(h).view(1, 600, -1, attn.head_dim).transpose(1, 2)
    for hh in range(pos.shape[0]):
        torch.testing.assert_close(layer.buf.k[0, hh, :L], k[0, hh, pos[hh]], atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(layer.buf.v[0, hh, :L], v[0, hh, pos[hh]])
    # 2) next-token logits equal a fresh model over the kept tokens at positions 0..L (all heads keep
    #    the same set for window/streaming_llm)
    if policy != "inf_mllm":
        kept = ids[0, pos[0]]
        fresh = _sdpa(m)(torch.cat([kept, ids[0, 599:600]])[None]).logits[:, -1]
        m.set_attn_implementation("inf_mllm")
        ours = m(ids[:, 599:600], **{CACHE_KW: cache}).logits[:, -1]
        torch.testing.assert_close(ours, fresh, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("policy", ["inf_mllm", "h2o", "full"])
def test_left_padded_batch_equals_rows_alone(model, policy):
    g = torch.Generator().manual_seed(5)
    a = torch.randint(1, 128, (70,), generator=g)
    b = torch.randint(1, 128, (45,), generator=g)
    ids = torch.zeros(2, 70, dtype=torch.long)
    mask = torch.zeros(2, 70, dtype=torch.long)
    ids[0], mask[0] = a, 1
    ids[1, 25:], mask[1, 25:] = b, 1
    kw = policy_kwargs(policy, budget=32, chunk=8)
    cache = inf_mllm.enable(model, policy, **kw)
    out = model.generate(ids, attention_mask=mask, **{CACHE_KW: cache}, max_new_tokens=12, do_sample=False,
                         output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    for row, seq in enumerate((a, b)):
        c1 = inf_mllm.enable(model, policy, **kw)
        o1 = model.generate(seq[None], **{CACHE_KW: c1}, max_new_tokens=12, do_sample=False, output_logits=True,
                            return_dict_in_generate=True, pad_token_id=0)
        alone = o1.sequences[0, len(seq):].tolist()  # stops at EOS; the batch row is padded after it
        assert out.sequences[row, 70 : 70 + len(alone)].tolist() == alone
        assert set(out.sequences[row, 70 + len(alone):].tolist()) <= {0}
        for lb, l1 in zip(out.logits, o1.logits):
            torch.testing.assert_close(lb[row], l1[0], atol=1e-4, rtol=1e-4)
    assert cache.lengths() != [0, 0]


def test_stream_with_padding_mask(model):
    g = torch.Generator().manual_seed(6)
    a = torch.randint(1, 128, (60,), generator=g)
    b = torch.randint(1, 128, (37,), generator=g)
    ids = torch.zeros(2, 60, dtype=torch.long)
    mask = torch.zeros(2, 60, dtype=torch.long)
    ids[0], mask[0] = a, 1
    ids[1, 23:], mask[1, 23:] = b, 1
    kw = policy_kwargs("inf_mllm", budget=24, chunk=8)
    cache = inf_mllm.enable(model, "inf_mllm", **kw)
    lg = inf_mllm.stream(model, ids, attention_mask=mask, cache=cache, chunk=8)
    for row, seq in enumerate((a, b)):
        c1 = inf_mllm.enable(model, "inf_mllm", **kw)
        l1 = inf_mllm.stream(model, seq[None], cache=c1, chunk=8)
        torch.testing.assert_close(lg[row], l1[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("policy", ALL)
def test_generate_every_policy(model, policy):
    ids = torch.randint(1, 128, (1, 60), generator=torch.Generator().manual_seed(7))  # 0 is the pad id
    cache = inf_mllm.enable(model, policy, **policy_kwargs(policy, budget=32, chunk=16))
    out = model.generate(ids, **{CACHE_KW: cache}, max_new_tokens=40, min_new_tokens=40, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 100)
    assert cache.get_seq_length() == 99
    if policy != "full":
        assert max(cache.lengths()) <= cache.capacity
    else:
        assert cache.lengths() == [99]


@pytest.mark.parametrize("policy", FIXED)
def test_one_long_forward_equals_stream(model, policy):
    # a forward longer than the buffer is fed in pieces as stream() cuts a prompt (chunk = slack)
    ids = torch.randint(0, 128, (1, 300), generator=torch.Generator().manual_seed(1))
    kw = policy_kwargs(policy, budget=48, chunk=16)
    c1 = inf_mllm.enable(model, policy, **kw)
    with torch.no_grad():
        a = model(ids, **{CACHE_KW: c1}).logits[:, -1]
    c2 = inf_mllm.enable(model, policy, **kw)
    b = inf_mllm.stream(model, ids, cache=c2)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert c1.lengths() == c2.lengths() and c1.stats()["evictions"] == c2.stats()["evictions"]


@pytest.mark.parametrize("bias_mode", ["relative", "absolute"])
def test_inf_mllm_scores_equal_plain_recomputation(bias_mode):
    # SPEC §5 (revised): over several calls (prefill chunks of several sizes, one shorter than the
    # window, then decode steps), each call first decays the scores by 2 ** (-n / h_life), then adds
    # the attention of its last min(w, n) queries (mean over the GQA group) plus the bias. Below the
    # budget a slot is the token's position, so the model's own eager attention gives the reference.
    m = tiny_llama(n_layers=2, seed=5)
    calls, w, h, beta = [20, 12, 5, 1, 1, 1, 1], 8, 40.0, (0.5 if bias_mode == "relative" else 1e-3)
    T = sum(calls)
    ids = torch.randint(0, 128, (1, T), generator=torch.Generator().manual_seed(4))
    cache = inf_mllm.enable(m, "inf_mllm", budget=128, n_recent=8, window=w, bias=beta, bias_mode=bias_mode,
                            h_life=h, novelty=0, pool=1, chunk=32)
    pos = 0
    with torch.no_grad():
        for n in calls:
            m(ids[:, pos : pos + n], **{CACHE_KW: cache})
            pos += n
        eager = tiny_llama(n_layers=2, seed=5)
        eager.set_attn_implementation("eager")
        att = eager(ids, output_attentions=True).attentions  # per layer [1, Hq, T, T]
    assert cache.lengths() == [T] and cache.stats()["evictions"] == 0
    for li, a in enumerate(att):
        Hq = a.shape[1]
        Hkv = cache.layers[li].buf.k.shape[1]
        P = a[0].double().view(Hkv, Hq // Hkv, T, T).mean(1)
        ref = torch.zeros(Hkv, T, dtype=torch.float64)
        pos = 0
        for n in calls:
            ref *= 2.0 ** (-n / h)
            for i in range(pos + n - min(w, n), pos + n):
                j = torch.arange(i + 1, dtype=torch.float64)
                bias = beta * (j + 1) / (i + 1) ** 2 if bias_mode == "relative" else beta * j
                ref[:, : i + 1] += P[:, i, : i + 1] + bias
            pos += n
        got = cache.layers[li].buf.scores[0, :, :T].double()
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("policy", ["inf_mllm", "snapkv", "full"])
def test_clone_is_independent_and_equal(model, policy):
    ids = torch.randint(0, 128, (1, 160), generator=torch.Generator().manual_seed(2))
    cache = inf_mllm.enable(model, policy, **policy_kwargs(policy, budget=48, chunk=16))
    inf_mllm.stream(model, ids[:, :120], cache=cache)
    twin = cache.clone()
    a = inf_mllm.stream(model, ids[:, 120:], cache=twin)  # the copy goes on ...
    assert cache.get_seq_length() == 120 and twin.get_seq_length() == 160  # ... the original stays
    b = inf_mllm.stream(model, ids[:, 120:], cache=cache)  # and then gives the same result
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert cache.lengths() == twin.lengths() and cache.stats() == twin.stats()


def test_stats_and_modality(model):
    cache = inf_mllm.enable(model, "inf_mllm", **policy_kwargs("inf_mllm", budget=32, chunk=8))
    inf_mllm.stream(model, torch.randint(0, 128, (1, 20)), cache=cache)
    inf_mllm.stream(model, torch.randint(0, 128, (1, 10)), cache=cache, modality="image")
    s = cache.stats()
    assert s["tokens_seen"] == 30 and s["slots_used"] == 30
    assert s["slots_by_modality"] == {"text": 20, "image": 10, "video": 0}
    assert s["cache_bytes"] > 0
    with pytest.raises(ValueError, match="unknown modality"):
        with cache.modality("audio"):
            pass


def test_enable_bad_arguments(model):
    with pytest.raises(ValueError, match="unknown policy"):
        inf_mllm.enable(model, "bogus")
    with pytest.raises(ValueError, match="smaller than n_sink"):
        inf_mllm.enable(model, "inf_mllm", budget=100, n_recent=256)
    with pytest.raises(ValueError, match="window must be >= 0"):
        inf_mllm.enable(model, "inf_mllm", window=-3)
    with pytest.raises(TypeError, match="unknown argument"):
        inf_mllm.enable(model, "window", merge="average")


def test_cache_needs_inf_mllm_attention(model):
    cache = inf_mllm.enable(model, "window", budget=16, chunk=8)
    model.set_attn_implementation("sdpa")
    with pytest.raises(RuntimeError, match="attn_implementation"):
        model(torch.zeros(1, 4, dtype=torch.long), **{CACHE_KW: cache})
    model.set_attn_implementation("inf_mllm")


def test_unsupported_models_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50, n_positions=64))
    with pytest.raises(ValueError, match="no RoPE"):
        inf_mllm.enable(gpt2)
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    g3 = Gemma3ForCausalLM(Gemma3TextConfig(
        vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, sliding_window=8,
    ))
    with pytest.raises(ValueError, match="sliding"):
        inf_mllm.enable(g3)
    from transformers import MistralConfig, MistralForCausalLM

    mi = MistralForCausalLM(MistralConfig(
        vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, sliding_window=16,
    ))
    with pytest.raises(ValueError, match="sliding"):
        inf_mllm.enable(mi)


def test_qwen2_supported():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    m = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512,
    )).eval()
    ids = torch.randint(0, 64, (1, 30))
    ref = _sdpa(m)(ids).logits[:, -1]
    cache = inf_mllm.enable(m, "inf_mllm", budget=64, n_recent=8, window=8, chunk=8)
    torch.testing.assert_close(inf_mllm.stream(m, ids, cache=cache), ref, atol=1e-4, rtol=1e-4)


def test_session_many_rounds_constant_memory():
    m = tiny_llama(n_layers=1, vocab=128)

    class Tok:  # minimal tokenizer: bytes mod 128, no chat template
        eos_token_id = 2
        chat_template = None

        def __call__(self, text, add_special_tokens=False, return_tensors="pt"):
            class R:
                pass

            r = R()
            r.input_ids = torch.tensor([[3 + (c % 120) for c in text.encode()]])
            return r

        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(97 + i % 26) for i in ids)

    s = inf_mllm.Session(m, Tok(), policy="inf_mllm", budget=48, n_recent=8, window=8, chunk=16)
    sizes = set()
    for r in range(100):
        s.append(f"round {r} some text")
        if r % 25 == 0:
            s.ask("question?", max_new_tokens=3)
        st = s.stats()
        sizes.add(st["cache_bytes"])
        assert st["slots_used"] <= st["capacity"]
    assert len(sizes) == 1 and st["tokens_seen"] > 1500


def test_generate_after_a_stream_names_the_helper(model):
    cache = inf_mllm.enable(model, "streaming_llm", budget=32, chunk=8)
    ids = torch.randint(0, 128, (1, 40))
    inf_mllm.stream(model, ids, cache=cache)
    with pytest.raises(ValueError) as e:
        model.generate(ids[:, -1:], **{CACHE_KW: cache}, max_new_tokens=3, do_sample=False)
    msg = str(e.value)
    assert "\n" not in msg and "inf_mllm.generate" in msg and "40 tokens" in msg


def test_cache_of_another_model_is_refused_at_the_first_forward(model):
    cache = inf_mllm.enable(model, "inf_mllm", **policy_kwargs("inf_mllm", budget=32, chunk=8))
    for other in (tiny_llama(n_layers=3, hidden=48), tiny_llama(n_layers=2, seed=1)):
        inf_mllm.enable(other)
        with pytest.raises(ValueError) as e:
            other(torch.randint(0, 128, (1, 12)), **{CACHE_KW: cache})
        msg = str(e.value)
        assert "\n" not in msg and "made for another model" in msg and "inf_mllm.enable(model)" in msg

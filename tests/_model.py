"""Shared fixtures for the model tests: the real SmolLM2 (loaded once per session) and tiny
random models. Test modules import the fixtures from here."""
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def smollm():
    inf_mllm = pytest.importorskip("inf_mllm")
    try:
        model, tok = inf_mllm.load_model("smollm2", dtype=torch.float32)
    except FileNotFoundError as e:  # pragma: no cover
        pytest.skip(str(e))
    return model, tok


def tiny_llama(n_layers=2, vocab=128, seed=0, max_pos=8192, **kw):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=96, intermediate_size=128, head_dim=16, num_hidden_layers=n_layers,
        num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=max_pos, **kw,
    )
    m = LlamaForCausalLM(cfg).eval()
    # sharper attention than the default init, so that eviction choices matter
    with torch.no_grad():
        for layer in m.model.layers:
            layer.self_attn.q_proj.weight.mul_(8)
            layer.self_attn.k_proj.weight.mul_(8)
    return m


def policy_kwargs(policy, budget, chunk=16):
    kw = dict(budget=budget, chunk=chunk)
    if policy in ("inf_mllm", "h2o", "look_m"):
        kw["n_recent"] = max(4, budget // 8)
    if policy == "inf_mllm":
        kw["window"] = 8
    if policy == "snapkv":
        kw["window"] = 8
    return kw

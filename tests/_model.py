"""Shared fixtures for the model tests: the real SmolLM2 (loaded once per session) and the tiny
random model (:func:`inf_mllm.models.tiny_llama`). Test modules import the fixtures from here."""
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


# the one tiny test model (also behind ``load_model("tiny-random")`` and the tiny LLaVA's text side)
from inf_mllm.models import tiny_llama  # noqa: E402,F401


def policy_kwargs(policy, budget, chunk=16):
    kw = dict(budget=budget, chunk=chunk)
    if policy in ("inf_mllm", "h2o", "look_m"):
        kw["n_recent"] = max(4, budget // 8)
    if policy == "inf_mllm":
        kw["window"] = 8
    if policy == "snapkv":
        kw["window"] = 8
    if policy == "kvzip":  # the tiny model has no tokenizer (tests/test_pooled.py gives the instruction)
        kw["instruct"] = False
        kw["n_recent"] = max(4, budget // 8)
    return kw

"""``inf_mllm.enable``: one line to stream a transformers model in a fixed-size cache."""
from __future__ import annotations

from typing import Optional, Union

from . import attention  # noqa: F401  (registers the "inf_mllm" attention)
from ._compat import set_attn_implementation, unsupported_reason
from .cache import ATTN_IMPL, StreamingCache
from .policies import Policy, make_policy

# The default prefill chunk, defined once by the policies; re-exported so that the CLI and the
# docs can name it.
from .policies import DEFAULT_CHUNK  # noqa: E402,F401


def enable(
    model,
    policy: Union[str, Policy] = "inf_mllm",
    *,
    budget: Optional[int] = None,
    n_recent: Optional[int] = None,
    window: Optional[int] = None,
    bias: Optional[float] = None,
    n_sink: Optional[int] = None,
    chunk: Optional[int] = None,
    tokenizer=None,
    **policy_args,
) -> StreamingCache:
    """Switch ``model`` to the ``"inf_mllm"`` attention and return a fresh :class:`StreamingCache`.

    Arguments left ``None`` take the policy's defaults (SPEC §5; ``chunk``, the largest prefill
    chunk the cache makes room for: :data:`DEFAULT_CHUNK`). Raises ``ValueError`` / ``TypeError``
    at once for bad arguments and unsupported models, naming the reason.

    Use: ``model.generate(ids, cache=cache, ...)`` or ``model(ids, cache=cache)`` (transformers
    5.0-5.23: ``past_key_values=cache``; ``inf_mllm.CACHE_KW`` names the installed version's
    keyword), or :func:`inf_mllm.stream` / :func:`inf_mllm.generate` for inputs of any length.

    ``tokenizer``: the model's, for a policy whose probes start with an instruction (``kvzip``);
    ignored by the others.

    Vision-language models (LLaVA family): the cache and the attention attach to the language
    model only (text sub-config); the vision tower keeps its own attention. Models with
    multimodal rotary positions (Qwen2-VL, Qwen2.5-VL) are refused. See ``docs/multimodal.md``.
    """
    args = dict(budget=budget, n_recent=n_recent, window=window, bias=bias, n_sink=n_sink, **policy_args)
    args = {k: v for k, v in args.items() if v is not None}
    if chunk is not None:
        args["chunk"] = chunk
    if isinstance(policy, Policy) and args:
        raise TypeError("inf_mllm: pass policy arguments either to the Policy object or to enable(), not both")
    pol = policy if isinstance(policy, Policy) else make_policy(policy, **args)
    reason = unsupported_reason(model, pol.rolling)
    if reason is not None:
        raise ValueError(f"inf_mllm: unsupported model: {reason}")
    set_attn_implementation(model, ATTN_IMPL)
    return StreamingCache(model, pol, tokenizer=tokenizer)

"""Thin layer between the evaluations and the streaming cache: load a model, make a cache for
a policy, feed tokens in chunks (optionally returning per-token NLL), decode greedily, and
measure what the cache holds.

Everything goes through the public API (``inf_mllm.enable`` / ``inf_mllm.stream``), every
policy including ``full``.
"""
from __future__ import annotations

import contextlib
import gc
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Sequence, Tuple

import torch

__all__ = [
    "ModelBundle",
    "load_bundle",
    "PolicyRunner",
    "POLICIES",
    "TRANSFORMERS",
    "parse_policy_args",
    "policy_kwargs",
    "process_rss",
    "is_oom",
]

# Policies the evaluations compare by default (SPEC §5).
POLICIES = ["full", "h2o", "streaming_llm", "inf_mllm"]

# Not a policy: the plain model with transformers' default attention (SDPA) and DynamicCache,
# i.e. what a user runs without inf_mllm (``bench stream`` only).
TRANSFORMERS = "transformers"


# --------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------


@dataclass
class ModelBundle:
    model: Any
    tokenizer: Any
    name: str
    device: str
    info: Dict[str, Any] = field(default_factory=dict)

    @property
    def max_context(self) -> Optional[int]:
        return self.info.get("max_position_embeddings")


def _model_info(model, name: str, source: str) -> Dict[str, Any]:
    cfg = model.config
    n_params = sum(p.numel() for p in model.parameters())
    return {
        "name": name,
        "source": source,
        "architecture": type(model).__name__,
        "params": n_params,
        "dtype": str(next(model.parameters()).dtype),
        "num_hidden_layers": getattr(cfg, "num_hidden_layers", None),
        "num_attention_heads": getattr(cfg, "num_attention_heads", None),
        "num_key_value_heads": getattr(cfg, "num_key_value_heads", None),
        "head_dim": getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
        "max_position_embeddings": getattr(cfg, "max_position_embeddings", None),
    }


def load_bundle(name: str = "smollm2", device: Optional[str] = None, dtype: Optional[str] = None) -> ModelBundle:
    """:func:`inf_mllm.models.load_model` (the one loader; ``tiny-random`` included) plus what the
    evaluations record about the model."""
    from ..models import load_model

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tdtype = getattr(torch, dtype) if isinstance(dtype, str) and dtype not in ("auto", "") else torch.float32
    model, tok = load_model(name, dtype=tdtype, device=device)
    source = "random init" if name == "tiny-random" else f"inf_mllm.models.load_model({name!r})"
    return ModelBundle(model, tok, name, device, _model_info(model, name, source))


# --------------------------------------------------------------------------------------
# Policies and caches
# --------------------------------------------------------------------------------------


def parse_policy_args(items: Sequence[str]) -> Dict[str, Any]:
    """``["budget=512", "bias=1e-3"]`` -> ``{"budget": 512, "bias": 0.001}``."""
    out: Dict[str, Any] = {}
    for it in items or ():
        if "=" not in it:
            raise ValueError(f"policy argument {it!r} must be key=value")
        k, v = it.split("=", 1)
        out[k.strip().replace("-", "_")] = _num(v.strip())
    return out


def _num(v: str):
    for conv in (int, float):
        try:
            return conv(v)
        except ValueError:
            pass
    if v.lower() in ("true", "false"):
        return v.lower() == "true"
    return v


def process_rss() -> int:
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except Exception:  # pragma: no cover
        return 0


def is_oom(e: BaseException) -> bool:
    if isinstance(e, getattr(torch, "OutOfMemoryError", ())) or isinstance(e, MemoryError):
        return True
    return "out of memory" in str(e).lower()


def _keys_of(policy: str) -> Tuple[str, ...]:
    """The CLI's policy options that ``policy`` takes (``Policy.follows``: the others keep the
    policy's own, published defaults, e.g. H2O's half/half split and no sinks)."""
    from ..policies import get_policy_class

    return get_policy_class(policy).common_params()


def policy_kwargs(policy: str, args: Dict[str, Any]) -> Dict[str, Any]:
    """The keyword arguments of ``args`` (the CLI's policy options) that ``policy`` gets. Extra
    ``--policy-arg`` keys go to every policy but ``full``; ``None`` values are dropped."""
    from ..policies.base import COMMON_PARAMS

    args = {k: v for k, v in dict(args).items() if v is not None}
    explicit = tuple(args.pop("__explicit__", ()))
    keys = _keys_of(policy) + (explicit if policy != "full" else ())
    return {k: v for k, v in args.items() if (k in keys) or (k not in COMMON_PARAMS and policy != "full")}


@contextlib.contextmanager
def plain_attention(model, impl: str = "sdpa"):
    """Run ``model`` with transformers' own attention ``impl`` inside the block (the model may have
    been switched to ``"inf_mllm"`` by :func:`inf_mllm.enable`); the previous one is restored."""
    from .._compat import get_attn_implementation, set_attn_implementation

    old = get_attn_implementation(model)
    set_attn_implementation(model, impl)
    try:
        yield model
    finally:
        if old is not None and old != impl:
            set_attn_implementation(model, old)


class PolicyRunner:
    """One model + one policy: make caches, feed chunks, decode.

    ``policy_args`` are passed to ``inf_mllm.enable`` as keyword arguments (``budget``,
    ``n_recent``, ``window``, ``bias``, ``n_sink``...); ``chunk`` None = the policy's default.
    ``policy="transformers"``: no inf_mllm at all, the model's SDPA attention and a
    ``DynamicCache`` (the baseline a user compares with); the runner switches the attention back
    and forth, so use it inside ``with runner.active():``.
    """

    def __init__(self, bundle: ModelBundle, policy: str, policy_args: Optional[Dict[str, Any]] = None,
                 chunk: Optional[int] = None):
        self.bundle = bundle
        self.model = bundle.model
        self.policy = policy
        self.plain = policy == TRANSFORMERS
        self.policy_args = {} if self.plain else policy_kwargs(policy, dict(policy_args or {}))
        if chunk is None:
            from ..api import DEFAULT_CHUNK

            chunk = DEFAULT_CHUNK
        self.chunk = int(chunk)
        self.device = bundle.device

    effective_args: Optional[Dict[str, Any]] = None

    def active(self):
        """Context in which the model runs as this runner needs (plain attention for ``transformers``)."""
        return plain_attention(self.model) if self.plain else contextlib.nullcontext()

    # -- cache ------------------------------------------------------------------------
    def new_cache(self):
        if self.plain:
            from transformers import DynamicCache

            self.effective_args = {"attention": "sdpa", "cache": "DynamicCache", "chunk": self.chunk}
            return DynamicCache(config=self.model.config)
        from ..api import enable

        cache = enable(self.model, policy=self.policy, chunk=self.chunk, tokenizer=self.bundle.tokenizer,
                       **self.policy_args)
        pol = getattr(cache, "policy", None)
        if pol is not None and getattr(pol, "params", None) is not None:
            self.effective_args = dict(pol.params, chunk=getattr(pol, "chunk", self.chunk))
        return cache

    def cache_len(self, cache) -> int:
        """Slots the cache holds now (summed over batch rows)."""
        if self.plain:
            return int(cache.get_seq_length()) * (cache.layers[0].keys.shape[0] if _has_keys(cache) else 1)
        return int(cache.stats()["slots_used"])

    def cache_bytes(self, cache) -> int:
        """Bytes of the cache's buffers."""
        if self.plain:
            return sum(t.numel() * t.element_size() for layer in cache.layers if _has_keys_layer(layer)
                       for t in (layer.keys, layer.values))
        return int(cache.stats()["cache_bytes"])

    # -- forward ----------------------------------------------------------------------
    def _forward(self, ids: torch.Tensor, cache, logits_to_keep: int = 1):
        from .._compat import cache_kwargs

        return self.model(input_ids=ids, **cache_kwargs(cache), use_cache=True, logits_to_keep=logits_to_keep).logits

    @torch.inference_mode()
    def feed(
        self,
        cache,
        ids: torch.Tensor,
        *,
        prev_logits: Optional[torch.Tensor] = None,
        want_nll: bool = False,
        chunk: Optional[int] = None,
        progress=None,
    ) -> Tuple[Optional[torch.Tensor], torch.Tensor]:
        """Feed ``ids`` ``[1, n]`` through the model in chunks.

        Returns ``(nll, last_logits)``: ``nll`` ``[n]`` float32 (nat) of each fed token given
        everything before it (the first entry uses ``prev_logits``; NaN when that is None) if
        ``want_nll``, and the logits ``[vocab]`` after the last token.
        """
        chunk = int(chunk or self.chunk)
        ids = ids.to(self.device)
        if ids.dim() == 1:
            ids = ids[None]
        n = ids.shape[1]
        nll = torch.full((n,), float("nan"), dtype=torch.float32) if want_nll else None
        last = prev_logits
        from ..streaming import stream

        for s in range(0, n, chunk):
            piece = ids[:, s: s + chunk]
            m = piece.shape[1]
            if self.plain:
                logits = self._forward(piece, cache, logits_to_keep=0 if want_nll else 1).float()
                if want_nll and m > 1:
                    lp = torch.log_softmax(logits[0, :-1], -1)
                    nll[s + 1: s + m] = -lp.gather(-1, piece[0, 1:, None])[:, 0].cpu()
                logits = logits[:, -1]
            elif want_nll:
                logits, part = stream(self.model, input_ids=piece, cache=cache, chunk=chunk, return_nll=True)
                if m > 1:
                    nll[s + 1: s + m] = part[0].float().cpu()
            else:
                logits = stream(self.model, input_ids=piece, cache=cache, chunk=chunk)
            if want_nll and last is not None:
                nll[s] = -torch.log_softmax(last.float(), -1)[piece[0, 0]].cpu()
            last = logits[0].float()
            if progress is not None:
                progress.update(m)
        return nll, last

    @torch.inference_mode()
    def decode(self, cache, token: int) -> torch.Tensor:
        ids = torch.tensor([[int(token)]], device=self.device)
        return self._forward(ids, cache)[0, -1].float()

    @torch.inference_mode()
    def greedy(self, cache, last_logits: torch.Tensor, max_new_tokens: int, stop_ids: Sequence[int] = ()):
        """:func:`inf_mllm.streaming.greedy`: every chosen token is fed (a stop token too, and then
        decoding ends). Returns ``(tokens, logits after them)``."""
        from ..streaming import greedy

        return greedy(self.model, cache, last_logits, max_new_tokens, stop_ids)


def _has_keys_layer(layer) -> bool:
    return getattr(layer, "keys", None) is not None and isinstance(layer.keys, torch.Tensor) and layer.keys.numel() > 0


def _has_keys(cache) -> bool:
    return bool(cache.layers) and _has_keys_layer(cache.layers[0])


def sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def free_memory(device: str) -> None:
    gc.collect()
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()

"""Policy interface (SPEC §5) and registry.

A policy decides the position mode, how the attention operator scores (``window``, ``bias``),
when to evict and how (``compact_`` plus any extra step). It owns no buffers: the cache layer
(:class:`inf_mllm.cache.StreamingLayer`) holds ``k, v, scores, length`` and the per-slot
metadata, and offers :meth:`~inf_mllm.cache.StreamingLayer.compact` to call ``compact_``.

Per-layer policy state (counters, flags) lives in ``layer.state`` (a dict), so one policy
object serves every layer.

Adding a policy: one module in this package with a subclass decorated by
:func:`register_policy`; nothing else changes.
"""
from __future__ import annotations

from typing import Dict, Optional, Type

import torch

ROLLING = "rolling"
ORIGINAL = "original"

_REGISTRY: Dict[str, Type["Policy"]] = {}


def register_policy(cls):
    if not cls.name:
        raise ValueError("policy class needs a name")
    _REGISTRY[cls.name] = cls
    return cls


def available_policies():
    return sorted(_REGISTRY)


def get_policy_class(name: str) -> Type["Policy"]:
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"inf_mllm: unknown policy {name!r}; available: {', '.join(available_policies())}")
    return _REGISTRY[name]


def make_policy(name: str, **kwargs) -> "Policy":
    return get_policy_class(name)(**kwargs)


def _check_int(name, val, lo):
    if not isinstance(val, int) or isinstance(val, bool):
        raise TypeError(f"inf_mllm: {name} must be an int, got {val!r}")
    if val < lo:
        raise ValueError(f"inf_mllm: {name} must be >= {lo}, got {val}")


class Policy:
    """Base class. Subclasses set class attributes and override the hooks they need.

    Class attributes:
        name: registry key.
        positions: ``ROLLING`` (keys stored un-rotated, RoPE by slot) or ``ORIGINAL``.
        defaults: default values of the parameters (``budget, n_sink, n_recent, window, bias``
            and policy-specific ones), overridden by the constructor's keyword arguments.
        grows: the buffers grow instead of evicting (``full`` only).
    """

    name: str = ""
    positions: str = ROLLING
    grows: bool = False
    defaults: dict = dict(budget=2048, n_sink=4, n_recent=256, window=32, bias=0.0)

    def __init__(self, chunk: int = 512, **kwargs):
        params = dict(self.defaults)
        unknown = sorted(set(kwargs) - set(params))
        if unknown:
            raise TypeError(
                f"inf_mllm: policy {self.name!r} got unknown argument(s) {unknown}; it accepts {sorted(params) + ['chunk']}"
            )
        params.update({k: v for k, v in kwargs.items() if v is not None})
        if params.get("n_recent") is None:
            params["n_recent"] = self.default_n_recent(params)
        self.params = params
        self.budget = params["budget"]
        self.n_sink = params["n_sink"]
        self.n_recent = params["n_recent"]
        self.window = params["window"]
        self.bias = params["bias"]
        self.chunk = chunk
        _check_int("budget", self.budget, 1)
        _check_int("n_sink", self.n_sink, 0)
        _check_int("n_recent", self.n_recent, 0)
        _check_int("window", self.window, 0)
        _check_int("chunk", self.chunk, 1)
        if not isinstance(self.bias, (int, float)) or isinstance(self.bias, bool) or self.bias != self.bias:
            raise TypeError(f"inf_mllm: bias must be a number, got {self.bias!r}")
        if self.bias < 0:
            raise ValueError(f"inf_mllm: bias must be >= 0, got {self.bias}")
        self.bias = float(self.bias)
        if self.budget < self.n_sink + self.n_recent:
            raise ValueError(
                f"inf_mllm: budget={self.budget} is smaller than n_sink + n_recent = {self.n_sink} + {self.n_recent}"
            )
        self.validate()

    # -- configuration ------------------------------------------------------------------
    @staticmethod
    def default_n_recent(params) -> int:
        """``n_recent`` when the caller gives none and ``defaults`` says ``None``."""
        n_sink = params.get("n_sink") or 0
        budget = params.get("budget")
        return budget - n_sink if isinstance(budget, int) and isinstance(n_sink, int) else 0

    def validate(self) -> None:
        """Extra argument checks of a subclass (raise ValueError/TypeError)."""

    @property
    def slack(self) -> int:
        """Slots beyond the budget: room for one prefill chunk or ``window`` decode steps."""
        return max(self.window, self.chunk, 1)

    @property
    def capacity(self) -> int:
        return self.budget + self.slack

    @property
    def rolling(self) -> bool:
        return self.positions == ROLLING

    def score_window(self, layer, n: int, phase: str) -> int:
        """How many of the ``n`` queries of this call add to ``scores`` (0: no scoring)."""
        return 0

    def score_bias(self, layer, phase: str) -> float:
        return 0.0

    # -- hooks --------------------------------------------------------------------------
    # ``rows``: the batch rows concerned (those that received tokens / need room). Decisions are
    # per row so that each row of a padded batch behaves exactly as the row alone.
    def before_attention(self, layer, n: int, phase: str, rows) -> None:
        """Called before ``n`` new tokens are written (``phase`` is "prefill" or "decode")."""

    def after_attention(self, layer, n: int, phase: str, rows) -> None:
        """Called right after this layer's attention over ``n`` new tokens: evict here."""

    def make_room(self, layer, n: int, rows) -> None:
        """``rows`` cannot take the next tokens: evict (never exceed C). Default: evict to budget."""
        self.evict(layer, rows)

    def evict(self, layer, rows) -> None:
        """Compact ``rows`` that are over budget down to ``budget`` slots."""
        layer.compact(self.budget, self.n_sink, self.n_recent, reset_scores=True, rows=rows)

    def over_budget(self, layer, rows):
        return [b for b in rows if layer.len_host[b] > self.budget]

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in sorted(self.params.items()))
        return f"{type(self).__name__}({args}, chunk={self.chunk})"


def select_keep(scores: torch.Tensor, length: int, budget: int, n_sink: int, n_recent: int) -> torch.Tensor:
    """Keep mask ``[Hkv, length]`` (bool) for one row, with the same rule as ``compact_``.

    ``scores``: ``[Hkv, >=length]``. Keeps ``[0, n_sink)``, the last ``n_recent`` slots and the
    ``budget - n_sink - n_recent`` best-scored slots in between, ties to the lower slot.
    """
    Hkv = scores.shape[0]
    keep = torch.zeros(Hkv, length, dtype=torch.bool, device=scores.device)
    if length <= budget:
        keep[:] = True
        return keep
    keep[:, :n_sink] = True
    if n_recent:
        keep[:, length - n_recent:] = True
    n_mid = budget - n_sink - n_recent
    if n_mid > 0:
        mid = scores[:, n_sink : length - n_recent]
        order = torch.sort(mid, dim=-1, descending=True, stable=True).indices[:, :n_mid]
        keep[:, n_sink : length - n_recent].scatter_(1, order, True)
    return keep

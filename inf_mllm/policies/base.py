"""Policy contract (SPEC §5) and registry.

A policy says three things, each a small method:

* **how it scores** — :meth:`Policy.scoring` returns a :class:`Scoring` for a call of the fused
  operator (how many trailing queries add their attention, the bias, the decay of earlier
  scores), or ``None`` for no scoring;
* **when it evicts** — :meth:`Policy.due` returns the rows to evict right after a call
  (default: every row over budget); :meth:`Policy.make_room` handles a full buffer;
* **what it keeps** — sinks and recent tokens by ``n_sink``/``n_recent``; the rest by
  :meth:`Policy.rank` (default: the scores as they are), with :meth:`Policy.protect` (slots that
  must stay) and :meth:`Policy.merge` (fold evicted tokens into kept ones, LOOK-M).

One shared step, :meth:`Policy.evict`, turns that into the compaction (``ops.compact_`` through
:meth:`inf_mllm.buffers.KVBuffers.compact`); no policy writes into ``scores`` to steer it.

Policies see a layer's :class:`~inf_mllm.buffers.KVBuffers` (``buf``): the buffers, the host
copy of the lengths (``buf.lengths``) and ``buf.state``, the policy's own per-layer state made
by :meth:`Policy.new_state`. That state is **JSON-serialisable** (``None``, bools, numbers,
strings, lists and dicts with string keys, no tuples: ``json.loads(json.dumps(state)) == state``),
because a saved cache stores it as JSON (:mod:`inf_mllm.persist`); per-row state is a list with
one entry per batch row, which :meth:`Policy.select_state` reorders for beam search (override
it for any other layout). ``tests/test_persist.py`` checks both for every registered policy. ``rows`` are the batch rows concerned; decisions are per row so
that each row of a padded batch behaves as the row alone. ``phase`` is ``"prefill"`` (a call of
several tokens) or ``"decode"`` (one token).

Adding a policy: one module in this package with a subclass decorated by
:func:`register_policy`, and its test. The CLI, the evaluations and the tests find it (and its
parameters, ``defaults``) through :func:`available_policies` / :func:`get_policy_class`.
"""
from __future__ import annotations

import copy
import math
import pkgutil
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Type

import torch

ROLLING = "rolling"
ORIGINAL = "original"

#: prefill chunk (tokens per forward of ``inf_mllm.stream``) when the caller gives none
DEFAULT_CHUNK = 256

#: parameters every policy may have, which evaluations set once for all policies
COMMON_PARAMS = ("budget", "n_sink", "n_recent", "window", "bias")

_REGISTRY: Dict[str, Type["Policy"]] = {}


def register_policy(cls):
    if not cls.name:
        raise ValueError("policy class needs a name")
    _REGISTRY[cls.name] = cls
    return cls


def _load_all() -> None:
    """Import every policy module of this package (each registers itself)."""
    import importlib

    from .. import policies as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        if not mod.name.startswith("_") and mod.name != "base":
            importlib.import_module(f"{pkg.__name__}.{mod.name}")


def available_policies() -> List[str]:
    _load_all()
    return sorted(n for n in _REGISTRY if not n.startswith("_"))


def get_policy_class(name: str) -> Type["Policy"]:
    _load_all()
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"inf_mllm: unknown policy {name!r}; available: {', '.join(available_policies())}")
    return _REGISTRY[name]


def make_policy(name: str, **kwargs) -> "Policy":
    return get_policy_class(name)(**kwargs)


def check_int(name, val, lo):
    if not isinstance(val, int) or isinstance(val, bool):
        raise TypeError(f"inf_mllm: {name} must be an int, got {val!r}")
    if val < lo:
        raise ValueError(f"inf_mllm: {name} must be >= {lo}, got {val}")


def check_number(name, val, lo=0.0, hi=math.inf):
    if not isinstance(val, (int, float)) or isinstance(val, bool) or not math.isfinite(val):
        raise (TypeError if not isinstance(val, (int, float)) or isinstance(val, bool) else ValueError)(
            f"inf_mllm: {name} must be a finite number, got {val!r}")
    if not lo <= val <= hi:
        raise ValueError(f"inf_mllm: {name} must be in [{lo}, {hi}], got {val}")


@dataclass(frozen=True)
class Scoring:
    """How one call of ``attention_with_scores`` updates ``scores`` (SPEC §4.1).

    ``window``: trailing queries of the call that add their attention (``min(window, n)``);
    ``bias``/``bias_mode``: the attention bias (``"absolute"``: ``bias * slot``; ``"relative"``:
    ``bias * (slot + 1) / (t + 1)**2``); ``decay`` in ``(0, 1]``: earlier scores are multiplied
    by it first (1: accumulate); ``restart``: rows whose scores start from zero in this call.
    """

    window: int
    bias: float = 0.0
    bias_mode: str = "absolute"
    decay: float = 1.0
    restart: Tuple[int, ...] = ()


class Policy:
    """Base class. Subclasses set the class attributes and override the methods they need.

    Class attributes:
        name: registry key.
        positions: ``ROLLING`` (keys stored un-rotated, RoPE by slot) or ``ORIGINAL``.
        defaults: the parameters and their defaults (``budget, n_sink, n_recent, window, bias``
            and the policy's own), overridden by the constructor's keyword arguments. A
            default of ``None`` for ``n_recent`` means :meth:`default_n_recent`.
        grows: the buffers grow instead of evicting (``full`` only).
        keep_scores: scores move with their tokens at eviction (else they are zeroed).
        follows: which of ``COMMON_PARAMS`` the policy takes from settings shared by all policies
            (an evaluation's ``--budget``, ``--n-recent``, ...); the others keep the policy's own,
            published defaults. ``None``: every common parameter it has.
    """

    name: str = ""
    positions: str = ROLLING
    grows: bool = False
    keep_scores: bool = False
    follows: Optional[Tuple[str, ...]] = None
    defaults: dict = dict(budget=2048, n_sink=4, n_recent=256, window=32, bias=0.0)

    @classmethod
    def common_params(cls) -> Tuple[str, ...]:
        """The common parameters this policy takes from shared settings (see ``follows``)."""
        if cls.follows is not None:
            return tuple(cls.follows)
        return tuple(k for k in COMMON_PARAMS if k in cls.defaults)

    def __init__(self, chunk: int = DEFAULT_CHUNK, **kwargs):
        params = dict(self.defaults)
        unknown = sorted(set(kwargs) - set(params))
        if unknown:
            raise TypeError(
                f"inf_mllm: policy {self.name!r} got unknown argument(s) {unknown}; it accepts {sorted(params) + ['chunk']}"
            )
        params.update({k: v for k, v in kwargs.items() if v is not None})
        if params.get("n_recent") is None:
            params["n_recent"] = self.default_n_recent(params)
            b, s = params.get("budget"), params.get("n_sink")
            if isinstance(params["n_recent"], int) and params["n_recent"] < 0 and isinstance(b, int) and isinstance(s, int):
                raise ValueError(f"inf_mllm: n_sink={s} is larger than budget={b} (the sinks are part of the budget)")
        self.params = params
        self.budget = params["budget"]
        self.n_sink = params["n_sink"]
        self.n_recent = params["n_recent"]
        self.window = params["window"]
        self.bias = params["bias"]
        self.chunk = chunk
        check_int("budget", self.budget, 1)
        check_int("n_sink", self.n_sink, 0)
        check_int("n_recent", self.n_recent, 0)
        check_int("window", self.window, 0)
        check_int("chunk", self.chunk, 1)
        if not isinstance(self.bias, (int, float)) or isinstance(self.bias, bool):
            raise TypeError(f"inf_mllm: bias must be a number, got {self.bias!r}")
        if not math.isfinite(self.bias):
            raise ValueError(f"inf_mllm: bias must be a finite number, got {self.bias!r}")
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

    def new_state(self, batch: int) -> Any:
        """The policy's per-layer state (stored as ``buf.state``); ``None`` when it needs none.
        JSON-serialisable (module docstring), per-row entries in a list indexed by row."""
        return None

    def select_state(self, state: Any, rows: Sequence[int]) -> Any:
        """The state for batch rows ``rows`` (in that order, repeats allowed: beam search reorders,
        repeats and drops rows). Default: ``None`` stays ``None``; a list with one entry per row is
        indexed by ``rows`` (entries copied). A policy whose state is laid out otherwise overrides it."""
        if state is None:
            return None
        if isinstance(state, list):
            return [copy.deepcopy(state[b]) for b in rows]
        raise TypeError(
            f"inf_mllm: policy {self.name!r} keeps a per-layer state of type {type(state).__name__}; override "
            "Policy.select_state to say how its rows are selected (beam search, batch select)"
        )

    # -- how it scores ------------------------------------------------------------------
    def scoring(self, buf, n: int, phase: str, rows: Sequence[int]) -> Optional[Scoring]:
        """How the coming call of ``n`` new tokens scores (``None``: no scoring)."""
        return None

    # -- when it evicts -----------------------------------------------------------------
    def before(self, buf, n: int, phase: str, rows: Sequence[int]) -> None:
        """Called once per forward, before its tokens are written (compress-once policies)."""

    def due(self, buf, n: int, phase: str, rows: Sequence[int]) -> List[int]:
        """Rows to evict right after a call of ``n`` tokens. Default: every row over budget."""
        return self.over_budget(buf, rows)

    def make_room(self, buf, n: int, rows: Sequence[int]) -> None:
        """``rows`` are full (``length == C``) and ``n`` tokens still come: evict them to budget."""
        self.evict(buf, rows)

    # -- what it keeps ------------------------------------------------------------------
    def rank(self, buf, rows: Sequence[int]) -> Optional[torch.Tensor]:
        """Ranking of the slots ``[B, Hkv, C]`` float32 (only ``rows`` are read); ``None``: the
        scores as they are."""
        return None

    def protect(self, buf, rows: Sequence[int], rank: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """Slots that must be kept, ``[B, Hkv, C]`` bool (only ``rows`` are read), or ``None``.
        At most ``budget - n_sink - n_recent`` protected slots per head between sinks and recent.
        ``rank``: the ranking this eviction selects by (``None``: the scores), computed once."""
        return None

    def evicted(self, buf, rows: Sequence[int]) -> None:
        """Called after ``rows`` were evicted (reset per-row counters)."""

    # -- reconstruction probing (opt-in; inf_mllm.stream) -----------------------------------
    @property
    def probes(self) -> bool:
        """Whether ``inf_mllm.stream`` feeds every chunk a second time as a probe (see
        :meth:`StreamingCache.probing`) before the chunk's eviction, and hands the probe's
        attention to :meth:`probed`."""
        return False

    @property
    def probe_reduce(self) -> str:
        """How a probe's attention reaches :meth:`probed`: ``"sum"`` over its queries (mean over the
        GQA group), or ``"max"`` over its queries and the heads of the group."""
        return "sum"

    def probed(self, buf, rows: Sequence[int], gained: torch.Tensor, n: int) -> None:
        """A probe of ``n`` queries (the chunk just fed, fed again) attended the layer's cache:
        ``gained [B, Hkv, C]`` float32 is their attention summed over the ``n`` queries (mean over
        the GQA group) per slot, zero past each row's length. Called before the chunk's eviction."""

    # -- the shared selection step --------------------------------------------------------
    def evict(self, buf, rows: Sequence[int], *, rank: Optional[torch.Tensor] = None,
              keep_scores: Optional[bool] = None, merge: Optional[Callable] = None) -> None:
        """Evict ``rows`` over budget down to ``budget``: sinks + recent + the best by rank, with
        the protected slots kept. ``rank``/``keep_scores`` override the policy's for this call;
        ``merge(buf, b, keep)`` (``keep``: ``[Hkv, length]`` bool) runs before the move, per row."""
        rows = self.over_budget(buf, rows)
        if not rows:
            return
        if rank is None:
            rank = self.rank(buf, rows)
        prot = self.protect(buf, rows, rank)
        if prot is not None:
            rank = (buf.scores if rank is None else rank).masked_fill(prot, math.inf)
        if merge is not None:
            by = buf.scores if rank is None else rank
            for b in rows:
                merge(buf, b, select_keep(by[b], buf.lengths[b], self.budget, self.n_sink, self.n_recent))
        buf.compact(rows, self.budget, self.n_sink, self.n_recent, rank=rank,
                    keep_scores=self.keep_scores if keep_scores is None else keep_scores)
        self.evicted(buf, rows)

    @staticmethod
    def over_budget_rows(buf, rows, budget) -> List[int]:
        return [b for b in rows if buf.lengths[b] > budget]

    def over_budget(self, buf, rows) -> List[int]:
        return self.over_budget_rows(buf, rows, self.budget)

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

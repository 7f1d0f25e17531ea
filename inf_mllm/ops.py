"""Public operators of inf_mllm (SPEC §4), as ``torch.library`` custom ops.

* ``attention_with_scores`` -> ``torch.ops.inf_mllm.attention_with_scores``: Triton on CUDA,
  a vectorised PyTorch path on the CPU.
* ``compact_`` -> ``torch.ops.inf_mllm.compact_``: the native C++ (CPU) / CUDA operator from
  ``csrc/``. The same library has ``inf_mllm::rope`` (CPU), a one-pass key rotation used by
  the CPU attention path. Their schemas are defined here, once; the native library only
  registers kernels for them (``TORCH_LIBRARY_IMPL``).

The Python wrappers here check every argument and raise ``ValueError``/``TypeError`` with a
message naming the problem; the raw ``torch.ops`` entry points trust their inputs.
References: :mod:`inf_mllm.reference`.
"""
from __future__ import annotations

import glob
import math
import os
import warnings
from typing import Optional, Sequence

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from ._torch_path import attention_with_scores_torch
from .reference import attention_with_scores_ref, compact_ref_  # noqa: F401  (re-exported)

__all__ = [
    "attention_with_scores",
    "compact_",
    "attention_with_scores_ref",
    "compact_ref_",
    "native_available",
    "value_checks",
]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# --------------------------------------------------------------------------------------
# Native ops: the schemas are defined here, once; the native library (csrc/, loaded below)
# registers its CPU and (when built) CUDA kernels for them with TORCH_LIBRARY_IMPL.
# --------------------------------------------------------------------------------------

COMPACT_SCHEMA = (
    "compact_(Tensor(a!) k, Tensor(b!) v, Tensor(c!) scores, Tensor(d!) length, "
    "Tensor(e!)[] extras, int budget, int n_sink, int n_recent, bool reset_scores, "
    "bool return_indices) -> Tensor"
)
ROPE_SCHEMA = "rope(Tensor x, Tensor cos, Tensor sin) -> Tensor"  # CPU only (csrc/rope_cpu.cpp)
# The fused decode step of attention_with_scores (a few queries per row; CPU only,
# csrc/attention_cpu.cpp); the CPU path of attention_with_scores calls it (see _torch_path.py).
ATTENTION_DECODE_SCHEMA = (
    "attention_decode(Tensor q, Tensor k, Tensor v, Tensor length, Tensor(a!)? scores, float scale, "
    "int window, float bias, Tensor? cos, Tensor? sin, str bias_mode, float decay) -> Tensor"
)
CPU_ISA_SCHEMA = "cpu_isa() -> str"  # the instruction set attention_decode runs with (base, avx2, avx512)
_LIB = torch.library.Library("inf_mllm", "FRAGMENT")
_LIB.define(COMPACT_SCHEMA)
_LIB.define(ROPE_SCHEMA)
_LIB.define(ATTENTION_DECODE_SCHEMA)
_LIB.define(CPU_ISA_SCHEMA)


def _load_native() -> bool:
    here = os.path.dirname(os.path.abspath(__file__))
    for path in sorted(glob.glob(os.path.join(here, "_C*.so")) + glob.glob(os.path.join(here, "_C*.pyd"))):
        torch.ops.load_library(path)
        return True
    return False


_NATIVE = _load_native()


def native_available() -> bool:
    """True when the compiled operators from ``csrc/`` were loaded."""
    return _NATIVE


if not _NATIVE:
    # A source checkout that was never built: the same op with the reference as its
    # implementation, so everything works, only slower.
    warnings.warn(
        "inf_mllm: native extension (inf_mllm/_C) not found; compact_ falls back to the "
        "PyTorch reference. Build it with `pip install --no-build-isolation -e .`.",
        RuntimeWarning,
        stacklevel=2,
    )

    def _compact_fallback(k, v, scores, length, extras, budget, n_sink, n_recent, reset_scores, return_indices):
        idx = compact_ref_(
            k, v, scores, length, budget=budget, n_sink=n_sink, n_recent=n_recent,
            reset_scores=reset_scores, extras=extras, return_indices=True,
        )
        return idx if return_indices else idx.new_empty(0)

    _LIB.impl("compact_", _compact_fallback, "CompositeExplicitAutograd")


@torch.library.register_fake("inf_mllm::compact_")
def _compact_fake(k, v, scores, length, extras, budget, n_sink, n_recent, reset_scores, return_indices):
    if return_indices:
        return k.new_empty((k.shape[0], k.shape[1], budget), dtype=torch.long)
    return k.new_empty((0,), dtype=torch.long)


@torch.library.register_fake("inf_mllm::rope")
def _rope_fake(x, cos, sin):
    return x.new_empty(x.shape, dtype=cos.dtype)


@torch.library.register_fake("inf_mllm::attention_decode")
def _attention_decode_fake(q, k, v, length, scores, scale, window, bias, cos, sin, bias_mode, decay):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


# --------------------------------------------------------------------------------------
# attention_with_scores: a Python custom op in the same namespace.
# --------------------------------------------------------------------------------------


@torch.library.custom_op("inf_mllm::attention_with_scores", mutates_args=("scores",))
def _attention_with_scores_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    length: torch.Tensor,
    scores: Optional[torch.Tensor],
    scale: float,
    window: int,
    bias: float,
    cos: Optional[torch.Tensor],
    sin: Optional[torch.Tensor],
    bias_mode: str = "absolute",
    decay: float = 1.0,
    inv_freq: Optional[torch.Tensor] = None,
    rope_scale: float = 1.0,
    rope_pos: Optional[torch.Tensor] = None,
    rope_sections: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    return _attention_with_scores_impl(q, k, v, length, scores, scale, window, bias, cos, sin, bias_mode, decay,
                                       inv_freq, rope_scale, rope_pos, rope_sections)


@_attention_with_scores_op.register_fake
def _(q, k, v, length, scores, scale, window, bias, cos, sin, bias_mode="absolute", decay=1.0, inv_freq=None,
      rope_scale=1.0, rope_pos=None, rope_sections=None):
    return torch.empty_like(q)


def _attention_with_scores_impl(q, k, v, length, scores, scale, window, bias, cos, sin, bias_mode, decay,
                                inv_freq=None, rope_scale=1.0, rope_pos=None, rope_sections=None):
    rope = dict(inv_freq=inv_freq, rope_scale=rope_scale, rope_pos=rope_pos, rope_sections=rope_sections)
    if q.is_cuda and q.dtype != torch.float64:
        from .kernels.attention import attention_with_scores_triton

        return attention_with_scores_triton(q, k, v, length, scores, scale, window, bias, cos, sin, bias_mode, decay,
                                            **rope)
    return attention_with_scores_torch(q, k, v, length, scores, scale, window, bias, cos, sin, bias_mode, decay, **rope)


def _plain_eager(*tensors) -> bool:
    """True for an eager call on plain tensors that need no autograd: the public wrapper then
    runs the implementation itself and skips the custom-op dispatch (about 70 us per call on
    the CPU, paid by every layer of every decode step). Under ``torch.compile``, a dispatch or
    function mode (fake tensors, tracing), functorch transforms, tensor subclasses or inputs
    that require grad, calls go through ``torch.ops`` so that the registration (fake kernel,
    mutation annotation) applies."""
    if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
        return False
    if torch._C._is_torch_function_mode_enabled() or torch._C._are_functorch_transforms_active():
        return False
    for t in tensors:
        if t is not None and (type(t) is not torch.Tensor or t.requires_grad):
            return False
    return True


BIAS_MODES = ("absolute", "relative")


# --------------------------------------------------------------------------------------
# Argument checking
# --------------------------------------------------------------------------------------

_VALUE_CHECKS = os.environ.get("INF_MLLM_VALUE_CHECKS", "1") != "0"


def value_checks(enabled: Optional[bool] = None) -> bool:
    """Get (and optionally set) whether checks that read tensor *values* run.

    Shape/dtype/device checks always run. Value checks (``length`` within range) read
    ``length`` on the host, a device sync on CUDA; they are skipped automatically while a
    CUDA graph is being captured or under ``torch.compile``, and can be turned off globally
    here or with ``INF_MLLM_VALUE_CHECKS=0``.
    """
    global _VALUE_CHECKS
    if enabled is not None:
        _VALUE_CHECKS = bool(enabled)
    return _VALUE_CHECKS


def _finite_number(x) -> bool:
    """A finite int/float (not a bool). Not checked while torch.compile traces: a float computed
    there (e.g. a decay from a token count) may be symbolic, and checking it would break the graph."""
    if torch.compiler.is_compiling():
        return True
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _values_checkable(t: torch.Tensor, override: Optional[bool] = None) -> bool:
    if override is not None:
        return override and not torch.compiler.is_compiling() and not (t.is_cuda and torch.cuda.is_current_stream_capturing())
    if not _VALUE_CHECKS:
        return False
    if torch.compiler.is_compiling():
        return False
    if t.is_cuda and torch.cuda.is_current_stream_capturing():
        return False
    return True


def _check(cond: bool, msg, exc=ValueError) -> None:
    """Raise ``exc("inf_mllm: " + msg)`` unless ``cond``; ``msg`` may be a callable, so that a
    message is only formatted when the check fails (these checks run on every layer's call)."""
    if not cond:
        raise exc(f"inf_mllm: {msg() if callable(msg) else msg}")


def _check_tensor(name: str, t, ndim: int) -> None:
    _check(isinstance(t, torch.Tensor), lambda: f"{name} must be a torch.Tensor, got {type(t).__name__}", TypeError)
    _check(t.dim() == ndim, lambda: f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")


def _check_length(length, B: int, device: torch.device) -> None:
    _check_tensor("length", length, 1)
    _check(length.dtype == torch.int32, lambda: f"length must be int32, got {length.dtype}", TypeError)
    _check(length.shape[0] == B, lambda: f"length must have shape [B]=[{B}], got {tuple(length.shape)}")
    _check(length.device == device, lambda: f"length is on {length.device} but the buffers are on {device}")


def _check_kv(k, v) -> None:
    _check_tensor("k", k, 4)
    _check_tensor("v", v, 4)
    _check(k.shape == v.shape, lambda: f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    _check(k.dtype == v.dtype, lambda: f"k and v must have the same dtype, got {k.dtype} and {v.dtype}", TypeError)
    _check(k.dtype in _FLOAT_DTYPES, lambda: f"k/v dtype {k.dtype} is not supported", TypeError)
    _check(k.device == v.device, lambda: f"k is on {k.device} but v is on {v.device}")
    _check(k.is_contiguous() and v.is_contiguous(), "k and v buffers must be contiguous [B, Hkv, C, D]")


def _check_scores(scores, k) -> None:
    B, Hkv, C, _ = k.shape
    _check_tensor("scores", scores, 3)
    _check(scores.dtype == torch.float32, lambda: f"scores must be float32, got {scores.dtype}", TypeError)
    _check(tuple(scores.shape) == (B, Hkv, C), lambda: f"scores must have shape [B, Hkv, C]={[B, Hkv, C]}, got {list(scores.shape)}")
    _check(scores.device == k.device, lambda: f"scores is on {scores.device} but k is on {k.device}")
    _check(scores.is_contiguous(), "scores must be contiguous")


def _check_no_alias(named) -> None:
    """Refuse buffers that share memory: ``compact_`` moves each of them in place, so an aliased
    pair would be moved twice (silently wrong). ``named``: ``(name, tensor)`` pairs. Skipped
    where memory addresses mean nothing (``torch.compile``, fake/meta tensors, dispatch modes)."""
    if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
        return
    spans = []
    for order, (name, t) in enumerate(named):
        if type(t) is not torch.Tensor or t.device.type == "meta" or t.numel() == 0:
            continue
        start = t.data_ptr()
        if t.is_contiguous():
            extent = t.numel()
        else:  # elements from the first to the last (strides of these buffers are positive)
            extent = 1 + sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))
        spans.append((start, start + extent * t.element_size(), order, name))
    spans.sort()
    # intervals sorted by start overlap somewhere iff some neighbours overlap
    for a, b in zip(spans, spans[1:]):
        first, second = sorted((a, b), key=lambda x: x[2])  # name them in argument order
        _check(b[0] >= a[1], lambda: f"{first[3]} and {second[3]} share memory; compact_ moves every buffer in "
               "place, so each must be a separate tensor (pass distinct buffers, e.g. .clone() one of them)")


def _check_rope_freq(inv_freq, rope_scale, rope_pos, rope_sections, cos, k, check_values) -> None:
    """Checks of the frequency form of RoPE (``inv_freq``, ``rope_scale``, ``rope_pos``, ``rope_sections``)."""
    B, Hkv, C, D = k.shape
    _check(_finite_number(rope_scale) and (torch.compiler.is_compiling() or rope_scale > 0),
           lambda: f"rope_scale must be a positive finite number, got {rope_scale!r}")
    if inv_freq is None:
        _check(rope_pos is None and rope_sections is None, "rope_pos/rope_sections need inv_freq (the rotary frequencies)")
        return
    _check(cos is None, "give RoPE either as cos/sin tables or as inv_freq, not both")
    _check_tensor("inv_freq", inv_freq, 1)
    _check(D % 2 == 0, lambda: f"RoPE needs an even head dim, got D={D}")
    _check(inv_freq.shape[0] == D // 2, lambda: f"inv_freq must have shape [D/2]=[{D // 2}], got {list(inv_freq.shape)}")
    _check(inv_freq.dtype == torch.float32, lambda: f"inv_freq must be float32, got {inv_freq.dtype}", TypeError)
    _check(inv_freq.device == k.device, lambda: f"inv_freq is on {inv_freq.device} but k is on {k.device}")
    _check(inv_freq.is_contiguous(), "inv_freq must be contiguous")
    _check((rope_pos is None) == (rope_sections is None), "rope_pos and rope_sections must be given together")
    if rope_pos is None:
        return
    _check_tensor("rope_pos", rope_pos, 4)
    S = rope_pos.shape[0]
    _check(tuple(rope_pos.shape[1:]) == (B, Hkv, C),
           lambda: f"rope_pos must have shape [S, B, Hkv, C]=[S, {B}, {Hkv}, {C}], got {list(rope_pos.shape)}")
    _check(rope_pos.dtype == torch.int32, lambda: f"rope_pos must be int32, got {rope_pos.dtype}", TypeError)
    _check(rope_pos.device == k.device, lambda: f"rope_pos is on {rope_pos.device} but k is on {k.device}")
    _check(rope_pos.is_contiguous(), "rope_pos must be contiguous")
    _check_tensor("rope_sections", rope_sections, 1)
    _check(rope_sections.shape[0] == D // 2,
           lambda: f"rope_sections must have shape [D/2]=[{D // 2}], got {list(rope_sections.shape)}")
    _check(rope_sections.dtype == torch.int32, lambda: f"rope_sections must be int32, got {rope_sections.dtype}", TypeError)
    _check(rope_sections.device == k.device, lambda: f"rope_sections is on {rope_sections.device} but k is on {k.device}")
    if _values_checkable(rope_sections, check_values):
        lo, hi = int(rope_sections.min()), int(rope_sections.max())
        _check(lo >= 0 and hi < S, lambda: f"rope_sections values must be in [0, S={S}), got [{lo}, {hi}]")


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------


def attention_with_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    length: torch.Tensor,
    scores: Optional[torch.Tensor] = None,
    *,
    scale: Optional[float] = None,
    window: int = 32,
    bias: float = 0.0,
    cos: Optional[torch.Tensor] = None,
    sin: Optional[torch.Tensor] = None,
    bias_mode: str = "absolute",
    decay: float = 1.0,
    inv_freq: Optional[torch.Tensor] = None,
    rope_scale: float = 1.0,
    rope_pos: Optional[torch.Tensor] = None,
    rope_sections: Optional[torch.Tensor] = None,
    check_values: Optional[bool] = None,
) -> torch.Tensor:
    """Causal attention of ``n`` new queries over a fixed-capacity KV buffer, plus local-sum scores.

    Args:
        q: ``[B, Hq, n, D]`` queries of the ``n`` new tokens (un-rotated when ``cos`` is given).
        k, v: ``[B, Hkv, C, D]`` buffers; the new tokens' keys/values are already written at
            slots ``length[b]-n .. length[b]-1``. Slots ``>= length[b]`` are never read.
        length: ``[B]`` int32, valid slots per row (ragged batches allowed).
        scores: optional ``[B, Hkv, C]`` float32, updated in place when the call scores
            (``window > 0``): the valid slots ``j < length[b]`` are multiplied by ``decay``, then
            each of the last ``min(window, n)`` queries ``i`` (at slot ``t_i``) adds
            ``mean over the GQA group of p[..., i, j] + bias_ij`` for every slot ``j <= t_i``.
            Slots ``>= length[b]`` are never changed.
        scale: softmax scale, default ``D ** -0.5``.
        window: retrieval window ``w`` (number of trailing queries that score).
        bias: attention bias ``beta``.
        cos, sin: optional ``[>=C, D]`` RoPE tables by slot (the fallback form of rolling
            positions): ``q`` is rotated at its slot and every key at its slot while loading,
            ``x * cos[t] + rotate_half(x) * sin[t]``.
        inv_freq, rope_scale: the other form, RoPE from the model's rotary frequencies
            (``inv_freq [D/2]`` float32, ``rope_scale`` its ``attention_scaling``): a key or query
            at position ``p`` is rotated by ``angle_i = p * inv_freq[i]`` (cos/sin times
            ``rope_scale``; :func:`inf_mllm.reference.rope_cos_sin`), at its slot, or at
        rope_pos, rope_sections: (multimodal rotary positions) ``rope_pos [S, B, Hkv, C]`` int32,
            every slot's position per rotary section, and ``rope_sections [D/2]`` int32, the section
            of each frequency; a query uses the positions stored at its own slot (per KV head).
            Needs ``inv_freq``.
        bias_mode: ``"absolute"`` (default): ``bias_ij = beta * j``; ``"relative"`` (SPEC §5):
            ``bias_ij = beta * (j + 1) / (t_i + 1) ** 2``, i.e. the newest visible slot gets
            ``beta`` times the query's uniform attention share ``1 / (t_i + 1)``, falling
            linearly towards the oldest.
        decay: factor in ``(0, 1]`` applied to the existing scores of the valid slots before
            the call adds its contributions (fused into the same pass; ``1.0`` keeps them).
        check_values: check the *values* of ``length`` (a host sync on CUDA). ``None`` follows
            :func:`value_checks`; callers that track lengths themselves pass ``False``.

    Returns:
        ``out`` ``[B, Hq, n, D]`` in ``q.dtype``.
    """
    _check_tensor("q", q, 4)
    _check_kv(k, v)
    B, Hq, n, D = q.shape
    Bk, Hkv, C, Dk = k.shape
    _check(q.dtype == k.dtype, lambda: f"q dtype {q.dtype} differs from k/v dtype {k.dtype}", TypeError)
    _check(q.device == k.device, lambda: f"q is on {q.device} but k/v are on {k.device}")
    _check(B == Bk, lambda: f"batch size of q ({B}) differs from k/v ({Bk})")
    _check(D == Dk, lambda: f"head dim of q ({D}) differs from k/v ({Dk})")
    _check(Hq % Hkv == 0, lambda: f"Hq={Hq} query heads is not a multiple of Hkv={Hkv} key/value heads")
    _check(n >= 1, "q must hold at least one query (n >= 1)")
    _check(n <= C, lambda: f"n={n} new tokens exceed the buffer capacity C={C}")
    _check(q.dtype != torch.float64 or not q.is_cuda, "float64 is supported on the CPU only", TypeError)
    _check_length(length, B, k.device)
    if scores is not None:
        _check_scores(scores, k)
    _check(isinstance(window, int) and not isinstance(window, bool) and window >= 0,
           lambda: f"window must be a non-negative int, got {window!r}")
    _check(_finite_number(bias), lambda: f"bias must be a finite number, got {bias!r}")
    _check(isinstance(bias_mode, str) and bias_mode in BIAS_MODES,
           lambda: f"bias_mode must be one of {BIAS_MODES}, got {bias_mode!r}")
    _check(_finite_number(decay) and (torch.compiler.is_compiling() or 0.0 < decay <= 1.0),
           lambda: f"decay must be a finite number in (0, 1], got {decay!r}")
    _check(scale is None or (_finite_number(scale) and (torch.compiler.is_compiling() or scale > 0)),
           lambda: f"scale must be a positive finite number, got {scale!r}")
    if (cos is None) != (sin is None):
        raise ValueError("inf_mllm: cos and sin must be given together")
    if cos is not None:
        for name, t in (("cos", cos), ("sin", sin)):
            _check_tensor(name, t, 2)
            _check(t.shape[0] >= C and t.shape[1] == D, lambda: f"{name} must have shape [C, D]=[{C}, {D}] (or more rows), got {list(t.shape)}")
            _check(t.device == k.device, lambda: f"{name} is on {t.device} but k is on {k.device}")
            _check(t.dtype.is_floating_point, lambda: f"{name} must be floating point, got {t.dtype}", TypeError)
        _check(D % 2 == 0, lambda: f"RoPE needs an even head dim, got D={D}")
        cos, sin = cos.contiguous(), sin.contiguous()
    _check_rope_freq(inv_freq, rope_scale, rope_pos, rope_sections, cos, k, check_values)
    if scale is None:
        scale = D ** -0.5
    if _values_checkable(length, check_values):
        lo, hi = int(length.min()), int(length.max())
        _check(hi <= C, lambda: f"length {hi} exceeds the buffer capacity C={C}")
        _check(lo >= n, lambda: f"length {lo} is smaller than the number of new tokens n={n}")
    args = (q.contiguous(), k, v, length, scores, float(scale), int(window), float(bias), cos, sin, bias_mode,
            float(decay), inv_freq, float(rope_scale), rope_pos, rope_sections)
    if _plain_eager(q, k, v, length, scores, cos, sin, inv_freq, rope_pos, rope_sections):
        return _attention_with_scores_impl(*args)
    return torch.ops.inf_mllm.attention_with_scores(*args)


def compact_(
    k: torch.Tensor,
    v: torch.Tensor,
    scores: torch.Tensor,
    length: torch.Tensor,
    *,
    budget: int,
    n_sink: int,
    n_recent: int,
    reset_scores: bool = True,
    extras: Sequence[torch.Tensor] = (),
    return_indices: bool = False,
    check_values: Optional[bool] = None,
) -> Optional[torch.Tensor]:
    """Evict in place down to ``budget`` slots per row over budget (SPEC §4.2).

    Per row with ``length[b] > budget`` and per KV head: keep slots ``[0, n_sink)``, the last
    ``n_recent`` valid slots, and the ``budget - n_sink - n_recent`` highest-scored slots in
    between (ties to the lower slot), packed into ``[0, budget)`` in their original order.
    ``extras`` (per-slot metadata ``[B, Hkv, C]``) move with their tokens. ``scores`` are zeroed
    (``reset_scores=True``) or moved with their tokens (slots ``>= budget`` zeroed);
    ``length[b] = budget``. Rows with ``length[b] <= budget`` are untouched.

    Every buffer (``k``, ``v``, ``scores``, ``length``, each extra) must be its own memory: buffers
    that share memory (``compact_(k, k, ...)``, ``extras=(pos, pos)``, an extra viewing ``scores``)
    are refused with ``ValueError``, since each would be moved twice.

    Returns the kept slot indices ``[B, Hkv, budget]`` (int64; ``arange(budget)`` for untouched
    rows) when ``return_indices``, else ``None``. ``check_values`` as in
    :func:`attention_with_scores`.
    """
    _check_kv(k, v)
    B, Hkv, C, D = k.shape
    _check_scores(scores, k)
    _check_length(length, B, k.device)
    for name, val in (("budget", budget), ("n_sink", n_sink), ("n_recent", n_recent)):
        _check(isinstance(val, int) and not isinstance(val, bool), lambda: f"{name} must be an int, got {val!r}", TypeError)
        _check(val >= 0, lambda: f"{name} must be >= 0, got {val}")
    _check(budget >= n_sink + n_recent, lambda: f"budget={budget} is smaller than n_sink + n_recent = {n_sink} + {n_recent}")
    _check(budget >= 1, "budget must be at least 1")
    _check(budget <= C, lambda: f"budget={budget} exceeds the buffer capacity C={C}")
    extras = list(extras)
    for i, e in enumerate(extras):
        _check_tensor(f"extras[{i}]", e, 3)
        _check(tuple(e.shape) == (B, Hkv, C), lambda: f"extras[{i}] must have shape [B, Hkv, C]={[B, Hkv, C]}, got {list(e.shape)}")
        _check(e.device == k.device, lambda: f"extras[{i}] is on {e.device} but k is on {k.device}")
        _check(e.is_contiguous(), lambda: f"extras[{i}] must be contiguous")
    _check_no_alias([("k", k), ("v", v), ("scores", scores), ("length", length)]
                    + [(f"extras[{i}]", e) for i, e in enumerate(extras)])
    if _values_checkable(length, check_values):
        hi = int(length.max())
        _check(hi <= C, lambda: f"length {hi} exceeds the buffer capacity C={C}")
        _check(int(length.min()) >= 0, "length must be non-negative")
    idx = torch.ops.inf_mllm.compact_(
        k, v, scores, length, extras, int(budget), int(n_sink), int(n_recent), bool(reset_scores), bool(return_indices)
    )
    return idx if return_indices else None

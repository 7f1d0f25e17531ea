"""Positions for rolling mode (SPEC §3): undo the model's RoPE on new tokens, and the rotary input
that the attention operator applies on load.

The model rotates queries and keys at their stream positions before the cache sees them. In
rolling mode the cache stores keys un-rotated and the operator rotates every key at its current
position (and the query at its own), so :class:`Rope` gives both the exact cos/sin the model used
for a forward (to undo it) and the operator's rotary input.

One definition of RoPE: a function of (position, frequency), ``angle_i = position * inv_freq[i]``
in float32, cos/sin times the rotary module's ``attention_scaling``
(:func:`inf_mllm.reference.rope_cos_sin`). The frequencies are **snapshot at** :class:`Rope`
creation (``enable``): the ones the rotary module uses for positions ``0..C-1`` (dynamic and
longrope rotaries rewrite ``inv_freq`` in place when called with long positions; the snapshot is
a copy, frozen, and the module is left as it was). The snapshot is then checked against the
module's own cos/sin over every slot below the capacity, in the form the GPU kernels compute
(angle addition inside a key block, :func:`inf_mllm.reference.rope_cos_sin_blocked`), with a
tolerance per model dtype; when it does not reproduce the module (a rotary that is not
``a * cos(p * f)``), the operator gets the module's own cos/sin table by slot instead (``kind ==
"table"``), and one line says so.

Multimodal rotary positions (M-RoPE: Qwen2-VL, Qwen2.5-VL, Qwen3-VL): the frequencies split into
sections (temporal, height, width; interleaved in Qwen3-VL) each rotated at its own position.
``sections [D/2]`` (the section of every frequency) is found by probing the module with one unit
position per section, then checked like the frequencies (at random 3-D positions); a module
that does not match is refused (a table cannot hold 3-D positions).
"""
from __future__ import annotations

import warnings
from typing import Optional, Tuple

import torch

from ._compat import rotary_cos_sin
from ._torch_path import native_rope_available
from .reference import rope_cos_sin, rope_cos_sin_blocked, rotate_half

__all__ = ["Rope", "unrotate", "RopeMismatch"]


class RopeMismatch(ValueError):
    """The rotary module is not RoPE of fixed frequencies (``a * cos(p * inv_freq)``)."""


def unrotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Inverse of ``x*cos + rotate_half(x)*sin`` (cos/sin ``[B|1, n, D]``), computed in float32."""
    y = x.float()
    c = cos.float()[:, None]
    s = sin.float()[:, None]
    return ((y * c - rotate_half(y) * s) / (c * c + s * s)).to(x.dtype)


def _tolerance(dtype: torch.dtype, max_angle: float) -> float:
    """How far the operator's cos/sin may be from the module's: the rounding of the model's own
    cos/sin in its dtype, or (float32) a few float32 roundings of the largest angle (the module's
    own ``fp32(p * f)`` and the kernel's angle addition round differently)."""
    own = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}.get(dtype, 0.0)
    return max(own, 8.0 * max_angle * 2.0 ** -24) + 1e-6


class _Frozen:
    """Calls of a rotary module that leave it as it was (dynamic/longrope variants rewrite their
    ``inv_freq`` buffer and counters in place when called with long positions)."""

    def __init__(self, rotary: torch.nn.Module):
        self.rotary = rotary

    def __enter__(self):
        r = self.rotary
        self.bufs = {n: b.detach().clone() for n, b in r.named_buffers(recurse=False) if b is not None}
        self.attrs = dict(vars(r))
        return self

    def __exit__(self, *exc):
        r = self.rotary
        with torch.no_grad():
            for n, b in r.named_buffers(recurse=False):
                if n in self.bufs and b is not None:
                    b.copy_(self.bufs[n])
        for k in [k for k in vars(r) if k not in self.attrs]:
            delattr(r, k)
        for k, v in self.attrs.items():
            if not isinstance(v, (torch.Tensor, dict)) and getattr(r, k, None) is not v:
                setattr(r, k, v)
        return False


def _mrope_sections(rotary, half: int) -> Optional[torch.Tensor]:
    """``[D/2]`` int32: the section of each frequency of a multimodal rotary module (probed with
    one unit position per section), or ``None`` when the module takes 1-D positions."""
    probe = torch.zeros(3, 1, 4, dtype=torch.long)
    probe[0, 0, 1] = probe[1, 0, 2] = probe[2, 0, 3] = 1  # token s + 1: position 1 in section s only
    try:
        with _Frozen(rotary):
            _, sin = rotary_cos_sin(rotary, probe, torch.float32, "cpu")
    except Exception:  # a 1-D rotary refuses [3, B, n] positions
        return None
    sin = sin[0, :, :half]  # [4, D/2]
    moved = sin[1:] != 0  # [3, D/2]: which frequencies each section's unit position moved
    if sin[0].abs().max() != 0 or not bool((moved.sum(0) == 1).all()):
        return None
    return moved.to(torch.int32).argmax(0).to(torch.int32)


class Rope:
    """The model's RoPE for a cache of capacity ``C``: per forward, the cos/sin the model used
    (computed by its first layer, shared by the others, with the factors that undo them:
    :meth:`at`, :meth:`undo`), and the operator's rotary input (:meth:`op_kwargs`).

    ``kind``: ``"freq"`` (the snapshot frequencies: ``inv_freq``, ``scale``), ``"table"`` (the
    module's cos/sin table by slot; ``reason`` says why) or ``"mrope"`` (frequencies with
    ``sections``; the positions come from the cache).
    """

    def __init__(self, rotary: torch.nn.Module, capacity: int, dtype: torch.dtype = torch.float32,
                 mrope: Optional[bool] = None):
        self.rotary = rotary
        self.capacity = int(capacity)
        self.dtype = dtype
        self.reason: Optional[str] = None
        self._memo = None
        self._undo = None
        self._dev: dict = {}
        self._table: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        self.inv_freq: Optional[torch.Tensor] = None
        self.scale = 1.0
        self.sections: Optional[torch.Tensor] = None
        self._snapshot(mrope)

    # ---- the snapshot and its check -------------------------------------------------------
    def _snapshot(self, mrope: Optional[bool]) -> None:
        r, C = self.rotary, self.capacity
        inv = getattr(r, "inv_freq", None)
        scale = getattr(r, "attention_scaling", 1.0)
        if not isinstance(inv, torch.Tensor) or inv.dim() != 1 or not isinstance(scale, (int, float)):
            if mrope:
                raise RopeMismatch(f"{type(r).__name__} has no 1-D inv_freq / attention_scaling to rotate at 3-D positions")
            self.kind, self.reason = "table", f"{type(r).__name__} has no 1-D inv_freq / attention_scaling"
            self._warn()
            return
        half = inv.shape[0]
        sections = _mrope_sections(r, half) if mrope is not False else None
        if mrope and sections is None:
            raise RopeMismatch(f"{type(r).__name__}: could not find the rotary section of every frequency")
        with _Frozen(r):
            if sections is None:  # the module at positions 0..C-1: the frequencies it uses there
                pos = torch.arange(C)[None]
            else:  # the slot diagonal and random 3-D positions below C
                gen = torch.Generator().manual_seed(0)
                rnd = torch.randint(0, C, (3, 1, 512), generator=gen)
                pos = torch.cat([torch.arange(C).expand(3, 1, C), rnd], dim=-1)
            ref_cos, ref_sin = rotary_cos_sin(r, pos, torch.float32, "cpu")
            with torch.inference_mode(False):  # a plain tensor even when enabled under inference_mode
                inv = r.inv_freq.detach().float().cpu().clone()
        self.inv_freq, self.scale = inv.contiguous(), float(scale)
        max_angle = float(inv.abs().max()) * C if half else 0.0
        tol = _tolerance(self.dtype, max_angle)
        if sections is None:
            cos, sin = rope_cos_sin_blocked(C, inv, self.scale)
        else:
            self.sections = sections
            cos, sin = rope_cos_sin(pos[:, 0], inv, self.scale, sections)
        err = max(float((cos - ref_cos[0]).abs().max()), float((sin - ref_sin[0]).abs().max()))
        if err <= tol:
            self.kind = "freq" if sections is None else "mrope"
            return
        where = f"max |cos/sin - module| {err:.2g} > {tol:.2g}"
        if sections is not None:
            raise RopeMismatch(f"{type(r).__name__}: its multimodal rotary frequencies do not reproduce its cos/sin ({where})")
        self.kind, self.reason = "table", f"the frequencies of {type(r).__name__} do not reproduce its cos/sin ({where})"
        self.inv_freq = None
        self._warn()

    def _warn(self) -> None:
        warnings.warn(f"inf_mllm: {self.reason}; the attention rotates keys from a table of its cos/sin by slot "
                      "instead (one load per key: slower on the GPU)", RuntimeWarning, stacklevel=4)

    # ---- the operator's rotary input ------------------------------------------------------
    def op_kwargs(self, device) -> dict:
        """Keyword arguments of ``ops.attention_with_scores`` that rotate keys and queries at their
        slots (``"freq"``/``"table"``), or the frequencies and sections of ``"mrope"`` (the caller
        adds ``rope_pos``, the cache's positions)."""
        device = torch.device(device)
        kw = self._dev.get(device)
        if kw is None:
            if self.kind == "table":
                cos, sin = self.slot_table(device)
                kw = dict(cos=cos, sin=sin)
            else:
                kw = dict(inv_freq=self.inv_freq.to(device), rope_scale=self.scale)
                if self.sections is not None:
                    kw["rope_sections"] = self.sections.to(device)
            self._dev[device] = kw
        return kw

    def slot_table(self, device) -> Tuple[torch.Tensor, torch.Tensor]:
        """The rotary module's own cos/sin ``[C, D]`` (float32) for slots ``0..C-1`` (the fallback)."""
        t = self._table
        if t is None or t[0].device != torch.device(device):
            pid = torch.arange(self.capacity, device=device)[None]
            with _Frozen(self.rotary):
                cos, sin = rotary_cos_sin(self.rotary, pid, torch.float32, device)
            self._table = t = (cos[0].contiguous(), sin[0].contiguous())
        return t

    # ---- undoing the model's rotation of this forward ---------------------------------------
    def at(self, position_ids: Optional[torch.Tensor], n: int, pos0: int, like: torch.Tensor, fresh: bool):
        """cos/sin ``[B|1, n, D]`` the model used for the ``n`` new tokens of this forward
        (``position_ids`` as the attention got them, or ``pos0 + arange(n)``). ``fresh``: compute
        them (the first layer of a forward); the other layers of the forward reuse them, with no
        comparison of Python values (which would make a compiled decode step recompile)."""
        if fresh or self._memo is None:
            if position_ids is None:
                pid = (torch.arange(n, device=like.device) + pos0)[None]
            else:
                pid = position_ids if position_ids.dim() >= 2 else position_ids[None]
                pid = pid[..., -n:]
            cos, sin = rotary_cos_sin(self.rotary, pid, like.dtype, like.device)
            c, s = cos.float()[:, None], sin.float()[:, None]  # [B|1, 1, n, D]
            norm = c * c + s * s  # 1 unless the rotary module scales cos/sin (e.g. YaRN's mscale)
            self._memo = (cos, sin)
            self._undo = ((c / norm).contiguous(), (-s / norm).contiguous())
        return self._memo

    def undo(self, x: torch.Tensor) -> torch.Tensor:
        """:func:`unrotate` of ``x [B, H, n, D]`` by the cos/sin of the last :meth:`at`, with the
        inverse factors computed once per forward (not per layer and tensor); on the CPU one
        native pass when the library has it."""
        cu, su = self._undo
        if (x.device.type == "cpu" and cu.shape[0] == 1 and x.stride(-1) == 1
                and (x.shape[-2] == 1 or x.stride(-2) == x.shape[-1]) and not torch.compiler.is_compiling()
                and native_rope_available()):
            return torch.ops.inf_mllm.rope(x, cu[0, 0], su[0, 0]).to(x.dtype)
        y = x.float()
        return (y * cu + rotate_half(y) * su).to(x.dtype)

    def forget(self) -> None:
        self._memo = self._undo = None

    def __repr__(self):
        return (f"Rope(kind={self.kind!r}, capacity={self.capacity}, scale={self.scale}"
                + (f", sections={self.sections.tolist()}" if self.sections is not None else "")
                + (f", reason={self.reason!r}" if self.reason else "") + ")")

"""Positions for rolling mode (SPEC §3): undo the model's RoPE on new tokens, and the cos/sin
table by slot that the attention operator applies on load.

The model rotates queries and keys at their stream positions before the cache sees them. In
rolling mode the cache stores keys un-rotated and the operator rotates every key at its current
slot (and the query at its slot), so :class:`Rope` gives both the exact cos/sin the model used
for a forward (to undo it) and the table of cos/sin for slots ``0..C-1``, both from the model's
own rotary module (scaled variants come for free).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ._compat import rotary_cos_sin
from ._torch_path import native_rope_available
from .reference import rotate_half

__all__ = ["Rope", "unrotate"]


def unrotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Inverse of ``x*cos + rotate_half(x)*sin`` (cos/sin ``[B|1, n, D]``), computed in float32."""
    y = x.float()
    c = cos.float()[:, None]
    s = sin.float()[:, None]
    return ((y * c - rotate_half(y) * s) / (c * c + s * s)).to(x.dtype)


class Rope:
    """cos/sin from a model's rotary module: per forward (computed by its first layer, shared by
    the others, with the factors that undo them: :meth:`undo`) and the table by slot."""

    def __init__(self, rotary: torch.nn.Module, capacity: int):
        self.rotary = rotary
        self.capacity = capacity
        self._memo = None
        self._undo = None
        self._table: Optional[Tuple[torch.Tensor, torch.Tensor]] = None

    def at(self, position_ids: Optional[torch.Tensor], n: int, pos0: int, like: torch.Tensor, fresh: bool):
        """cos/sin ``[B|1, n, D]`` the model used for the ``n`` new tokens of this forward
        (``position_ids`` as the attention got them, or ``pos0 + arange(n)``). ``fresh``: compute
        them (the first layer of a forward); the other layers of the forward reuse them, with no
        comparison of Python values (which would make a compiled decode step recompile)."""
        if fresh or self._memo is None:
            if position_ids is None:
                pid = (torch.arange(n, device=like.device) + pos0)[None]
            else:
                pid = position_ids if position_ids.dim() == 2 else position_ids[None]
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

    def slot_table(self, device) -> Tuple[torch.Tensor, torch.Tensor]:
        """cos/sin ``[C, D]`` (float32) for slots ``0..C-1``."""
        t = self._table
        if t is None or t[0].device != torch.device(device):
            pid = torch.arange(self.capacity, device=device)[None]
            cos, sin = rotary_cos_sin(self.rotary, pid, torch.float32, device)
            self._table = t = (cos[0].contiguous(), sin[0].contiguous())
        return t

    def forget(self) -> None:
        self._memo = self._undo = None

"""``KVBuffers``: the fixed-size per-layer buffers of SPEC §2 — the view a policy gets.

One object per layer holds, allocated once (``full`` alone grows them):

* ``k, v``       ``[B, Hkv, C, D]`` model dtype (un-rotated keys with rolling positions),
* ``scores``     ``[B, Hkv, C]`` float32, the policy's per-slot relevance,
* ``modality``   ``[B, Hkv, C]`` int8 (``inf_mllm.modality`` codes),
* ``position``   ``[B, Hkv, C]`` int32, each token's original stream position,
* ``length``     ``[B]`` int32 on the device: valid slots per row; ``lengths`` is its host copy
  (a Python list kept in step by every method here, so reading it never syncs the device).

The one per-row counter is the number of valid slots (``length``/``lengths``). Tokens fed per
row (``fed``, device ``[B]`` int64) is a different quantity: the original position of the
row's next real token.

Policies read every buffer, and change them only through the methods here: :meth:`reset_scores`,
:meth:`decay_scores`, :meth:`grow` and :meth:`compact` (the only way tokens leave). ``state``
is the policy's own per-layer state (what ``Policy.new_state`` returned).
"""
from __future__ import annotations

import copy
from typing import Any, Dict, List, Optional, Sequence

import torch

from . import ops

__all__ = ["KVBuffers", "OWNER_ATTR"]

#: attribute of the key buffer that names its owner (the cache layer), so the attention
#: function finds the layer from the key tensor it receives
OWNER_ATTR = "_inf_mllm_layer"


def _static(*tensors) -> None:
    """Tag buffers as fixed addresses, so a compiled decode step updates them in place and can be
    captured in a CUDA graph (``torch.compile(mode="reduce-overhead")``)."""
    if not torch.compiler.is_compiling():
        for t in tensors:
            torch._dynamo.mark_static_address(t)


class KVBuffers:
    #: the per-slot tensors, each ``[B, Hkv, C(, D)]`` with the slot axis at dim 2, by attribute name:
    #: the one list that clone, grow, save/load (``inf_mllm.persist``), beam reorder and batch select
    #: go through, so a tensor added here (and allocated in ``_alloc``) is handled by all of them
    SLOT_TENSORS = ("k", "v", "scores", "modality", "position")
    #: the per-row device tensors ``[B]``
    ROW_TENSORS = ("length", "fed")
    #: slot tensors that start at zero (new tokens add to them); the others start uninitialised
    ZEROED = ("scores",)

    def __init__(self, batch: int, heads: int, capacity: int, head_dim: int, dtype: torch.dtype, device,
                 state: Any = None, owner: Any = None, mrope: bool = False):
        if capacity < 1:
            raise ValueError(f"inf_mllm: buffer capacity must be >= 1, got {capacity}")
        self.owner = owner
        #: multimodal rotary positions (inf_mllm.mrope): per slot the 3-D positions and the unit
        #: metadata, per (row, KV head) the shift of new tokens; registered like the rest
        self.mrope = bool(mrope)
        self.rolling = False  # (M-RoPE) lay kept units out again after each eviction: set by the cache
        if self.mrope:
            from .mrope import MROPE_SLOTS

            self.SLOT_TENSORS = KVBuffers.SLOT_TENSORS + MROPE_SLOTS
            self.ROW_TENSORS = KVBuffers.ROW_TENSORS + ("mshift",)
        self.dtype = dtype
        self.device = torch.device(device)
        self._alloc(batch, heads, capacity, head_dim)
        self.length = torch.zeros(batch, dtype=torch.int32, device=self.device)
        self.lengths: List[int] = [0] * batch
        self.fed = torch.zeros(batch, dtype=torch.long, device=self.device)
        if self.mrope:
            self.mshift = torch.zeros(batch, heads, dtype=torch.int32, device=self.device)
        self.evictions = 0
        self.state = state
        _static(self.length, self.fed)

    def _alloc(self, B, H, C, D):
        dev = self.device
        # slots >= length are never read (the operators' contract), so only the scores, which new
        # tokens add to, start at zero; the rest is touched (and paid for) as it fills
        self.k = torch.empty(B, H, C, D, dtype=self.dtype, device=dev)
        self.v = torch.empty(B, H, C, D, dtype=self.dtype, device=dev)
        self.scores = torch.zeros(B, H, C, dtype=torch.float32, device=dev)
        self.modality = torch.empty(B, H, C, dtype=torch.int8, device=dev)
        self.position = torch.empty(B, H, C, dtype=torch.int32, device=dev)
        if self.mrope:  # the three position tensors are views of one [3, B, H, C] (the operator's rope_pos)
            self._mpos = torch.empty(3, B, H, C, dtype=torch.int32, device=dev)
            self.mpos_t, self.mpos_h, self.mpos_w = self._mpos.unbind(0)
            for name in ("unit", "ubase", "uadv"):
                setattr(self, name, torch.empty(B, H, C, dtype=torch.int32, device=dev))
        setattr(self.k, OWNER_ATTR, self.owner)
        _static(self.k, self.v, self.scores, self.modality, self.position,
                *((self._mpos, self.unit, self.ubase, self.uadv) if self.mrope else ()))

    # ---- shape -------------------------------------------------------------------------
    @property
    def batch(self) -> int:
        return self.k.shape[0]

    @property
    def heads(self) -> int:
        return self.k.shape[1]

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def max_length(self) -> int:
        return max(self.lengths) if self.lengths else 0

    def tensors(self):
        return (*self.slot_tensors().values(), *self.row_tensors().values())

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def clone(self, owner: Any = None) -> "KVBuffers":
        """An independent copy (tensors, counters, policy state) owned by ``owner``."""
        new = copy.copy(self)
        new.owner = owner
        for name, t in {**self.slot_tensors(), **self.row_tensors()}.items():
            setattr(new, name, t.clone())
        new._tag()
        new.lengths = list(self.lengths)
        new.state = copy.deepcopy(self.state)
        return new

    # ---- the registry: what save/load, clone and row selection go through ----------------
    def slot_tensors(self) -> Dict[str, torch.Tensor]:
        """``{name: tensor}`` of the per-slot tensors (:attr:`SLOT_TENSORS`), slot axis at dim 2."""
        return {name: getattr(self, name) for name in self.SLOT_TENSORS}

    def row_tensors(self) -> Dict[str, torch.Tensor]:
        """``{name: tensor}`` of the per-row device tensors ``[B]`` (:attr:`ROW_TENSORS`)."""
        return {name: getattr(self, name) for name in self.ROW_TENSORS}

    def _tag(self) -> None:
        """What a fresh tensor needs (after clone, grow, a batch change or a load): the key buffer
        names its owner (else the attention would not find the layer), addresses are static."""
        setattr(self.k, OWNER_ATTR, self.owner)
        if self.mrope and self.mpos_t.data_ptr() != self._mpos.data_ptr():  # replaced one by one: one tensor again
            self._mpos = torch.stack([self.mpos_t, self.mpos_h, self.mpos_w])
            self.mpos_t, self.mpos_h, self.mpos_w = self._mpos.unbind(0)
        _static(*self.slot_tensors().values(), *self.row_tensors().values())

    def rope_pos(self, rows: Optional[slice] = None) -> torch.Tensor:
        """The stored 3-D positions ``[3, b, Hkv, C]`` int32 (contiguous) of ``rows`` (default all)."""
        if self.mpos_t.data_ptr() != self._mpos.data_ptr():
            self._tag()
        if rows is None or (rows.start in (0, None) and rows.stop in (None, self.batch)):
            return self._mpos
        return self._mpos[:, rows].contiguous()

    def to_json(self) -> Dict[str, Any]:
        """The host state (JSON): shape, ``lengths``, ``evictions`` and the policy's ``state``
        (JSON-serialisable by the Policy contract)."""
        return {"batch": self.batch, "heads": self.heads, "capacity": self.capacity, "head_dim": self.k.shape[-1],
                "dtype": str(self.dtype).replace("torch.", ""), "lengths": list(self.lengths),
                "evictions": self.evictions, "state": self.state, "mrope": self.mrope}

    def from_json(self, d: Dict[str, Any]) -> None:
        """Restore the host state written by :meth:`to_json` (the tensors are copied separately)."""
        self.lengths = [int(x) for x in d["lengths"]]
        self.evictions = int(d["evictions"])
        self.state = d["state"]

    def select_rows(self, rows: Sequence[int], state: Any) -> None:
        """Keep batch rows ``rows``, in that order; a row may repeat (beam search reorders, repeats
        and drops rows). Every registered tensor moves along, and ``lengths``; ``state`` is the
        policy's state for the new rows. The same batch size: in place (the buffers keep their
        addresses, as a compiled step needs); another: new buffers."""
        rows = [int(b) for b in rows]
        if any(not 0 <= b < self.batch for b in rows) or not rows:
            raise ValueError(f"inf_mllm: row indices {rows} out of range for a batch of {self.batch}")
        idx = torch.tensor(rows, dtype=torch.long, device=self.device)
        if len(rows) == self.batch:
            L = self.max_length()  # slots past every row's length are never read: not moved
            for t in self.slot_tensors().values():
                t[:, :, :L] = t[:, :, :L].index_select(0, idx)
            for t in self.row_tensors().values():
                t.copy_(t.index_select(0, idx))
        else:
            for name, t in {**self.slot_tensors(), **self.row_tensors()}.items():
                setattr(self, name, t.index_select(0, idx))
            self._tag()
        self.lengths = [self.lengths[b] for b in rows]
        self.state = state

    # ---- writes ------------------------------------------------------------------------
    def append(self, kn: torch.Tensor, vn: torch.Tensor, modality: int, rows: Optional[slice] = None,
               count: bool = True, mrope=None) -> None:
        """Write ``m`` new tokens ``kn, vn [b, Hkv, m, D]`` at slots ``length..length+m-1`` of
        ``rows`` (default all), tag them, record their stream positions, advance the counters
        (the host copy ``lengths`` too, unless ``count=False``: the caller does it later)."""
        g = slice(None) if rows is None else rows
        idx = range(self.batch)[g]
        length, fed = self.length[g], self.fed[g]
        m = kn.shape[2]
        # eager, the usual case (every row at the same slot): plain slices. Compiled: tensor indices
        # only, so that no slot number becomes part of the graph (it would recompile every step)
        starts = None if torch.compiler.is_compiling() or not count else {self.lengths[b] for b in idx}
        if starts is not None and len(starts) == 1:
            L = starts.pop()
            sl = slice(L, L + m)
            self.k[g, :, sl] = kn
            self.v[g, :, sl] = vn
            # stream positions fed .. fed + m - 1 (a decode step: fed itself, cast on the copy)
            self.position[g, :, sl] = fed[:, None, None] if m == 1 else (
                fed[:, None] + torch.arange(m, device=kn.device)).to(torch.int32)[:, None, :]
            self.modality[g, :, sl] = modality
        else:  # compiled, or ragged rows (after a padded prefill)
            pos = (fed[:, None] + torch.arange(m, device=kn.device)).to(torch.int32)[:, None, :]  # [b, 1, m]
            slots = length.long()[:, None] + torch.arange(m, device=kn.device)  # [b, m]
            bidx = torch.arange(kn.shape[0], device=kn.device)[:, None]
            self.k[g][bidx, :, slots] = kn.permute(0, 2, 1, 3)
            self.v[g][bidx, :, slots] = vn.permute(0, 2, 1, 3)
            self.position[g][bidx, :, slots] = pos.permute(0, 2, 1)
            self.modality[g][bidx, :, slots] = modality
        if self.mrope:
            self._write_mrope(mrope, g, idx, m)
        fed += m
        length += m
        if count:
            for b in idx:
                self.lengths[b] += m

    def _write_mrope(self, fwd, g, idx, m: int) -> None:
        """The 3-D positions (the model's own minus the row and head's shift) and unit metadata of
        the ``m`` tokens just written at ``length..`` of rows ``g`` (an ``inf_mllm.mrope.Forward``)."""
        if fwd is None:
            raise RuntimeError("inf_mllm: an M-RoPE cache got tokens without their 3-D positions (a forward that did "
                               "not go through the model's language model)")
        shift = self.mshift[g][:, :, None]  # [b, Hkv, 1]
        H = self.heads
        for j, b in enumerate(idx):
            L = self.lengths[b] if not torch.compiler.is_compiling() else None
            sl = slice(L, L + m)
            for s, name in enumerate(("mpos_t", "mpos_h", "mpos_w")):
                getattr(self, name)[b, :, sl] = fwd.pos[s, j].to(torch.int32)[None] - shift[j]
            self.unit[b, :, sl] = fwd.unit[j][None].expand(H, m)
            self.ubase[b, :, sl] = fwd.ubase[j][None] - shift[j]
            self.uadv[b, :, sl] = fwd.uadv[j][None].expand(H, m)
            self.modality[b, :, sl] = fwd.modality[j][None].expand(H, m)

    def grow(self, needed: int) -> None:
        """Enlarge the buffers to at least ``needed`` slots (policy ``full`` only)."""
        C = self.capacity
        new_c = max(needed, 2 * C)
        for name, src in self.slot_tensors().items():
            make = torch.zeros if name in self.ZEROED else torch.empty
            dst = make((*src.shape[:2], new_c, *src.shape[3:]), dtype=src.dtype, device=src.device)
            dst[:, :, :C] = src
            setattr(self, name, dst)
        self._tag()

    def reset_scores(self, rows: Sequence[int]) -> None:
        for b in rows:
            self.scores[b].zero_()

    # ---- eviction: the one way tokens leave ---------------------------------------------
    def compact(self, rows: Sequence[int], budget: int, n_sink: int, n_recent: int, *,
                rank: Optional[torch.Tensor] = None, keep_scores: bool = False) -> None:
        """Evict ``rows`` that hold more than ``budget`` slots down to ``budget`` (``ops.compact_``):
        keep ``[0, n_sink)``, the last ``n_recent`` slots and the best-ranked slots between, in
        order; metadata moves along; ``lengths`` follow.

        ``rank`` (``[B, Hkv, C]`` float32, rows indexed like the buffers; consumed): rank by it
        instead of by ``scores``. ``keep_scores``: the scores move with their tokens (else zeroed).
        """
        rows = [b for b in rows if self.lengths[b] > budget]
        if not rows:
            return
        over_all = [b for b in range(self.batch) if self.lengths[b] > budget]
        # one call when every row over budget is concerned (compact_ skips the others itself)
        groups = [slice(0, self.batch)] if rows == over_all else [slice(b, b + 1) for b in rows]
        for g in groups:
            extras = [self.modality[g], self.position[g]]
            # every other registered slot tensor (M-RoPE's positions, a policy's own) moves with its token
            extras += [getattr(self, name)[g] for name in self.SLOT_TENSORS[len(KVBuffers.SLOT_TENSORS):]]
            if rank is None:
                by, reset = self.scores[g], not keep_scores
            else:
                by, reset = rank[g], True
                if keep_scores:
                    extras.append(self.scores[g])
            ops.compact_(self.k[g], self.v[g], by, self.length[g], budget=budget, n_sink=n_sink,
                         n_recent=n_recent, reset_scores=reset, extras=extras,
                         check_values=False)  # lengths are tracked on the host: no device sync per layer
            if rank is not None:
                if keep_scores:
                    self.scores[g][:, :, budget:].zero_()  # extras are moved, not cleared past budget
                else:
                    self.scores[g].zero_()
        for b in rows:
            self.lengths[b] = budget
        if self.mrope and self.rolling:
            from .mrope import relayout

            relayout(self, rows, budget)
        self.evictions += 1

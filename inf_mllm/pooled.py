"""A KV budget pooled over every layer and KV head (docs/method.md §9.4; the ``kvzip`` policy).

SPEC §2's buffers give every head of a layer the same length. Here each batch row has one **pool**
of ``P`` slots shared by all layers and KV heads, and each (layer, KV head) holds the list of its
slots in stream order (a page table with pages of one slot):

* ``k, v``      ``[B, P, D]`` model dtype (un-rotated keys: rolling positions, RoPE by slot),
* ``score``     ``[B, P]`` float32, the policy's score of the token in the slot,
* ``position``  ``[B, P]`` int64, the token's stream position,
* per layer ``table [B, Hkv, W]`` int64 and ``lens`` (host ``[B][Hkv]``): head ``h`` of layer ``l``
  holds the tokens in slots ``table[b, h, :lens[b][h]]``, its ``j``-th at rolling position ``j``.

``P = n_layers * Hkv * (budget + head_room)``: after every cut the row holds ``n_layers * Hkv *
budget`` slots, so one chunk and its probe always fit, however the heads share them. The memory
is fixed when the cache is made (the tables alone grow, a few bytes per held token).

Attention of layer ``l``: the new tokens take free slots, then each KV head is one row of the
operator (``ops.attention_with_scores`` with ``B * Hkv`` rows of one KV head each, the row's keys
gathered from the pool in table order, its own length): SPEC §4.1 exactly, per head.

The cut (after a forward, or when ``deferred_eviction`` ends): every head keeps its ``n_sink``
first and ``n_recent`` last tokens; of the rest, the ``n_layers * Hkv * budget`` minus those
protected slots with the best scores over all heads and layers are kept (ties to the earlier
layer, head, slot), the others' slots return to the row's free list.
"""
from __future__ import annotations

import copy
from typing import List, Optional

import torch

from . import ops, reference
from .buffers import OWNER_ATTR

__all__ = ["Pool", "PooledLayerState"]


class Pool:
    """The shared slots of every row (see the module docstring)."""

    def __init__(self, batch: int, slots: int, head_dim: int, dtype, device):
        self.batch, self.slots = batch, slots
        self.k = torch.empty(batch, slots, head_dim, dtype=dtype, device=device)
        self.v = torch.empty(batch, slots, head_dim, dtype=dtype, device=device)
        self.score = torch.zeros(batch, slots, dtype=torch.float32, device=device)
        self.position = torch.zeros(batch, slots, dtype=torch.long, device=device)
        self.free: List[List[int]] = [list(range(slots - 1, -1, -1)) for _ in range(batch)]  # a stack per row
        self.evictions = 0

    def take(self, b: int, m: int) -> List[int]:
        f = self.free[b]
        if m > len(f):
            raise RuntimeError(f"inf_mllm: the pool of row {b} has {len(f)} free slots, {m} are needed (a forward of "
                               "more tokens than one chunk and its probe: feed long inputs with inf_mllm.stream)")
        out = f[len(f) - m:]
        del f[len(f) - m:]
        return out

    def give(self, b: int, idx: List[int]) -> None:
        self.free[b].extend(idx)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.score, self.position))

    def clone(self) -> "Pool":
        new = copy.copy(self)
        new.k, new.v, new.score, new.position = (t.clone() for t in (self.k, self.v, self.score, self.position))
        new.free = [list(f) for f in self.free]
        return new


def _flat(pool: Pool, slots: torch.Tensor) -> torch.Tensor:
    """Slot numbers ``[B, ...]`` of each row's pool as indices into the pool flattened over rows."""
    B = slots.shape[0]
    return (slots + torch.arange(B, device=slots.device).view(B, *([1] * (slots.dim() - 1))) * pool.slots).reshape(-1)


class PooledLayerState:
    """One layer's view of the pool: its tables and lengths (host), and the shim ``k``/``v`` that the
    transformers layer returns from ``update`` (so the attention function finds the layer)."""

    def __init__(self, owner, batch: int, heads: int, head_dim: int, dtype, device, width: int):
        self.owner = owner
        self.heads = heads
        self.table = torch.zeros(batch, heads, width, dtype=torch.long, device=device)
        self.lens = [[0] * heads for _ in range(batch)]
        self.k = torch.empty(batch, heads, 0, head_dim, dtype=dtype, device=device)
        self.v = torch.empty(batch, heads, 0, head_dim, dtype=dtype, device=device)
        setattr(self.k, OWNER_ATTR, owner)
        self.probed_upto = [0] * batch  # tokens fed when the last probe ran (the next probe scores the rest)

    @property
    def batch(self) -> int:
        return self.table.shape[0]

    def clone(self, owner) -> "PooledLayerState":
        new = copy.copy(self)
        new.owner = owner
        new.table = self.table.clone()
        new.lens = [list(r) for r in self.lens]
        new.probed_upto = list(self.probed_upto)
        new.k, new.v = self.k.clone(), self.v.clone()
        setattr(new.k, OWNER_ATTR, owner)
        return new

    @property
    def lengths(self) -> List[int]:
        """Per row, the most tokens any head of the layer holds."""
        return [max(r) for r in self.lens]

    def held(self) -> int:
        return sum(sum(r) for r in self.lens)

    def _room(self, need: int) -> None:
        W = self.table.shape[2]
        if need > W:
            grown = torch.zeros(self.table.shape[0], self.heads, max(need, 2 * W), dtype=torch.long,
                                device=self.table.device)
            grown[:, :, :W] = self.table
            self.table = grown

    def append(self, pool: Pool, kn, vn, first_pos) -> torch.Tensor:
        """Write ``kn, vn [B, Hkv, n, D]`` into free slots at the end of every head; returns their
        slots ``[B, Hkv, n]``."""
        B, H, n, D = kn.shape
        self._room(max(max(r) for r in self.lens) + n)
        slots = torch.tensor([[pool.take(b, H * n)] for b in range(B)], dtype=torch.long).view(B, H, n)
        slots = slots.to(self.table.device)
        flat = _flat(pool, slots)
        pool.k.view(-1, D).index_copy_(0, flat, kn.detach().reshape(-1, D).to(pool.k.dtype))
        pool.v.view(-1, D).index_copy_(0, flat, vn.detach().reshape(-1, D).to(pool.v.dtype))
        pool.score.view(-1).index_fill_(0, flat, 0.0)
        pos = torch.arange(n, device=slots.device) + torch.as_tensor(first_pos, device=slots.device).view(B, 1, 1)
        pool.position.view(-1).index_copy_(0, flat, pos.expand(B, H, n).reshape(-1))
        for b in range(B):
            for h in range(H):
                L = self.lens[b][h]
                self.table[b, h, L:L + n] = slots[b, h]
                self.lens[b][h] = L + n
        return slots

    def drop_last(self, pool: Pool, n: int) -> None:
        """Take the last ``n`` tokens of every head out again (a probe's), their slots freed."""
        for b in range(self.batch):
            for h in range(self.heads):
                L = self.lens[b][h]
                pool.give(b, self.table[b, h, L - n:L].tolist())
                self.lens[b][h] = L - n

    def gathered(self, pool: Pool):
        """``(k, v, length, slots, flat)``: every (row, head) as one operator row ``[B*Hkv, 1, Lmax, D]``,
        its tokens in table order, ``length [B*Hkv]`` int32, ``slots [B, Hkv, Lmax]`` and their
        indices into the flattened pool."""
        B, H = self.batch, self.heads
        Lmax = max(max(r) for r in self.lens)
        slots = self.table[:, :, :Lmax]
        flat = _flat(pool, slots)
        D = pool.k.shape[-1]
        k = pool.k.view(-1, D).index_select(0, flat).view(B * H, 1, Lmax, D)
        v = pool.v.view(-1, D).index_select(0, flat).view(B * H, 1, Lmax, D)
        length = torch.tensor([L for r in self.lens for L in r], dtype=torch.int32, device=slots.device)
        return k, v, length, slots, flat


def attend(state: PooledLayerState, pool: Pool, q, kn, vn, scaling, rope: dict, first_pos, probe: bool,
           score: bool = True, roll: bool = True):
    """One layer's attention over the pool (the module docstring): returns ``[B, Hq, n, D]``.
    A forward outside a probe scores its own new tokens (their peak probability from its queries)
    unless ``score`` is false (a chunk whose probe follows: it would overwrite them); a probe
    scores the tokens fed since the last probe, then leaves. ``roll=False``: RoPE at every token's
    stream position instead of its slot (valid inside the model's trained context only)."""
    B, Hq, n, D = q.shape
    H = state.heads
    G = Hq // H
    new = state.append(pool, kn, vn, first_pos)
    k, v, length, slots, flat = state.gathered(pool)
    if not roll:  # every token at its stream position (one rotary section: every frequency's)
        pos = pool.position.view(-1).index_select(0, flat).to(torch.int32).view(1, B * H, 1, -1)
        rope = dict(rope, rope_pos=pos, rope_sections=torch.zeros(D // 2, dtype=torch.int32, device=pos.device))
    qr = q.reshape(B, H, G, n, D).reshape(B * H, G, n, D)
    out = ops.attention_with_scores(qr, k, v, length, None, scale=scaling, window=0, **rope, check_values=False)
    if not (probe or score):
        return out.view(B, H, G, n, D).reshape(B, Hq, n, D)
    with torch.no_grad():
        peak = reference.probe_attention_max(qr.detach(), k, length, scale=scaling, **rope).view(B, H, -1)  # [B, Hkv, Lmax]
    if probe:
        state.drop_last(pool, n)
        for b in range(B):
            for h in range(H):
                L = state.lens[b][h]
                sl = slots[b, h, :L]
                fresh = pool.position[b, sl] >= state.probed_upto[b]
                pool.score[b, sl] = torch.where(fresh, peak[b, h, :L], pool.score[b, sl])
    else:
        for b in range(B):
            for h in range(H):
                L = state.lens[b][h]
                pool.score[b, new[b, h]] = peak[b, h, L - n:L]
    return out.view(B, H, G, n, D).reshape(B, Hq, n, D)


def cut(states: List[PooledLayerState], pool: Pool, budget: int, n_sink: int, n_recent: int,
        rows: Optional[List[int]] = None) -> None:
    """The pooled cut of each row over ``n_layers * Hkv * budget`` slots (the module docstring)."""
    for b in range(pool.batch) if rows is None else rows:
        heads = [(st, h) for st in states for h in range(st.heads)]
        lens = [st.lens[b][h] for st, h in heads]
        total = budget * len(heads)
        if sum(lens) <= total:
            continue
        W = max(lens)
        dev = pool.score.device
        tbl = torch.zeros(len(heads), W, dtype=torch.long, device=dev)
        for i, (st, h) in enumerate(heads):
            tbl[i, :lens[i]] = st.table[b, h, :lens[i]]
        L = torch.tensor(lens, device=dev)[:, None]
        j = torch.arange(W, device=dev)[None]
        valid = j < L
        protected = valid & ((j < n_sink) | (j >= L - n_recent))
        middle = valid & ~protected
        n_keep = max(total - int(protected.sum()), 0)
        s = pool.score[b][tbl].masked_fill(~middle, float("-inf"))
        order = torch.sort(s.reshape(-1), descending=True, stable=True).indices[:n_keep]
        keep = protected.clone()
        keep.view(-1)[order] = True
        keep &= valid
        gone = valid & ~keep
        pool.give(b, tbl[gone].tolist())
        pool.evictions += 1
        for i, (st, h) in enumerate(heads):
            kept = tbl[i][keep[i]]
            st.table[b, h, :kept.numel()] = kept
            st.lens[b][h] = int(kept.numel())

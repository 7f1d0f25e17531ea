"""Naive PyTorch references for the two operators of SPEC §4.

These are written for clarity, not speed: a loop over batch rows, a full softmax, a
sort-and-gather compaction. The tests compare the fast paths (C++/CUDA/Triton and the
vectorised CPU path) against them; users can call them to check their own results.

They compute in the dtype of their inputs (pass float64 tensors for a gold reference),
except that ``scores`` is always accumulated in its own dtype (float32 in the fast ops).
Unlike the public ops they do no argument checking beyond what indexing enforces.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Llama/transformers convention: ``cat(-x2, x1)`` for the two halves of the last dim."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` with ``cos``/``sin`` broadcast against ``x``."""
    return x * cos + rotate_half(x) * sin


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, scale: float = 1.0,
                 sections: Optional[torch.Tensor] = None, dtype: torch.dtype = torch.float32):
    """RoPE as one function of (position, frequency) (SPEC §3): ``cos, sin [..., D]`` with
    ``angle[..., i] = position * inv_freq[i]`` computed in ``dtype`` (float32: what transformers'
    rotary modules compute; float64: the exact rotation, for gold references), times ``scale``
    (the rotary module's ``attention_scaling``), both halves equal (``rotate_half`` convention).

    ``positions``: ``[...]`` integers (1-D RoPE), or ``[S, ...]`` with ``sections [D/2]`` giving
    the section (0..S-1) of every frequency (multimodal rotary positions: temporal, height,
    width): frequency ``i`` is rotated at ``positions[sections[i]]``.
    """
    f = inv_freq.to(dtype)
    if sections is None:
        ang = positions.to(dtype)[..., None] * f
    else:
        sec = sections.long().to(positions.device)
        p = positions.to(dtype).movedim(0, -1)  # [..., S]
        ang = p[..., sec] * f  # [..., D/2]: frequency i at its section's position
    ang = torch.cat((ang, ang), dim=-1)
    return ang.cos() * scale, ang.sin() * scale


#: key block of the GPU kernels' angle addition that :func:`rope_cos_sin_blocked` models
ROPE_BLOCK = 64


def rope_cos_sin_blocked(C: int, inv_freq: torch.Tensor, scale: float = 1.0, block: int = ROPE_BLOCK):
    """:func:`rope_cos_sin` at slots ``0..C-1`` (float32) as the GPU kernels compute it, without a
    sine or cosine per key: slot ``j = j0 + o`` of a key block starting at ``j0`` combines the
    block start's angle with the in-block offset's by angle addition,
    ``cos(j0 f + o f) = cos(j0 f) cos(o f) - sin(j0 f) sin(o f)`` (and likewise the sine), each
    factor from a float32 angle. The cache checks this form against the model's rotary module."""
    f = inv_freq.float()
    j = torch.arange(C)
    j0, o = (j // block) * block, j % block
    a0, a1 = j0.float()[:, None] * f, o.float()[:, None] * f
    c0, s0, c1, s1 = a0.cos(), a0.sin(), a1.cos(), a1.sin()
    cos, sin = c0 * c1 - s0 * s1, s0 * c1 + c0 * s1
    return torch.cat((cos, cos), -1) * scale, torch.cat((sin, sin), -1) * scale


def _rope_for_row(b: int, L: int, n: int, dtype, cos, sin, inv_freq, rope_scale, rope_pos, rope_sections, device):
    """cos/sin of row ``b``'s keys ``[Hkv | 1, L, D]`` and queries ``[Hkv | 1, n, D]`` (queries sit at
    the slots of the row's ``n`` last keys), or ``None`` without RoPE."""
    if cos is not None:
        t = torch.arange(L - n, L, device=device)
        return cos[:L].to(dtype)[None], sin[:L].to(dtype)[None], cos[t].to(dtype)[None], sin[t].to(dtype)[None]
    if inv_freq is None:
        return None
    if rope_pos is None:
        pos = torch.arange(L, device=device)[None]  # position = slot
        kc, ks = rope_cos_sin(pos, inv_freq, rope_scale, dtype=dtype)
    else:
        kc, ks = rope_cos_sin(rope_pos[:, b, :, :L], inv_freq, rope_scale, rope_sections, dtype=dtype)  # [Hkv, L, D]
    return kc, ks, kc[:, L - n :], ks[:, L - n :]


def rotate_row(qb, kb, b: int, L: int, n: int, G: int, cos=None, sin=None, inv_freq=None, rope_scale: float = 1.0,
               rope_pos=None, rope_sections=None):
    """Row ``b``'s queries ``qb [Hq, n, D]`` and keys ``kb [Hkv, L, D]`` rotated at their slots (or
    stored positions) as the operators do, in the dtype of ``qb``; unchanged without RoPE."""
    rot = _rope_for_row(b, L, n, qb.dtype, cos, sin, inv_freq, rope_scale, rope_pos, rope_sections, qb.device)
    if rot is None:
        return qb, kb
    kc, ks, qc, qs = rot
    return (apply_rope(qb, qc.repeat_interleave(G, dim=0) if qc.shape[0] > 1 else qc,
                       qs.repeat_interleave(G, dim=0) if qs.shape[0] > 1 else qs), apply_rope(kb, kc, ks))


def attention_with_scores_ref(
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
) -> torch.Tensor:
    """SPEC §4.1 computed the obvious way. Updates ``scores`` in place; returns ``out``.

    RoPE (rolling positions), either the ``cos, sin [>=C, D]`` tables by slot, or the frequencies
    ``inv_freq [D/2]`` with ``rope_scale`` (:func:`rope_cos_sin`, angles in the dtype of ``q``): at
    the slot of each key and query, or with ``rope_pos [S, B, Hkv, C]`` and ``rope_sections [D/2]``
    at each slot's stored positions (a query at the positions of its own slot, per KV head).

    When the call scores (``scores`` given and ``window > 0``), the valid slots ``j < length[b]``
    of ``scores`` are first multiplied by ``decay``; then each of the last ``min(window, n)``
    queries ``i`` (at slot ``t_i``) adds ``mean_g p[.., i, j] + bias_ij`` for ``j <= t_i``, with
    ``bias_ij = bias * j`` (``bias_mode="absolute"``) or ``bias * (j + 1) / (t_i + 1) ** 2``
    (``"relative"``).
    """
    if bias_mode not in ("absolute", "relative"):
        raise ValueError(f"unknown bias_mode {bias_mode!r}")
    B, Hq, n, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    scale = D ** -0.5 if scale is None else scale
    out = torch.zeros_like(q)
    for b in range(B):
        L = int(length[b])
        t = torch.arange(L - n, L, device=q.device)  # slot of each query
        qb = q[b]  # [Hq, n, D]
        kb = k[b, :, :L]  # [Hkv, L, D]
        vb = v[b, :, :L]
        qb, kb = rotate_row(qb, kb, b, L, n, G, cos, sin, inv_freq, rope_scale, rope_pos, rope_sections)
        kb = kb.repeat_interleave(G, dim=0)  # [Hq, L, D]
        vb = vb.repeat_interleave(G, dim=0)
        logits = (qb @ kb.transpose(-1, -2)) * scale  # [Hq, n, L]
        j = torch.arange(L, device=q.device)
        causal = j[None, :] <= t[:, None]  # [n, L]
        logits = logits.masked_fill(~causal, float("-inf"))
        p = torch.softmax(logits, dim=-1)
        out[b] = p @ vb
        if scores is not None and window > 0:
            scores[b, :, :L] *= decay
            for i in range(max(0, n - window), n):
                ti = int(t[i])
                row = p[:, i, : ti + 1].reshape(Hkv, G, ti + 1).mean(dim=1)  # [Hkv, ti+1]
                jj = j[: ti + 1].to(row.dtype)
                if bias_mode == "absolute":
                    row = row + bias * jj
                else:
                    row = row + bias * (jj + 1) / (ti + 1) ** 2
                scores[b, :, : ti + 1] += row.to(scores.dtype)
    return out


def probe_attention_max(q: torch.Tensor, k: torch.Tensor, length: torch.Tensor, *, scale: Optional[float] = None,
                        cos=None, sin=None, inv_freq=None, rope_scale: float = 1.0, rope_pos=None,
                        rope_sections=None) -> torch.Tensor:
    """``[B, Hkv, C]`` float32: for every slot ``j < length[b]``, the largest attention probability any
    of the ``n`` queries ``q [B, Hq, n, D]`` (at the row's last ``n`` slots, causal, RoPE as in
    :func:`attention_with_scores_ref`) or any query head of its GQA group gives it; 0 past the length.
    (A probe's per-slot peak, KVzip's max over queries and heads; not part of SPEC §4.1.)"""
    B, Hq, n, D = q.shape
    Hkv, C = k.shape[1], k.shape[2]
    G = Hq // Hkv
    scale = D ** -0.5 if scale is None else scale
    out = torch.zeros(B, Hkv, C, dtype=torch.float32, device=q.device)
    for b in range(B):
        L = int(length[b])
        qb, kb = rotate_row(q[b].float(), k[b, :, :L].float(), b, L, n, G, cos, sin, inv_freq, rope_scale, rope_pos,
                            rope_sections)
        logits = (qb.reshape(Hkv, G * n, D) @ kb.transpose(-1, -2)).reshape(Hkv, G, n, L) * scale
        t = torch.arange(L - n, L, device=q.device)
        causal = torch.arange(L, device=q.device)[None, :] <= t[:, None]  # [n, L]
        p = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)
        out[b, :, :L] = p.amax(dim=(1, 2))
    return out


def compact_ref_(
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
) -> Optional[torch.Tensor]:
    """SPEC §4.2 by sort and gather. In place; returns kept slots ``[B, Hkv, budget]`` if asked.

    Rows with ``length <= budget`` are untouched and report ``arange(budget)``.
    """
    B, Hkv, C, _ = k.shape
    idx_out = torch.arange(budget, device=k.device).expand(B, Hkv, budget).clone()
    n_mid = budget - n_sink - n_recent
    for b in range(B):
        L = int(length[b])
        if L <= budget:
            continue
        for h in range(Hkv):
            mid = torch.arange(n_sink, L - n_recent, device=k.device)
            s = scores[b, h, n_sink : L - n_recent]
            # stable descending sort: equal scores keep slot order, so ties go to the lower slot
            order = torch.sort(s, descending=True, stable=True).indices[:n_mid]
            keep = torch.cat(
                [
                    torch.arange(n_sink, device=k.device),
                    mid[order],
                    torch.arange(L - n_recent, L, device=k.device),
                ]
            ).sort().values
            idx_out[b, h] = keep
            k[b, h, :budget] = k[b, h, keep].clone()
            v[b, h, :budget] = v[b, h, keep].clone()
            for e in extras:
                e[b, h, :budget] = e[b, h, keep].clone()
            if reset_scores:
                scores[b, h].zero_()
            else:
                kept_scores = scores[b, h, keep].clone()
                scores[b, h].zero_()
                scores[b, h, :budget] = kept_scores
        length[b] = budget
    return idx_out if return_indices else None

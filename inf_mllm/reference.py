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
) -> torch.Tensor:
    """SPEC §4.1 computed the obvious way. Updates ``scores`` in place; returns ``out``.

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
        if cos is not None:
            qb = apply_rope(qb, cos[t].to(qb.dtype), sin[t].to(qb.dtype))
            kb = apply_rope(kb, cos[:L].to(kb.dtype), sin[:L].to(kb.dtype))
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

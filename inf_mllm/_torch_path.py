"""Vectorised PyTorch implementation of ``attention_with_scores`` (SPEC §4.1).

Used for CPU tensors (and as a fallback where Triton is unavailable). Same semantics as the
Triton kernels; no Python loop over rows or tokens. Logits, softmax and scores are computed in
float32 (float64 when the inputs are float64); the output is cast back to ``q.dtype``.
"""
from __future__ import annotations

from typing import Optional

import torch


# Above this many logits per call the query dimension is processed in blocks, so a long
# prefill chunk does not materialise a huge [B, Hq, n, L] float32 tensor.
_MAX_LOGITS = 1 << 26


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` in three passes and one allocation (the obvious
    form with ``cat``/``neg`` makes six temporaries the size of ``x``)."""
    h = x.shape[-1] // 2
    out = x * cos
    out[..., :h].addcmul_(x[..., h:], sin[..., :h], value=-1)
    out[..., h:].addcmul_(x[..., :h], sin[..., h:])
    return out


def window_bias(length: torch.Tensor, Lmax: int, w: int, bias: float, bias_mode: str, dtype) -> torch.Tensor:
    """``[B, Lmax]``: the bias summed over the ``w`` window queries that see each slot ``j``
    (query ``i`` at slot ``t_i = length - w + i`` sees ``j <= t_i``; none see ``j >= length``).

    ``absolute``: ``bias * j * count_j`` with ``count_j = clamp(length - j, 0, w)``;
    ``relative``: ``bias * (j + 1) * sum_{t_i >= j} 1 / (t_i + 1) ** 2`` (a loop over the ``w``
    window queries, ``O(w * Lmax)``)."""
    length = length.to(torch.long)
    j = torch.arange(Lmax, device=length.device)
    if bias == 0.0:
        return torch.zeros(length.shape[0], Lmax, dtype=dtype, device=length.device)
    if bias_mode == "absolute":
        count = (length[:, None] - j[None, :]).clamp(0, w).to(dtype)
        return bias * j.to(dtype) * count
    t = length[:, None] - w + torch.arange(w, device=length.device)  # [B, w] slot of each window query
    inv = (t.to(dtype) + 1).pow(-2)  # [B, w]
    sees = j[None, None, :] <= t[:, :, None]  # [B, w, Lmax]
    acc = torch.where(sees, inv[:, :, None], torch.zeros((), dtype=dtype, device=length.device)).sum(dim=1)
    return bias * (j.to(dtype) + 1) * acc


def attention_with_scores_torch(
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
) -> torch.Tensor:
    B, Hq, n, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    Lmax = int(length.max())
    length = length.to(torch.long)
    j = torch.arange(Lmax, device=q.device)
    kk = k[:, :, :Lmax].to(cdt)
    vv = v[:, :, :Lmax].to(cdt)
    if int(length.min()) < Lmax:
        # ragged rows: slots past a row's length may hold anything (even NaN); a masked
        # weight of 0 times NaN is NaN, so clear them (logits are masked to -inf below)
        vv = vv.masked_fill((j[None, :] >= length[:, None])[:, None, :, None], 0)
    slots = length[:, None] - n + torch.arange(n, device=q.device)  # [B, n] slot of each query
    qq = q.to(cdt)
    if cos is not None:
        cq = cos.to(cdt)[slots][:, None]  # [B, 1, n, D]
        sq = sin.to(cdt)[slots][:, None]
        qq = _rope(qq, cq, sq)
        kk = _rope(kk, cos[:Lmax].to(cdt), sin[:Lmax].to(cdt))
    qq = qq.reshape(B, Hkv, G * n, D)  # the G heads of a KV head share one matmul
    # keep[b, i, j]: slot j is visible to query i of row b (causal, and never past length)
    visible = j[None, None, :] <= slots[:, :, None]  # [B, n, Lmax]
    out = torch.empty(B, Hkv, G * n, D, dtype=cdt, device=q.device)

    w = min(window, n) if scores is not None else 0
    col = torch.zeros(B, Hkv, Lmax, dtype=cdt, device=q.device) if w > 0 else None

    rows_per_block = max(1, _MAX_LOGITS // max(1, B * Hq * Lmax))
    for i0 in range(0, n, rows_per_block):  # one iteration for decode and usual chunks
        i1 = min(n, i0 + rows_per_block)
        nb = i1 - i0
        qb = qq.view(B, Hkv, G, n, D)[:, :, :, i0:i1].reshape(B, Hkv, G * nb, D)
        logits = torch.matmul(qb, kk.transpose(-1, -2)).mul_(scale)  # [B, Hkv, G*nb, Lmax]
        logits = logits.view(B, Hkv, G, nb, Lmax)
        logits.masked_fill_(~visible[:, None, None, i0:i1], float("-inf"))
        p = torch.softmax(logits, dim=-1)
        ob = torch.matmul(p.view(B, Hkv, G * nb, Lmax), vv).view(B, Hkv, G, nb, D)
        out.view(B, Hkv, G, n, D)[:, :, :, i0:i1] = ob
        if w > 0 and i1 > n - w:
            lo = max(i0, n - w) - i0
            # mean over the GQA group, sum over the retrieval-window queries
            col += p[:, :, :, lo:].sum(dim=3).mean(dim=2)
    if w > 0:
        col += window_bias(length, Lmax, w, bias, bias_mode, cdt)[:, None, :]
        sc = scores[:, :, :Lmax]
        if decay != 1.0:
            valid = (j[None, :] < length[:, None])[:, None, :]  # slots past length stay untouched
            sc.copy_(torch.where(valid, sc * decay, sc))
        sc += col.to(scores.dtype)
    return out.view(B, Hq, n, D).to(q.dtype)

"""PyTorch implementation of ``attention_with_scores`` (SPEC §4.1) for CPU tensors.

Same semantics as the Triton kernels, split by what each query needs:

* the ``n - w`` queries that do not score (``w = min(window, n)`` when scores are asked for,
  else 0) go through ``torch.nn.functional.scaled_dot_product_attention`` (PyTorch's fused
  attention: no ``[n, L]`` weight matrix), over the keys they can see, with a bottom-right
  causal mask;
* the last ``w`` queries (the retrieval window) are computed explicitly: their softmax
  weights ``p`` (``G * w x L`` per KV head, an ``O(w * L)`` pass) give both their output
  ``p @ V`` and the column sums added to ``scores``. A decode step (``n = 1``) is this part
  only, with or without scores (for ``G * n <= 16`` rows the explicit form measured faster
  than SDPA).

The GQA group shares its KV head: the ``G`` query heads of a KV head are stacked as
``G * n`` rows of one ``[B, Hkv, G * n, D]`` problem (no ``repeat_interleave`` of K/V).
Rows of a ragged batch are processed in runs of equal length, each run reading exactly the
slots ``< length``, so nothing past a row's length (NaN, garbage) is ever read. In rolling
mode (``cos``/``sin``) the run's keys are rotated once at their slots (one pass in the native library when it
has ``inf_mllm::rope``, see :func:`rope_rows`).

Logits, softmax and scores are computed in float32 (float64 when the inputs are float64);
bfloat16/float16 inputs are converted to float32 first. The output is cast back to
``q.dtype``.
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch
import torch.nn.functional as F

from .reference import rope_cos_sin


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` in three passes and one allocation (the obvious
    form with ``cat``/``neg`` makes six temporaries the size of ``x``)."""
    h = x.shape[-1] // 2
    out = x * cos
    out[..., :h].addcmul_(x[..., h:], sin[..., :h], value=-1)
    out[..., h:].addcmul_(x[..., :h], sin[..., h:])
    return out


_NATIVE_ROPE: Optional[bool] = None


def native_rope_available() -> bool:
    """True when the native library registers a CPU kernel for ``inf_mllm::rope``."""
    global _NATIVE_ROPE
    if _NATIVE_ROPE is None:
        _NATIVE_ROPE = torch._C._dispatch_has_kernel_for_dispatch_key("inf_mllm::rope", "CPU")
    return _NATIVE_ROPE


def rope_rows(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x [..., L, D]`` rotated row ``j`` at ``cos[j], sin[j]`` (``[L, D]``, float32 or
    float64), returned contiguous in the dtype of ``cos``.

    One pass in the native library (``torch.ops.inf_mllm.rope``, csrc/rope_cpu.cpp: reads x
    once, converting it on load, writes the result once) when it was built with it; else
    :func:`_rope` (three broadcasting passes)."""
    if native_rope_available() and x.device.type == "cpu" and x.stride(-1) == 1 and x.stride(-2) == x.shape[-1]:
        return torch.ops.inf_mllm.rope(x, cos.contiguous(), sin.contiguous())
    return _rope(x.to(cos.dtype), cos, sin)


_FREQ_TABLES: dict = {}  # id(inv_freq) -> (weakref(inv_freq), key, cos, sin)


def freq_table(inv_freq: torch.Tensor, scale: float, C: int, dtype: torch.dtype = torch.float32):
    """cos/sin ``[>=C, D]`` (``dtype``: float32, or float64 for float64 inputs) for slots ``0..C-1``
    from the frequencies (the CPU form of RoPE from ``inv_freq``: one table by slot, built from the
    same definition and kept per frequency tensor, so a decode step builds nothing). Rebuilt when
    ``inv_freq`` is modified in place."""
    # an inference tensor (made under torch.inference_mode) keeps no version counter: it is a
    # snapshot no one rewrites outside that mode, so its table is keyed without one
    version = -1 if inv_freq.is_inference() else inv_freq._version
    key = (version, float(scale), dtype)
    memo = _FREQ_TABLES.get(id(inv_freq))
    if memo is not None and memo[0]() is not inv_freq:  # a dead tensor's id, reused
        memo = None
    if memo is None or memo[1] != key or memo[2].shape[0] < C:
        rows = max(C, 2 * memo[2].shape[0]) if memo is not None and memo[1] == key else C
        pos = torch.arange(rows, device=inv_freq.device)
        cos, sin = rope_cos_sin(pos, inv_freq, float(scale), dtype=dtype)
        ident = id(inv_freq)
        memo = (weakref.ref(inv_freq, lambda _r: _FREQ_TABLES.pop(ident, None)), key, cos.contiguous(), sin.contiguous())
        _FREQ_TABLES[ident] = memo
    return memo[2], memo[3]


def _rotate_at_positions(q, k, L, n, inv_freq, scale, rope_pos, rope_sections, cdt):
    """``q [R, Hkv, G, n, D]``, ``k [R, Hkv, L, D]`` rotated at their stored positions ``rope_pos
    [S, R, Hkv, >=L]`` (multimodal rotary positions; a query at the positions of its slot)."""
    kc, ks = rope_cos_sin(rope_pos[..., :L], inv_freq, scale, rope_sections, dtype=cdt)  # [R, Hkv, L, D]
    kk = _rope(k.to(cdt), kc, ks)
    qc, qs = kc[:, :, None, L - n :], ks[:, :, None, L - n :]  # [R, Hkv, 1, n, D]
    return _rope(q.to(cdt), qc, qs), kk


def window_bias(L: int, w: int, bias: float, bias_mode: str, dtype, device) -> torch.Tensor:
    """``[L]``: the bias of a row holding ``L`` slots, summed over its ``w`` window queries
    (query ``i`` at slot ``t_i = L - w + i`` sees ``j <= t_i``), in closed form, ``O(L)``.

    ``absolute``: ``bias * j * count_j`` with ``count_j = min(w, L - j)``;
    ``relative``: ``bias * (j + 1) * S_j`` with ``S_j = sum_{t_i >= j} 1 / (t_i + 1) ** 2``,
    the same total for every ``j <= L - w`` and a suffix sum over the window's own slots above.
    The ``w`` window slots are computed on the host in float64 (``w`` terms)."""
    if bias_mode == "absolute":
        out = torch.arange(L, dtype=dtype, device=device).mul_(bias * w)
        tail = [bias * (L - w + i) * (w - i) for i in range(w)]  # count = L - j on the window's slots
    else:
        suffix, acc = [0.0] * w, 0.0
        for i in range(w - 1, -1, -1):  # window query i sits at slot L - w + i
            acc += 1.0 / float(L - w + i + 1) ** 2
            suffix[i] = acc
        out = torch.arange(1, L + 1, dtype=dtype, device=device).mul_(bias * acc)
        tail = [bias * (L - w + i + 1) * suffix[i] for i in range(w)]
    if w > 1 or bias_mode == "absolute":
        out[L - w :] = torch.tensor(tail, dtype=dtype, device=device)
    return out


# keys @ queries^T measured 2x faster than queries @ keys^T for a decode step at L x D = 4096 x
# 128 (8 KV heads, 4 query rows each) and 1.4x slower at 1056 x 64 (SmolLM2: 3 x 3), one thread.
_KQ_MIN_ELEMS = 1 << 18
# Without scores, calls with at most this many query rows per KV head (G * n) skip SDPA.
_EXPLICIT_MAX_ROWS = 16


def _runs(lens):
    """Maximal runs ``(b0, b1, L)`` of consecutive rows with the same length."""
    b0 = 0
    while b0 < len(lens):
        b1 = b0 + 1
        while b1 < len(lens) and lens[b1] == lens[b0]:
            b1 += 1
        yield b0, b1, lens[b0]
        b0 = b1


def _attend_run(q, k, v, L, out, scores, scale, w, we, bias, bias_mode, decay, cos, sin, cdt, mrope=None):
    """One run of rows that all hold ``L`` valid slots. ``q [R, Hkv, G, n, D]``, ``k, v
    [R, Hkv, L, D]`` (the valid slots only), ``out [R, Hkv, G, n, D]`` written in place,
    ``scores [R, Hkv, C]`` or ``None``. The last ``we`` queries are computed explicitly (``we =
    w`` when scoring), the others by SDPA; only the ``w`` window queries add to ``scores``."""
    R, Hkv, G, n, D = q.shape
    vv = v if v.dtype == cdt else v.to(cdt)
    if mrope is not None:
        qq, kk = _rotate_at_positions(q, k, L, n, *mrope, cdt)
    elif cos is not None:
        if cos.dtype != cdt:
            cos, sin = cos[:L].to(cdt), sin[:L].to(cdt)
        kk = rope_rows(k, cos[:L], sin[:L])
        qq = rope_rows(q, cos[L - n : L], sin[L - n : L])  # query i at slot L - n + i
    else:
        kk = k if k.dtype == cdt else k.to(cdt)
        qq = q if q.dtype == cdt else q.to(cdt)
    nh = n - we  # queries that do not score: fused attention
    if nh > 0:
        Lk = L - we  # the last of them sits at slot Lk - 1
        qh = qq[:, :, :, :nh].reshape(R, Hkv, G * nh, D)
        # bottom-right causal: query i (slot Lk - nh + i) sees j <= Lk - nh + i; tiled over the group
        mask = None
        if nh > 1:
            mask = torch.ones(nh, Lk, dtype=torch.bool, device=q.device).tril(Lk - nh).repeat(G, 1)
        oh = F.scaled_dot_product_attention(qh, kk[:, :, :Lk], vv[:, :, :Lk], attn_mask=mask, scale=scale)
        out[:, :, :, :nh] = oh.view(R, Hkv, G, nh, D)
    if we > 0:
        w = we  # equals the scoring window whenever scores is given (scores is None otherwise)
        # the window queries: explicit weights [R, Hkv, G * w, L]. For the few rows of a decode
        # step over a long buffer, keys @ queries^T is the faster GEMM shape (then transposed for
        # a contiguous softmax); otherwise queries @ keys^T (measured, one thread).
        qw = qq[:, :, :, nh:].reshape(R, Hkv, G * w, D) * scale
        if G * w <= 16 and L * D >= _KQ_MIN_ELEMS:
            logits = torch.matmul(kk, qw.transpose(-1, -2)).transpose(-1, -2).contiguous()
        else:
            logits = torch.matmul(qw, kk.transpose(-1, -2))
        if w > 1:  # causal inside the window: query i (slot L - w + i) does not see slots L - w + i' > i
            tri = torch.ones(w, w, dtype=torch.bool, device=q.device).triu(1)  # [query, slot]
            logits.view(R, Hkv, G, w, L)[..., L - w :].masked_fill_(tri, float("-inf"))
        p = torch.softmax(logits, dim=-1)
        ow = torch.matmul(p, vv)  # [R, Hkv, G * w, D]
        out[:, :, :, nh:] = ow.view(R, Hkv, G, w, D)
        if scores is None:
            return
        col = p.sum(dim=-2).div_(G)  # [R, Hkv, L]: mean over the group, sum over the window
        if bias != 0.0:
            col += window_bias(L, w, bias, bias_mode, cdt, q.device)
        sc = scores[:, :, :L]
        if decay != 1.0:
            sc.mul_(decay)
        sc.add_(col.to(scores.dtype))


# Calls with at most this many queries per row (a decode step) go to the fused native kernel
# (torch.ops.inf_mllm.attention_decode, csrc/attention_cpu.cpp) when the library has it; longer
# chunks (prefill) keep the SDPA path below.
NATIVE_DECODE_MAX_N = 8
_NATIVE_DECODE: Optional[bool] = None


def native_decode_available() -> bool:
    """True when the native library registers a CPU kernel for ``inf_mllm::attention_decode``."""
    global _NATIVE_DECODE
    if _NATIVE_DECODE is None:
        _NATIVE_DECODE = torch._C._dispatch_has_kernel_for_dispatch_key("inf_mllm::attention_decode", "CPU")
    return _NATIVE_DECODE


def _use_native_decode(q, k, v, n) -> bool:
    return (
        n <= NATIVE_DECODE_MAX_N
        and q.dtype in (torch.float32, torch.bfloat16, torch.float16)
        and q.device.type == "cpu"
        and native_decode_available()
        and q.is_contiguous() and k.is_contiguous() and v.is_contiguous()
    )


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
    inv_freq: Optional[torch.Tensor] = None,
    rope_scale: float = 1.0,
    rope_pos: Optional[torch.Tensor] = None,
    rope_sections: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    B, Hq, n, D = q.shape
    if inv_freq is not None and rope_pos is None:
        cos, sin = freq_table(inv_freq, rope_scale, k.shape[2], torch.float64 if q.dtype == torch.float64 else torch.float32)
    if rope_pos is None and _use_native_decode(q, k, v, n):
        if cos is not None and cos.dtype != torch.float32:
            cos, sin = cos.float(), sin.float()
        return torch.ops.inf_mllm.attention_decode(
            q, k, v, length, scores if window > 0 else None, scale, window, bias, cos, sin, bias_mode, decay
        )
    Hkv = k.shape[1]
    G = Hq // Hkv
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    w = min(window, n) if scores is not None else 0
    # rows computed explicitly: the scoring window; without scores, a decode step's few rows
    # (explicit measured faster than SDPA there: 3.6-3.9 vs 4.2-4.8 ms at L=4096, Hkv=8, G=4, D=128)
    we = w if w > 0 else (n if G * n <= _EXPLICIT_MAX_ROWS else 0)
    lens = [int(x) for x in length.tolist()]
    qv = q.view(B, Hkv, G, n, D)  # the G heads of a KV head are consecutive
    out = torch.empty(B, Hkv, G, n, D, dtype=q.dtype, device=q.device)
    for b0, b1, L in _runs(lens):
        mrope = None if rope_pos is None else (inv_freq, rope_scale, rope_pos[:, b0:b1], rope_sections)
        _attend_run(
            qv[b0:b1], k[b0:b1, :, :L], v[b0:b1, :, :L], L, out[b0:b1], None if w == 0 else scores[b0:b1],
            scale, w, we, bias, bias_mode, decay, cos, sin, cdt, mrope,
        )
    return out.view(B, Hq, n, D)

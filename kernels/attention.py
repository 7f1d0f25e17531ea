"""Triton kernels for ``attention_with_scores`` (SPEC §4.1).

Two paths, picked from the shapes only (never from the values of ``length``, so a call is
CUDA-graph capturable and never syncs):

* **decode** (``G * n <= DECODE_MAX_ROWS``): split-K "flash-decoding". Grid
  ``(B * Hkv, num_splits)``; one program owns the ``G * n`` query rows of one KV head (all
  heads of the GQA group, all new queries) and one slice of that row's valid slots, so K
  and V are read exactly once. The slice boundaries are computed *inside* the kernel from
  ``length[b]`` (``cdiv(length, num_splits)`` rounded up to a key block), so the work is
  balanced whatever the fill level of the buffer; ``num_splits`` comes from ``B * Hkv``
  and ``C``. Stage 1 writes per-split ``(m, l, acc)`` and, for the retrieval-window rows,
  the raw scaled logits to a float32 workspace ``[B * Hkv, G * w, C]`` (window rows only;
  equivalent to storing ``exp(s - m_split)`` and rescaling it later). The reduce kernel (same grid) merges the
  splits with the global log-sum-exp; split 0 writes ``out``, and every program turns the
  logits of its own slot slice into ``p = exp(s - lse)`` and updates
  ``scores[j] = decay * scores[j] + mean_g p + bias_j`` (each slot owned by one program: no
  atomics; ``bias_j`` is the window queries' bias summed for slot ``j``, see below).
* **prefill** (larger ``n``): a flash-attention forward, grid ``(cdiv(n, BLOCK_M), B * Hq)``,
  online softmax over key blocks, causal by slot with a per-row ``length``; it also writes
  the row log-sum-exp. A second kernel, grid ``(B * Hkv, cdiv(C, BLOCK_N))``, reloads the
  last ``min(w, n)`` queries of all ``G`` heads, recomputes the logits of its key block,
  ``p = exp(s - lse)``, sums over the window queries, means over the group and updates
  ``scores[j] = decay * scores[j] + col_j + bias_j`` for its valid slots ``j < length``.

Bias (``_window_bias``), summed over the window queries at slots ``t`` that see slot ``j``:
``absolute`` ``bias * j * count_j`` (``count_j = clamp(length - j, 0, nw)``); ``relative``
``bias * (j + 1) * sum_t 1 / (t + 1)^2``, a scalar loop over the ``nw <= window`` window slots
per key block (no read of K). ``decay`` multiplies the old scores in the same store, so it
costs no launch; with ``decay == 1`` the update is the plain ``+=``.

RoPE (rolling positions) is applied on load: ``x * cos[t] + rotate_half(x) * sin[t]`` with
``rotate_half(x)[d] = -x[d + D/2]`` for ``d < D/2`` and ``x[d - D/2]`` otherwise, i.e. a
second load of the same row at the partner column. Logits, softmax statistics,
accumulators and scores are float32. On the GPU the two matmuls take their operands in
the input dtype (fp16/bf16 tensor cores; fp32 inputs in IEEE fp32, no TF32) with float32
accumulation; under ``TRITON_INTERPRET=1`` they run in float32 throughout (the
interpreter's bf16 arithmetic is not faithful).

The head dim is padded to a power of two with masks; the GQA group (not necessarily a
power of two, e.g. 3) is flattened into the row dimension, padded with masks.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

__all__ = ["attention_with_scores_triton", "DECODE_MAX_ROWS", "choose_num_splits"]

# Decode path when the G*n query rows of one KV head fit one program.
DECODE_MAX_ROWS = 64

# Debug aid for the tests: fill outputs and workspaces with NaN before the kernels run, so
# that an element a kernel forgets to write (or a workspace entry it reads without having
# written it) shows up as NaN.
POISON = False

# Tests only: take the GPU's low-precision matmul branch under the interpreter as well.
_FORCE_LOWP = False

_NEG = tl.constexpr(-1.0e30)  # finite "minus infinity" for running maxima: empty splits stay NaN-free


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


_SM_COUNT: dict = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def choose_num_splits(bh: int, C: int, block_n: int, device: torch.device) -> int:
    """Splits of the slot axis for decode: enough programs to fill the GPU (about two waves
    of ``B * Hkv * splits`` programs), but at least two key blocks per split."""
    if device.type != "cuda" or _interpreting():
        target = 4
    else:
        target = 2 * _sm_count(device)
    ns = triton.cdiv(target, max(1, bh))
    ns = min(ns, max(1, triton.cdiv(C, 2 * block_n)), 64)
    return max(1, ns)


# --------------------------------------------------------------------------------------
# shared helpers
# --------------------------------------------------------------------------------------


@triton.jit
def _load_rows(base, row_off, pos, row_mask, cos_ptr, sin_ptr, d,
               HEAD_DIM: tl.constexpr, HALF: tl.constexpr, HAS_ROPE: tl.constexpr):
    """Load rows ``base + row_off[r] + d`` as float32 ``[R, BLOCK_D]``, rotated at slot
    ``pos[r]`` when ``HAS_ROPE`` (cos/sin tables have row stride ``HEAD_DIM``)."""
    dmask = d < HEAD_DIM
    m2 = row_mask[:, None] & dmask[None, :]
    x = tl.load(base + row_off[:, None] + d[None, :], mask=m2, other=0.0).to(tl.float32)
    if HAS_ROPE:
        dp = tl.where(d < HALF, d + HALF, d - HALF)
        xp = tl.load(base + row_off[:, None] + dp[None, :], mask=m2, other=0.0).to(tl.float32)
        sign = tl.where(d < HALF, -1.0, 1.0)
        tab = pos[:, None].to(tl.int64) * HEAD_DIM + d[None, :]
        c = tl.load(cos_ptr + tab, mask=m2, other=0.0).to(tl.float32)
        s = tl.load(sin_ptr + tab, mask=m2, other=0.0).to(tl.float32)
        x = x * c + sign[None, :] * xp * s
    return x


@triton.jit
def _window_bias(j, L, nw, bias, BIAS_REL: tl.constexpr):
    """The bias summed over the ``nw`` window queries (slots ``L - nw .. L - 1``) that see slot
    ``j``, as float32 ``[BLOCK_N]``: ``absolute`` ``bias * j * count_j`` with ``count_j =
    clamp(L - j, 0, nw)``; ``relative`` ``bias * (j + 1) * sum_{t >= j} 1 / (t + 1)^2`` over the
    window slots ``t`` (a scalar loop of ``nw <= window`` steps; no read of K)."""
    jf = j.to(tl.float32)
    if BIAS_REL:
        acc = tl.zeros_like(jf)
        for ii in range(0, nw):
            tp1 = (L - nw + ii + 1).to(tl.float32)
            acc += tl.where(j < L - nw + ii + 1, 1.0 / (tp1 * tp1), 0.0)
        return bias * (jf + 1.0) * acc
    else:
        cnt = tl.minimum(tl.maximum(L - j, 0), nw).to(tl.float32)
        return bias * jf * cnt


@triton.jit
def _qk(q, k, LOWP: tl.constexpr, DT: tl.constexpr):
    """``q [R, D] @ k[N, D]^T`` with float32 accumulation."""
    if LOWP:
        return tl.dot(q.to(DT), tl.trans(k.to(DT)))
    else:
        return tl.dot(q, tl.trans(k), input_precision="ieee")


@triton.jit
def _pv(p, v, LOWP: tl.constexpr, DT: tl.constexpr):
    if LOWP:
        return tl.dot(p.to(DT), v.to(DT))
    else:
        return tl.dot(p, v, input_precision="ieee")


# --------------------------------------------------------------------------------------
# decode: split-K stage 1 and reduce
# --------------------------------------------------------------------------------------


@triton.jit
def _decode_stage1(
    Q, K, V, LEN, COS, SIN,
    M_WS, L_WS, ACC_WS, S_WS,
    scale, Hkv, C, n, NS, R, nw,
    HEAD_DIM: tl.constexpr, HALF: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_ROPE: tl.constexpr, SCORE: tl.constexpr, LOWP: tl.constexpr, DT: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    sid = tl.program_id(1)
    b = pid_bh // Hkv
    L = tl.load(LEN + b)

    r = tl.arange(0, BLOCK_R)
    d = tl.arange(0, BLOCK_D)
    rmask = r < R
    i = r % n  # query index inside the call; rows are (g, i) flattened, g-major
    t = L - n + i  # slot of each query row

    # q[b, h*G + g, i, :] sits at row (b*Hkv + h)*G*n + r of the [B*Hq*n, D] view
    q_base = Q + pid_bh.to(tl.int64) * R * HEAD_DIM
    q = _load_rows(q_base, r * HEAD_DIM, t, rmask, COS, SIN, d, HEAD_DIM, HALF, HAS_ROPE)
    if LOWP:
        q = q.to(DT)  # once, outside the key loop

    kv_base = pid_bh.to(tl.int64) * C * HEAD_DIM
    split_len = tl.cdiv(tl.cdiv(L, NS), BLOCK_N) * BLOCK_N
    lo = sid * split_len
    hi = tl.minimum(lo + split_len, L)

    m_i = tl.full([BLOCK_R], _NEG, tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    score_row = rmask & (i >= n - nw)
    # workspace row of a scoring query: (g, i - (n - nw)) in a [G * nw, C] plane per KV head
    srow = (r // n) * nw + (i - (n - nw))
    s_base = S_WS + pid_bh.to(tl.int64) * (R // n) * nw * C
    for j0 in range(lo, hi, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        jmask = j < hi
        k = _load_rows(K + kv_base, j * HEAD_DIM, j, jmask, COS, SIN, d, HEAD_DIM, HALF, HAS_ROPE)
        v = tl.load(V + kv_base + j[:, None] * HEAD_DIM + d[None, :],
                    mask=jmask[:, None] & (d[None, :] < HEAD_DIM), other=0.0)
        s = _qk(q, k, LOWP, DT) * scale
        vis = (j[None, :] <= t[:, None]) & jmask[None, :] & rmask[:, None]
        s = tl.where(vis, s, float("-inf"))
        if SCORE:
            tl.store(s_base + srow[:, None] * C + j[None, :], s,
                     mask=score_row[:, None] & jmask[None, :])
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _pv(p, v.to(tl.float32), LOWP, DT)
        m_i = m_new

    ws = (pid_bh * NS + sid).to(tl.int64) * BLOCK_R
    tl.store(M_WS + ws + r, m_i)
    tl.store(L_WS + ws + r, l_i)
    tl.store(ACC_WS + ws * BLOCK_D + r[:, None] * BLOCK_D + d[None, :], acc)


@triton.jit
def _decode_reduce(
    O, LEN, SCORES, M_WS, L_WS, ACC_WS, S_WS,
    Hkv, C, n, NS, R, nw, G, bias, decay,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr, NS_P2: tl.constexpr, SCORE: tl.constexpr, BIAS_REL: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    sid = tl.program_id(1)
    b = pid_bh // Hkv
    L = tl.load(LEN + b)

    r = tl.arange(0, BLOCK_R)
    d = tl.arange(0, BLOCK_D)
    sp = tl.arange(0, NS_P2)
    rmask = r < R
    ws0 = pid_bh.to(tl.int64) * NS * BLOCK_R
    stat = ws0 + sp[:, None] * BLOCK_R + r[None, :]
    smask = (sp[:, None] < NS) & (r[None, :] < BLOCK_R)
    m_s = tl.load(M_WS + stat, mask=smask, other=_NEG)  # [NS_P2, BLOCK_R]
    l_s = tl.load(L_WS + stat, mask=smask, other=0.0)
    m_g = tl.max(m_s, 0)  # [BLOCK_R]
    w_s = tl.exp(m_s - m_g[None, :])
    l_g = tl.sum(l_s * w_s, 0)
    l_safe = tl.where(l_g > 0, l_g, 1.0)

    if sid == 0:
        acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
        for s in range(0, NS):
            ws = ws0 + s * BLOCK_R
            m_one = tl.load(M_WS + ws + r)
            a = tl.load(ACC_WS + ws * BLOCK_D + r[:, None] * BLOCK_D + d[None, :])
            acc += a * tl.exp(m_one - m_g)[:, None]
        out = acc / l_safe[:, None]
        o_base = O + pid_bh.to(tl.int64) * R * HEAD_DIM
        tl.store(o_base + r[:, None] * HEAD_DIM + d[None, :], out.to(O.dtype.element_ty),
                 mask=rmask[:, None] & (d[None, :] < HEAD_DIM))

    if SCORE:
        lse = m_g + tl.log(l_safe)
        i = r % n
        t = L - n + i
        score_row = rmask & (i >= n - nw)
        split_len = tl.cdiv(tl.cdiv(L, NS), BLOCK_N) * BLOCK_N
        lo = sid * split_len
        hi = tl.minimum(lo + split_len, L)
        srow = (r // n) * nw + (i - (n - nw))
        s_base = S_WS + pid_bh.to(tl.int64) * G * nw * C
        sc_base = SCORES + pid_bh.to(tl.int64) * C
        inv_g = 1.0 / G
        for j0 in range(lo, hi, BLOCK_N):
            j = j0 + tl.arange(0, BLOCK_N)
            jmask = j < hi
            vis = score_row[:, None] & (j[None, :] <= t[:, None]) & jmask[None, :]
            x = tl.load(s_base + srow[:, None] * C + j[None, :], mask=vis, other=float("-inf"))
            p = tl.where(vis, tl.exp(x - lse[:, None]), 0.0)
            col = tl.sum(p, 0) * inv_g
            old = tl.load(sc_base + j, mask=jmask, other=0.0)
            tl.store(sc_base + j, old * decay + col + _window_bias(j, L, nw, bias, BIAS_REL), mask=jmask)


# --------------------------------------------------------------------------------------
# prefill: flash-attention forward + score pass over the window queries
# --------------------------------------------------------------------------------------


@triton.jit
def _prefill_fwd(
    Q, K, V, O, LSE, LEN, COS, SIN,
    scale, Hq, G, C, n,
    HEAD_DIM: tl.constexpr, HALF: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_ROPE: tl.constexpr, WRITE_LSE: tl.constexpr, LOWP: tl.constexpr, DT: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bq = tl.program_id(1)  # b * Hq + hq
    b = pid_bq // Hq
    hq = pid_bq % Hq
    h = hq // G
    L = tl.load(LEN + b)

    i = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    imask = i < n
    t = L - n + i
    q_base = Q + pid_bq.to(tl.int64) * n * HEAD_DIM
    q = _load_rows(q_base, i * HEAD_DIM, t, imask, COS, SIN, d, HEAD_DIM, HALF, HAS_ROPE)
    if LOWP:
        q = q.to(DT)  # once, outside the key loop

    kv_base = (b * (Hq // G) + h).to(tl.int64) * C * HEAD_DIM
    hi = tl.minimum(L - n + tl.minimum(pid_m * BLOCK_M + BLOCK_M, n), L)  # last visible slot + 1

    m_i = tl.full([BLOCK_M], _NEG, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for j0 in range(0, hi, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        jmask = j < hi
        k = _load_rows(K + kv_base, j * HEAD_DIM, j, jmask, COS, SIN, d, HEAD_DIM, HALF, HAS_ROPE)
        v = tl.load(V + kv_base + j[:, None] * HEAD_DIM + d[None, :],
                    mask=jmask[:, None] & (d[None, :] < HEAD_DIM), other=0.0)
        s = _qk(q, k, LOWP, DT) * scale
        vis = (j[None, :] <= t[:, None]) & jmask[None, :] & imask[:, None]
        s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _pv(p, v.to(tl.float32), LOWP, DT)
        m_i = m_new

    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_safe[:, None]
    o_base = O + pid_bq.to(tl.int64) * n * HEAD_DIM
    tl.store(o_base + i[:, None] * HEAD_DIM + d[None, :], out.to(O.dtype.element_ty),
             mask=imask[:, None] & (d[None, :] < HEAD_DIM))
    if WRITE_LSE:
        tl.store(LSE + pid_bq.to(tl.int64) * n + i, m_i + tl.log(l_safe), mask=imask)


@triton.jit
def _prefill_scores(
    Q, K, LSE, LEN, COS, SIN, SCORES,
    scale, Hkv, G, C, n, nw, bias, decay,
    HEAD_DIM: tl.constexpr, HALF: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_ROPE: tl.constexpr, LOWP: tl.constexpr, DT: tl.constexpr, BIAS_REL: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = pid_bh // Hkv
    L = tl.load(LEN + b)
    j0 = pid_n * BLOCK_N
    if j0 < L:
        d = tl.arange(0, BLOCK_D)
        j = j0 + tl.arange(0, BLOCK_N)
        jmask = j < L
        kv_base = pid_bh.to(tl.int64) * C * HEAD_DIM
        k = _load_rows(K + kv_base, j * HEAD_DIM, j, jmask, COS, SIN, d, HEAD_DIM, HALF, HAS_ROPE)
        if LOWP:
            k = k.to(DT)
        col = tl.zeros([BLOCK_N], tl.float32)
        R = G * nw
        # the G*n query rows of this KV head start at row pid_bh*G*n of the [B*Hq*n, D] view
        q_base = Q + pid_bh.to(tl.int64) * G * n * HEAD_DIM
        lse_base = LSE + pid_bh.to(tl.int64) * G * n
        for r0 in range(0, R, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)
            rmask = r < R
            g = r // nw
            i = n - nw + r % nw
            t = L - n + i
            row = g * n + i
            q = _load_rows(q_base, row * HEAD_DIM, t, rmask, COS, SIN, d, HEAD_DIM, HALF, HAS_ROPE)
            lse = tl.load(lse_base + row, mask=rmask, other=0.0)
            s = _qk(q, k, LOWP, DT) * scale
            vis = rmask[:, None] & (j[None, :] <= t[:, None]) & jmask[None, :]
            p = tl.where(vis, tl.exp(s - lse[:, None]), 0.0)
            col += tl.sum(p, 0)
        sc_base = SCORES + pid_bh.to(tl.int64) * C
        old = tl.load(sc_base + j, mask=jmask, other=0.0)
        tl.store(sc_base + j, old * decay + col / G + _window_bias(j, L, nw, bias, BIAS_REL), mask=jmask)


# --------------------------------------------------------------------------------------
# host wrapper
# --------------------------------------------------------------------------------------

_TL_DT = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def _empty(shape, dtype, device):
    x = torch.empty(shape, dtype=dtype, device=device)
    if POISON:
        x.fill_(float("nan"))
    return x


def attention_with_scores_triton(
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
    *,
    inv_freq: Optional[torch.Tensor] = None,
    rope_scale: float = 1.0,
    rope_pos: Optional[torch.Tensor] = None,
    rope_sections: Optional[torch.Tensor] = None,
    path: Optional[str] = None,
    num_splits: Optional[int] = None,
) -> torch.Tensor:
    """SPEC §4.1 with Triton. Arguments are trusted (checked by ``inf_mllm.ops``).

    ``path`` (``"decode"``/``"prefill"``) and ``num_splits`` override the heuristics (tests,
    benchmarks). ``length`` is never read on the host.
    """
    if rope_pos is not None:
        raise NotImplementedError("inf_mllm: the Triton kernels do not take per-slot rotary positions yet")
    if inv_freq is not None:  # interim: the frequencies as a table by slot
        pos = torch.arange(k.shape[2], device=k.device, dtype=torch.float32)
        ang = pos[:, None] * inv_freq
        ang = torch.cat((ang, ang), dim=-1)
        cos, sin = (ang.cos() * rope_scale).contiguous(), (ang.sin() * rope_scale).contiguous()
    B, Hq, n, D = q.shape
    Hkv, C = k.shape[1], k.shape[2]
    G = Hq // Hkv
    dev = q.device
    interp = _interpreting()
    lowp = (q.dtype != torch.float32) and (not interp or _FORCE_LOWP)
    DT = _TL_DT[q.dtype]
    score = scores is not None and window > 0
    nw = min(window, n) if score else 0
    has_rope = cos is not None
    cos_t = cos if has_rope else q
    sin_t = sin if has_rope else q
    sc_t = scores if score else q
    BLOCK_D = max(16, _next_pow2(D))
    HALF = D // 2
    scale = float(scale)
    bias = float(bias)
    decay = float(decay)
    if bias_mode not in ("absolute", "relative"):
        raise ValueError(f"unknown bias_mode {bias_mode!r}")
    bias_rel = bias_mode == "relative"
    out = _empty(q.shape, q.dtype, dev)

    if path is None:
        path = "decode" if G * n <= DECODE_MAX_ROWS else "prefill"

    if path == "decode":
        R = G * n
        BLOCK_R = max(16, _next_pow2(R))
        if interp:
            BLOCK_N = 128
        elif has_rope and not lowp and BLOCK_D >= 128:
            BLOCK_N = 32  # fp32 RoPE: at 64 even two stages need 200 KiB of shared memory
        else:
            BLOCK_N = 64 if BLOCK_R * BLOCK_D <= 64 * 64 else 32
        ns = num_splits or choose_num_splits(B * Hkv, C, BLOCK_N, dev)
        num_warps = 8 if BLOCK_R >= 64 and BLOCK_D >= 128 else 4
        # RoPE pipelines four [BLOCK_N, BLOCK_D] tiles per key block (K, its partner half,
        # float32 cos and sin) besides V; with fp32 K/V, or bf16/fp16 at 64 x 128 tiles, three
        # stages overflow the A100's 163 KiB (bf16 D=128: 164-168 KiB; fp32: 180-368 KiB);
        # two stages take 100-128 KiB (tools/triton_aot_check.py, bench/NOTES_triton.md).
        num_stages = 2 if has_rope and (not lowp or BLOCK_N * BLOCK_D >= 64 * 128) else 3
        m_ws = _empty((B * Hkv, ns, BLOCK_R), torch.float32, dev)
        l_ws = _empty((B * Hkv, ns, BLOCK_R), torch.float32, dev)
        acc_ws = _empty((B * Hkv, ns, BLOCK_R, BLOCK_D), torch.float32, dev)
        s_ws = _empty((B * Hkv, G * nw, C), torch.float32, dev) if score else m_ws
        grid = (B * Hkv, ns)
        _decode_stage1[grid](
            q, k, v, length, cos_t, sin_t, m_ws, l_ws, acc_ws, s_ws,
            scale, Hkv, C, n, ns, R, nw,
            HEAD_DIM=D, HALF=HALF, BLOCK_D=BLOCK_D, BLOCK_R=BLOCK_R, BLOCK_N=BLOCK_N,
            HAS_ROPE=has_rope, SCORE=score, LOWP=lowp, DT=DT, num_warps=num_warps,
            num_stages=num_stages,
        )
        _decode_reduce[grid](
            out, length, sc_t, m_ws, l_ws, acc_ws, s_ws,
            Hkv, C, n, ns, R, nw, G, bias, decay,
            HEAD_DIM=D, BLOCK_D=BLOCK_D, BLOCK_R=BLOCK_R, BLOCK_N=BLOCK_N,
            NS_P2=max(2, _next_pow2(ns)), SCORE=score, BIAS_REL=bias_rel and score, num_warps=num_warps,
        )
        return out

    if path != "prefill":
        raise ValueError(f"unknown path {path!r}")
    if interp:
        BLOCK_M = max(16, min(128, _next_pow2(n)))
        BLOCK_N = 128
        BLOCK_R = max(16, min(128, _next_pow2(G * max(nw, 1))))
        BLOCK_NS = 128
        num_warps = 4
    else:
        BLOCK_M = 64 if n >= 64 else max(16, _next_pow2(n))
        BLOCK_N = 64 if BLOCK_D <= 64 else 32
        BLOCK_R = 32
        BLOCK_NS = 64
        num_warps = 4
    # fp32 RoPE: three stages need 176-208 KiB of shared memory (> sm_80's 163 KiB), two
    # stages 112-128 KiB; bf16/fp16 keep three (at most 96 KiB).
    num_stages = 2 if has_rope and not lowp else 3
    lse = _empty((B, Hq, n), torch.float32, dev) if score else out
    _prefill_fwd[(triton.cdiv(n, BLOCK_M), B * Hq)](
        q, k, v, out, lse, length, cos_t, sin_t,
        scale, Hq, G, C, n,
        HEAD_DIM=D, HALF=HALF, BLOCK_D=BLOCK_D, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
        HAS_ROPE=has_rope, WRITE_LSE=score, LOWP=lowp, DT=DT, num_warps=num_warps,
        num_stages=num_stages,
    )
    if score:
        _prefill_scores[(B * Hkv, triton.cdiv(C, BLOCK_NS))](
            q, k, lse, length, cos_t, sin_t, sc_t,
            scale, Hkv, G, C, n, nw, bias, decay,
            HEAD_DIM=D, HALF=HALF, BLOCK_D=BLOCK_D, BLOCK_R=BLOCK_R, BLOCK_N=BLOCK_NS,
            HAS_ROPE=has_rope, LOWP=lowp, DT=DT, BIAS_REL=bias_rel, num_warps=num_warps,
            num_stages=num_stages,
        )
    return out

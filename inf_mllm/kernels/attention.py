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

RoPE is applied on load, ``x * cos[t] + rotate_half(x) * sin[t]`` (``rotate_half(x) = cat(-x2,
x1)``): every row (query or key) is loaded once as its two halves ``x1 = x[:D/2]``, ``x2 =
x[D/2:]``, both rotated from that load (``r1 = x1 c1 - x2 s1``, ``r2 = x2 c2 + x1 s2``), and the
logits are two dots ``q1 . r1 + q2 . r2``. The cos/sin come in one of three forms (constexpr
``ROPE``): from the frequencies ``inv_freq`` at the slot (``ROPE_FREQ``, the cache's form), by
angle addition inside key blocks of ``ROPE_BLOCK`` = 64 slots exactly as
``reference.rope_cos_sin_blocked`` defines it -- the block start's cos/sin once per block for the
``D/2`` frequencies, the in-block offsets' ``[64, D/2]`` once per program, no table and no sin/cos
per key --, ``rope_scale`` folded into the softmax scale; from the frequencies at each slot's
stored multimodal positions (``ROPE_POS``: ``angle_i = rope_pos[sections[i], b, h, slot] *
inv_freq[i]``, a sin/cos per key and frequency, four bytes per section and slot loaded); or from
``cos, sin`` tables by slot (``ROPE_TABLE``, the fallback: both halves of both tables loaded per
key). The decode workspaces hold the valid query rows only (``next_pow2(G * n)``, not the 16-row
tile that ``tl.dot`` needs). Launch parameters per GPU (``KNOWN_TARGETS``, ``gpu_target``): key
blocks, warps and the most pipeline stages whose shared memory fits the target (sm_89: 99 KiB per
block); the split count from its SM count; ``tools/triton_aot_check.py`` compiles what this
launches for sm_80/89/90. Logits, softmax statistics,
accumulators and scores are float32. On the GPU the two matmuls take their operands in
the input dtype (fp16/bf16 tensor cores; fp32 inputs in IEEE fp32, no TF32) with float32
accumulation; under ``TRITON_INTERPRET=1`` they run in float32 throughout (the
interpreter's bf16 arithmetic is not faithful).

The head dim is padded to a power of two with masks; the GQA group (not necessarily a
power of two, e.g. 3) is flattened into the row dimension, padded with masks.
"""
from __future__ import annotations

import os
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

__all__ = ["attention_with_scores_triton", "DECODE_MAX_ROWS", "choose_num_splits", "gpu_target", "GpuTarget",
           "KNOWN_TARGETS"]

# Decode path when the G*n query rows of one KV head fit one program.
DECODE_MAX_ROWS = 64

# Debug aid for the tests: fill outputs and workspaces with NaN before the kernels run, so
# that an element a kernel forgets to write (or a workspace entry it reads without having
# written it) shows up as NaN.
POISON = False

# Tests only: take the GPU's low-precision matmul branch under the interpreter as well.
_FORCE_LOWP = False

# Key block under the interpreter (a multiple of ROPE_BLOCK; the tests also run 64, the GPU's).
_INTERP_BLOCK_N = 128

_NEG = tl.constexpr(-1.0e30)  # finite "minus infinity" for running maxima: empty splits stay NaN-free


_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"  # as when triton.jit built the kernels below


def _interpreting() -> bool:
    return _INTERPRET


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


class GpuTarget(NamedTuple):
    """What the launch heuristics need to know of a GPU: compute capability ``arch`` (major * 10 +
    minor), SM count, the opt-in shared memory per block and per SM (bytes), the resident
    threads and blocks per SM."""

    name: str
    arch: int
    sms: int
    smem_block: int
    smem_sm: int
    threads_sm: int = 2048
    blocks_sm: int = 32
    regs_sm: int = 65536


#: The targets the compile check (tools/triton_aot_check.py) compiles for, with their heuristics'
#: inputs: A100 (sm_80: 108 SMs, 163 KiB per block), RTX 4090 D (sm_89: 114 SMs -- the RTX 4090
#: has 128 --, 99 KiB per block, 1536 threads and 24 blocks per SM), H200 (sm_90: 132 SMs, 227 KiB).
KNOWN_TARGETS = {
    80: GpuTarget("A100 (sm_80)", 80, 108, 163 * 1024, 164 * 1024),
    89: GpuTarget("RTX 4090 D (sm_89)", 89, 114, 99 * 1024, 100 * 1024, threads_sm=1536, blocks_sm=24),
    90: GpuTarget("H200 (sm_90)", 90, 132, 227 * 1024, 228 * 1024),
}

#: Without a GPU (the interpreter; a launch captured on CPU tensors without TARGET_OVERRIDE): a
#: small GPU with the smallest shared memory of the known targets (sm_89's), so that what is
#: planned there fits every known GPU.
_CPU_TARGET = GpuTarget("cpu (no GPU)", 0, 2, 99 * 1024, 100 * 1024, threads_sm=1536, blocks_sm=24)

# tools/triton_aot_check.py sets this to compile what the launcher would launch on that GPU.
TARGET_OVERRIDE: Optional[GpuTarget] = None

_TARGETS: dict = {}


def gpu_target(device: torch.device) -> GpuTarget:
    """The launch heuristics' view of ``device`` (cached per device; ``TARGET_OVERRIDE`` first)."""
    if TARGET_OVERRIDE is not None:
        return TARGET_OVERRIDE
    if device.type != "cuda" or _interpreting():
        return _CPU_TARGET
    idx = device.index if device.index is not None else torch.cuda.current_device()
    t = _TARGETS.get(idx)
    if t is None:
        p = torch.cuda.get_device_properties(idx)
        arch = p.major * 10 + p.minor
        known = KNOWN_TARGETS.get(arch)
        smem_block = getattr(p, "shared_memory_per_block_optin", 0) or (known.smem_block if known else 48 * 1024)
        smem_sm = getattr(p, "shared_memory_per_multiprocessor", 0) or (known.smem_sm if known else smem_block)
        t = GpuTarget(p.name, arch, p.multi_processor_count, int(smem_block), int(smem_sm),
                      int(getattr(p, "max_threads_per_multi_processor", 0) or (known.threads_sm if known else 1536)),
                      known.blocks_sm if known else 16, int(getattr(p, "regs_per_multiprocessor", 0) or 65536))
        _TARGETS[idx] = t
    return t


def choose_num_splits(bh: int, C: int, block_n: int, target) -> int:
    """Splits of the slot axis for decode: enough programs to fill the GPU (about two waves
    of ``B * Hkv * splits`` programs over ``target.sms``), but at least two key blocks per split.
    ``target``: a :class:`GpuTarget` (or a device)."""
    if not isinstance(target, GpuTarget):
        target = gpu_target(torch.device(target))
    ns = -(-2 * target.sms // max(1, bh))
    ns = min(ns, max(1, -(-C // (2 * block_n))), 64)
    return max(1, ns)


# --------------------------------------------------------------------------------------
# shared helpers
# --------------------------------------------------------------------------------------

# RoPE modes (constexpr ROPE of every kernel)
ROPE_NONE = 0   # no rotation
ROPE_TABLE = 1  # cos/sin tables [>=C, D] by slot (the fallback)
ROPE_FREQ = 2   # from inv_freq at the slot: angle addition inside a key block of ROPE_BLOCK slots
ROPE_POS = 3    # from inv_freq at per-slot positions rope_pos[sections[i], b, h, slot] (M-RoPE)

#: key block of the angle addition (== inf_mllm.reference.ROPE_BLOCK; the tests check it)
ROPE_BLOCK = 64


@triton.jit
def _load_halves(base, row_off, row_mask, h, HALF: tl.constexpr):
    """The two halves ``x[:, :HALF]``, ``x[:, HALF:]`` of rows ``base + row_off[r]`` as float32
    ``[R, BLOCK_H]`` (each element loaded once)."""
    m2 = row_mask[:, None] & (h < HALF)[None, :]
    p = base + row_off[:, None] + h[None, :]
    x1 = tl.load(p, mask=m2, other=0.0).to(tl.float32)
    x2 = tl.load(p + HALF, mask=m2, other=0.0).to(tl.float32)
    return x1, x2


@triton.jit
def _rope_rows(pos, row_mask, h, COS, SIN, FREQ, POS, SEC, pos_base, pos_plane,
               HEAD_DIM: tl.constexpr, HALF: tl.constexpr, ROPE: tl.constexpr, NSEC: tl.constexpr,
               RB: tl.constexpr):
    """cos/sin of the first and second halves ``(c1, s1, c2, s2)``, float32 ``[R, BLOCK_H]``, of rows
    at slots ``pos [R]`` (one cos/sin per row and frequency: for the queries, and the keys of the
    table and per-slot position forms). ``ROPE_FREQ``: the angle-addition form of
    ``reference.rope_cos_sin_blocked`` (without ``rope_scale``, which the launcher folds into the
    softmax scale); ``ROPE_POS``: ``angle_i = POS[SEC[i], pos_base + pos] * FREQ[i]``."""
    hm = h < HALF
    if ROPE == 1:
        m2 = row_mask[:, None] & hm[None, :]
        tab = pos[:, None].to(tl.int64) * HEAD_DIM + h[None, :]
        c1 = tl.load(COS + tab, mask=m2, other=0.0).to(tl.float32)
        c2 = tl.load(COS + tab + HALF, mask=m2, other=0.0).to(tl.float32)
        s1 = tl.load(SIN + tab, mask=m2, other=0.0).to(tl.float32)
        s2 = tl.load(SIN + tab + HALF, mask=m2, other=0.0).to(tl.float32)
        return c1, s1, c2, s2
    elif ROPE == 2:
        f = tl.load(FREQ + h, mask=hm, other=0.0)
        jb = (pos // RB) * RB
        a0 = jb.to(tl.float32)[:, None] * f[None, :]
        a1 = (pos - jb).to(tl.float32)[:, None] * f[None, :]
        c0, s0, co, so = tl.cos(a0), tl.sin(a0), tl.cos(a1), tl.sin(a1)
        c = c0 * co - s0 * so
        s = s0 * co + c0 * so
        return c, s, c, s
    else:
        f = tl.load(FREQ + h, mask=hm, other=0.0)
        sec = tl.load(SEC + h, mask=hm, other=0)
        p = pos[:, None] * 0 + sec[None, :] * 0
        for si in tl.static_range(NSEC):
            ps = tl.load(POS + si * pos_plane + pos_base + pos, mask=row_mask, other=0)
            p = tl.where(sec[None, :] == si, ps[:, None], p)
        a = p.to(tl.float32) * f[None, :]
        c = tl.cos(a)
        s = tl.sin(a)
        return c, s, c, s


@triton.jit
def _rope_offsets(FREQ, h, HALF: tl.constexpr, RB: tl.constexpr):
    """``ROPE_FREQ``: the frequencies ``[BLOCK_H]`` and the in-block offsets' ``cos(o f), sin(o f)``
    ``[RB, BLOCK_H]`` (``o = 0..RB-1``), computed once per program."""
    f = tl.load(FREQ + h, mask=h < HALF, other=0.0)
    a1 = tl.arange(0, RB).to(tl.float32)[:, None] * f[None, :]
    return f, tl.cos(a1), tl.sin(a1)


@triton.jit
def _rope_block(j0, f, co, so, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, RB: tl.constexpr):
    """``ROPE_FREQ``: cos/sin ``[BLOCK_N, BLOCK_H]`` of the key block at slots ``j0 .. j0+BLOCK_N-1``
    (``j0`` a multiple of ``RB``, ``BLOCK_N`` of ``RB``) by angle addition: a cos/sin per
    ``RB``-slot sub-block start and frequency, times the offsets' (``_rope_offsets``)."""
    if BLOCK_N == RB:
        a0 = f * j0  # j0 < 2**24: exact in float32, as the reference's j0.float()
        c0 = tl.cos(a0)[None, :]
        s0 = tl.sin(a0)[None, :]
        return c0 * co - s0 * so, s0 * co + c0 * so
    else:
        NB: tl.constexpr = BLOCK_N // RB
        jb = j0 + tl.arange(0, NB) * RB
        a0 = jb.to(tl.float32)[:, None] * f[None, :]
        c0 = tl.cos(a0)[:, None, :]
        s0 = tl.sin(a0)[:, None, :]
        c = tl.reshape(c0 * co[None, :, :] - s0 * so[None, :, :], [BLOCK_N, BLOCK_H])
        s = tl.reshape(s0 * co[None, :, :] + c0 * so[None, :, :], [BLOCK_N, BLOCK_H])
        return c, s


@triton.jit
def _load_q(q_base, row_off, pos, row_mask, d, h, COS, SIN, FREQ, POS, SEC, pos_base, pos_plane,
            HEAD_DIM: tl.constexpr, HALF: tl.constexpr, ROPE: tl.constexpr, NSEC: tl.constexpr,
            RB: tl.constexpr, LOWP: tl.constexpr, DT: tl.constexpr):
    """Query rows, rotated at slot ``pos`` when ``ROPE``: ``(q, q)`` full rows ``[R, BLOCK_D]``
    without RoPE, else the two rotated halves ``(q1, q2)`` ``[R, BLOCK_H]``; in ``DT`` when
    ``LOWP`` (cast once, outside the key loop), else float32."""
    if ROPE == 0:
        m2 = row_mask[:, None] & (d < HEAD_DIM)[None, :]
        q = tl.load(q_base + row_off[:, None] + d[None, :], mask=m2, other=0.0).to(tl.float32)
        if LOWP:
            q = q.to(DT)
        return q, q
    else:
        x1, x2 = _load_halves(q_base, row_off, row_mask, h, HALF)
        c1, s1, c2, s2 = _rope_rows(pos, row_mask, h, COS, SIN, FREQ, POS, SEC, pos_base, pos_plane,
                                    HEAD_DIM, HALF, ROPE, NSEC, RB)
        q1 = x1 * c1 - x2 * s1
        q2 = x2 * c2 + x1 * s2
        if LOWP:
            q1 = q1.to(DT)
            q2 = q2.to(DT)
        return q1, q2


@triton.jit
def _key_logits(q1, q2, k_base, j, jmask, j0, d, h, f, co, so, COS, SIN, FREQ, POS, SEC, pos_base, pos_plane,
                HEAD_DIM: tl.constexpr, HALF: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
                ROPE: tl.constexpr, NSEC: tl.constexpr, RB: tl.constexpr, LOWP: tl.constexpr, DT: tl.constexpr):
    """Unscaled logits ``q . rot(k_j)`` ``[R, BLOCK_N]`` of the key block at slots ``j`` (block start
    ``j0``): one load of each key element; with RoPE the two halves of a row are loaded once and
    both rotated from that load (``r1 = k1 c - k2 s``, ``r2 = k2 c + k1 s``), two dots."""
    if ROPE == 0:
        k = tl.load(k_base + j[:, None] * HEAD_DIM + d[None, :], mask=jmask[:, None] & (d < HEAD_DIM)[None, :],
                    other=0.0)
        if not LOWP:
            k = k.to(tl.float32)
        return _qk(q1, k, LOWP, DT)
    else:
        r1, r2 = _rotated_key_halves(k_base, j, jmask, j0, h, f, co, so, COS, SIN, FREQ, POS, SEC, pos_base,
                                     pos_plane, HEAD_DIM, HALF, BLOCK_N, BLOCK_H, ROPE, NSEC, RB)
        return _qk(q1, r1, LOWP, DT) + _qk(q2, r2, LOWP, DT)


@triton.jit
def _rotated_key_halves(k_base, j, jmask, j0, h, f, co, so, COS, SIN, FREQ, POS, SEC, pos_base, pos_plane,
                        HEAD_DIM: tl.constexpr, HALF: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
                        ROPE: tl.constexpr, NSEC: tl.constexpr, RB: tl.constexpr):
    """The two halves ``[BLOCK_N, HALF]`` (float32) of the key rows at slots ``j``, loaded once and
    rotated from that load: by angle addition in the block (``ROPE == 2``: ``f, co, so`` from
    :func:`_rope_offsets`), else at each slot (table or per-slot positions)."""
    k1, k2 = _load_halves(k_base, j * HEAD_DIM, jmask, h, HALF)
    if ROPE == 2:
        c, s = _rope_block(j0, f, co, so, BLOCK_N, BLOCK_H, RB)
        r1 = k1 * c - k2 * s
        r2 = k2 * c + k1 * s
    else:
        c1, s1, c2, s2 = _rope_rows(j, jmask, h, COS, SIN, FREQ, POS, SEC, pos_base, pos_plane,
                                    HEAD_DIM, HALF, ROPE, NSEC, RB)
        r1 = k1 * c1 - k2 * s1
        r2 = k2 * c2 + k1 * s2
    return r1, r2


@triton.jit
def _top_rows(x, ROWS: tl.constexpr, TOP: tl.constexpr, COLS: tl.constexpr):
    """The first ``TOP`` rows of ``x [ROWS, COLS]`` (``TOP`` divides ``ROWS``): the decode tiles
    are padded to 16 rows for ``tl.dot``; the workspaces hold the valid rows only."""
    if TOP == ROWS:
        return x
    else:
        x3 = tl.reshape(x, [ROWS // TOP, TOP, COLS])
        first = tl.arange(0, ROWS // TOP)[:, None, None] == 0
        return tl.sum(tl.where(first, x3, 0.0), 0)


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
    Q, K, V, LEN, COS, SIN, FREQ, POS, SEC,
    M_WS, L_WS, ACC_WS, S_WS,
    scale, Hkv, C, n, NS, R, nw, pos_plane,
    HEAD_DIM: tl.constexpr, HALF: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_RR: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SR: tl.constexpr,
    ROPE: tl.constexpr, NSEC: tl.constexpr, RB: tl.constexpr,
    SCORE: tl.constexpr, ALL_ROWS_SCORE: tl.constexpr, LOWP: tl.constexpr, DT: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    sid = tl.program_id(1)
    b = pid_bh // Hkv
    L = tl.load(LEN + b)

    r = tl.arange(0, BLOCK_R)
    d = tl.arange(0, BLOCK_D)
    h = tl.arange(0, BLOCK_H)
    rmask = r < R
    i = r % n  # query index inside the call; rows are (g, i) flattened, g-major
    t = L - n + i  # slot of each query row
    pos_base = pid_bh.to(tl.int64) * C

    # q[b, h*G + g, i, :] sits at row (b*Hkv + h)*G*n + r of the [B*Hq*n, D] view
    q_base = Q + pid_bh.to(tl.int64) * R * HEAD_DIM
    q1, q2 = _load_q(q_base, r * HEAD_DIM, t, rmask, d, h, COS, SIN, FREQ, POS, SEC, pos_base, pos_plane,
                     HEAD_DIM, HALF, ROPE, NSEC, RB, LOWP, DT)
    if ROPE == 2:
        f, co, so = _rope_offsets(FREQ, h, HALF, RB)
    else:
        f = 0.0
        co = 0.0
        so = 0.0

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
        s = _key_logits(q1, q2, K + kv_base, j, jmask, j0, d, h, f, co, so, COS, SIN, FREQ, POS, SEC, pos_base,
                        pos_plane, HEAD_DIM, HALF, BLOCK_N, BLOCK_H, ROPE, NSEC, RB, LOWP, DT) * scale
        v = tl.load(V + kv_base + j[:, None] * HEAD_DIM + d[None, :],
                    mask=jmask[:, None] & (d[None, :] < HEAD_DIM), other=0.0)
        vis = (j[None, :] <= t[:, None]) & jmask[None, :] & rmask[:, None]
        s = tl.where(vis, s, float("-inf"))
        if SCORE:
            if ALL_ROWS_SCORE and BLOCK_SR < BLOCK_R:
                # every query row scores (n == nw): store only the first BLOCK_SR >= R rows of the
                # tile, so that no padding row is even a masked store
                sr = tl.arange(0, BLOCK_SR)
                tl.store(s_base + sr[:, None] * C + j[None, :], _top_rows(s, BLOCK_R, BLOCK_SR, BLOCK_N),
                         mask=(sr < R)[:, None] & jmask[None, :])
            else:
                tl.store(s_base + srow[:, None] * C + j[None, :], s,
                         mask=score_row[:, None] & jmask[None, :])
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _pv(p, v.to(tl.float32), LOWP, DT)
        m_i = m_new

    # the workspace holds the first BLOCK_RR >= R rows only (the tile has BLOCK_R >= 16 for tl.dot)
    ws = (pid_bh * NS + sid).to(tl.int64) * BLOCK_RR
    rr = tl.arange(0, BLOCK_RR)
    tl.store(M_WS + ws + rr, tl.reshape(_top_rows(m_i[:, None], BLOCK_R, BLOCK_RR, 1), [BLOCK_RR]))
    tl.store(L_WS + ws + rr, tl.reshape(_top_rows(l_i[:, None], BLOCK_R, BLOCK_RR, 1), [BLOCK_RR]))
    tl.store(ACC_WS + ws * BLOCK_D + rr[:, None] * BLOCK_D + d[None, :], _top_rows(acc, BLOCK_R, BLOCK_RR, BLOCK_D))


@triton.jit
def _decode_reduce(
    O, LEN, SCORES, M_WS, L_WS, ACC_WS, S_WS,
    Hkv, C, n, NS, R, nw, G, bias, decay,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_RR: tl.constexpr, BLOCK_SR: tl.constexpr,
    BLOCK_N: tl.constexpr, NS_P2: tl.constexpr, SCORE: tl.constexpr, BIAS_REL: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    sid = tl.program_id(1)
    b = pid_bh // Hkv
    L = tl.load(LEN + b)
    sp = tl.arange(0, NS_P2)
    ws0 = pid_bh.to(tl.int64) * NS * BLOCK_RR

    if sid == 0:
        r = tl.arange(0, BLOCK_RR)
        d = tl.arange(0, BLOCK_D)
        rmask = r < R
        stat = ws0 + sp[:, None] * BLOCK_RR + r[None, :]
        smask = (sp[:, None] < NS) & (r[None, :] < BLOCK_RR)
        m_s = tl.load(M_WS + stat, mask=smask, other=_NEG)  # [NS_P2, BLOCK_RR]
        l_s = tl.load(L_WS + stat, mask=smask, other=0.0)
        m_g = tl.max(m_s, 0)  # [BLOCK_RR]
        l_g = tl.sum(l_s * tl.exp(m_s - m_g[None, :]), 0)
        l_safe = tl.where(l_g > 0, l_g, 1.0)
        acc = tl.zeros([BLOCK_RR, BLOCK_D], tl.float32)
        for s in range(0, NS):
            ws = ws0 + s * BLOCK_RR
            m_one = tl.load(M_WS + ws + r)
            a = tl.load(ACC_WS + ws * BLOCK_D + r[:, None] * BLOCK_D + d[None, :])
            acc += a * tl.exp(m_one - m_g)[:, None]
        out = acc / l_safe[:, None]
        o_base = O + pid_bh.to(tl.int64) * R * HEAD_DIM
        tl.store(o_base + r[:, None] * HEAD_DIM + d[None, :], out.to(O.dtype.element_ty),
                 mask=rmask[:, None] & (d[None, :] < HEAD_DIM))

    if SCORE:
        # the G * nw scoring rows only: (g, iw) -> query row g * n + n - nw + iw at slot L - nw + iw
        sr = tl.arange(0, BLOCK_SR)
        srmask = sr < G * nw
        iw = sr % nw
        rr = (sr // nw) * n + (n - nw) + iw
        t = L - nw + iw
        stat = ws0 + sp[:, None] * BLOCK_RR + rr[None, :]
        smask = (sp[:, None] < NS) & srmask[None, :]
        m_s = tl.load(M_WS + stat, mask=smask, other=_NEG)  # [NS_P2, BLOCK_SR]
        l_s = tl.load(L_WS + stat, mask=smask, other=0.0)
        m_g = tl.max(m_s, 0)
        l_g = tl.sum(l_s * tl.exp(m_s - m_g[None, :]), 0)
        lse = m_g + tl.log(tl.where(l_g > 0, l_g, 1.0))
        split_len = tl.cdiv(tl.cdiv(L, NS), BLOCK_N) * BLOCK_N
        lo = sid * split_len
        hi = tl.minimum(lo + split_len, L)
        s_base = S_WS + pid_bh.to(tl.int64) * G * nw * C
        sc_base = SCORES + pid_bh.to(tl.int64) * C
        inv_g = 1.0 / G
        for j0 in range(lo, hi, BLOCK_N):
            j = j0 + tl.arange(0, BLOCK_N)
            jmask = j < hi
            vis = srmask[:, None] & (j[None, :] <= t[:, None]) & jmask[None, :]
            x = tl.load(s_base + sr[:, None] * C + j[None, :], mask=vis, other=float("-inf"))
            p = tl.where(vis, tl.exp(x - lse[:, None]), 0.0)
            col = tl.sum(p, 0) * inv_g
            old = tl.load(sc_base + j, mask=jmask, other=0.0)
            tl.store(sc_base + j, old * decay + col + _window_bias(j, L, nw, bias, BIAS_REL), mask=jmask)


# --------------------------------------------------------------------------------------
# prefill: flash-attention forward + score pass over the window queries
# --------------------------------------------------------------------------------------


@triton.jit
def _prefill_fwd(
    Q, K, V, O, LSE, LEN, COS, SIN, FREQ, POS, SEC,
    scale, Hq, G, C, n, pos_plane,
    HEAD_DIM: tl.constexpr, HALF: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ROPE: tl.constexpr, NSEC: tl.constexpr, RB: tl.constexpr,
    WRITE_LSE: tl.constexpr, LOWP: tl.constexpr, DT: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bq = tl.program_id(1)  # b * Hq + hq
    b = pid_bq // Hq
    hq = pid_bq % Hq
    h_kv = hq // G
    L = tl.load(LEN + b)

    i = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    h = tl.arange(0, BLOCK_H)
    imask = i < n
    t = L - n + i
    kv_row = (b * (Hq // G) + h_kv).to(tl.int64)
    pos_base = kv_row * C
    q_base = Q + pid_bq.to(tl.int64) * n * HEAD_DIM
    q1, q2 = _load_q(q_base, i * HEAD_DIM, t, imask, d, h, COS, SIN, FREQ, POS, SEC, pos_base, pos_plane,
                     HEAD_DIM, HALF, ROPE, NSEC, RB, LOWP, DT)
    if ROPE == 2:
        f, co, so = _rope_offsets(FREQ, h, HALF, RB)
    else:
        f = 0.0
        co = 0.0
        so = 0.0

    kv_base = kv_row * C * HEAD_DIM
    hi = tl.minimum(L - n + tl.minimum(pid_m * BLOCK_M + BLOCK_M, n), L)  # last visible slot + 1

    m_i = tl.full([BLOCK_M], _NEG, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for j0 in range(0, hi, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        jmask = j < hi
        s = _key_logits(q1, q2, K + kv_base, j, jmask, j0, d, h, f, co, so, COS, SIN, FREQ, POS, SEC, pos_base,
                        pos_plane, HEAD_DIM, HALF, BLOCK_N, BLOCK_H, ROPE, NSEC, RB, LOWP, DT) * scale
        v = tl.load(V + kv_base + j[:, None] * HEAD_DIM + d[None, :],
                    mask=jmask[:, None] & (d[None, :] < HEAD_DIM), other=0.0)
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
    Q, K, LSE, LEN, COS, SIN, FREQ, POS, SEC, SCORES,
    scale, Hkv, G, C, n, nw, bias, decay, pos_plane,
    HEAD_DIM: tl.constexpr, HALF: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    ROPE: tl.constexpr, NSEC: tl.constexpr, RB: tl.constexpr,
    LOWP: tl.constexpr, DT: tl.constexpr, BIAS_REL: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = pid_bh // Hkv
    L = tl.load(LEN + b)
    j0 = pid_n * BLOCK_N
    if j0 < L:
        d = tl.arange(0, BLOCK_D)
        h = tl.arange(0, BLOCK_H)
        j = j0 + tl.arange(0, BLOCK_N)
        jmask = j < L
        pos_base = pid_bh.to(tl.int64) * C
        kv_base = pid_bh.to(tl.int64) * C * HEAD_DIM
        # the key block, loaded and rotated once: full rows without RoPE, else its two rotated halves
        if ROPE == 0:
            k1 = tl.load(K + kv_base + j[:, None] * HEAD_DIM + d[None, :],
                         mask=jmask[:, None] & (d < HEAD_DIM)[None, :], other=0.0).to(tl.float32)
            k2 = k1
        else:
            if ROPE == 2:
                f, co, so = _rope_offsets(FREQ, h, HALF, RB)
            else:
                f = 0.0
                co = 0.0
                so = 0.0
            k1, k2 = _rotated_key_halves(K + kv_base, j, jmask, j0, h, f, co, so, COS, SIN, FREQ, POS, SEC, pos_base,
                                         pos_plane, HEAD_DIM, HALF, BLOCK_N, BLOCK_H, ROPE, NSEC, RB)
        if LOWP:
            k1 = k1.to(DT)
            k2 = k2.to(DT)
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
            q1, q2 = _load_q(q_base, row * HEAD_DIM, t, rmask, d, h, COS, SIN, FREQ, POS, SEC, pos_base, pos_plane,
                             HEAD_DIM, HALF, ROPE, NSEC, RB, LOWP, DT)
            lse = tl.load(lse_base + row, mask=rmask, other=0.0)
            if ROPE == 0:
                s = _qk(q1, k1, LOWP, DT) * scale
            else:
                s = (_qk(q1, k1, LOWP, DT) + _qk(q2, k2, LOWP, DT)) * scale
            vis = rmask[:, None] & (j[None, :] <= t[:, None]) & jmask[None, :]
            p = tl.where(vis, tl.exp(s - lse[:, None]), 0.0)
            col += tl.sum(p, 0)
        sc_base = SCORES + pid_bh.to(tl.int64) * C
        old = tl.load(sc_base + j, mask=jmask, other=0.0)
        tl.store(sc_base + j, old * decay + col / G + _window_bias(j, L, nw, bias, BIAS_REL), mask=jmask)


# --------------------------------------------------------------------------------------
# host wrapper
# --------------------------------------------------------------------------------------

# Tests and the compile check only: override the heuristics' picks, e.g. {"decode": {"num_stages": 2}}.
_TUNE: dict = {}


def _pick_stages(target: GpuTarget, s1: int, per_stage: int) -> int:
    """The most pipeline stages (at most 3) whose shared-memory estimate ``s1 + (stages - 1) *
    per_stage`` fits ``target``'s per-block limit. ``per_stage``: the global bytes one trip of the
    pipelined loop copies to shared memory (each stage beyond the first buffers one trip);
    ``s1``: an upper bound of the single-stage program (the dot operands' layout conversions).
    Checked against the compiled kernels for sm_80/89/90 by tools/triton_aot_check.py (the
    estimate is an upper bound there; bench/NOTES_triton.md has the measured sizes)."""
    st = 3
    while st > 1 and s1 + (st - 1) * per_stage > target.smem_block:
        st -= 1
    return st


def _tile_bytes(rows: int, BLOCK_N: int, BLOCK_D: int, itemsize: int, lowp: bool, rope: int, nsec: int):
    """``(s1, per_stage)`` of :func:`_pick_stages` for a loop over key blocks of ``BLOCK_N`` slots
    (K and V, and the table fallback's float32 cos/sin tiles or the positions, per trip) by a
    program of ``rows`` query rows."""
    dsz = itemsize if lowp else 4  # the dots' operands
    s1 = (rows + 2 * BLOCK_N) * BLOCK_D * dsz + 8192
    per_stage = 2 * BLOCK_N * BLOCK_D * itemsize
    if rope == ROPE_TABLE:
        per_stage += 2 * BLOCK_N * BLOCK_D * 4
    elif rope == ROPE_POS:
        per_stage += nsec * BLOCK_N * 4
    return s1, per_stage


def _decode_config(target: GpuTarget, interp: bool, lowp: bool, itemsize: int, BLOCK_D: int, BLOCK_R: int,
                   rope: int, nsec: int = 1):
    """``(BLOCK_N, num_warps, num_stages)`` of the decode stage 1 on ``target``: key blocks of
    ROPE_BLOCK = 64 slots (the frequency form needs a multiple of it; 32 for the other forms when
    the query rows are many), 8 warps for 64 rows at D=128, the most stages that fit the target's
    shared memory per block (sm_89: 99 KiB, sm_80: 163 KiB, sm_90: 227 KiB)."""
    if interp:
        cfg = dict(BLOCK_N=_INTERP_BLOCK_N, num_warps=4, num_stages=1)
    else:
        BLOCK_N = 64
        if rope != ROPE_FREQ and BLOCK_R * BLOCK_D > 64 * 64:
            BLOCK_N = 32  # many query rows: smaller key blocks keep the register tiles in bounds
        num_warps = 8 if BLOCK_R >= 64 and BLOCK_D >= 128 else 4
        num_stages = _pick_stages(target, *_tile_bytes(BLOCK_R, BLOCK_N, BLOCK_D, itemsize, lowp, rope, nsec))
        cfg = dict(BLOCK_N=BLOCK_N, num_warps=num_warps, num_stages=num_stages)
    cfg.update(_TUNE.get("decode", {}))
    return cfg["BLOCK_N"], cfg["num_warps"], cfg["num_stages"]


def _prefill_config(target: GpuTarget, interp: bool, lowp: bool, itemsize: int, BLOCK_D: int, n: int,
                    score_rows: int, rope: int, nsec: int = 1):
    """``(BLOCK_M, BLOCK_N, BLOCK_R, BLOCK_NS, num_warps, stages_fwd, stages_scores)`` of the
    prefill kernels on ``target`` (the forward pipelines key blocks, the score pass blocks of
    ``BLOCK_R`` window queries; stages as in :func:`_decode_config`)."""
    if interp:
        cfg = dict(BLOCK_M=max(16, min(128, _next_pow2(n))), BLOCK_N=_INTERP_BLOCK_N,
                   BLOCK_R=max(16, min(128, _next_pow2(score_rows))), BLOCK_NS=_INTERP_BLOCK_N, num_warps=4,
                   num_stages=1, scores_stages=1)
    else:
        BLOCK_M = 64 if n >= 64 else max(16, _next_pow2(n))
        BLOCK_N = 64 if (BLOCK_D <= 64 or rope == ROPE_FREQ) else 32
        BLOCK_R, BLOCK_NS = 32, 64
        st = _pick_stages(target, *_tile_bytes(BLOCK_M, BLOCK_N, BLOCK_D, itemsize, lowp, rope, nsec))
        # the score pass: the key block stays; the window queries' rows (and their cos/sin) stream
        s1, _ = _tile_bytes(BLOCK_R, BLOCK_NS, BLOCK_D, itemsize, lowp, rope, nsec)
        per_rows = BLOCK_R * BLOCK_D * itemsize + (2 * BLOCK_R * BLOCK_D * 4 if rope == ROPE_TABLE else 0)
        cfg = dict(BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_R=BLOCK_R, BLOCK_NS=BLOCK_NS, num_warps=4,
                   num_stages=st, scores_stages=_pick_stages(target, s1, per_rows))
    cfg.update(_TUNE.get("prefill", {}))
    return (cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_R"], cfg["BLOCK_NS"], cfg["num_warps"], cfg["num_stages"],
            cfg["scores_stages"])


_TL_DT = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def _empty(shape, dtype, device):
    x = torch.empty(shape, dtype=dtype, device=device)
    if POISON:
        x.fill_(float("nan"))
    return x


class _Plan:
    """Everything of a launch that depends on the shapes, dtypes, device and flags only: block
    sizes, grids, constexprs, workspace shapes (computed once per key, see ``_plan``), and the
    workspaces themselves, cached per stream (none while a CUDA graph is being captured)."""

    __slots__ = ("path", "grid1", "kw1", "grid2", "kw2", "ws_shapes", "ws", "scale_rope")

    def workspaces(self, dev):
        if dev.type == "cuda":
            if torch.cuda.is_current_stream_capturing():  # the graph's pool owns what it allocates
                return tuple(_empty(sh, torch.float32, dev) for sh in self.ws_shapes)
            where = torch.cuda.current_stream(dev).cuda_stream
        else:
            where = None
        ws = self.ws.get(where)
        if ws is None:
            ws = self.ws[where] = tuple(_empty(sh, torch.float32, dev) for sh in self.ws_shapes)
        elif POISON:
            for t in ws:
                t.fill_(float("nan"))
        return ws


_PLANS: dict = {}
_MAX_PLANS = 64


def _plan(key, q, k, score, nw, rope, nsec, bias_rel, path, num_splits) -> _Plan:
    B, Hq, n, D = q.shape
    Hkv, C = k.shape[1], k.shape[2]
    G = Hq // Hkv
    dev = q.device
    target = gpu_target(dev)
    interp = _interpreting()
    lowp = (q.dtype != torch.float32) and (not interp or _FORCE_LOWP)
    BLOCK_D = max(16, _next_pow2(D))
    HALF = D // 2
    common = dict(HEAD_DIM=D, HALF=HALF, BLOCK_D=BLOCK_D, BLOCK_H=max(16, _next_pow2(HALF)),
                  ROPE=rope, NSEC=nsec, RB=ROPE_BLOCK, LOWP=lowp, DT=_TL_DT[q.dtype])
    pl = _Plan()
    pl.ws = {}
    pl.scale_rope = rope in (ROPE_FREQ, ROPE_POS)  # cos/sin times rope_scale on q and on k
    pl.path = path or ("decode" if G * n <= DECODE_MAX_ROWS else "prefill")
    if pl.path == "decode":
        R = G * n
        BLOCK_R = max(16, _next_pow2(R))
        BLOCK_RR = _next_pow2(R)
        BLOCK_SR = _next_pow2(G * nw) if score else 1
        BLOCK_N, num_warps, num_stages = _decode_config(target, interp, lowp, q.element_size(), BLOCK_D, BLOCK_R,
                                                        rope, nsec)
        assert rope != ROPE_FREQ or BLOCK_N % ROPE_BLOCK == 0
        ns = num_splits or choose_num_splits(B * Hkv, C, BLOCK_N, target)
        # the reduce moves little: [BLOCK_SR, BLOCK_N] logits per trip, [BLOCK_RR, BLOCK_D] per split
        reduce_warps = 2 if max(BLOCK_SR * BLOCK_N, BLOCK_RR * BLOCK_D) <= 2048 else 4
        pl.ws_shapes = ((B * Hkv, ns, BLOCK_RR), (B * Hkv, ns, BLOCK_RR), (B * Hkv, ns, BLOCK_RR, BLOCK_D)) + (
            ((B * Hkv, G * nw, C),) if score else ())
        pl.grid1 = pl.grid2 = (B * Hkv, ns)
        pl.kw1 = dict(Hkv=Hkv, C=C, n=n, NS=ns, R=R, nw=nw, pos_plane=B * Hkv * C, **common,
                      BLOCK_R=BLOCK_R, BLOCK_RR=BLOCK_RR, BLOCK_N=BLOCK_N, BLOCK_SR=BLOCK_SR, SCORE=score,
                      ALL_ROWS_SCORE=score and nw == n, num_warps=num_warps, num_stages=num_stages)
        pl.kw2 = dict(Hkv=Hkv, C=C, n=n, NS=ns, R=R, nw=nw, G=G, HEAD_DIM=D, BLOCK_D=BLOCK_D, BLOCK_RR=BLOCK_RR,
                      BLOCK_SR=BLOCK_SR, BLOCK_N=BLOCK_N, NS_P2=max(2, _next_pow2(ns)), SCORE=score,
                      BIAS_REL=bias_rel and score, num_warps=reduce_warps)
    elif pl.path == "prefill":
        BLOCK_M, BLOCK_N, BLOCK_R, BLOCK_NS, num_warps, num_stages, scores_stages = _prefill_config(
            target, interp, lowp, q.element_size(), BLOCK_D, n, G * max(nw, 1), rope, nsec)
        assert rope != ROPE_FREQ or (BLOCK_N % ROPE_BLOCK == 0 and BLOCK_NS % ROPE_BLOCK == 0)
        pl.ws_shapes = ((B, Hq, n),) if score else ()
        pl.grid1 = (triton.cdiv(n, BLOCK_M), B * Hq)
        pl.grid2 = (B * Hkv, triton.cdiv(C, BLOCK_NS))
        pl.kw1 = dict(Hq=Hq, G=G, C=C, n=n, pos_plane=B * Hkv * C, **common, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                      WRITE_LSE=score, num_warps=num_warps, num_stages=num_stages)
        pl.kw2 = dict(Hkv=Hkv, G=G, C=C, n=n, nw=nw, pos_plane=B * Hkv * C, **common, BLOCK_R=BLOCK_R,
                      BLOCK_N=BLOCK_NS, BIAS_REL=bias_rel, num_warps=num_warps, num_stages=scores_stages)
    else:
        raise ValueError(f"unknown path {path!r}")
    if len(_PLANS) >= _MAX_PLANS:
        _PLANS.clear()
    _PLANS[key] = pl
    return pl


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

    RoPE: the ``cos, sin [>=C, D]`` tables by slot (the fallback), or the frequencies ``inv_freq
    [D/2]`` (float32) with ``rope_scale``, at the slot (angle addition inside key blocks of
    ``ROPE_BLOCK`` slots, ``inf_mllm.reference.rope_cos_sin_blocked``) or, with ``rope_pos [S, B,
    Hkv, C]`` int32 and ``rope_sections [D/2]`` int32, at each slot's stored positions.

    ``path`` (``"decode"``/``"prefill"``) and ``num_splits`` override the heuristics (tests,
    benchmarks). ``length`` is never read on the host. What depends on shapes and flags only is
    planned once per key (``_plan``); a call allocates its output and, the first time per
    stream, the workspaces.
    """
    score = scores is not None and window > 0
    n = q.shape[2]
    nw = min(window, n) if score else 0
    if cos is not None:
        rope, nsec = ROPE_TABLE, 1
    elif inv_freq is None:
        rope, nsec = ROPE_NONE, 1
    elif rope_pos is None:
        rope, nsec = ROPE_FREQ, 1
    else:
        rope, nsec = ROPE_POS, rope_pos.shape[0]
    if bias_mode != "absolute" and bias_mode != "relative":
        raise ValueError(f"unknown bias_mode {bias_mode!r}")
    key = (q.shape, k.shape, q.dtype, q.device, score, nw, rope, nsec, bias_mode, path, num_splits,
           TARGET_OVERRIDE, _FORCE_LOWP, _INTERP_BLOCK_N, repr(_TUNE) if _TUNE else None)
    pl = _PLANS.get(key)
    if pl is None:
        pl = _plan(key, q, k, score, nw, rope, nsec, bias_mode == "relative", path, num_splits)
    dev = q.device
    scale, bias, decay = float(scale), float(bias), float(decay)  # fp32 arguments, never ints to specialise
    if pl.scale_rope:
        scale = scale * rope_scale * rope_scale
    out = _empty(q.shape, q.dtype, dev)
    ws = pl.workspaces(dev)
    cos_t = q if cos is None else cos
    sin_t = q if sin is None else sin
    freq_t = q if inv_freq is None else inv_freq
    pos_t = length if rope_pos is None else rope_pos
    sec_t = length if rope_sections is None else rope_sections
    sc_t = scores if score else q
    if pl.path == "decode":
        m_ws, l_ws, acc_ws = ws[0], ws[1], ws[2]
        s_ws = ws[3] if score else m_ws
        _decode_stage1[pl.grid1](q, k, v, length, cos_t, sin_t, freq_t, pos_t, sec_t, m_ws, l_ws, acc_ws, s_ws,
                                 scale, **pl.kw1)
        _decode_reduce[pl.grid2](out, length, sc_t, m_ws, l_ws, acc_ws, s_ws, bias=bias, decay=decay, **pl.kw2)
        return out
    lse = ws[0] if score else out
    _prefill_fwd[pl.grid1](q, k, v, out, lse, length, cos_t, sin_t, freq_t, pos_t, sec_t, scale, **pl.kw1)
    if score:
        _prefill_scores[pl.grid2](q, k, lse, length, cos_t, sin_t, freq_t, pos_t, sec_t, sc_t, scale, bias=bias,
                                  decay=decay, **pl.kw2)
    return out

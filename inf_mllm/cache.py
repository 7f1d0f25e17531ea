"""``StreamingCache``: a transformers ``Cache`` with fixed-size per-layer buffers (SPEC §2).

Flow of one forward through layer ``l`` (HF calls ``update`` then the attention function):

1. ``StreamingLayer.update`` stashes the new (HF-rotated) keys/values and returns the layer's
   buffer tensors as handles; ``get_seq_length`` counts every token fed (HF semantics, so
   ``generate`` and hand-written loops compute the usual ``position_ids``).
2. The registered attention function (:mod:`inf_mllm.attention`) finds the layer from the
   handle and calls :meth:`StreamingLayer.attend`: in rolling mode it un-rotates the new
   keys and queries with the exact cos/sin the model used; it strips pad tokens (2-D attention
   mask) so each row equals the row alone; writes the new tokens at slots
   ``length[b]..``; runs ``ops.attention_with_scores`` (RoPE by slot in rolling mode); and
   lets the policy evict right after. If the tokens do not fit in ``C`` slots, the policy
   makes room first and the call is processed in sub-chunks (identical to chunked prefill),
   so ``length <= C`` always holds.
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Optional, Union

import torch

from . import ops
from ._compat import Cache, CacheLayerMixin, find_rotary, get_attn_implementation, text_config, unsupported_reason
from .modality import NAMES, TEXT, modality_code
from .policies import Policy, make_policy
from .reference import rotate_half

ATTN_IMPL = "inf_mllm"

# id(k buffer) -> layer, so the attention function can find the layer from the key tensor it receives
_OWNERS: "weakref.WeakValueDictionary[int, StreamingLayer]" = weakref.WeakValueDictionary()


def owner_of(key: torch.Tensor) -> Optional["StreamingLayer"]:
    layer = _OWNERS.get(id(key))
    if layer is not None and layer.k is key:
        return layer
    return None


def _unrotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Inverse of ``x*cos + rotate_half(x)*sin`` (cos/sin ``[B|1, n, D]``), computed in float32."""
    y = x.float()
    c = cos.float()[:, None]
    s = sin.float()[:, None]
    return ((y * c - rotate_half(y) * s) / (c * c + s * s)).to(x.dtype)


class StreamingLayer(CacheLayerMixin):
    is_compileable = False
    is_sliding = False
    is_croppable = False

    def __init__(self, cache: "StreamingCache", layer_idx: int):
        super().__init__()
        self._cache = weakref.ref(cache)
        self.layer_idx = layer_idx
        self.k = self.v = self.scores = self.length = self.modality = self.position = None
        self.row_pos = None  # [B] int64: original stream position of each row's next real token
        self.len_host: list = []  # host mirror of `length` (no device sync to read it)
        self.C = 0
        self.seen = 0
        self.state: dict = {}
        self.pending = None
        self.n_evictions = 0

    @property
    def cache(self) -> "StreamingCache":
        return self._cache()

    # ---- buffers -----------------------------------------------------------------------
    def _alloc(self, B, H, D, dtype, device, C):
        self.k = torch.zeros(B, H, C, D, dtype=dtype, device=device)
        self.v = torch.zeros(B, H, C, D, dtype=dtype, device=device)
        self.scores = torch.zeros(B, H, C, dtype=torch.float32, device=device)
        self.modality = torch.zeros(B, H, C, dtype=torch.int8, device=device)
        self.position = torch.full((B, H, C), -1, dtype=torch.int32, device=device)
        self.C = C
        self.keys, self.values = self.k, self.v
        _OWNERS[id(self.k)] = self

    def lazy_initialization(self, key_states, value_states) -> None:
        B, H, _, D = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        self._alloc(B, H, D, key_states.dtype, key_states.device, self.cache.policy.capacity)
        self.length = torch.zeros(B, dtype=torch.int32, device=key_states.device)
        self.row_pos = torch.zeros(B, dtype=torch.long, device=key_states.device)
        self.len_host = [0] * B
        self.is_initialized = True

    def grow(self, needed: int) -> None:
        """Enlarge the buffers (policy ``full`` only)."""
        B, H, C, D = self.k.shape
        new_C = max(needed, 2 * C)
        old = (self.k, self.v, self.scores, self.modality, self.position)
        _OWNERS.pop(id(self.k), None)
        self._alloc(B, H, D, self.k.dtype, self.k.device, new_C)
        for dst, src in zip((self.k, self.v, self.scores, self.modality, self.position), old):
            dst[:, :, :C] = src

    def max_length(self) -> int:
        return max(self.len_host) if self.len_host else 0

    def compact(self, budget: int, n_sink: int, n_recent: int, reset_scores: bool = True, rows=None) -> None:
        """``ops.compact_`` on ``rows`` (default all) of this layer; rows under budget are untouched;
        metadata moves along."""
        B = len(self.len_host)
        rows = range(B) if rows is None else rows
        rows = [b for b in rows if self.len_host[b] > budget]
        if not rows:
            return
        over_all = [b for b in range(B) if self.len_host[b] > budget]
        if rows == over_all:
            groups = [slice(0, B)]  # one call: compact_ skips rows under budget itself
        else:
            groups = [slice(b, b + 1) for b in rows]
        for g in groups:
            ops.compact_(
                self.k[g], self.v[g], self.scores[g], self.length[g], budget=budget, n_sink=n_sink,
                n_recent=n_recent, reset_scores=reset_scores, extras=(self.modality[g], self.position[g]),
                check_values=False,  # lengths are tracked on the host: no device sync per layer
            )
        for b in rows:
            self.len_host[b] = budget
        self.n_evictions += 1

    # ---- transformers API --------------------------------------------------------------
    def update(self, key_states, value_states, *args, **kwargs):
        cache = self.cache
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        impl = cache._attn_impl()
        if impl is not None and impl != ATTN_IMPL:
            raise RuntimeError(
                f"inf_mllm: StreamingCache needs the model's attn_implementation to be {ATTN_IMPL!r} (got {impl!r}); "
                "create it with inf_mllm.enable(model, ...)"
            )
        if key_states.shape[0] != self.k.shape[0]:
            raise ValueError(
                f"inf_mllm: batch size changed from {self.k.shape[0]} to {key_states.shape[0]}; call cache.reset() "
                "or make a new cache"
            )
        self.pending = (key_states, value_states)
        self.seen += key_states.shape[-2]
        return self.k, self.v

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int):
        return self.seen + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        if self.is_initialized:
            self.length.zero_()
            self.scores.zero_()
            self.position.fill_(-1)
            self.modality.zero_()
            self.row_pos.zero_()
            self.len_host = [0] * len(self.len_host)
        self.seen = 0
        self.state = {}
        self.pending = None

    def reorder_cache(self, beam_idx):
        raise NotImplementedError("inf_mllm: beam search is not supported by StreamingCache")

    def crop(self, tokens_to_remove: int):
        raise NotImplementedError("inf_mllm: StreamingCache cannot be cropped (evicted tokens are gone)")

    def batch_repeat_interleave(self, repeats: int):
        raise NotImplementedError("inf_mllm: StreamingCache does not support batch_repeat_interleave")

    def batch_select_indices(self, indices):
        raise NotImplementedError("inf_mllm: StreamingCache does not support batch_select_indices")

    # ---- attention ---------------------------------------------------------------------
    def attend(self, query, attention_mask, scaling, position_ids) -> torch.Tensor:
        """Attention of the pending new tokens; returns ``[B, Hq, n, D]``."""
        if self.pending is None:
            raise RuntimeError("inf_mllm: attention called without a cache update for this layer")
        kn, vn = self.pending
        self.pending = None
        cache, pol = self.cache, self.cache.policy
        B, Hq, n, D = query.shape
        real = None
        if attention_mask is not None:
            if attention_mask.dim() != 2:
                raise ValueError(
                    f"inf_mllm: expected a 2-D padding mask, got shape {tuple(attention_mask.shape)}; pass the usual "
                    "[batch, seq] attention_mask"
                )
            real = attention_mask[:, -n:].to(device=query.device, dtype=torch.bool)
            if real.shape[1] != n or bool(real.all()):
                real = None
        cos_t = sin_t = None
        if pol.rolling:
            cos, sin = cache._rope_at(position_ids, n, self.seen - n, query)
            query = _unrotate(query, cos, sin)
            kn = _unrotate(kn, cos, sin)
            cos_t, sin_t = cache._slot_table(query.device)
        phase = "prefill" if n > 1 else "decode"
        B = query.shape[0]
        if real is None:
            out = torch.empty_like(query)
            self._run(range(B), query, kn, vn, None, out, scaling, cos_t, sin_t, phase)
        else:
            out = torch.zeros_like(query)
            for b in range(B):  # padded rows: each row alone, pads stripped
                idx = real[b].nonzero().squeeze(1)
                if idx.numel():
                    self._run([b], query, kn, vn, idx, out, scaling, cos_t, sin_t, phase)
        return out

    def _run(self, rows, q, kn, vn, idx, out, scaling, cos_t, sin_t, phase):
        """Write + attend the new tokens of ``rows`` in sub-chunks that fit, with the policy hooks.

        ``rows`` is all rows (``idx is None``) or one row whose real tokens are ``idx``.
        """
        pol = self.cache.policy
        rows = list(rows)
        n = q.shape[2] if idx is None else int(idx.numel())
        pol.before_attention(self, n, phase, rows)
        i = 0
        while i < n:
            full = [b for b in rows if self.len_host[b] >= self.C]
            if full:
                pol.make_room(self, n - i, full)
            room = self.C - max(self.len_host[b] for b in rows)
            if room <= 0:
                raise RuntimeError(f"inf_mllm: policy {pol.name!r} could not make room in the cache (C={self.C})")
            m = min(n - i, room)
            if idx is None:
                sl = slice(i, i + m)
                self._write_and_attend(q[:, :, sl], kn[:, :, sl], vn[:, :, sl], out[:, :, sl], scaling, cos_t, sin_t, m, phase)
            else:
                b = rows[0]
                j = idx[i : i + m]
                sb = slice(b, b + 1)
                res = torch.empty_like(q[sb, :, j])
                self._write_and_attend(q[sb, :, j], kn[sb, :, j], vn[sb, :, j], res, scaling, cos_t, sin_t, m, phase, row=b)
                out[b, :, j] = res[0]
            pol.after_attention(self, m, phase, rows)
            i += m

    def _write_and_attend(self, q, kn, vn, out, scaling, cos_t, sin_t, m, phase, row=None):
        cache, pol = self.cache, self.cache.policy
        w = pol.score_window(self, m, phase)
        bias = pol.score_bias(self, phase) if w > 0 else 0.0
        g = slice(None) if row is None else slice(row, row + 1)
        k, v, length, scores = self.k[g], self.v[g], self.length[g], self.scores[g]
        B = q.shape[0]
        ar = torch.arange(m, device=q.device)
        slots = length.long()[:, None] + ar  # [B, m]
        bidx = torch.arange(B, device=q.device)[:, None]
        k[bidx, :, slots] = kn.permute(0, 2, 1, 3)
        v[bidx, :, slots] = vn.permute(0, 2, 1, 3)
        rp = self.row_pos[g]
        self.position[g][bidx, :, slots] = (rp[:, None] + ar).to(torch.int32)[:, :, None]
        self.modality[g][bidx, :, slots] = cache._modality
        rp += m
        length += m
        for b in range(len(self.len_host)) if row is None else (row,):
            self.len_host[b] += m
        out.copy_(
            ops.attention_with_scores(
                q, k, v, length, scores if w > 0 else None, scale=scaling, window=w, bias=bias, cos=cos_t, sin=sin_t,
                check_values=False,  # len_host guarantees n <= length <= C; no device sync per layer
            )
        )


class StreamingCache(Cache):
    """Fixed-size KV cache for streaming inference with a ``transformers`` decoder model.

    Args:
        model: the (already loaded) model; checked for support.
        policy: policy name (see :func:`inf_mllm.policies.available_policies`) or a ``Policy``.
        chunk: prefill chunk size; the capacity is ``C = budget + max(window, chunk)``.
        **policy_args: ``budget, n_sink, n_recent, window, bias`` and policy-specific ones.

    The model must use ``attn_implementation="inf_mllm"``: use :func:`inf_mllm.enable`.
    """

    def __init__(self, model, policy: Union[str, Policy] = "inf_mllm", *, chunk: int = 512, **policy_args):
        if isinstance(policy, Policy):
            if policy_args:
                raise TypeError("inf_mllm: pass policy arguments either to the Policy or here, not both")
            pol = policy
        else:
            pol = make_policy(policy, chunk=chunk, **{k: v for k, v in policy_args.items() if v is not None})
        reason = unsupported_reason(model, pol.rolling)
        if reason is not None:
            raise ValueError(f"inf_mllm: unsupported model: {reason}")
        cfg = text_config(model)
        layers = [StreamingLayer(self, i) for i in range(cfg.num_hidden_layers)]
        super().__init__(layers=layers)
        self.policy = pol
        self.config = model.config
        self.rotary = find_rotary(model)
        self._modality = TEXT
        self._rope_memo = None
        self._table = None

    # ---- helpers -----------------------------------------------------------------------
    def _attn_impl(self):
        return get_attn_implementation(self)

    def _rope_at(self, position_ids, n, pos0, like):
        """cos/sin the model used for the new tokens (memoised across layers of one forward)."""
        from ._compat import rotary_cos_sin

        # one forward = one (pos0, n); the position_ids object alone is not enough (a caller may
        # update a static position buffer in place between forwards)
        memo = self._rope_memo
        if memo is not None and memo[0] == (pos0, n) and memo[1] is position_ids:
            return memo[2], memo[3]
        if position_ids is None:
            pid = (torch.arange(n, device=like.device) + pos0)[None]
        else:
            pid = position_ids
            if pid.dim() == 1:
                pid = pid[None]
            pid = pid[..., -n:]
        cos, sin = rotary_cos_sin(self.rotary, pid, like.dtype, like.device)
        self._rope_memo = ((pos0, n), position_ids, cos, sin)
        return cos, sin

    def _slot_table(self, device):
        """RoPE cos/sin ``[C, D]`` (float32) for slots ``0..C-1`` from the model's rotary module."""
        from ._compat import rotary_cos_sin

        C = self.policy.capacity
        t = self._table
        if t is None or t[0].device != torch.device(device) or t[0].shape[0] < C:
            pid = torch.arange(C, device=device)[None]
            cos, sin = rotary_cos_sin(self.rotary, pid, torch.float32, device)
            self._table = t = (cos[0].contiguous(), sin[0].contiguous())
        return t

    # ---- public ------------------------------------------------------------------------
    @contextlib.contextmanager
    def modality(self, m: Union[str, int]):
        """Tag the tokens fed inside the ``with`` block (``"text"``, ``"image"``, ``"video"``)."""
        old, self._modality = self._modality, modality_code(m)
        try:
            yield self
        finally:
            self._modality = old

    @property
    def capacity(self) -> int:
        return self.policy.capacity

    def lengths(self, layer_idx: int = 0):
        """Valid slots per row of layer ``layer_idx``."""
        return list(self.layers[layer_idx].len_host)

    def stats(self) -> dict:
        """Tokens seen, slots used (per modality), evictions, bytes held by the buffers."""
        used = {name: 0 for name in NAMES.values()}
        nbytes = 0
        slots = 0
        for layer in self.layers:
            if not layer.is_initialized:
                continue
            for t in (layer.k, layer.v, layer.scores, layer.length, layer.modality, layer.position, layer.row_pos):
                nbytes += t.numel() * t.element_size()
        first = self.layers[0]
        if first.is_initialized:
            slots = sum(first.len_host)
            for b, L in enumerate(first.len_host):
                counts = torch.bincount(first.modality[b, 0, :L].long(), minlength=len(NAMES))
                for code, name in NAMES.items():
                    used[name] += int(counts[code])
        return {
            "policy": self.policy.name,
            "tokens_seen": self.get_seq_length(),
            "slots_used": slots,
            "slots_by_modality": used,
            "capacity": self.capacity if not self.policy.grows else (first.C if first.is_initialized else 0),
            "budget": self.policy.budget,
            "evictions": first.n_evictions,
            "cache_bytes": nbytes,
        }

    def reset(self):
        for layer in self.layers:
            layer.reset()
        self._rope_memo = None

    def __repr__(self):
        return f"StreamingCache(policy={self.policy!r}, layers={len(self.layers)})"

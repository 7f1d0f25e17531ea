"""``StreamingCache``: a transformers ``Cache`` with fixed-size per-layer buffers (SPEC §2).

The jobs are split: :mod:`inf_mllm.buffers` holds a layer's buffers (allocation, writes,
compaction); :mod:`inf_mllm.rope` the positions (undoing the model's RoPE, the operator's rotary input);
:mod:`inf_mllm.policies` decide scoring and eviction; this module is the transformers API and
the scheduling of a forward's tokens.

Flow of one forward through layer ``l`` (HF calls ``update`` then the attention function):

1. ``StreamingLayer.update`` stashes the new (HF-rotated) keys/values and returns the layer's
   key/value buffers; ``get_seq_length`` counts every token fed (HF semantics, so ``generate``
   and hand-written loops compute the usual ``position_ids``).
2. The registered attention function (:mod:`inf_mllm.attention`) gets those buffers back, finds
   their layer (each key buffer carries a reference to its layer) and calls
   :meth:`StreamingLayer.attend`: in rolling mode the new keys and queries are un-rotated with
   the exact cos/sin the model used; pad tokens are stripped per row (2-D attention mask), so a
   padded row equals the row alone; the tokens are written at slots ``length[b]..`` in pieces
   that fit (the policy makes room first when a row is full, so ``length <= C`` always), each
   piece attended by ``ops.attention_with_scores`` (RoPE by slot in rolling mode) as the
   policy's :class:`~inf_mllm.policies.Scoring` says, and evicted right after when the policy
   says it is due.
"""
from __future__ import annotations

import contextlib
import copy
import weakref
from typing import List, Optional, Union

import torch

from . import ops, reference
from ._compat import (Cache, CacheLayerMixin, attention_modules, find_rotary, get_attn_implementation, text_config,
                      unsupported_reason)
from .buffers import KVBuffers
from .mrope import Tracker, install_hooks, is_mrope_model
from .modality import NAMES, TEXT, modality_code
from .policies import DEFAULT_CHUNK, Policy, Scoring, make_policy
from .rope import Rope, RopeMismatch

ATTN_IMPL = "inf_mllm"


class StreamingLayer(CacheLayerMixin):
    """One layer of a :class:`StreamingCache`: transformers' per-layer cache API over a
    :class:`~inf_mllm.buffers.KVBuffers` (``buf``), and the attention of a forward's tokens."""

    is_compileable = False
    is_sliding = False
    is_croppable = False

    def __init__(self, cache: "StreamingCache", layer_idx: int):
        super().__init__()
        self._cache = weakref.ref(cache)
        self.layer_idx = layer_idx
        self.buf: Optional[KVBuffers] = None
        self.seen = 0  # tokens fed to this layer, pads included (transformers' sequence length)
        self.pending = None
        self.plan = None  # the Scoring of a planned decode step (see StreamingCache.plan_decode_step)
        self.deferred: set = set()  # rows whose eviction waits (StreamingCache.deferred_eviction)

    @property
    def cache(self) -> "StreamingCache":
        return self._cache()

    # ---- transformers API --------------------------------------------------------------
    def lazy_initialization(self, key_states, value_states) -> None:
        B, H, _, D = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        pol = self.cache.policy
        self.buf = KVBuffers(B, H, pol.capacity, D, key_states.dtype, key_states.device, state=pol.new_state(B),
                             owner=self, mrope=self.cache.mrope is not None)
        self.buf.rolling = pol.rolling
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        cache = self.cache
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        impl = cache._attn_impl() if self.layer_idx == 0 else None  # once per forward
        if impl is not None and impl != ATTN_IMPL:
            raise RuntimeError(
                f"inf_mllm: StreamingCache needs the model's attn_implementation to be {ATTN_IMPL!r} (got {impl!r}); "
                "create it with inf_mllm.enable(model, ...)"
            )
        if key_states.shape[0] != self.buf.batch:
            raise ValueError(
                f"inf_mllm: batch size changed from {self.buf.batch} to {key_states.shape[0]}; call cache.reset() "
                "or make a new cache"
            )
        self.pending = (key_states, value_states)
        if self.plan is None:  # (a planned step counts it afterwards, outside the graph)
            self.seen += key_states.shape[-2]
        self.keys, self.values = self.buf.k, self.buf.v  # (``full`` may have grown them)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length):
        # transformers < 5.13 passes the cache_position tensor instead of the query length
        n = query_length.shape[0] if isinstance(query_length, torch.Tensor) else query_length
        if n == 0:
            raise ValueError(
                f"inf_mllm: a forward with no new token (the cache already holds {self.seen} tokens). After a stream, "
                "model.generate needs the ids of the whole history; inf_mllm.generate(model, new_ids, cache=cache) "
                "takes only the new ones"
            )
        if self.plan is not None:  # a planned step: a size that does not change from step to step
            return self.buf.capacity + n, 0  # (the "inf_mllm" mask function does not use it)
        return self.seen + n, 0

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:  # transformers < 5.13 asks for it
        return -1

    def reset(self) -> None:
        """Forget everything, buffers included (the next forward may use another batch size)."""
        self.buf = None
        self.keys = self.values = None
        self.is_initialized = False
        self.seen = 0
        self.pending = None

    def crop(self, tokens_to_remove: int):
        raise NotImplementedError("inf_mllm: StreamingCache cannot be cropped (evicted tokens are gone)")

    # ---- batch rows (beam search) and host state (inf_mllm.persist) ----------------------
    def reorder_cache(self, beam_idx):
        self.select_rows(_host_rows(beam_idx))

    def batch_repeat_interleave(self, repeats: int):
        if self.buf is not None:
            self.select_rows([b for b in range(self.buf.batch) for _ in range(int(repeats))])

    def batch_select_indices(self, indices):
        self.select_rows(_host_rows(indices))

    def select_rows(self, rows: List[int]) -> None:
        """Keep batch rows ``rows`` in that order (repeats allowed): every registered buffer, the
        host counters and the policy's per-row state move with their row."""
        if self.buf is None:
            return
        if rows == list(range(self.buf.batch)):
            return
        self.buf.select_rows(rows, self.cache.policy.select_state(self.buf.state, rows))
        self.keys, self.values = self.buf.k, self.buf.v

    def to_json(self) -> dict:
        """This layer's host state (JSON); its buffers' host state is ``buf.to_json()``."""
        return {"seen": self.seen}

    def from_json(self, d: dict) -> None:
        self.seen = int(d["seen"])

    # ---- attention ---------------------------------------------------------------------
    def attend(self, query, attention_mask, scaling, position_ids) -> torch.Tensor:
        """Attention of the pending new tokens; returns ``[B, Hq, n, D]``."""
        if self.pending is None:
            raise RuntimeError("inf_mllm: attention called without a cache update for this layer")
        kn, vn = self.pending
        self.pending = None
        cache = self.cache
        B, Hq, n, D = query.shape
        real = _real_tokens(attention_mask, n, query.device)
        rope = {}
        if self.plan is not None:
            return self._attend_planned(query, kn, vn, position_ids, scaling)
        fwd = None
        if cache.mrope is not None:  # the 3-D positions the cache gave this forward (inf_mllm.mrope)
            fwd = cache._forward
            if fwd is None or fwd.pos.shape[-1] != n:
                raise RuntimeError("inf_mllm: an M-RoPE model's forward did not go through its language model's "
                                   "positions hook (call the model, or its language model, with cache=<this cache>)")
            position_ids = fwd.pos
        if cache.policy.rolling:
            cache.rope.at(position_ids, n, self.seen - n, query, fresh=self.layer_idx == 0)
            query, kn = cache.rope.undo(query), cache.rope.undo(kn)
            rope = cache.rope.op_kwargs(query.device)
        phase = "prefill" if n > 1 else "decode"
        if cache._probing:
            if real is not None:
                raise ValueError("inf_mllm: a probe forward takes unpadded rows (no padding in attention_mask)")
            return self._probe(query, kn, vn, scaling, rope)
        if real is None:
            return self._feed(list(range(B)), query, kn, vn, scaling, rope, phase, fwd)
        out = torch.zeros_like(query)
        for b in range(B):  # padded rows: each row alone, pads stripped
            idx = real[b].nonzero().squeeze(1)
            if idx.numel():
                sb = slice(b, b + 1)
                res = self._feed([b], query[sb, :, idx], kn[sb, :, idx], vn[sb, :, idx], scaling, rope, phase,
                                 None if fwd is None else fwd.rows(idx, b))
                out[b, :, idx] = res[0]
        return out

    def _attend_planned(self, query, kn, vn, position_ids, scaling) -> torch.Tensor:
        """A planned decode step (one token per row, room made, scoring decided beforehand): tensor
        work only, no host counter read or written, so it compiles into one replayable graph."""
        cache, buf, sc = self.cache, self.buf, self.plan
        rope = {}
        if cache.policy.rolling:
            cache.rope.at(position_ids, 1, 0, query, fresh=self.layer_idx == 0)
            query, kn = cache.rope.undo(query), cache.rope.undo(kn)
            rope = cache.rope.op_kwargs(query.device)
        buf.append(kn, vn, cache._modality, count=False)
        return ops.attention_with_scores(
            query, buf.k, buf.v, buf.length, None if sc is _NO_SCORING else buf.scores, scale=scaling, **rope,
            **_scoring_args(None if sc is _NO_SCORING else sc), check_values=False,
        )

    def _feed(self, rows: List[int], q, kn, vn, scaling, rope: dict, phase, fwd=None) -> torch.Tensor:
        """Write and attend the ``n`` new tokens of ``rows`` (all rows, or one row alone) in pieces
        that fit the buffer, with the policy's scoring and eviction around each piece; returns their
        attention output ``[b, Hq, n, D]``. Pieces are at most ``slack`` tokens, so one long forward
        equals the same tokens fed by ``stream`` with its default chunk (the policies score per call)."""
        pol, buf = self.cache.policy, self.buf
        n = q.shape[2]
        if len(rows) == buf.batch:
            g, K, V, length, scores = None, buf.k, buf.v, buf.length, buf.scores
        else:
            g = slice(rows[0], rows[0] + 1)
            K, V, length, scores = buf.k[g], buf.v[g], buf.length[g], buf.scores[g]
        pol.before(buf, n, phase, rows)
        out = None
        i = 0
        while i < n:
            full = [b for b in rows if buf.lengths[b] >= buf.capacity]
            if full:
                pol.make_room(buf, n - i, full)
            room = buf.capacity - max(buf.lengths[b] for b in rows)
            if room <= 0:
                raise RuntimeError(f"inf_mllm: policy {pol.name!r} could not make room in the cache (C={buf.capacity})")
            m = min(n - i, room) if pol.grows else min(n - i, room, pol.slack)  # pieces as stream() cuts them
            whole = m == n  # the usual case (a decode step, a chunk that fits): no slicing, no copy
            sl = slice(i, i + m)
            sc = pol.scoring(buf, m, phase, rows)
            buf.append(kn if whole else kn[:, :, sl], vn if whole else vn[:, :, sl], self.cache._modality, g,
                       mrope=None if fwd is None else (fwd if whole else fwd.piece(sl)))
            if fwd is not None and rope:  # rolling M-RoPE: every key at its stored 3-D positions
                rope = dict(rope, rope_pos=buf.rope_pos(g))
            if sc is not None and sc.restart:
                buf.reset_scores(sc.restart)
            if pol.grows:  # ``full`` may have grown the buffers
                K, V = (buf.k, buf.v) if g is None else (buf.k[g], buf.v[g])
                scores = buf.scores if g is None else buf.scores[g]
            res = ops.attention_with_scores(
                q if whole else q[:, :, sl], K, V, length, None if sc is None else scores,
                scale=scaling, **rope, **_scoring_args(sc),
                check_values=False,  # the host lengths guarantee n <= length <= C: no device sync per layer
            )
            if whole:
                out = res
            else:
                if out is None:
                    out = q.new_empty(q.shape)
                out[:, :, sl] = res
            due = pol.due(buf, m, phase, rows)
            if self.cache._deferring:
                self.deferred.update(due)
            else:
                pol.evict(buf, due)
            i += m
        return out

    def _probe(self, q, kn, vn, scaling, rope: dict) -> torch.Tensor:
        """A probe forward's attention (:meth:`StreamingCache.probing`): the ``n`` tokens are written
        after the cache's slots, attended like any chunk (every query scores, into a scratch buffer,
        no bias), then taken out again; the policy gets their attention to the slots that were
        there before (:meth:`Policy.probed`). Nothing is evicted, no counter or score moves."""
        pol, buf = self.cache.policy, self.buf
        n = q.shape[2]
        before = list(buf.lengths)
        if max(before) + n > buf.capacity:
            raise RuntimeError(f"inf_mllm: a probe of {n} tokens does not fit the cache ({max(before)} of {buf.capacity} "
                               "slots used); probe at most one chunk, right after it")
        length, fed = buf.length.clone(), buf.fed.clone()
        buf.append(kn, vn, self.cache._modality)
        if pol.probe_reduce == "max":  # each slot's peak over the probe's queries and heads (KVzip's)
            out = ops.attention_with_scores(q, buf.k, buf.v, buf.length, None, scale=scaling, **rope, window=0,
                                            check_values=False)
            gained = reference.probe_attention_max(q, buf.k, buf.length, scale=scaling, **rope)
        else:
            gained = torch.zeros_like(buf.scores)
            out = ops.attention_with_scores(q, buf.k, buf.v, buf.length, gained, scale=scaling, **rope, window=n,
                                            bias=0.0, decay=1.0, check_values=False)
        buf.length.copy_(length)
        buf.fed.copy_(fed)
        buf.lengths = before
        for b, L in enumerate(before):
            gained[b, :, L:] = 0  # the probe's own slots
        pol.probed(buf, list(range(buf.batch)), gained, n)
        return out


class PooledLayer(StreamingLayer):
    """A layer of a cache whose policy pools its budget over every layer and KV head
    (:mod:`inf_mllm.pooled`): ``buf`` is the layer's view of the rows' pool."""

    def lazy_initialization(self, key_states, value_states) -> None:
        from .pooled import Pool, PooledLayerState

        B, H, _, D = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        cache, pol = self.cache, self.cache.policy
        if cache._pool is None or cache._pool.batch != B:
            n_heads = H * len(cache.layers)
            cache._pool = Pool(B, n_heads * (pol.budget + pol.head_room), D, key_states.dtype, key_states.device)
        self.buf = PooledLayerState(self, B, H, D, key_states.dtype, key_states.device, pol.capacity)
        self.is_initialized = True

    def select_rows(self, rows):
        if self.buf is not None and rows != list(range(self.buf.batch)):
            raise NotImplementedError(f"inf_mllm: policy {self.cache.policy.name!r} (a pooled budget) does not "
                                      "support beam search or row selection yet")

    def attend(self, query, attention_mask, scaling, position_ids) -> torch.Tensor:
        from . import pooled

        if self.pending is None:
            raise RuntimeError("inf_mllm: attention called without a cache update for this layer")
        if self.plan is not None:
            raise RuntimeError("inf_mllm: a pooled cache does not take planned decode steps")
        kn, vn = self.pending
        self.pending = None
        cache = self.cache
        n = query.shape[2]
        if _real_tokens(attention_mask, n, query.device) is not None:
            raise ValueError(f"inf_mllm: policy {cache.policy.name!r} (a pooled budget) does not take padded batches "
                             "yet; feed the rows one by one")
        if self.layer_idx == 0:  # room for the forward in every layer, checked before any is written
            need = n * kn.shape[1] * len(cache.layers)
            free = min(len(f) for f in cache._pool.free)
            if need > free:
                raise ValueError(f"inf_mllm: a forward of {n} tokens needs {need} free slots of the pool, which has {free}; "
                                 f"feed long inputs with inf_mllm.stream (chunks of at most {cache.policy.slack})")
        cache.rope.at(position_ids, n, self.seen - n, query, fresh=self.layer_idx == 0)
        query, kn = cache.rope.undo(query), cache.rope.undo(kn)
        probe = cache._probing is not None
        # tokens fed inside deferred_eviction() are scored by the probe that follows them (inf_mllm.stream)
        out = pooled.attend(self.buf, cache._pool, query, kn, vn, scaling, cache.rope.op_kwargs(query.device),
                            [self.seen - n] * self.buf.batch, probe, score=not cache._deferring,
                            roll=cache.policy.params["roll"])
        if probe:
            self.buf.probed_upto = [self.seen - n] * self.buf.batch  # (seen counts the probe's tokens until it ends)
        elif self.layer_idx == len(cache.layers) - 1 and not cache._deferring:
            cache._pooled_cut()  # after the forward's last layer: every layer holds its new tokens
        return out


_NO_SCORING = object()  # the plan of a step that does not score


def _model_dtype(model) -> torch.dtype:
    p = next(model.parameters(), None)
    return p.dtype if p is not None else torch.float32


def _host_rows(indices) -> List[int]:
    """Row indices as a host list (one device sync), from a tensor or a sequence."""
    if isinstance(indices, torch.Tensor):
        if indices.dtype == torch.bool:
            indices = indices.nonzero().flatten()
        return [int(b) for b in indices.tolist()]
    return [int(b) for b in indices]


def _scoring_args(sc) -> dict:
    if sc is None:
        return dict(window=0)
    return dict(window=sc.window, bias=sc.bias, bias_mode=sc.bias_mode, decay=sc.decay)


def _real_tokens(attention_mask, n: int, device) -> Optional[torch.Tensor]:
    """``[B, n]`` bool of the real (non-pad) new tokens, or ``None`` when all are real."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:
        raise ValueError(
            f"inf_mllm: expected a 2-D padding mask, got shape {tuple(attention_mask.shape)}; pass the usual "
            "[batch, seq] attention_mask"
        )
    real = attention_mask[:, -n:].to(device=device, dtype=torch.bool)
    if real.shape[1] != n or bool(real.all()):
        return None
    return real


class StreamingCache(Cache):
    """Fixed-size KV cache for streaming inference with a ``transformers`` decoder model.

    Args:
        model: the (already loaded) model; checked for support.
        policy: policy name (see :func:`inf_mllm.policies.available_policies`) or a ``Policy``.
        chunk: prefill chunk size; the capacity is ``C = budget + max(window, chunk)``.
        tokenizer: the model's, for a policy whose probes start with an instruction (``kvzip``).
        **policy_args: ``budget, n_sink, n_recent, window, bias`` and policy-specific ones.

    The model must use ``attn_implementation="inf_mllm"``: use :func:`inf_mllm.enable`.
    """

    def __init__(self, model, policy: Union[str, Policy] = "inf_mllm", *, chunk: int = DEFAULT_CHUNK, tokenizer=None,
                 **policy_args):
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
        self.pooled = bool(getattr(pol, "pooled", False))  # one pool per row over all layers and heads
        layer_cls = PooledLayer if self.pooled else StreamingLayer
        layers = [layer_cls(self, i) for i in range(cfg.num_hidden_layers)]
        super().__init__(layers=layers)
        self.policy = pol
        self.config = model.config
        self.mrope = None  # the 3-D positions' host state (inf_mllm.mrope.Tracker) of an M-RoPE model
        if is_mrope_model(model):
            if self.pooled:
                raise ValueError(f"inf_mllm: policy {pol.name!r} (a pooled budget) does not support multimodal rotary "
                                 "positions (M-RoPE) yet")
            if pol.rolling and getattr(pol, "n_recent", 1) < 1:
                raise ValueError(f"inf_mllm: policy {pol.name!r} with n_recent=0 on an M-RoPE model: rolling 3-D "
                                 "positions need the newest token kept (n_recent >= 1)")
            self.mrope = Tracker(model)
            install_hooks(model)
        self._forward = None
        self._pool = None  # (pooled policies) the rows' shared slots, made by the first forward
        #: token ids that ``inf_mllm.stream`` puts before every probe's tokens, for a policy that
        #: asks for an instruction (``policy.instruction``; :meth:`set_instruction`)
        self.instruction_ids: Optional[List[int]] = None
        if getattr(pol, "instruction", None) is not None:
            if tokenizer is None:
                raise ValueError(f"inf_mllm: policy {pol.name!r} puts an instruction before every probe: pass the model's "
                                 "tokenizer (enable(model, ..., tokenizer=tok)), or instruct=False")
            self.set_instruction(tokenizer)
        try:
            self.rope = Rope(find_rotary(model), pol.capacity, _model_dtype(model), mrope=self.mrope is not None)
        except RopeMismatch as e:
            raise ValueError(f"inf_mllm: unsupported model: {e}") from None
        if self.pooled and self.rope.kind != "freq":
            raise ValueError(f"inf_mllm: policy {pol.name!r} needs RoPE from the model's frequencies (a head's rolling "
                             f"positions may pass the capacity); this model's: {self.rope.reason}")
        self._modality = TEXT
        self._plans: dict = {}
        self._deferring = False  # inside deferred_eviction()
        self._probing = None  # inside probing(): each layer's tokens seen before the probe
        if pol.probes and self.mrope is not None:
            raise ValueError(f"inf_mllm: policy {pol.name!r} probes (reconstruct > 0), which multimodal rotary positions "
                             "(M-RoPE) do not support yet")
        # the attention module of layer 0 of the model this cache was made for (check_model)
        self._attn0 = next((m for m in attention_modules(model) if getattr(m, "layer_idx", None) == 0), None)
        self._made_for = f"a {type(model).__name__} with {cfg.num_hidden_layers} layers"
        self._model = weakref.ref(model)  # for save()'s model fingerprint

    def _attn_impl(self):
        return get_attn_implementation(self)

    # ---- public ------------------------------------------------------------------------
    @contextlib.contextmanager
    def modality(self, m: Union[str, int]):
        """Tag the tokens fed inside the ``with`` block (``"text"``, ``"image"``, ``"video"``)."""
        old, self._modality = self._modality, modality_code(m)
        try:
            yield self
        finally:
            self._modality = old

    @contextlib.contextmanager
    def deferred_eviction(self):
        """Inside the ``with`` block the evictions the policy finds due are postponed; on exit each
        layer evicts the rows that came due (once). The block may feed at most the cache's free
        slots without eviction (a full buffer still makes room at once)."""
        if self._deferring:
            raise RuntimeError("inf_mllm: deferred_eviction() blocks do not nest")
        self._deferring = True
        try:
            yield self
        finally:
            self._deferring = False
            if self.pooled:
                for layer in self.layers:
                    layer.deferred = set()
                self._pooled_cut()
            for layer in self.layers:
                rows, layer.deferred = sorted(layer.deferred), set()
                if rows and layer.buf is not None:
                    self.policy.evict(layer.buf, rows)

    @contextlib.contextmanager
    def probing(self):
        """Forwards inside the ``with`` block are probes: their tokens attend the cache as usual
        (their output is the model's) but are not kept, nothing is evicted, the counters and the
        scores stay, except that the policy sees the probe's attention (``Policy.probed``;
        reconstruction scoring). One probe of at most ``slack`` tokens fits after a chunk fed
        inside :meth:`deferred_eviction` when the policy reserves room for it (``probes``)."""
        if self._probing is not None:
            raise RuntimeError("inf_mllm: probing() blocks do not nest")
        if self.mrope is not None:
            raise ValueError("inf_mllm: probing does not support multimodal rotary positions (M-RoPE) yet")
        if any(layer.buf is None for layer in self.layers):
            raise RuntimeError("inf_mllm: a probe needs a cache that has seen tokens")
        self._probing = [layer.seen for layer in self.layers]
        try:
            yield self
        finally:
            for layer, seen in zip(self.layers, self._probing):
                layer.seen = seen
                layer.pending = None
            self._probing = None

    def set_instruction(self, tokenizer) -> None:
        """Tokenise the policy's probe instruction (``kvzip``: KVzip's "Repeat the previous context
        exactly.") with the model's tokenizer; ``inf_mllm.stream`` puts it before every probe."""
        text = getattr(self.policy, "instruction", None)
        if text is None:
            self.instruction_ids = None
            return
        ids = [int(t) for t in tokenizer.encode(text, add_special_tokens=False)]
        room = self.policy.params.get("prompt_room", 0)
        if len(ids) > room:
            raise ValueError(f"inf_mllm: the instruction is {len(ids)} tokens, more than prompt_room={room}")
        self.instruction_ids = ids

    def _pooled_cut(self) -> None:
        """(pooled policies) the cut over every layer and KV head of each row (inf_mllm.pooled.cut)."""
        from .pooled import cut

        if self._pool is None or any(layer.buf is None for layer in self.layers):
            return
        pol = self.policy
        cut([layer.buf for layer in self.layers], self._pool, pol.budget, pol.n_sink, pol.n_recent)

    def _refuse_pooled(self, what: str) -> None:
        if self.pooled:
            raise NotImplementedError(f"inf_mllm: policy {self.policy.name!r} (a pooled budget) does not support {what} "
                                      "yet")

    @property
    def capacity(self) -> int:
        return self.policy.capacity

    def lengths(self, layer_idx: int = 0) -> List[int]:
        """Valid slots per row of layer ``layer_idx`` (empty before the first forward)."""
        buf = self.layers[layer_idx].buf
        return list(buf.lengths) if buf is not None else []

    def stats(self) -> dict:
        """Tokens seen, slots used (per modality), evictions, bytes held by the buffers. A pooled
        cache (``kvzip``) counts slots per layer on average (its heads hold different numbers), all
        of them text, and ``cache_bytes`` is the pool's, allocated once."""
        if self.pooled:
            return self._pooled_stats()
        used = {name: 0 for name in NAMES.values()}
        nbytes = sum(layer.buf.nbytes() for layer in self.layers if layer.buf is not None)
        slots = evictions = capacity = 0
        first = self.layers[0].buf
        if first is not None:
            slots = sum(first.lengths)
            evictions = first.evictions
            capacity = first.capacity
            for b, L in enumerate(first.lengths):
                counts = torch.bincount(first.modality[b, 0, :L].long(), minlength=len(NAMES))
                for code, name in NAMES.items():
                    used[name] += int(counts[code])
        return {
            "policy": self.policy.name,
            "tokens_seen": self.get_seq_length(),
            "slots_used": slots,
            "slots_by_modality": used,
            "capacity": capacity if self.policy.grows else self.capacity,
            "budget": self.policy.budget,
            "evictions": evictions,
            "cache_bytes": nbytes,
        }

    def _pooled_stats(self) -> dict:
        states = [layer.buf for layer in self.layers if layer.buf is not None]
        pool = self._pool
        # per layer on average, summed over rows (the heads of a layer hold different numbers)
        slots = round(sum(st.held() for st in states) / (len(states) * states[0].heads)) if states else 0
        return {
            "policy": self.policy.name,
            "tokens_seen": self.get_seq_length(),
            "slots_used": slots,
            "slots_by_modality": {name: (slots if code == TEXT else 0) for code, name in NAMES.items()},
            "capacity": self.capacity,
            "budget": self.policy.budget,
            "evictions": pool.evictions if pool is not None else 0,
            "cache_bytes": pool.nbytes() + sum(st.table.numel() * 8 for st in states) if pool is not None else 0,
        }

    def get_query_offset(self, layer_idx: int = 0):
        layer = self.layers[layer_idx]
        if layer.plan is not None:  # a planned step: a constant (the "inf_mllm" mask function does not use it)
            return 0
        return layer.get_seq_length()

    def plan_decode_step(self) -> None:
        """Do eagerly what the policy decides before a decode step of one token per row (room,
        scoring), so that the forward itself only does tensor work (see ``inf_mllm.compile_decode``).
        Follow it by one forward of one token per row, then :meth:`finish_decode_step`."""
        if self.policy.grows:
            raise ValueError(f"inf_mllm: a planned decode step needs a fixed-size cache; policy {self.policy.name!r} grows")
        self._refuse_pooled("compiled (planned) decode steps")
        if self.mrope is not None:
            raise ValueError("inf_mllm: compiled decode steps do not take multimodal rotary positions yet (the positions "
                             "are computed on the host per forward); decode eagerly (inf_mllm.greedy / generate)")
        pol = self.policy
        for layer in self.layers:
            buf = layer.buf
            if buf is None:
                raise RuntimeError("inf_mllm: a planned decode step needs a cache that has seen a prompt")
            rows = list(range(buf.batch))
            pol.before(buf, 1, "decode", rows)
            full = [b for b in rows if buf.lengths[b] >= buf.capacity]
            if full:
                pol.make_room(buf, 1, full)
            sc = pol.scoring(buf, 1, "decode", rows)
            if sc is not None and sc.restart:
                buf.reset_scores(sc.restart)
            if sc is None:
                layer.plan = _NO_SCORING
            else:  # one object per distinct scoring, so a compiled step sees the same constants
                key = (sc.window, sc.bias, sc.bias_mode, sc.decay)
                layer.plan = self._plans.setdefault(key, Scoring(*key))

    def finish_decode_step(self) -> None:
        """The host side of a planned decode step: counters, then the evictions now due."""
        pol = self.policy
        for layer in self.layers:
            if layer.plan is None:
                continue
            layer.plan = None
            layer.seen += 1
            buf = layer.buf
            rows = list(range(buf.batch))
            for b in rows:
                buf.lengths[b] += 1
            pol.evict(buf, pol.due(buf, 1, "decode", rows))

    def clone(self) -> "StreamingCache":
        """An independent copy of the cache (buffers, counters, policy state), e.g. to ask several
        questions after one long stream without streaming it again."""
        new = copy.copy(self)
        if self._pool is not None:
            new._pool = self._pool.clone()
        new.layers = []
        for layer in self.layers:
            twin = copy.copy(layer)
            twin._cache = weakref.ref(new)
            twin.pending = None
            twin.deferred = set()
            if layer.buf is not None:
                twin.buf = layer.buf.clone(owner=twin)
                twin.keys, twin.values = twin.buf.k, twin.buf.v
            new.layers.append(twin)
        new.rope = copy.copy(self.rope)
        new.rope.forget()
        if self.mrope is not None:
            new.mrope = self.mrope.clone()
        new._forward = None
        return new

    def reset(self):
        """Forget every token, counter and buffer: the cache is as new (any batch size next)."""
        self._pool = None
        for layer in self.layers:
            layer.reset()
        self.rope.forget()
        if self.mrope is not None:
            self.mrope.rows = []
        self._forward = None

    def check_model(self, module) -> None:
        """Called by the attention of layer 0 at every forward: ``module`` must be the layer-0
        attention of the model this cache was made for (another model's keys would not fit)."""
        if self._attn0 is not None and module is not self._attn0:
            raise ValueError(
                f"inf_mllm: this StreamingCache was made for another model ({self._made_for}), not the one running this "
                "forward: make a cache for this model with inf_mllm.enable(model)"
            )

    # ---- batch rows (beam search): the rows of every layer move together -----------------
    def reorder_cache(self, beam_idx):
        """Beam search (transformers' ``generate(num_beams=...)``): row ``i`` becomes row ``beam_idx[i]``."""
        self.select_rows(_host_rows(beam_idx))

    def batch_repeat_interleave(self, repeats: int):
        """Each row repeated ``repeats`` times in place (``[a, b]`` -> ``[a, a, b, b]``)."""
        buf = self.layers[0].buf
        if buf is not None:
            self.select_rows([b for b in range(buf.batch) for _ in range(int(repeats))])

    def batch_select_indices(self, indices):
        self.select_rows(_host_rows(indices))

    def select_rows(self, rows: List[int]) -> None:
        """Keep batch rows ``rows`` (host ints, in that order, repeats allowed) in every layer."""
        for layer in self.layers:
            layer.select_rows(list(rows))
        if self.mrope is not None and self.mrope.rows:
            self.mrope.select_rows(list(rows))

    # ---- persistence (inf_mllm.persist) ------------------------------------------------
    def to_json(self) -> dict:
        """The cache-level host state (JSON): the policy, its parameters and chunk, the modality
        being fed. Layers and buffers have their own ``to_json``."""
        pol = self.policy
        d = {"policy": pol.name, "params": dict(pol.params), "chunk": pol.chunk, "modality": self._modality}
        if self.mrope is not None:
            d["mrope"] = self.mrope.to_json()
        return d

    def from_json(self, d: dict) -> None:
        self._modality = int(d.get("modality", TEXT))
        if self.mrope is not None:
            if "mrope" not in d:
                raise ValueError("inf_mllm: the saved cache has no multimodal rotary positions (saved for another model)")
            self.mrope.from_json(d["mrope"])

    def save(self, path) -> dict:
        """Write the cache to ``path`` (safetensors, atomically; :mod:`inf_mllm.persist`).
        Returns what was written (bytes, seconds)."""
        from .persist import save_cache

        self._refuse_pooled("save()")
        return save_cache(self, path)

    @classmethod
    def load(cls, path, model) -> "StreamingCache":
        """A cache saved by :meth:`save`, for ``model`` (the one it was saved with: checked);
        switches the model's attention as :func:`inf_mllm.enable` does."""
        from .persist import load_cache

        return load_cache(path, model)

    def __repr__(self):
        return f"StreamingCache(policy={self.policy!r}, layers={len(self.layers)})"

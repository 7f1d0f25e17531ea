"""Multimodal rotary positions (M-RoPE: Qwen2-VL, Qwen2.5-VL, Qwen3-VL) owned by the cache.

The model computes its 3-D (temporal, height, width) positions only while its cache is empty;
later chunks of a stream would get text-like positions. So the cache computes them itself, for
every forward, with the model's own rule, and hands them to the language model (a pre-hook on it
replaces ``position_ids``). docs/method.md §3b holds the definition; in short:

* **The stream is a sequence of groups**: a run of text tokens, or one image / one video (Qwen3-VL:
  one video frame) of ``t*h*w / merge**2`` tokens. The layout (which tokens are which, the grids)
  is announced by the model's own forward (a pre-hook on ``model.model`` reads its
  ``mm_token_type_ids`` and grids) or by :func:`inf_mllm.stream`; tokens never announced are text.
* **The model's own positions** of a group are ``start + rel`` where ``rel`` is what the model's
  ``get_rope_index`` gives that group at the start of a sequence, and the next group starts at
  ``start + advance`` (``advance``: the position ``get_rope_index`` gives a text token right after
  the group). :class:`Rule` probes the model for both (memoised per grid), so the three families'
  rules (Qwen2.5-VL's ``second_per_grid_ts``, Qwen3-VL's frames) come from the model itself.
* **Units**: a text token is a unit of advance 1; a vision group is one unit (its tokens keep
  their geometry). Per kept slot the cache stores the positions, the unit id, the unit's start and
  its advance (``KVBuffers`` slot tensors ``mpos_t/h/w``, ``unit``, ``ubase``, ``uadv``).
* **Original mode** (``full``, ``h2o``, ``snapkv``, ...): positions are the model's own.
* **Rolling mode** (``inf_mllm``, ``streaming_llm``, ``window``): a new token's positions are the
  model's own minus a per-(row, KV head) shift (``mshift``, 0 until the first eviction: exact
  below budget). After each eviction the kept units are laid out again from 0 as the model's rule
  would place a stream made of the kept units only (each kept unit starts where the previous kept
  unit's advance ends; a unit with any token kept counts whole), every token of a unit moves by its
  unit's displacement, and the shift becomes that of the last kept unit (the newest token is always
  kept: ``n_recent >= 1``). Bounded by the kept units' advances (about the capacity); text
  reduces to position = slot; order is kept where the model's own positions are ordered.
"""
from __future__ import annotations

import inspect
import weakref
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .modality import IMAGE, TEXT, VIDEO

__all__ = ["is_mrope_model", "Rule", "Tracker", "Forward", "MROPE_SLOTS", "install_hooks", "relayout"]

#: the per-slot tensors an M-RoPE cache adds to ``KVBuffers`` (int32 ``[B, Hkv, C]``)
MROPE_SLOTS = ("mpos_t", "mpos_h", "mpos_w", "unit", "ubase", "uadv")


def is_mrope_model(model) -> bool:
    """Whether ``model`` is a VLM whose language model takes 3-D rotary positions and whose base
    model has the ``get_rope_index`` rule (Qwen2-VL, Qwen2.5-VL, Qwen3-VL)."""
    base = getattr(model, "model", None)
    return base is not None and callable(getattr(base, "get_rope_index", None)) and _language_model(model) is not None


def _language_model(model):
    base = getattr(model, "model", None)
    lm = getattr(base, "language_model", None)
    return lm if isinstance(lm, torch.nn.Module) else None


class Rule:
    """The model's own position rule, one group at a time (probed from ``get_rope_index``)."""

    def __init__(self, model):
        self.base = model.model
        self.merge = int(model.config.vision_config.spatial_merge_size)
        mtype = str(getattr(model.config, "model_type", ""))
        #: Qwen3-VL lays a video out frame by frame (timestamps between frames): one group per frame
        self.split_video = mtype.startswith("qwen3")
        self._spgt = "second_per_grid_ts" in inspect.signature(self.base.get_rope_index).parameters
        self._memo: Dict[tuple, Tuple[torch.Tensor, int]] = {}

    def tokens(self, grid: Sequence[int]) -> int:
        t, h, w = (int(x) for x in grid)
        return t * h * w // (self.merge * self.merge)

    def group(self, mtype: int, grid: Sequence[int], spgt: Optional[float] = None) -> Tuple[torch.Tensor, int]:
        """``(rel [3, n] long, advance)`` of one image (``mtype`` 1) or video (2) group."""
        grid = tuple(int(x) for x in grid)
        key = (mtype, grid, None if spgt is None else float(spgt))
        hit = self._memo.get(key)
        if hit is None:
            n = self.tokens(grid)
            ids = torch.zeros(1, n + 1, dtype=torch.long)
            types = torch.tensor([[mtype] * n + [0]], dtype=torch.int32)
            g = torch.tensor([grid], dtype=torch.long)
            kw = dict(image_grid_thw=g) if mtype == IMAGE else dict(video_grid_thw=g)
            if mtype == VIDEO and self._spgt and spgt is not None:
                kw["second_per_grid_ts"] = torch.tensor([float(spgt)])
            pos, _ = self.base.get_rope_index(ids, mm_token_type_ids=types, **kw)
            hit = (pos[:, 0, :n].clone(), int(pos[0, 0, n]))
            self._memo[key] = hit
        return hit


class Forward:
    """The positions and unit metadata of one forward's ``n`` new tokens (``[B, n]`` each; pads 0)."""

    __slots__ = ("pos", "unit", "ubase", "uadv", "modality")

    def __init__(self, pos, unit, ubase, uadv, modality):
        self.pos, self.unit, self.ubase, self.uadv, self.modality = pos, unit, ubase, uadv, modality

    def rows(self, idx: torch.Tensor, b: int) -> "Forward":
        """Row ``b``'s tokens ``idx`` (a padded row's real tokens), as a batch of one."""
        return Forward(self.pos[:, b:b + 1, idx], *(t[b:b + 1, idx] for t in (self.unit, self.ubase, self.uadv, self.modality)))

    def piece(self, sl: slice) -> "Forward":
        return Forward(self.pos[..., sl], *(t[:, sl] for t in (self.unit, self.ubase, self.uadv, self.modality)))


class _Row:
    """One batch row's place in the model's rule: the next group's start, the group being fed."""

    __slots__ = ("next", "queue", "open", "units")

    def __init__(self):
        self.next = 0        # the model's start of the next group
        self.queue: List[tuple] = []  # announced groups not yet begun: ("text", n) or (mtype, grid, spgt)
        self.open = None     # [mtype, rel, advance, start, taken, unit] of a vision group being fed
        self.units = 0       # unit ids handed out

    def to_json(self):
        o = self.open
        return {"next": self.next, "units": self.units,
                "queue": [list(q) if q[0] == "text" else [q[0], list(q[1]), q[2]] for q in self.queue],
                "open": None if o is None else (
                    {"mtype": TEXT, "n": o[1], "start": o[3], "taken": o[4]} if o[0] == TEXT else
                    {"mtype": o[0], "grid": list(o[6]), "spgt": o[7], "start": o[3], "taken": o[4], "unit": o[5]})}


class Tracker:
    """Host state of a cache's 3-D positions: per row, where the model's rule stands."""

    def __init__(self, model, batch: int = 1):
        self.rule = Rule(model)
        self.rows = [_Row() for _ in range(batch)]

    # ---- layout ------------------------------------------------------------------------
    def resize(self, batch: int) -> None:
        if len(self.rows) != batch:
            self.rows = [_Row() for _ in range(batch)]

    def announce(self, token_types: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                 image_grid_thw=None, video_grid_thw=None, second_per_grid_ts=None) -> None:
        """The layout of a forward's (or a stream's) tokens: ``token_types [B, n]`` (0 text, 1 image,
        2 video, as the processor's ``mm_token_type_ids``), grids in order over the batch as the
        model consumes them."""
        B = token_types.shape[0]
        self.resize(B)
        images = [tuple(int(x) for x in g) for g in (image_grid_thw.tolist() if image_grid_thw is not None else [])]
        videos, spgts = [], []
        vg = video_grid_thw.tolist() if video_grid_thw is not None else []
        sp = (second_per_grid_ts.tolist() if isinstance(second_per_grid_ts, torch.Tensor) else list(second_per_grid_ts or []))
        for i, g in enumerate(vg):
            s = float(sp[i]) if i < len(sp) else None
            if self.rule.split_video:
                videos += [(1, int(g[1]), int(g[2]))] * int(g[0])
                spgts += [s] * int(g[0])
            else:
                videos.append(tuple(int(x) for x in g))
                spgts.append(s)
        it_img, it_vid = iter(images), iter(zip(videos, spgts))
        for b in range(B):
            types = token_types[b]
            if attention_mask is not None:
                types = types[attention_mask[b, -types.shape[0]:].bool()]
            row = self.rows[b]
            for mtype, count in _runs(types.tolist()):
                if mtype == TEXT:
                    row.queue.append(("text", count))
                    continue
                while count > 0:
                    try:
                        grid, s = (next(it_img), None) if mtype == IMAGE else next(it_vid)
                    except StopIteration:
                        raise ValueError(f"inf_mllm: more {'image' if mtype == IMAGE else 'video'} tokens than grids "
                                         "were given (image_grid_thw / video_grid_thw)") from None
                    n = self.rule.tokens(grid)
                    if n > count:
                        raise ValueError(f"inf_mllm: a {'image' if mtype == IMAGE else 'video'} of grid {list(grid)} "
                                         f"needs {n} tokens, the input has {count} in that run")
                    row.queue.append((mtype, grid, s))
                    count -= n

    # ---- positions -------------------------------------------------------------------------
    def take(self, n: int, real: Optional[torch.Tensor], device) -> Forward:
        """The model's positions of the next ``n`` tokens of every row (``real [B, n]`` bool: pad
        tokens take no position), with their units."""
        B = len(self.rows)
        pos = torch.zeros(3, B, n, dtype=torch.long)
        meta = torch.zeros(4, B, n, dtype=torch.int32)  # unit, ubase, uadv, modality
        for b, row in enumerate(self.rows):
            cols = range(n) if real is None else real[b].nonzero().flatten().tolist()
            cols = list(cols)
            i = 0
            while i < len(cols):
                if row.open is None:
                    self._begin(row)
                o = row.open
                if o[0] == TEXT:  # a run of text: as many as the run (or the forward) has
                    m = min(len(cols) - i, o[1] - o[4])
                    c = torch.tensor(cols[i:i + m])
                    ar = torch.arange(m)
                    pos[:, b, c] = (row.next + ar)[None]
                    meta[0, b, c] = (row.units + ar).to(torch.int32)
                    meta[1, b, c] = (row.next + ar).to(torch.int32)
                    meta[2, b, c] = 1
                    meta[3, b, c] = TEXT
                    row.next += m
                    row.units += m
                    o[4] += m
                    if o[4] == o[1]:
                        row.open = None
                else:
                    rel, adv, start, taken = o[1], o[2], o[3], o[4]
                    m = min(len(cols) - i, rel.shape[1] - taken)
                    c = torch.tensor(cols[i:i + m])
                    pos[:, b, c] = rel[:, taken:taken + m] + start
                    meta[0, b, c] = o[5]
                    meta[1, b, c] = start
                    meta[2, b, c] = adv
                    meta[3, b, c] = o[0]
                    o[4] += m
                    if o[4] == rel.shape[1]:
                        row.open = None
                i += m
        meta = meta.to(device)
        return Forward(pos.to(device), meta[0], meta[1], meta[2], meta[3].to(torch.int8))

    def _begin(self, row: _Row) -> None:
        if not row.queue:  # nothing announced: text, one token at a time
            row.queue.append(("text", 1))
        q = row.queue.pop(0)
        if q[0] == "text":
            row.open = [TEXT, q[1], 1, row.next, 0, None]
            return
        mtype, grid, spgt = q
        rel, adv = self.rule.group(mtype, grid, spgt)
        row.open = [mtype, rel, adv, row.next, 0, row.units, grid, spgt]
        row.units += 1
        row.next += adv

    def pending(self) -> int:
        """Announced tokens of row 0 not yet fed."""
        row = self.rows[0]
        n = sum(q[1] if q[0] == "text" else self.rule.tokens(q[1]) for q in row.queue)
        if row.open is not None:
            o = row.open
            n += (o[1] if o[0] == TEXT else o[1].shape[1]) - o[4]
        return n

    # ---- state -------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {"rows": [r.to_json() for r in self.rows]}

    def from_json(self, d: dict) -> None:
        self.rows = []
        for r in d["rows"]:
            row = _Row()
            row.next, row.units = int(r["next"]), int(r["units"])
            row.queue = [("text", int(q[1])) if q[0] == "text" else (int(q[0]), tuple(q[1]), q[2]) for q in r["queue"]]
            o = r["open"]
            if o is not None:
                if o["mtype"] == TEXT:
                    row.open = [TEXT, int(o["n"]), 1, int(o["start"]), int(o["taken"]), None]
                else:
                    rel, adv = self.rule.group(o["mtype"], o["grid"], o["spgt"])
                    row.open = [o["mtype"], rel, adv, int(o["start"]), int(o["taken"]), int(o["unit"]),
                                tuple(o["grid"]), o["spgt"]]
            self.rows.append(row)

    def select_rows(self, rows: Sequence[int]) -> None:
        import copy

        self.rows = [copy.deepcopy(self.rows[b]) for b in rows]

    def clone(self) -> "Tracker":
        import copy

        new = copy.copy(self)
        new.rows = copy.deepcopy(self.rows)
        return new


def _runs(types: List[int]):
    """``[(type, count), ...]`` of consecutive equal token types."""
    out: List[list] = []
    for t in types:
        if out and out[-1][0] == t:
            out[-1][1] += 1
        else:
            out.append([int(t), 1])
    return [tuple(r) for r in out]


# ---- the rolling layout after an eviction --------------------------------------------------
def relayout(buf, rows: Sequence[int], L: int) -> None:
    """Rolling mode, after ``rows`` of ``buf`` were compacted to ``L`` slots: lay the kept units
    out again from 0 (each starts where the previous kept unit's advance ends), move every token
    by its unit's displacement, and set the row's shift for new tokens to the last kept unit's."""
    for b in rows:
        u, a, base = buf.unit[b, :, :L], buf.uadv[b, :, :L], buf.ubase[b, :, :L]
        first = torch.ones_like(u, dtype=torch.bool)
        first[:, 1:] = u[:, 1:] != u[:, :-1]
        step = torch.where(first, a, torch.zeros_like(a))
        new_base = torch.cumsum(step, dim=-1, dtype=torch.int32) - a
        delta = base - new_base  # [Hkv, L]
        for name in ("mpos_t", "mpos_h", "mpos_w"):
            getattr(buf, name)[b, :, :L] -= delta
        base.copy_(new_base)
        buf.mshift[b] += delta[:, L - 1]


# ---- hooks: the layout from the model's forward, positions into its language model ---------------
def _cache_of(kwargs):
    c = kwargs.get("cache")
    return c if c is not None else kwargs.get("past_key_values")


def _announce_hook(module, args, kwargs):
    cache = _cache_of(kwargs)
    tr = getattr(cache, "mrope", None)
    if tr is None or getattr(cache, "_announcing", False):
        return None
    types = kwargs.get("mm_token_type_ids")
    if types is None:
        return None  # a forward without vision tokens: text
    tr.announce(types, kwargs.get("attention_mask"), kwargs.get("image_grid_thw"), kwargs.get("video_grid_thw"),
                kwargs.get("second_per_grid_ts"))
    return None


def _lm_hook(module, args, kwargs):
    cache = _cache_of(kwargs)
    tr = getattr(cache, "mrope", None)
    if tr is None:
        return None
    x = kwargs.get("inputs_embeds")
    if x is None:
        x = kwargs.get("input_ids")
    if x is None and args:
        x = args[0]
    B, n = x.shape[0], x.shape[1]
    if len(tr.rows) != B:
        if any(r.queue or r.open for r in tr.rows) or cache.get_seq_length():
            raise ValueError(f"inf_mllm: batch size changed from {len(tr.rows)} to {B}; call cache.reset() or make a new cache")
        tr.resize(B)
    mask = kwargs.get("attention_mask")
    real = None
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and not bool(mask[:, -n:].all()):
        real = mask[:, -n:].bool().cpu()
    fwd = tr.take(n, real, x.device)
    cache._forward = fwd
    kwargs["position_ids"] = fwd.pos
    return args, kwargs


def install_hooks(model) -> None:
    """Once per model: the layout hook on ``model.model``, the positions hook on its language model
    (both act only for a forward whose cache is an M-RoPE ``StreamingCache``)."""
    if getattr(model, "_inf_mllm_mrope_hooks", None) is not None:
        return
    h1 = model.model.register_forward_pre_hook(_announce_hook, with_kwargs=True)
    h2 = _language_model(model).register_forward_pre_hook(_lm_hook, with_kwargs=True)
    model._inf_mllm_mrope_hooks = (h1, h2)

"""``look_m`` (LOOK-M, Wan et al. 2024, arXiv 2406.18139): text-prior eviction plus KV merging.

At the end of prefill (once): scores are the attention accumulated over **all** prompt queries;
text tokens rank above image/video tokens (text prior: all text kept first, then the best
image tokens), plus the last ``n_recent`` tokens. Each evicted token is merged into the kept
token whose key is most similar (cosine of keys, per KV head):

* ``pivotal`` (default): ``kept = (kept + mean(evicted assigned to it)) / 2`` — the kept
  (pivotal) token keeps half the weight (ours where the paper leaves the many-to-one case open);
* ``average``: ``kept = (kept + sum(evicted)) / (1 + count)``;
* ``weighted``: ``kept = (kept + sum(sim_i * evicted_i)) / (1 + sum(sim_i))`` with the cosine
  similarities clamped at 0.

Keys and values are merged with the same assignment and weights; scores restart after the
compression. Original positions. Decode-phase overflow: see :mod:`inf_mllm.policies._once`.
"""
import torch

from ..modality import TEXT
from ._once import CompressOncePolicy
from .base import Scoring, register_policy, select_keep

MERGES = ("pivotal", "average", "weighted")


@register_policy
class LookMPolicy(CompressOncePolicy):
    name = "look_m"
    follows = ("budget",)
    defaults = dict(budget=2048, n_sink=0, n_recent=32, window=0, bias=0.0, merge="pivotal")

    def validate(self):
        if self.params["merge"] not in MERGES:
            raise ValueError(f"inf_mllm: look_m merge must be one of {MERGES}, got {self.params['merge']!r}")

    def prefill_scoring(self, buf, n, rows):
        return Scoring(window=n)  # cumulative over all prompt queries

    def compress(self, buf, rows):
        # the keep set by (text first, then score), decided in float64 so that close scores stay apart
        rank = torch.zeros_like(buf.scores)
        for b in rows:
            T = buf.lengths[b]
            s = buf.scores[b, :, :T].double()
            prior = s + (buf.modality[b, :, :T] == TEXT).double() * (s.abs().max() + 1.0)
            rank[b, :, :T] = select_keep(prior, T, self.budget, self.n_sink, self.n_recent).float()
        mode = self.params["merge"]
        self.evict(buf, rows, rank=rank, keep_scores=False,
                   merge=lambda buf_, b, keep: merge_row_(buf_.k[b], buf_.v[b], keep, mode))


def merge_row_(k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor, mode: str) -> None:
    """Merge evicted slots of one row into their most similar kept slot, in place.

    ``k, v``: ``[Hkv, C, D]``; ``keep``: ``[Hkv, T]`` bool with the same count per head.
    """
    H, T = keep.shape
    n_keep = int(keep[0].sum())
    n_ev = T - n_keep
    if n_ev == 0:
        return
    ki = keep.nonzero()[:, 1].view(H, n_keep)
    ei = (~keep).nonzero()[:, 1].view(H, n_ev)
    D = k.shape[-1]
    kk = k[:, :T].float()
    vv = v[:, :T].float()
    gk = lambda x, i: torch.gather(x, 1, i[..., None].expand(-1, -1, D))  # noqa: E731
    k_keep, k_ev = gk(kk, ki), gk(kk, ei)
    v_keep, v_ev = gk(vv, ki), gk(vv, ei)
    kn = torch.nn.functional.normalize
    sim = kn(k_ev, dim=-1) @ kn(k_keep, dim=-1).transpose(1, 2)  # [H, n_ev, n_keep]
    best, tgt = sim.max(dim=-1)  # [H, n_ev]
    if mode == "weighted":
        w = best.clamp_min(0)
    else:
        w = torch.ones_like(best)
    wsum = torch.zeros(H, n_keep, device=k.device).scatter_add_(1, tgt, w)
    idx = tgt[..., None].expand(-1, -1, D)
    ksum = torch.zeros_like(k_keep).scatter_add_(1, idx, k_ev * w[..., None])
    vsum = torch.zeros_like(v_keep).scatter_add_(1, idx, v_ev * w[..., None])
    if mode == "pivotal":
        has = (wsum > 0)[..., None]
        denom = wsum.clamp_min(1)[..., None]
        k_new = torch.where(has, (k_keep + ksum / denom) / 2, k_keep)
        v_new = torch.where(has, (v_keep + vsum / denom) / 2, v_keep)
    else:
        denom = (1 + wsum)[..., None]
        k_new = (k_keep + ksum) / denom
        v_new = (v_keep + vsum) / denom
    k[:, :T].scatter_(1, ki[..., None].expand(-1, -1, D), k_new.to(k.dtype))
    v[:, :T].scatter_(1, ki[..., None].expand(-1, -1, D), v_new.to(v.dtype))

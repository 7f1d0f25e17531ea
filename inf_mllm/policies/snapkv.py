"""``snapkv`` (Li et al. 2024): keep the observation window (last ``window`` prompt tokens) and
the top ``budget - window`` prompt tokens by the attention of the window's queries, smoothed by
1-D max pooling (kernel 7); compress once at the end of prefill; original positions.
Decode-phase overflow: see :mod:`inf_mllm.policies._once`.
"""
import torch.nn.functional as F

from ._once import CompressOncePolicy
from .base import Scoring, register_policy


def max_pool_slots(scores, k: int):
    """Max over ``k`` neighbouring slots (odd ``k``, same length) of ``[..., C]`` scores."""
    if k == 1:
        return scores
    shape = scores.shape
    flat = scores.reshape(-1, 1, shape[-1])
    return F.max_pool1d(flat, kernel_size=k, stride=1, padding=k // 2).view(shape)


@register_policy
class SnapKVPolicy(CompressOncePolicy):
    name = "snapkv"
    follows = ("budget",)  # its published observation window and pooling
    defaults = dict(budget=2048, n_sink=0, n_recent=None, window=32, bias=0.0, kernel=7)

    @staticmethod
    def default_n_recent(params):
        return params.get("window") or 0

    def validate(self):
        if self.n_sink:
            raise ValueError("inf_mllm: policy 'snapkv' keeps no sinks (n_sink must be 0)")
        k = self.params["kernel"]
        if not isinstance(k, int) or k < 1 or k % 2 == 0:
            raise ValueError(f"inf_mllm: snapkv kernel must be an odd int >= 1, got {k!r}")
        if self.window < 1:
            raise ValueError(f"inf_mllm: policy 'snapkv' needs window >= 1, got {self.window}")

    def prefill_scoring(self, buf, n, rows):
        # only the last prompt chunk's window queries count (a chunk shorter than the window adds
        # to the previous one's, so the observation window stays >= w)
        return Scoring(window=self.window, restart=tuple(rows) if n >= self.window else ())

    def compress(self, buf, rows):
        self.evict(buf, rows, rank=max_pool_slots(buf.scores, self.params["kernel"]))

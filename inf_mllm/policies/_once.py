"""Shared behaviour of the compress-once policies (SnapKV, LOOK-M).

As published they compress the prompt once, at the end of prefill. Here:

* prefill chunks score (policy-specific); the prompt is compressed to ``budget`` right before
  the first decode step that follows a prefill (so each new prompt of a multi-round session
  is compressed once), or earlier if a prompt longer than the buffer would overflow ``C``;
* **after** compression (ours, the papers stop here): decode queries keep adding their
  attention to ``scores`` (cumulative, no bias), and whenever the buffer is full the rows are
  evicted back to ``budget`` by those scores, protecting the last ``n_recent`` tokens. So the
  cache never exceeds ``C`` slots however long the generation.
"""
from __future__ import annotations

from .base import ORIGINAL, Policy


class CompressOncePolicy(Policy):
    positions = ORIGINAL

    def prefill_score_window(self, layer, n: int) -> int:
        raise NotImplementedError

    def compress(self, layer, rows) -> None:
        raise NotImplementedError

    def score_window(self, layer, n, phase):
        if phase == "prefill":
            return self.prefill_score_window(layer, n)
        return n

    def before_attention(self, layer, n, phase, rows):
        pending = layer.state.setdefault("pending", set())
        if phase == "prefill":
            pending.update(rows)
            return
        todo = [b for b in rows if b in pending]
        pending.difference_update(todo)
        todo = self.over_budget(layer, todo)
        if todo:
            self.compress(layer, todo)

    def make_room(self, layer, n, rows):
        pending = layer.state.setdefault("pending", set())
        early = [b for b in rows if b in pending]
        if early:
            pending.difference_update(early)  # compressed now: not again at the first decode step
            self.compress(layer, early)  # prompt longer than the buffer: compress now with what we have
        rest = [b for b in rows if b not in pending]
        if rest:
            self.evict(layer, rest)

    def evict(self, layer, rows):
        layer.compact(self.budget, 0, self.n_recent, reset_scores=False, rows=rows)

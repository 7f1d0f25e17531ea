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

from .base import ORIGINAL, Policy, Scoring


class CompressOncePolicy(Policy):
    positions = ORIGINAL
    keep_scores = True

    def new_state(self, batch):
        return [False] * batch  # per row: a prompt was fed and is not compressed yet

    def prefill_scoring(self, buf, n, rows) -> Scoring:
        raise NotImplementedError

    def compress(self, buf, rows) -> None:
        raise NotImplementedError

    def scoring(self, buf, n, phase, rows):
        return self.prefill_scoring(buf, n, rows) if phase == "prefill" else Scoring(window=n)

    def before(self, buf, n, phase, rows):
        if phase == "prefill":
            return
        pending = buf.state
        todo = [b for b in rows if pending[b]]
        for b in todo:
            pending[b] = False
        todo = self.over_budget(buf, todo)
        if todo:
            self.compress(buf, todo)

    def due(self, buf, n, phase, rows):
        if phase == "prefill":  # after every prefill piece, so one long forward equals the same tokens chunked
            for b in rows:
                buf.state[b] = True
        return []  # compressed before the first decode step, or when the buffer is full

    def make_room(self, buf, n, rows):
        pending = buf.state
        early = [b for b in rows if pending[b]]
        for b in early:
            pending[b] = False  # compressed now: not again at the first decode step
        if early:
            self.compress(buf, early)  # prompt longer than the buffer: compress now with what we have
        rest = [b for b in rows if b not in early]
        if rest:
            self.evict(buf, rest)

"""``inf_mllm`` (Ning et al. 2024): ``n_sink`` sinks + top relevant tokens + ``n_recent`` recent.

Relevance: local sum of the attention of the last ``window`` queries (one scoring period: a
prefill chunk, or ``window`` decode steps; scores start from zero at each period), plus
``bias * slot`` per scoring query (favours newer tokens). Evicts after every prefill chunk that
leaves a row over budget, and every ``window`` decode steps once over budget. Rolling positions.

``min_text_slots=N`` (multimodal quota, ours): after an eviction each KV head keeps at least
``min(N, text tokens held before it)`` text slots (sinks and recent count), so a stream of video
frames cannot push out the text (question, instructions). Done by boosting the best-scored text
slots of the middle above every other candidate just before ``compact_`` (scores are reset after).
"""
import torch

from ..modality import TEXT
from .base import ROLLING, Policy, _check_int, register_policy


@register_policy
class InfMLLMPolicy(Policy):
    name = "inf_mllm"
    positions = ROLLING
    defaults = dict(budget=2048, n_sink=4, n_recent=256, window=32, bias=1e-3, min_text_slots=0)

    def validate(self):
        if self.window < 1:
            raise ValueError(f"inf_mllm: policy 'inf_mllm' needs window >= 1, got {self.window}")
        _check_int("min_text_slots", self.params["min_text_slots"], 0)
        if self.params["min_text_slots"] > self.budget:
            raise ValueError(f"inf_mllm: min_text_slots={self.params['min_text_slots']} exceeds budget={self.budget}")

    def _text_quota(self, layer, rows):
        N = self.params["min_text_slots"]
        for b in rows:
            T = layer.len_host[b]
            if not N or T <= self.budget:
                continue
            text = layer.modality[b, :, :T] == TEXT  # [H, T]
            mid = torch.zeros_like(text)
            mid[:, self.n_sink : T - self.n_recent] = True
            protected = (text & ~mid).sum(-1)
            n_mid = self.budget - self.n_sink - self.n_recent
            need = (text.sum(-1).clamp(max=N) - protected).clamp(0, n_mid)  # [H]
            if not bool(need.any()):
                continue
            s = layer.scores[b, :, :T]
            cand = torch.where(text & mid, s.double(), torch.tensor(float("-inf"), dtype=torch.float64, device=s.device))
            rank = torch.empty_like(cand, dtype=torch.long)
            order = torch.sort(cand, dim=-1, descending=True, stable=True).indices
            rank.scatter_(1, order, torch.arange(T, device=s.device).expand_as(order).contiguous())
            boost = (rank < need[:, None]) & text & mid
            s.add_(boost.float() * (float(s.abs().max()) * 2 + 1e6))

    def score_window(self, layer, n, phase):
        return self.window

    def before_attention(self, layer, n, phase, rows):
        # A scoring period is one prefill chunk or `window` decode steps: scores start from zero
        # at its beginning, so an eviction ranks by the last `window` queries only (not by
        # everything since the last eviction while a row stayed under budget). A prefill chunk
        # shorter than the window adds to what came before, keeping >= window queries.
        steps = layer.state.setdefault("decode_steps", {})
        for b in rows:
            if (phase == "prefill" and n >= self.window) or (phase == "decode" and steps.get(b, 0) == 0):
                layer.scores[b].zero_()
            if phase == "prefill":
                steps[b] = 0

    def score_bias(self, layer, phase):
        return self.bias

    def evict(self, layer, rows):
        self._text_quota(layer, rows)
        layer.compact(self.budget, self.n_sink, self.n_recent, reset_scores=True, rows=rows)
        steps = layer.state.setdefault("decode_steps", {})
        for b in rows:
            steps[b] = 0

    def after_attention(self, layer, n, phase, rows):
        if phase == "prefill":
            self.evict(layer, self.over_budget(layer, rows))
            return
        steps = layer.state.setdefault("decode_steps", {})
        done = []
        for b in rows:
            steps[b] = steps.get(b, 0) + 1
            if steps[b] >= self.window:
                done.append(b)
        self.evict(layer, self.over_budget(layer, done))
        for b in done:
            steps[b] = 0  # the next decode step starts a new scoring period

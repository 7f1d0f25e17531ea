"""``inf_mllm`` (Ning et al. 2024): ``n_sink`` sinks + top relevant tokens + ``n_recent`` recent.

Relevance: local sum of the attention of the last ``window`` queries since the last eviction,
plus ``bias * slot`` per scoring query (favours newer tokens). Evicts after every prefill chunk
that leaves a row over budget, and every ``window`` decode steps once over budget; scores are
reset after each eviction. Rolling positions.
"""
from .base import ROLLING, Policy, register_policy


@register_policy
class InfMLLMPolicy(Policy):
    name = "inf_mllm"
    positions = ROLLING
    defaults = dict(budget=2048, n_sink=4, n_recent=256, window=32, bias=1e-3)

    def validate(self):
        if self.window < 1:
            raise ValueError(f"inf_mllm: policy 'inf_mllm' needs window >= 1, got {self.window}")

    def score_window(self, layer, n, phase):
        return self.window

    def score_bias(self, layer, phase):
        return self.bias

    def evict(self, layer, rows):
        layer.compact(self.budget, self.n_sink, self.n_recent, reset_scores=True, rows=rows)
        steps = layer.state.setdefault("decode_steps", {})
        for b in rows:
            steps[b] = 0

    def after_attention(self, layer, n, phase, rows):
        if phase == "prefill":
            self.evict(layer, self.over_budget(layer, rows))
            return
        steps = layer.state.setdefault("decode_steps", {})
        for b in rows:
            steps[b] = steps.get(b, 0) + 1
        self.evict(layer, [b for b in self.over_budget(layer, rows) if steps[b] >= self.window])

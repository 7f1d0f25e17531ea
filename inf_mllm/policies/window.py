"""``window``: the last ``budget`` tokens, rolling positions; evicts whenever over budget."""
from .base import ROLLING, Policy, register_policy


@register_policy
class WindowPolicy(Policy):
    name = "window"
    positions = ROLLING
    follows = ("budget",)
    defaults = dict(budget=2048, n_sink=0, n_recent=None, window=0, bias=0.0)

    def validate(self):
        if self.n_sink:
            raise ValueError("inf_mllm: policy 'window' keeps no sinks (n_sink must be 0); use 'streaming_llm'")
        if self.n_recent != self.budget:
            raise ValueError(f"inf_mllm: policy 'window' keeps the last budget={self.budget} tokens; n_recent does not apply")

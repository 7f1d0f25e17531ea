"""``streaming_llm`` (Xiao et al. 2023): ``n_sink`` attention sinks + the last ``budget - n_sink``
tokens, rolling positions; evicts whenever over budget."""
from .base import ROLLING, Policy, register_policy


@register_policy
class StreamingLLMPolicy(Policy):
    name = "streaming_llm"
    positions = ROLLING
    follows = ("budget", "n_sink")
    defaults = dict(budget=2048, n_sink=4, n_recent=None, window=0, bias=0.0)

    def validate(self):
        if self.n_recent != self.budget - self.n_sink:
            raise ValueError(
                "inf_mllm: policy 'streaming_llm' keeps n_sink + the last budget - n_sink tokens; n_recent does not apply"
            )

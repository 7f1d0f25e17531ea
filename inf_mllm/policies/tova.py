"""``tova`` (Oren et al. 2024, "Transformers are Multi-State RNNs"): keep the tokens that the
newest query attends to most. Scores are the attention of each call's last query (mean over the
GQA group; the paper averages over all heads of a layer), restarted at every call; when a call
leaves a row over budget, the best ``budget - n_sink - n_recent`` tokens by those scores stay
(top-k once per call instead of one eviction per token). Original positions.
"""
from .base import ORIGINAL, Policy, Scoring, register_policy


@register_policy
class TOVAPolicy(Policy):
    name = "tova"
    positions = ORIGINAL
    follows = ("budget",)
    defaults = dict(budget=2048, n_sink=0, n_recent=0, window=1, bias=0.0)

    def validate(self):
        if self.window != 1:
            raise ValueError(f"inf_mllm: policy 'tova' scores with the last query only (window=1), got window={self.window}")

    def scoring(self, buf, n, phase, rows):
        return Scoring(window=1, restart=tuple(rows))

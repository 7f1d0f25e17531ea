"""``h2o`` (Zhang et al. 2023): heavy hitters by attention accumulated over **all** queries
(never reset, no sinks) + the last ``n_recent`` tokens; evicts after every forward that leaves
a row over budget; original positions."""
from .base import ORIGINAL, Policy, Scoring, register_policy


@register_policy
class H2OPolicy(Policy):
    name = "h2o"
    positions = ORIGINAL
    follows = ("budget",)  # its published split: half heavy hitters, half recent; no sinks
    keep_scores = True
    defaults = dict(budget=2048, n_sink=0, n_recent=None, window=0, bias=0.0)

    @staticmethod
    def default_n_recent(params):
        # H2O's default split: half heavy hitters, half recent
        b = params.get("budget")
        return b // 2 if isinstance(b, int) else 0

    def validate(self):
        if self.n_sink:
            raise ValueError("inf_mllm: policy 'h2o' keeps no sinks (n_sink must be 0)")

    def scoring(self, buf, n, phase, rows):
        return Scoring(window=n)  # every query of every call, accumulated

"""``full``: keeps everything (the reference). The buffers grow; never evicts."""
from .base import ORIGINAL, Policy, register_policy


@register_policy
class FullPolicy(Policy):
    name = "full"
    positions = ORIGINAL
    grows = True
    defaults = dict(budget=2048, n_sink=0, n_recent=0, window=0, bias=0.0)

    def make_room(self, layer, n, rows):
        layer.grow(layer.max_length() + n)

    def evict(self, layer, rows):  # never
        pass

"""``full``: keeps everything (the reference). The buffers grow; never evicts."""
from .base import ORIGINAL, Policy, register_policy


@register_policy
class FullPolicy(Policy):
    name = "full"
    positions = ORIGINAL
    follows = ()
    grows = True
    defaults = dict(budget=2048, n_sink=0, n_recent=0, window=0, bias=0.0)

    def due(self, buf, n, phase, rows):
        return []

    def make_room(self, buf, n, rows):
        buf.grow(buf.max_length() + n)

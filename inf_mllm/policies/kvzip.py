"""``kvzip`` (experimental, opt-in): KVzip's reconstruction score, streamed, under a budget pooled
over every layer and KV head (docs/method.md §9.4; Kim et al. 2025's scoring, per chunk).

How it scores: after every chunk, the chunk is fed again as a probe, after KVzip's instruction
(``instruct``); each of the chunk's tokens gets the largest attention probability that any probe
query and any query head of its GQA group gives it, the softmax over every slot still held. A
token fed outside a probe (decode steps, a question) gets the largest probability its own
forward's queries give it. The score is fixed from then on (a probability: comparable across
heads and layers).

What it keeps: after every forward (after the probe, in ``inf_mllm.stream``) the row holds at most
``budget`` slots per head *on average*: each KV head of each layer keeps its ``n_sink`` first and
``n_recent`` last tokens, and the remaining ``n_layers * Hkv * budget`` slots go to the best-scored
middle tokens of all heads and layers together, so one head may hold many and another few.
The storage is one pool per row (:mod:`inf_mllm.pooled`), fixed when the cache is made.
Positions roll (a head's ``j``-th token at position ``j``); ``roll=False`` keeps every token at
its stream position instead, valid only inside the model's trained context (there it kept more on
the needle evaluation: method.md §9.5).

Not supported yet (each refused with a clear error): saving a cache, beam search and row
selection, padded batches, compiled decode steps, multimodal rotary positions (M-RoPE).
"""
from .base import ROLLING, Policy, register_policy

#: KVzip's instruction before the repeated context (as bench/kvzip_stream.py measured it)
INSTRUCTION = "\n\nRepeat the previous context exactly.\n"


@register_policy
class KVzipPolicy(Policy):
    name = "kvzip"
    positions = ROLLING
    pooled = True
    follows = ("budget", "n_sink", "n_recent")
    defaults = dict(budget=2048, n_sink=4, n_recent=32, window=0, bias=0.0, instruct=True, prompt_room=32, roll=True)

    def validate(self):
        if self.window or self.bias:
            raise ValueError("inf_mllm: policy 'kvzip' scores by its probe; window and bias do not apply")
        for name in ("instruct", "roll"):
            if not isinstance(self.params[name], bool):
                raise TypeError(f"inf_mllm: {name} must be a bool, got {self.params[name]!r}")
        if not isinstance(self.params["prompt_room"], int) or self.params["prompt_room"] < 0:
            raise ValueError(f"inf_mllm: prompt_room must be an int >= 0, got {self.params['prompt_room']!r}")

    @property
    def probes(self) -> bool:
        return True

    @property
    def probe_reduce(self) -> str:
        return "max"

    @property
    def instruction(self):
        """The text put before every probe (``None``: the chunk alone)."""
        return INSTRUCTION if self.params["instruct"] else None

    @property
    def head_room(self) -> int:
        """Slots per head beyond the budget, on average: one chunk, then its probe (the chunk and the
        instruction, at most ``prompt_room`` tokens)."""
        return 2 * self.slack + self.params["prompt_room"]

    @property
    def capacity(self) -> int:
        return self.budget + self.head_room

    def rank(self, buf, rows):
        raise RuntimeError("inf_mllm: policy 'kvzip' keeps by a cut over its pool (inf_mllm.pooled), not per buffer")

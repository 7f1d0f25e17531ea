"""Real ``KVBuffers`` filled with random tokens, for policy tests without a model."""
import torch

from inf_mllm.buffers import KVBuffers
from inf_mllm.modality import TEXT


def filled_buffers(B=2, H=2, C=32, D=4, lengths=(32, 20), seed=0, policy=None, modality=TEXT):
    """``KVBuffers`` whose rows hold ``lengths`` random tokens written through ``append`` (so
    ``position`` is ``0..L-1``), with random positive scores; ``state`` from ``policy``."""
    g = torch.Generator().manual_seed(seed)
    buf = KVBuffers(B, H, C, D, torch.float32, "cpu", state=policy.new_state(B) if policy is not None else None)
    for b, L in enumerate(lengths):
        if L:
            buf.append(torch.randn(1, H, L, D, generator=g), torch.randn(1, H, L, D, generator=g), modality,
                       slice(b, b + 1))
    buf.scores.copy_(torch.rand(B, H, C, generator=g))
    for b, L in enumerate(lengths):
        buf.scores[b, :, L:] = 0
    return buf

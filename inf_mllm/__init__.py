"""inf_mllm: stream a (multimodal) LLM forever in a fixed-size KV cache."""
from . import ops  # noqa: F401  (registers torch.ops.inf_mllm.*)

__version__ = "0.1.0"

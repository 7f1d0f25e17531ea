"""inf_mllm: stream a (multimodal) LLM forever in a fixed-size KV cache."""
from . import ops  # noqa: F401  (registers torch.ops.inf_mllm.*)

__version__ = "0.1.0"

_LAZY = {
    "StreamingCache": ("cache", "StreamingCache"),
    "enable": ("api", "enable"),
    "stream": ("streaming", "stream"),
    "generate": ("streaming", "generate"),
    "greedy": ("streaming", "greedy"),
    "compile_decode": ("streaming", "compile_decode"),
    "CACHE_KW": ("_compat", "CACHE_KW"),
    "Session": ("session", "Session"),
    "load_model": ("models", "load_model"),
    "policies": ("policies", None),
    "available_policies": ("policies", "available_policies"),
}


def __getattr__(name):
    # transformers-dependent parts load on first use, so `import inf_mllm` stays light
    if name in _LAZY:
        import importlib

        mod_name, attr = _LAZY[name]
        mod = importlib.import_module(f".{mod_name}", __name__)
        if mod_name in ("cache", "streaming", "session", "api", "_compat"):
            importlib.import_module(".attention", __name__)
        return mod if attr is None else getattr(mod, attr)
    raise AttributeError(f"module 'inf_mllm' has no attribute {name!r}")

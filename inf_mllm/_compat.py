"""Everything that depends on the `transformers` version lives here (supported: >=5.0,<6).

The rest of the package talks to transformers only through these names, so a breaking change
in transformers is fixed in this one module.
"""
from __future__ import annotations

from typing import Optional

import torch

try:
    import transformers
    from transformers import AttentionInterface
    from transformers.cache_utils import Cache, CacheLayerMixin
    from transformers.masking_utils import AttentionMaskInterface
except ImportError as e:  # pragma: no cover
    raise ImportError(
        "inf_mllm's transformers integration needs transformers>=5.0,<6: pip install 'transformers>=5.0,<6'"
    ) from e

TRANSFORMERS_RANGE = (">=5.0", "<6")
_major = int(transformers.__version__.split(".")[0])
if _major != 5:  # pragma: no cover
    raise ImportError(
        f"inf_mllm supports transformers>=5.0,<6, found {transformers.__version__}: "
        "pip install 'transformers>=5.0,<6'"
    )

__all__ = [
    "Cache",
    "CacheLayerMixin",
    "register_attention",
    "set_attn_implementation",
    "find_rotary",
    "rotary_cos_sin",
    "unsupported_reason",
]


def register_attention(name: str, attn_fn, mask_fn) -> None:
    """Register an attention function and its mask function under ``name``."""
    AttentionInterface.register(name, attn_fn)
    AttentionMaskInterface.register(name, mask_fn)


def set_attn_implementation(model, name: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    if getattr(model.config, "_attn_implementation", None) != name:
        raise ValueError(
            f"inf_mllm: could not set attn_implementation={name!r} on {type(model).__name__}: the model does not route "
            "its attention through transformers' AttentionInterface"
        )


def get_attn_implementation(model) -> Optional[str]:
    return getattr(model.config, "_attn_implementation", None)


def text_config(model):
    cfg = model.config
    if hasattr(cfg, "get_text_config"):
        return cfg.get_text_config()
    return cfg


def find_rotary(model) -> Optional[torch.nn.Module]:
    """The model's rotary-embedding module: ``forward(x, position_ids) -> (cos, sin)``."""
    base = getattr(model, "model", None)
    for owner in (base, getattr(base, "language_model", None), model):
        rot = getattr(owner, "rotary_emb", None) if owner is not None else None
        if rot is not None and hasattr(rot, "inv_freq"):
            return rot
    for name, mod in model.named_modules():
        if name.endswith("rotary_emb") and hasattr(mod, "inv_freq"):
            return mod
    return None


@torch.no_grad()
def rotary_cos_sin(rotary: torch.nn.Module, position_ids: torch.Tensor, dtype: torch.dtype, device):
    """cos/sin ``[B or 1, n, D]`` exactly as the model computes them for ``position_ids``, in ``dtype``."""
    x = torch.empty(0, dtype=dtype, device=device)
    cos, sin = rotary(x, position_ids.to(device))
    if cos.dim() == 4:  # some multimodal rotaries return [3, B, n, D]
        raise ValueError("inf_mllm: multi-section (mrope) rotary embeddings are not supported")
    return cos, sin


def attention_modules(model):
    """Modules that are decoder self-attention layers (have ``layer_idx`` and a q/k/v projection)."""
    mods = []
    for _, m in model.named_modules():
        if hasattr(m, "layer_idx") and (hasattr(m, "q_proj") or hasattr(m, "qkv_proj")) and hasattr(m, "scaling"):
            mods.append(m)
    return mods


def unsupported_reason(model, rolling: bool) -> Optional[str]:
    """Why this model cannot run with inf_mllm, or ``None`` when it can."""
    cfg = text_config(model)
    name = f"{type(model).__name__} (model_type={getattr(cfg, 'model_type', '?')!r})"
    if getattr(model.config, "is_encoder_decoder", False):
        return f"{name} is an encoder-decoder model; inf_mllm supports decoder-only models"
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types is not None:
        other = sorted({t for t in layer_types if t != "full_attention"})
        if other:
            return (
                f"{name} has layers of type {other} (sliding-window, chunked or linear attention); "
                "inf_mllm supports models whose layers all use full attention"
            )
    sw = getattr(cfg, "sliding_window", None)
    if sw is not None and getattr(cfg, "use_sliding_window", True):
        return f"{name} uses sliding-window attention (sliding_window={sw}); inf_mllm supports full-attention layers only"
    if getattr(cfg, "attention_chunk_size", None) is not None:
        return f"{name} uses chunked attention; inf_mllm supports full-attention layers only"
    if find_rotary(model) is None:
        return f"{name} has no RoPE rotary embedding (inf_mllm needs a decoder-only model with RoPE attention)"
    for attr in ("kv_lora_rank", "q_lora_rank"):
        if getattr(cfg, attr, None):
            return f"{name} uses a compressed (MLA) KV cache layout ({attr}); inf_mllm needs plain [B, Hkv, T, D] keys/values"
    for attr in ("attn_logit_softcapping",):
        if getattr(cfg, attr, None):
            return f"{name} uses {attr}, which the inf_mllm attention operator does not implement"
    if hasattr(model, "_can_set_attn_implementation") and not model._can_set_attn_implementation():
        return f"{name} does not route attention through transformers' AttentionInterface"
    n_layers = getattr(cfg, "num_hidden_layers", None)
    mods = attention_modules(model)
    if not mods or (n_layers is not None and len(mods) != n_layers):
        return (
            f"{name}: unknown attention/cache layout (found {len(mods)} attention modules with q/k/v projections "
            f"for {n_layers} layers)"
        )
    rp = getattr(cfg, "rope_parameters", None) or {}
    if isinstance(rp, dict) and rolling:
        if rp.get("mrope_section") is not None:
            return f"{name} uses multi-section RoPE (mrope), not supported with rolling positions"
        prf = rp.get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", 1.0))
        if prf not in (None, 1, 1.0):
            return f"{name} uses partial rotary embeddings (partial_rotary_factor={prf}), not supported with rolling positions"
    return None

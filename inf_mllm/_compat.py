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


def _version_tuple(v: str):
    """``"5.24.0"`` -> ``(5, 24, 0)``; pre-release suffixes (``5.25.0.dev0``, ``5.24.0rc1``) are dropped."""
    import re

    nums = [int(m.group(0)) if m else 0 for m in (re.match(r"\d+", part) for part in v.split(".")[:3])]
    return tuple(nums + [0] * (3 - len(nums)))


TRANSFORMERS_VERSION = _version_tuple(transformers.__version__)
if TRANSFORMERS_VERSION[0] != 5:  # pragma: no cover
    raise ImportError(
        f"inf_mllm supports transformers>=5.0,<6, found {transformers.__version__}: "
        "pip install 'transformers>=5.0,<6'"
    )

# The keyword that passes a cache to ``forward``/``generate``. transformers 5.24 renamed
# ``past_key_values`` to ``cache`` (the old name warns, and goes from ``forward`` in 5.40 and
# from ``generate`` in 6.0); 5.0-5.23 know only ``past_key_values``.
CACHE_KW = "cache" if TRANSFORMERS_VERSION >= (5, 24, 0) else "past_key_values"


def cache_kwargs(cache) -> dict:
    """``{CACHE_KW: cache}``: the cache as the installed transformers wants it passed."""
    return {CACHE_KW: cache}

__all__ = [
    "CACHE_KW",
    "TRANSFORMERS_VERSION",
    "cache_kwargs",
    "Cache",
    "CacheLayerMixin",
    "register_attention",
    "set_attn_implementation",
    "find_rotary",
    "rotary_cos_sin",
    "rotary_params",
    "unsupported_reason",
    "text_config",
    "text_config_key",
    "is_multimodal",
    "language_model",
    "vision_tower",
    "image_features",
    "video_features",
]


def register_attention(name: str, attn_fn, mask_fn) -> None:
    """Register an attention function and its mask function under ``name``."""
    AttentionInterface.register(name, attn_fn)
    AttentionMaskInterface.register(name, mask_fn)


def set_attn_implementation(model, name: str) -> None:
    """Switch the (language-side) attention of ``model`` to ``name``.

    Vision-language models: only the text sub-config is switched (transformers' per-sub-config
    ``{"text_config": name}`` form, or the language model's own ``set_attn_implementation``), so
    the vision tower keeps its own attention.
    """
    key = text_config_key(model)
    if key is None:
        if hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation(name)
    else:
        vision_impls = _vision_attn_impls(model)
        try:
            model.set_attn_implementation({key: name})
        except (TypeError, ValueError, AttributeError, KeyError):
            lm = language_model(model)
            if lm is not None and hasattr(lm, "set_attn_implementation"):
                lm.set_attn_implementation(name)
        if _vision_attn_impls(model) != vision_impls:  # pragma: no cover  (defensive: never touch the vision tower)
            raise RuntimeError("inf_mllm: switching the text attention also changed the vision tower's attention")
    if get_attn_implementation(model) != name:
        raise ValueError(
            f"inf_mllm: could not set attn_implementation={name!r} on {type(model).__name__}: the model does not route "
            "its attention through transformers' AttentionInterface"
        )


def get_attn_implementation(model) -> Optional[str]:
    """The attention implementation of the language side (the text sub-config of a VLM)."""
    return getattr(text_config(model), "_attn_implementation", None)


def text_config(model):
    cfg = model.config
    if hasattr(cfg, "get_text_config"):
        return cfg.get_text_config()
    return cfg


def text_config_key(model) -> Optional[str]:
    """Name of the text sub-config of a composite (vision-language) config, ``None`` for a plain LM."""
    cfg = model.config
    tc = text_config(model)
    if tc is cfg:
        return None
    for key in getattr(cfg, "sub_configs", {}) or {}:
        if getattr(cfg, key, None) is tc:
            return key
    return "text_config" if getattr(cfg, "text_config", None) is tc else None


def is_multimodal(model) -> bool:
    """A vision-language model: composite config with a vision sub-config."""
    return text_config_key(model) is not None and getattr(model.config, "vision_config", None) is not None


def _submodule(model, name: str):
    """``model.model.<name>`` (transformers 5 layout) or ``model.<name>``, if it is a module."""
    for owner in (getattr(model, "model", None), model):
        sub = getattr(owner, name, None) if owner is not None else None
        if isinstance(sub, torch.nn.Module):
            return sub
    return None


def language_model(model):
    """The decoder (text) model inside a VLM (``model.model.language_model`` in transformers 5;
    ``model.model.text_model`` in Idefics3 / SmolVLM), or ``None``."""
    return _submodule(model, "language_model") or _submodule(model, "text_model")


def vision_tower(model):
    return _submodule(model, "vision_tower")


def _vision_attn_impls(model):
    vc = getattr(model.config, "vision_config", None)
    vt = vision_tower(model)
    return (getattr(vc, "_attn_implementation", None), getattr(getattr(vt, "config", None), "_attn_implementation", None))


def _features_list(out) -> list:
    if hasattr(out, "pooler_output") and not isinstance(out, torch.Tensor):
        out = out.pooler_output  # transformers >= 5.x: BaseModelOutputWithPooling(pooler_output=[per-image features])
    if isinstance(out, torch.Tensor):
        return list(out) if out.dim() == 3 else [out]
    if isinstance(out, (list, tuple)):
        res = []
        for t in out:
            res.extend(list(t) if t.dim() == 3 else [t])
        return res
    raise TypeError(f"inf_mllm: unexpected image-feature output {type(out).__name__}")


@torch.no_grad()
def image_features(model, pixel_values: torch.Tensor, **kwargs) -> list:
    """Vision tower + projector of a VLM on ``pixel_values [N, 3, H, W]``: a list of ``[T_i, hidden]``
    tensors (one per image), in the language model's embedding space."""
    fn = getattr(model, "get_image_features", None) or getattr(getattr(model, "model", None), "get_image_features", None)
    if fn is None:
        raise ValueError(f"inf_mllm: {type(model).__name__} has no get_image_features (not a supported VLM)")
    return _features_list(fn(pixel_values=pixel_values, **kwargs))


def clip_image_processor(image_size: int):
    """A CLIP image processor (resize shortest edge + center crop to ``image_size``, CLIP mean/std)
    that needs no torchvision: the PIL backend (``CLIPImageProcessorPil``, transformers >= 5.x) when
    present, else the slow ``CLIPImageProcessor``."""
    import transformers as _t

    cls = getattr(_t, "CLIPImageProcessorPil", None)
    if cls is None:
        try:
            import torchvision  # noqa: F401

            cls = _t.CLIPImageProcessor
        except ImportError:
            cls = getattr(_t, "CLIPImageProcessorSlow", None) or _t.CLIPImageProcessor
    return cls(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})


@torch.no_grad()
def video_features(model, pixel_values_videos: torch.Tensor, **kwargs) -> Optional[torch.Tensor]:
    """``[T, hidden]`` tokens of one clip ``pixel_values_videos [1, F, 3, H, W]`` through the model's own
    video path (``get_video_features``: LLaVA-NeXT-Video's resampler, LLaVA-OneVision's pooling +
    newline), or ``None`` when the model has none (plain LLaVA: frames go through the image path)."""
    fn = getattr(model, "get_video_features", None) or getattr(getattr(model, "model", None), "get_video_features", None)
    if fn is None:
        return None
    import inspect

    # the argument is `pixel_values_videos` in recent transformers, `pixel_values` in older 5.x (5.13)
    params = inspect.signature(fn).parameters
    key = "pixel_values_videos" if "pixel_values_videos" in params or "pixel_values" not in params else "pixel_values"
    feats = _features_list(fn(**{key: pixel_values_videos}, **kwargs))
    return torch.cat([f.reshape(-1, f.shape[-1]) for f in feats], 0)


#: the M-RoPE families whose 3-D positions the cache computes (tests/test_mrope.py)
MROPE_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
_MROPE_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen2_5_omni", "glm4v")


def find_rotary(model) -> Optional[torch.nn.Module]:
    """The model's rotary-embedding module: ``forward(x, position_ids) -> (cos, sin)``."""
    base = getattr(model, "model", None)
    lm = language_model(model)
    for owner in (lm, base, getattr(base, "language_model", None), model):
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


def rotary_params(rotary: torch.nn.Module) -> dict:
    """What identifies a rotary module's positions (recorded in a saved cache's model fingerprint):
    its type, its attention scaling, and the number and a SHA-256 of its frequencies (the initial
    ``inv_freq``: dynamic types update the live one as the context grows)."""
    import hashlib

    inv = getattr(rotary, "original_inv_freq", None)
    if not isinstance(inv, torch.Tensor):
        inv = getattr(rotary, "inv_freq")
    scaling = getattr(rotary, "attention_scaling", 1.0)
    scaling = float(scaling.item() if isinstance(scaling, torch.Tensor) else scaling)
    return {
        "type": str(getattr(rotary, "rope_type", None) or "default"),
        "attention_scaling": scaling,
        "dim": int(inv.numel()),
        "inv_freq_sha256": hashlib.sha256(inv.detach().to("cpu", torch.float64).contiguous().numpy().tobytes()).hexdigest(),
    }


def attention_modules(model):
    """Modules that are decoder self-attention layers (have ``layer_idx`` and a q/k/v projection);
    for a VLM, those of its language model only."""
    mods = []
    root = (language_model(model) if is_multimodal(model) else None) or model
    for _, m in root.named_modules():
        if hasattr(m, "layer_idx") and (hasattr(m, "q_proj") or hasattr(m, "qkv_proj")) and hasattr(m, "scaling"):
            mods.append(m)
    return mods


def unsupported_reason(model, rolling: bool) -> Optional[str]:
    """Why this model cannot run with inf_mllm, or ``None`` when it can."""
    cfg = text_config(model)
    name = f"{type(model).__name__} (model_type={getattr(cfg, 'model_type', '?')!r})"
    if getattr(model.config, "is_encoder_decoder", False):
        return f"{name} is an encoder-decoder model; inf_mllm supports decoder-only models"
    rp0 = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    mtypes = {getattr(model.config, "model_type", None), getattr(cfg, "model_type", None)}
    from .mrope import is_mrope_model

    mrope = is_mrope_model(model)
    if mrope and not mtypes & set(MROPE_FAMILIES):
        return (f"{name}: multimodal rotary positions are supported for {', '.join(MROPE_FAMILIES)} (each tested for "
                "exactness); this family is not one of them")
    if not mrope and ((isinstance(rp0, dict) and rp0.get("mrope_section") is not None) or any(
        str(t).startswith(_MROPE_TYPES) for t in mtypes if t
    )):
        return (
            f"{name} uses multimodal rotary positions (mrope) but has no model.model.get_rope_index and "
            "model.model.language_model (the layout of Qwen2-VL, Qwen2.5-VL and Qwen3-VL, which inf_mllm supports): "
            "the cache cannot compute its 3-D positions with the model's own rule"
        )
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
        if rp.get("mrope_section") is not None and not mrope:
            return f"{name} uses multi-section RoPE (mrope), not supported with rolling positions"
        prf = rp.get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", 1.0))
        if prf not in (None, 1, 1.0):
            return f"{name} uses partial rotary embeddings (partial_rotary_factor={prf}), not supported with rolling positions"
    return None


class _Captured(Exception):
    pass


@torch.no_grad()
def language_model_inputs(model, **inputs) -> dict:
    """What a VLM's own forward hands its language model for ``inputs`` (a processor's output):
    ``inputs_embeds`` with the vision features merged in, and (Qwen3-VL) ``visual_pos_masks`` /
    ``deepstack_visual_embeds``. The model's forward runs up to the language model's call, without a
    cache, and stops there (nothing of the language model runs)."""
    lm = language_model(model)
    if lm is None:
        raise ValueError(f"inf_mllm: {type(model).__name__} has no language model to feed")
    got = {}

    def grab(module, args, kwargs):
        got.update(kwargs)
        raise _Captured

    h = lm.register_forward_pre_hook(grab, with_kwargs=True, prepend=True)
    try:
        model.model(**inputs, use_cache=False)
    except _Captured:
        pass
    finally:
        h.remove()
    if "inputs_embeds" not in got:
        raise RuntimeError(f"inf_mllm: {type(model).__name__}'s forward did not call its language model")
    return {k: got[k] for k in ("inputs_embeds", "visual_pos_masks", "deepstack_visual_embeds") if got.get(k) is not None}

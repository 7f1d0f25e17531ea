"""transformers glue: the ``"inf_mllm"`` attention function and mask function.

Registered through ``AttentionInterface`` / ``AttentionMaskInterface`` (no monkey-patching).
The mask function hands the 2-D padding mask through unchanged (the attention function strips
pad tokens per row). The attention function gets back the key buffer that
``StreamingLayer.update`` returned; the buffer names its layer (``buffers.OWNER_ATTR``), which
must be the layer of the calling attention module (``module.layer_idx``), and the layer runs
the streaming attention + eviction.

A forward without a ``StreamingCache`` (``use_cache=False``, or another transformers cache)
gets plain causal attention over the keys it passes, so the model still works.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._compat import register_attention
from .buffers import OWNER_ATTR
from .cache import ATTN_IMPL


def inf_mllm_mask(batch_size=None, q_length=None, kv_length=None, q_offset=0, kv_offset=0, mask_function=None,
                  attention_mask=None, **kwargs):
    """Return the 2-D ``[B, kv]`` boolean padding mask (or ``None``) for the attention function."""
    if attention_mask is None or attention_mask.dim() != 2:
        return attention_mask
    if bool(attention_mask.all()):
        return None
    return attention_mask


def _plain_attention(query, key, value, attention_mask, scaling):
    """Causal attention of the last ``n`` of ``T`` positions, with an optional 2-D padding mask."""
    n, T = query.shape[2], key.shape[2]
    G = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(G, dim=1)
    v = value.repeat_interleave(G, dim=1)
    i = torch.arange(n, device=query.device)[:, None] + (T - n)
    allowed = (torch.arange(T, device=query.device)[None, :] <= i)[None, None]
    if attention_mask is not None and attention_mask.dim() == 2:
        allowed = allowed & attention_mask[:, None, None, -T:].to(device=query.device, dtype=torch.bool)
    out = F.scaled_dot_product_attention(query, k, v, attn_mask=allowed, scale=scaling)
    return out.nan_to_num(0.0)  # a fully padded query row


def inf_mllm_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    layer = getattr(key, OWNER_ATTR, None)
    if layer is None:
        out = _plain_attention(query, key, value, attention_mask, scaling)
    else:
        if layer.layer_idx == 0 and layer.plan is None:  # once per forward (a planned step was checked eagerly)
            layer.cache.check_model(module)
        idx = getattr(module, "layer_idx", layer.layer_idx)
        if layer.layer_idx != idx or layer.buf is None or layer.buf.k is not key:
            raise RuntimeError(
                f"inf_mllm: the attention of layer {idx} got the key buffer of StreamingCache layer {layer.layer_idx} "
                "(stale or foreign); run each forward with the cache the keys came from"
            )
        out = layer.attend(query, attention_mask, float(scaling), kwargs.get("position_ids"))
    return out.transpose(1, 2).contiguous(), None


register_attention(ATTN_IMPL, inf_mllm_attention, inf_mllm_mask)

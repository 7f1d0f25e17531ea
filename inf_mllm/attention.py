"""transformers glue: the ``"inf_mllm"`` attention function and mask function.

Registered through ``AttentionInterface`` / ``AttentionMaskInterface`` (no monkey-patching).
The mask function hands the 2-D padding mask through unchanged (the attention function strips
pad tokens per row); the attention function finds the :class:`~inf_mllm.cache.StreamingLayer`
from the key tensor ``update`` returned and runs the streaming attention + eviction.
Called without a ``StreamingCache`` (e.g. ``use_cache=False``), it falls back to plain causal
attention over the given keys so the model still works.
"""
from __future__ import annotations

import torch

from ._compat import register_attention
from .cache import ATTN_IMPL, owner_of


def inf_mllm_mask(batch_size=None, q_length=None, kv_length=None, q_offset=0, kv_offset=0, mask_function=None,
                  attention_mask=None, **kwargs):
    """Return the 2-D ``[B, kv]`` boolean padding mask (or ``None``) for the attention function."""
    if attention_mask is None or attention_mask.dim() != 2:
        return attention_mask
    if bool(attention_mask.all()):
        return None
    return attention_mask


def _fallback(module, query, key, value, attention_mask, scaling):
    B, Hq, n, D = query.shape
    Hkv, T = key.shape[1], key.shape[2]
    G = Hq // Hkv
    k = key.repeat_interleave(G, dim=1)
    v = value.repeat_interleave(G, dim=1)
    i = torch.arange(n, device=query.device)[:, None] + (T - n)
    j = torch.arange(T, device=query.device)[None, :]
    allowed = (j <= i)[None, None]
    if attention_mask is not None and attention_mask.dim() == 2:
        allowed = allowed & attention_mask[:, None, None, -T:].to(torch.bool)
    logits = (query.float() @ k.float().transpose(-1, -2)) * scaling
    logits = logits.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    return (p @ v.float()).to(query.dtype)


def inf_mllm_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    layer = owner_of(key)
    if layer is None:
        out = _fallback(module, query, key, value, attention_mask, scaling)
    else:
        out = layer.attend(query, attention_mask, float(scaling), kwargs.get("position_ids"))
    return out.transpose(1, 2).contiguous(), None


register_attention(ATTN_IMPL, inf_mllm_attention, inf_mllm_mask)

"""Chunked prefill under a fixed budget (SPEC §5): feed any length, evicting after each chunk."""
from __future__ import annotations

from typing import Optional

import torch

from .cache import StreamingCache


@torch.no_grad()
def stream(
    model,
    input_ids: Optional[torch.Tensor] = None,
    *,
    inputs_embeds: Optional[torch.Tensor] = None,
    cache: StreamingCache,
    chunk: Optional[int] = None,
    attention_mask: Optional[torch.Tensor] = None,
    modality="text",
    progress: bool = False,
    return_nll: bool = False,
):
    """Feed ``input_ids`` ``[B, T]`` (or ``inputs_embeds`` ``[B, T, H]``) through ``model`` in chunks.

    Each chunk is at most ``chunk`` tokens (default and maximum: the cache's slack), and the
    policy evicts after each, so peak memory is ``C`` slots plus one chunk of activations
    however long the input. ``attention_mask`` ``[B, T]`` (0 = pad, e.g. left padding) is
    supported. Tokens are tagged with ``modality``.

    Returns the logits of the last position ``[B, V]`` (float32); with ``return_nll=True``,
    ``(logits, nll)`` where ``nll[b, t]`` is ``-log p(token[t+1] | tokens[..t])`` (``[B, T-1]``,
    float32, computed chunk by chunk without keeping all logits; pad targets give 0).
    """
    if not isinstance(cache, StreamingCache):
        raise TypeError("inf_mllm: stream() needs cache=<StreamingCache> (from inf_mllm.enable)")
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("inf_mllm: pass exactly one of input_ids or inputs_embeds")
    if return_nll and input_ids is None:
        raise ValueError("inf_mllm: return_nll needs input_ids (the targets)")
    x = input_ids if input_ids is not None else inputs_embeds
    if input_ids is not None and input_ids.dim() == 1:
        input_ids = x = input_ids[None]
    B, T = x.shape[0], x.shape[1]
    if T == 0:
        raise ValueError("inf_mllm: empty input")
    slack = cache.policy.slack
    chunk = slack if chunk is None else int(chunk)
    if chunk < 1:
        raise ValueError(f"inf_mllm: chunk must be >= 1, got {chunk}")
    chunk = min(chunk, slack) if not cache.policy.grows else chunk
    device = next(model.parameters()).device
    if attention_mask is not None and not bool(attention_mask.all()):
        if return_nll:
            raise ValueError("inf_mllm: return_nll is not supported with a padded attention_mask; stream rows one by one")
        if tuple(attention_mask.shape) != (B, T):
            raise ValueError(f"inf_mllm: attention_mask must have shape {(B, T)}, got {tuple(attention_mask.shape)}")
        # Re-chunk per row so that every row sees the same chunk boundaries as when streamed alone:
        # row b's real tokens are cut in chunks from its start; rows with fewer chunks start later,
        # a partial last chunk is left-padded, so all rows end together on the last column.
        x_src = input_ids if input_ids is not None else inputs_embeds
        real = [attention_mask[b].bool().nonzero().squeeze(1) for b in range(B)]
        chunk_ = min(chunk if chunk is not None else cache.policy.slack, cache.policy.slack)
        n_chunks = [-(-int(r.numel()) // chunk_) for r in real]
        K = max(n_chunks)
        new_x = x_src.new_zeros((B, K * chunk_) + tuple(x_src.shape[2:]))
        new_m = torch.zeros(B, K * chunk_, dtype=torch.long, device=attention_mask.device)
        for b in range(B):
            r = real[b]
            n_b = int(r.numel())
            first = K - n_chunks[b]
            for c in range(n_chunks[b]):
                piece = r[c * chunk_ : (c + 1) * chunk_]
                end = (first + c + 1) * chunk_
                new_x[b, end - piece.numel() : end] = x_src[b, piece]
                new_m[b, end - piece.numel() : end] = 1
        if input_ids is not None:
            input_ids = new_x
        else:
            inputs_embeds = new_x
        attention_mask = new_m
        x = new_x
        T = x.shape[1]
        chunk = chunk_
    elif attention_mask is not None:
        attention_mask = None
    if attention_mask is not None:
        if tuple(attention_mask.shape) != (B, T):
            raise ValueError(f"inf_mllm: attention_mask must have shape {(B, T)}, got {tuple(attention_mask.shape)}")
        attention_mask = attention_mask.to(device).long()
    nll = torch.zeros(B, T - 1, dtype=torch.float32, device=device) if return_nll else None
    prev_last = None
    last = None
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=T, unit="tok", desc=f"inf_mllm[{cache.policy.name}]")
    with cache.modality(modality):
        for s in range(0, T, chunk):
            e = min(T, s + chunk)
            kw = dict(past_key_values=cache, use_cache=True)
            if attention_mask is not None:
                kw["attention_mask"], kw["position_ids"] = _mask_and_positions(cache, attention_mask[:, s:e])
            if not return_nll:
                kw["logits_to_keep"] = 1
            if input_ids is not None:
                out = model(input_ids=input_ids[:, s:e].to(device), **kw)
            else:
                out = model(inputs_embeds=inputs_embeds[:, s:e].to(device), **kw)
            logits = out.logits
            if return_nll:
                lp = torch.log_softmax(logits.float(), dim=-1)
                tgt = input_ids[:, s + 1 : e].to(device)
                if tgt.shape[1]:
                    nll[:, s : e - 1] = -lp[:, :-1].gather(-1, tgt[..., None])[..., 0]
                if prev_last is not None:
                    nll[:, s - 1] = -prev_last.gather(-1, input_ids[:, s : s + 1].to(device))[:, 0]
                prev_last = lp[:, -1]
                if attention_mask is not None:
                    nll[:, s : e - 1] *= attention_mask[:, s + 1 : e].float()
            last = logits[:, -1].float()
            del out, logits
            if bar is not None:
                bar.update(e - s)
    if bar is not None:
        bar.close()
    return (last, nll) if return_nll else last


def _mask_and_positions(cache, chunk_mask):
    """HF-style 2-D mask (past assumed real: pads were stripped) and per-row positions for a chunk."""
    B = chunk_mask.shape[0]
    seen = cache.get_seq_length()
    buf0 = cache.layers[0].buf
    base = buf0.fed if buf0 is not None else torch.zeros(B, dtype=torch.long, device=chunk_mask.device)
    pos = base.to(chunk_mask.device)[:, None] + chunk_mask.cumsum(-1) - 1
    pos = pos.clamp_min(0)
    mask = torch.cat([torch.ones(B, seen, dtype=torch.long, device=chunk_mask.device), chunk_mask], dim=1)
    return mask, pos

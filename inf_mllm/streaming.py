"""Chunked prefill under a fixed budget (SPEC §5), greedy decoding, and ``generate`` after a
stream: feed any length, evicting after each chunk."""
from __future__ import annotations

import contextlib
import logging
from typing import List, Optional, Sequence, Tuple

import torch

from ._compat import cache_kwargs, text_config
from .cache import StreamingCache

__all__ = ["stream", "greedy", "generate", "as_ids", "compile_decode"]


def as_ids(ids, name: str = "input_ids") -> torch.Tensor:
    """Token ids as a ``[B, T]`` long tensor: a tensor, a list of ints or a list of lists."""
    if ids is None:
        raise TypeError(f"inf_mllm: {name} is None; give token ids (a tensor or a list of ints) or text")
    if isinstance(ids, str):
        raise TypeError(f"inf_mllm: {name} must be token ids, not a string: tokenize it first (tokenizer(text).input_ids)")
    if not isinstance(ids, torch.Tensor):
        try:
            ids = torch.as_tensor(ids)
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(f"inf_mllm: {name} must be a tensor or a list of token ids, got {type(ids).__name__} ({e})") from None
        if ids.numel() == 0:
            ids = ids.long()
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise TypeError(f"inf_mllm: {name} must hold integer token ids, got dtype {ids.dtype}")
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2:
        raise ValueError(f"inf_mllm: {name} must be [T] or [B, T], got shape {tuple(ids.shape)}")
    return ids.long()


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
    **vision,
):
    """Feed ``input_ids`` ``[B, T]`` (a tensor, or a list of ints for one row) or ``inputs_embeds``
    ``[B, T, H]`` through ``model`` in chunks.

    A Qwen-VL model (M-RoPE) also takes its processor's vision inputs here (``pixel_values``,
    ``image_grid_thw``, ``pixel_values_videos``, ``video_grid_thw``, ``mm_token_type_ids``,
    ``second_per_grid_ts``): the vision tower runs once over the whole input, then the merged
    embeddings are fed to the language model chunk by chunk, at the 3-D positions the cache
    computes (the model's own while nothing was evicted).

    Each chunk is at most ``chunk`` tokens (default and maximum: the cache's slack), and the
    policy evicts after each, so peak memory is ``C`` slots plus one chunk of activations
    however long the input. ``attention_mask`` ``[B, T]`` (0 = pad, e.g. left padding) is
    supported; every row needs at least one real token. Tokens are tagged with ``modality``.

    A policy that probes (``inf_mllm`` with ``reconstruct > 0``) gets every chunk twice: fed, then
    fed again as a probe (:meth:`StreamingCache.probing`) before the chunk's eviction.

    Returns the logits of the last position ``[B, V]`` (float32); with ``return_nll=True``,
    ``(logits, nll)`` where ``nll[b, t]`` is ``-log p(token[t+1] | tokens[..t])`` (``[B, T-1]``,
    float32, computed chunk by chunk without keeping all logits; pad targets give 0).
    """
    if not isinstance(cache, StreamingCache):
        raise TypeError("inf_mllm: stream() needs cache=<StreamingCache> (from inf_mllm.enable)")
    if vision:
        return _stream_vision(model, input_ids, cache, chunk, attention_mask, progress, return_nll, inputs_embeds, vision)
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("inf_mllm: pass exactly one of input_ids or inputs_embeds")
    if return_nll and input_ids is None:
        raise ValueError("inf_mllm: return_nll needs input_ids (the targets)")
    if input_ids is not None:
        input_ids = as_ids(input_ids)
    elif not isinstance(inputs_embeds, torch.Tensor) or inputs_embeds.dim() != 3:
        raise ValueError("inf_mllm: inputs_embeds must be a [B, T, H] tensor")
    x = input_ids if input_ids is not None else inputs_embeds
    B, T = x.shape[0], x.shape[1]
    if T == 0:
        raise ValueError("inf_mllm: empty input")
    if attention_mask is not None:
        attention_mask = torch.as_tensor(attention_mask)
        if tuple(attention_mask.shape) != (B, T):
            raise ValueError(f"inf_mllm: attention_mask must have shape {(B, T)}, got {tuple(attention_mask.shape)}")
        empty = [b for b in range(B) if not bool(attention_mask[b].bool().any())]
        if empty:
            raise ValueError(
                f"inf_mllm: attention_mask row(s) {empty} are all zeros: nothing to feed (every row needs a real token)"
            )
    slack = cache.policy.slack
    chunk = slack if chunk is None else int(chunk)
    if chunk < 1:
        raise ValueError(f"inf_mllm: chunk must be >= 1, got {chunk}")
    chunk = min(chunk, slack) if not cache.policy.grows else chunk
    device = next(model.parameters()).device
    padded = attention_mask is not None and not bool(attention_mask.all())
    if padded and cache.policy.probes:
        raise ValueError(f"inf_mllm: policy {cache.policy.name!r} probes every chunk (reconstruct > 0), which a padded "
                         "batch does not support yet; stream the rows one by one")
    if padded:
        if return_nll:
            raise ValueError("inf_mllm: return_nll is not supported with a padded attention_mask; stream rows one by one")
        # Re-chunk per row so that every row sees the same chunk boundaries as when streamed alone:
        # row b's real tokens are cut in chunks from its start; rows with fewer chunks start later,
        # a partial last chunk is left-padded, so all rows end together on the last column.
        chunk = min(chunk, slack)
        real = [attention_mask[b].bool().nonzero().squeeze(1) for b in range(B)]
        n_chunks = [-(-int(r.numel()) // chunk) for r in real]
        K = max(n_chunks)
        new_x = x.new_zeros((B, K * chunk) + tuple(x.shape[2:]))
        new_m = torch.zeros(B, K * chunk, dtype=torch.long, device=attention_mask.device)
        for b in range(B):
            r = real[b]
            first = K - n_chunks[b]
            for c in range(n_chunks[b]):
                piece = r[c * chunk : (c + 1) * chunk]
                end = (first + c + 1) * chunk
                new_x[b, end - piece.numel() : end] = x[b, piece]
                new_m[b, end - piece.numel() : end] = 1
        if input_ids is not None:
            input_ids = new_x
        else:
            inputs_embeds = new_x
        attention_mask = new_m.to(device)
        T = new_x.shape[1]
    else:
        attention_mask = None  # all ones: the same as no mask
    probe = cache.policy.probes
    if probe and getattr(cache.policy, "instruction", None) is not None and cache.instruction_ids is None:
        raise ValueError(f"inf_mllm: policy {cache.policy.name!r} puts an instruction before every probe: call "
                         "cache.set_instruction(tokenizer) first (or make the cache with instruct=False)")
    nll = torch.zeros(B, T - 1, dtype=torch.float32, device=device) if return_nll else None
    prev_last = None
    last = None
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=T, unit="tok", unit_scale=True, desc=f"inf_mllm[{cache.policy.name}]")
    with cache.modality(modality):
        for s in range(0, T, chunk):
            e = min(T, s + chunk)
            kw = dict(cache_kwargs(cache), use_cache=True)
            if attention_mask is not None:
                kw["attention_mask"], kw["position_ids"] = _mask_and_positions(cache, attention_mask[:, s:e])
            if not return_nll:
                kw["logits_to_keep"] = 1
            piece = dict(input_ids=input_ids[:, s:e].to(device)) if input_ids is not None else dict(
                inputs_embeds=inputs_embeds[:, s:e].to(device))
            if probe:  # reconstruction scoring: the chunk again, as a probe, before the chunk's eviction
                with cache.deferred_eviction():
                    out = model(**piece, **kw)
                    with cache.probing():
                        model(**_instructed(model, cache, piece), **dict(kw, logits_to_keep=1))
            else:
                out = model(**piece, **kw)
            logits = out.logits
            if return_nll:
                lp = torch.log_softmax(logits.float(), dim=-1)
                tgt = input_ids[:, s + 1 : e].to(device)
                if tgt.shape[1]:
                    nll[:, s : e - 1] = -lp[:, :-1].gather(-1, tgt[..., None])[..., 0]
                if prev_last is not None:
                    nll[:, s - 1] = -prev_last.gather(-1, input_ids[:, s : s + 1].to(device))[:, 0]
                prev_last = lp[:, -1]
            last = logits[:, -1].float()
            del out, logits
            if bar is not None:
                bar.update(e - s)
    if bar is not None:
        bar.close()
    return (last, nll) if return_nll else last


VISION_INPUTS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "mm_token_type_ids",
                 "second_per_grid_ts")


def _instructed(model, cache, piece: dict) -> dict:
    """A probe's inputs: the cache's instruction (``cache.instruction_ids``), if any, then the chunk."""
    ids = cache.instruction_ids
    if not ids:
        return piece
    if "input_ids" in piece:
        x = piece["input_ids"]
        pre = torch.tensor([ids], dtype=x.dtype, device=x.device).expand(x.shape[0], -1)
        return dict(input_ids=torch.cat([pre, x], 1))
    x = piece["inputs_embeds"]
    emb = model.get_input_embeddings()(torch.tensor([ids], device=x.device)).to(x.dtype)
    return dict(inputs_embeds=torch.cat([emb.expand(x.shape[0], -1, -1), x], 1))


def _stream_vision(model, input_ids, cache, chunk, attention_mask, progress, return_nll, inputs_embeds, vision):
    """:func:`stream` of a Qwen-VL input: vision features merged once, the language model fed in chunks."""
    from ._compat import language_model, language_model_inputs

    bad = sorted(set(vision) - set(VISION_INPUTS))
    if bad:
        raise TypeError(f"inf_mllm: stream() got unexpected keyword(s) {bad}; vision inputs are {list(VISION_INPUTS)}")
    if cache.mrope is None:
        raise ValueError(f"inf_mllm: vision inputs to stream() are for Qwen-VL (M-RoPE) models; for "
                         f"{type(model).__name__} use inf_mllm.Session.append_image / append_video")
    if input_ids is None or inputs_embeds is not None:
        raise ValueError("inf_mllm: stream() with vision inputs needs the processor's input_ids (and no inputs_embeds)")
    if return_nll:
        raise ValueError("inf_mllm: return_nll is not supported with vision inputs")
    ids = as_ids(input_ids)
    B, T = ids.shape
    if B != 1 or (attention_mask is not None and not bool(torch.as_tensor(attention_mask).all())):
        raise ValueError("inf_mllm: stream() with vision inputs takes one unpadded row; stream rows one by one")
    device = next(model.parameters()).device
    cfg = model.config
    types = vision.get("mm_token_type_ids")
    if types is None:  # what the processor would have said: the image / video placeholder tokens
        types = (ids == cfg.image_token_id).long() + 2 * (ids == cfg.video_token_id).long()
    vision = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in vision.items()}
    vision["mm_token_type_ids"] = types.to(device)
    lm_in = language_model_inputs(model, input_ids=ids.to(device), attention_mask=torch.ones_like(ids).to(device), **vision)
    emb = lm_in["inputs_embeds"]
    vis_mask = lm_in.get("visual_pos_masks")
    deep = lm_in.get("deepstack_visual_embeds")
    cache.mrope.announce(types.cpu(), None, vision.get("image_grid_thw"), vision.get("video_grid_thw"),
                         vision.get("second_per_grid_ts"))
    slack = cache.policy.slack
    chunk = slack if chunk is None else int(chunk)
    if chunk < 1:
        raise ValueError(f"inf_mllm: chunk must be >= 1, got {chunk}")
    chunk = min(chunk, slack) if not cache.policy.grows else chunk
    lm = language_model(model)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=T, unit="tok", unit_scale=True, desc=f"inf_mllm[{cache.policy.name}]")
    last, done_vis = None, 0
    for s in range(0, T, chunk):
        e = min(T, s + chunk)
        kw = dict(cache_kwargs(cache), use_cache=True)
        if vis_mask is not None and deep is not None:
            vm = vis_mask[:, s:e]
            nv = int(vm.sum())
            if nv:
                kw["visual_pos_masks"] = vm
                kw["deepstack_visual_embeds"] = [d[done_vis:done_vis + nv] for d in deep]
            done_vis += nv
        h = lm(inputs_embeds=emb[:, s:e], **kw).last_hidden_state
        last = model.lm_head(h[:, -1:]).float()[:, -1]
        if bar is not None:
            bar.update(e - s)
    if bar is not None:
        bar.close()
    return last


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


def _stop_ids(stop_ids) -> set:
    if stop_ids is None:
        return set()
    if isinstance(stop_ids, int):
        return {stop_ids}
    return {int(i) for i in stop_ids}


@torch.no_grad()
def greedy(model, cache, logits: torch.Tensor, max_new_tokens: int, stop_ids: Sequence[int] = ()) -> Tuple[List[int], torch.Tensor]:
    """Greedy decoding of one row from ``logits`` (``[V]`` or ``[1, V]``: the logits after the last
    token in ``cache``, e.g. what :func:`stream` returned).

    Every chosen token is fed into the cache, a stop token included (so the stream stays
    well-formed: the end of the turn is in the history); the stop token is not returned. Returns
    ``(tokens, logits after the last fed token [V])``. ``cache`` is a :class:`StreamingCache` or
    any transformers ``Cache``.
    """
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"inf_mllm: max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    stop = _stop_ids(stop_ids)
    logits = logits.reshape(-1, logits.shape[-1])
    if logits.shape[0] != 1:
        raise ValueError(f"inf_mllm: greedy decodes one row, got logits for {logits.shape[0]}")
    logits = logits[0].float()
    device = next(model.parameters()).device
    out: List[int] = []
    for _ in range(max_new_tokens):
        nxt = int(torch.argmax(logits))
        ids = torch.tensor([[nxt]], device=device)
        logits = model(input_ids=ids, **cache_kwargs(cache), use_cache=True, logits_to_keep=1).logits[0, -1].float()
        if nxt in stop:
            break
        out.append(nxt)
    return out, logits


@torch.no_grad()
def generate(model, input_ids, *, cache: StreamingCache, chunk: Optional[int] = None, progress: bool = False, **generate_kwargs):
    """``model.generate`` after any length of input, in constant memory.

    ``input_ids`` ``[1, T]`` are the tokens *not yet* in ``cache`` (the first call: the whole
    prompt; later calls: what came since). All but the last are streamed into the cache in
    chunks (:func:`stream`: eviction after each chunk), then ``model.generate`` feeds the last one
    and decodes with ``generate_kwargs`` (``max_new_tokens``, ``do_sample``, ...). Returns only the
    new tokens ``[1, n_new]``.

    Why a helper: transformers' ``generate`` feeds ``input_ids[:, cache_position]``, the positions
    not yet in the cache, so it must be given ids for the whole history (the
    ``cache.get_seq_length()`` tokens already inside plus at least one new one). Given only the new
    token after a :func:`stream`, it slices an empty tensor ("cannot reshape tensor of 0
    elements"). This helper hands it placeholders for the history the cache already holds (with
    an all-ones attention mask; they are never embedded). Logits processors that look at earlier
    tokens (``repetition_penalty``, ``no_repeat_ngram_size``) therefore see only ``input_ids``.

    Beam search (``num_beams=k``): the cache's one row is repeated into ``k`` rows first, and
    transformers reorders them at every step; afterwards the cache holds the ``k`` running beams
    (``cache.batch_select_indices([i])`` keeps one of them). With a rolling policy, transformers'
    reminder that the ids exceed the model's trained context is hidden: the positions the model
    sees stay below the cache's capacity.
    """
    if not isinstance(cache, StreamingCache):
        raise TypeError("inf_mllm: generate() needs cache=<StreamingCache> (from inf_mllm.enable)")
    ids = as_ids(input_ids)
    if ids.shape[0] != 1:
        raise ValueError("inf_mllm: generate() takes one row (batch size 1); use model.generate for padded batches")
    if ids.shape[1] == 0:
        raise ValueError("inf_mllm: generate() needs at least one new token")
    for key in ("cache", "past_key_values", "attention_mask"):
        if key in generate_kwargs:
            raise TypeError(f"inf_mllm: generate() sets {key} itself")
    device = next(model.parameters()).device
    if ids.shape[1] > 1:
        stream(model, ids[:, :-1], cache=cache, chunk=chunk, progress=progress)
    seen = cache.get_seq_length()
    pad = getattr(getattr(model, "generation_config", None), "pad_token_id", None)
    if isinstance(pad, (list, tuple)):
        pad = pad[0] if pad else None
    filler = int(pad) if pad is not None else int(ids[0, -1])
    full = torch.cat([torch.full((1, seen), filler, dtype=torch.long), ids[:, -1:].cpu()], dim=1).to(device)
    beams = generate_kwargs.get("num_beams") or getattr(getattr(model, "generation_config", None), "num_beams", 1) or 1
    if beams > 1 and cache.layers[0].buf is not None and cache.layers[0].buf.batch == 1:
        cache.batch_repeat_interleave(int(beams))  # generate expands the ids to one row per beam, not the cache
    with _positions_below_capacity(model, cache):
        out = model.generate(full, attention_mask=torch.ones_like(full), **cache_kwargs(cache), **generate_kwargs)
    seqs = out.sequences if hasattr(out, "sequences") else out
    new = seqs[:, seen + 1 :]
    if hasattr(out, "sequences"):
        out.sequences = new
        return out
    return new


@contextlib.contextmanager
def _positions_below_capacity(model, cache):
    """transformers' ``generate`` reminds that the ids exceed the trained context
    (``max_position_embeddings``) when the history is longer. With a rolling policy whose capacity
    fits that context the model never sees a position past the capacity (the cache re-indexes
    every kept token by its slot), so the reminder is not true there and is hidden; with original
    positions it is true, and it is shown."""
    max_pos = getattr(text_config(model), "max_position_embeddings", None)
    if not (cache.policy.rolling and max_pos and cache.capacity <= max_pos):
        yield
        return
    log = logging.getLogger("transformers.generation.stopping_criteria")
    once = log.warning_once  # transformers' (remembers what it said: so not called at all for the reminder)

    def quiet(msg, *a, **k):
        if "predefined maximum length" not in str(msg):
            once(msg, *a, **k)

    log.warning_once = quiet  # this logger object only, for this call
    try:
        yield
    finally:
        del log.warning_once


def compile_decode(model, cache: StreamingCache, **compile_kwargs):
    """A decode step of one token per row, with the model's forward compiled whole.

    Returns ``step(tokens [B, 1]) -> logits [B, V]`` (float32). The forward runs under
    ``torch.compile(fullgraph=True, **compile_kwargs)`` (e.g. ``mode="reduce-overhead"`` for CUDA
    graphs on a GPU); what the policy decides (making room, how the step scores, evictions) and the
    host counters are done eagerly around it (``StreamingCache.plan_decode_step`` /
    ``finish_decode_step``), so the compiled step holds only tensor work and no Python integer
    that changes from step to step: the same graph replays at every step, evictions included.
    Needs a fixed-size policy and a cache that has seen the prompt (e.g. by :func:`stream`).
    """
    if not isinstance(cache, StreamingCache):
        raise TypeError("inf_mllm: compile_decode() needs cache=<StreamingCache> (from inf_mllm.enable)")
    if cache.policy.grows:
        raise ValueError(f"inf_mllm: compile_decode needs a fixed-size cache; policy {cache.policy.name!r} grows")

    def forward(tok, pos):
        return model(tok, **cache_kwargs(cache), position_ids=pos, cache_position=pos[0], use_cache=True,
                     logits_to_keep=1).logits[:, -1]

    compiled = torch.compile(forward, fullgraph=True, **compile_kwargs)

    @torch.no_grad()
    def step(tokens) -> torch.Tensor:
        tok = as_ids(tokens, "tokens")
        if tok.shape[1] != 1:
            raise ValueError(f"inf_mllm: a decode step takes one token per row, got shape {tuple(tok.shape)}")
        buf = cache.layers[0].buf
        if buf is None:
            raise RuntimeError("inf_mllm: compile_decode's step needs a cache that has seen a prompt (stream it first)")
        pos = buf.fed.clone()[:, None]  # each row's next stream position (device; no sync)
        cache.plan_decode_step()
        try:
            return compiled(tok.to(pos.device), pos).float()
        finally:
            cache.finish_decode_step()

    return step

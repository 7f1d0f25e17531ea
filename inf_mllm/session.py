"""Multi-round sessions over one fixed-size cache (constant memory over hundreds of rounds)."""
from __future__ import annotations

import itertools
from typing import Iterable, Optional, Union

import torch

from .api import enable
from .streaming import as_ids, greedy, stream


def _rope_index_args(model):
    import inspect

    return inspect.signature(model.model.get_rope_index).parameters


class Session:
    """One cache kept across rounds.

    >>> s = Session(model, tokenizer, policy="inf_mllm", budget=1024)
    >>> s.append("Some long document ...")
    >>> s.ask("What was it about?", max_new_tokens=32)

    ``policy_args`` go to :func:`inf_mllm.enable` (``policy``, ``budget``, ``n_recent``, ...).

    ``progress=True`` (default) shows a progress bar on stderr for every append longer than one
    prefill chunk; ``progress=False`` turns them off (each method also takes ``progress=``).

    Vision-language models (LLaVA family): pass ``processor`` (the model's ``AutoProcessor`` /
    image processor; ``None`` = plain resize + normalize) and stream pictures with
    :meth:`append_image` / :meth:`append_video`; ``tokenizer`` may be ``None`` when the processor
    carries one.
    """

    def __init__(self, model, tokenizer=None, processor=None, *, progress: bool = True, **policy_args):
        self.model = model
        self.tokenizer = tokenizer if tokenizer is not None else getattr(processor, "tokenizer", None)
        self.processor = processor
        self.progress = bool(progress)
        self.cache = enable(model, **policy_args)
        self.device = next(model.parameters()).device
        self.appends = 0
        self.questions = 0
        self.images = 0
        self.frames = 0
        self._encoder = None
        self._qwen = None
        self._last_logits: Optional[torch.Tensor] = None

    def _ids(self, text_or_ids) -> torch.Tensor:
        if isinstance(text_or_ids, str):
            if self.tokenizer is None:
                raise ValueError("inf_mllm: this Session has no tokenizer: pass token ids, or give Session a tokenizer")
            ids = self.tokenizer(text_or_ids, add_special_tokens=False, return_tensors="pt").input_ids
        else:
            ids = as_ids(text_or_ids, "text_or_ids")
        if ids.shape[0] != 1:
            raise ValueError("inf_mllm: Session takes one sequence (batch size 1)")
        return ids

    def _show(self, n_tokens: int, progress: Optional[bool]) -> bool:
        on = self.progress if progress is None else bool(progress)
        return on and n_tokens > self.cache.policy.slack  # more than one prefill chunk

    @torch.no_grad()
    def append(self, text_or_ids: Union[str, torch.Tensor, list], modality: str = "text", progress: Optional[bool] = None):
        """Feed text (or token ids) into the cache, in chunks; returns the last logits.

        A progress bar shows when the input is longer than one chunk (``progress=None``: the
        session's setting)."""
        ids = self._ids(text_or_ids)
        if ids.shape[1] == 0:
            return self._last_logits
        self._last_logits = stream(self.model, ids, cache=self.cache, modality=modality,
                                   progress=self._show(ids.shape[1], progress))
        self.appends += 1
        return self._last_logits

    # ---- pictures (vision-language models) --------------------------------------------
    @property
    def encoder(self):
        if self._encoder is None:
            from .vision import FrameEncoder

            self._encoder = FrameEncoder(self.model, self.processor)
        return self._encoder

    @torch.no_grad()
    def append_embeds(self, embeds: torch.Tensor, modality: str = "image", progress: Optional[bool] = None):
        """Feed ready ``inputs_embeds`` ``[T, H]`` or ``[1, T, H]`` (chunked prefill, eviction after each chunk)."""
        if not isinstance(embeds, torch.Tensor):
            raise TypeError(f"inf_mllm: embeds must be a tensor [T, H] or [1, T, H], got {type(embeds).__name__}")
        if embeds.dim() == 2:
            embeds = embeds[None]
        if embeds.shape[1] == 0:
            return self._last_logits
        self._last_logits = stream(self.model, inputs_embeds=embeds, cache=self.cache, modality=modality,
                                   progress=self._show(embeds.shape[1], progress))
        return self._last_logits

    def _text(self, text: Optional[str]):
        if text:
            self.append(text)

    # ---- Qwen-VL (M-RoPE): the model's own vision inputs, positions computed by the cache ----
    @property
    def qwen_inputs(self):
        if self._qwen is None:
            from .vision import QwenVLInputs

            self._qwen = QwenVLInputs(self.model, self.processor)
        return self._qwen

    def _vision_ids(self, mtype: int, n: int) -> list:
        cfg = self.model.config
        tok = cfg.image_token_id if mtype == 1 else cfg.video_token_id
        return [cfg.vision_start_token_id] + [tok] * n + [cfg.vision_end_token_id]

    def _stream_vision(self, ids: list, mtype: int, **vision):
        types = torch.tensor([[mtype if i in (self.model.config.image_token_id, self.model.config.video_token_id) else 0
                               for i in ids]])
        self._last_logits = stream(self.model, torch.tensor([ids]), cache=self.cache, mm_token_type_ids=types, **vision)
        return self._last_logits

    def _qwen_image(self, image):
        pv, grid, n = self.qwen_inputs.image(image)
        return self._stream_vision(self._vision_ids(1, n), 1, pixel_values=pv, image_grid_thw=grid)

    def _qwen_clip(self, frames, first: int, fps: Optional[float], frame_text: Optional[str]):
        """One clip of a Qwen-VL video: its own video (grid ``t = frames / 2``); Qwen3-VL lays it out
        frame by frame with a timestamp (``frame_text``, default ``"<{t:.1f} seconds>"``) before each."""
        pv, grid, n = self.qwen_inputs.video(frames)
        t = int(grid[0, 0])
        tp = self.qwen_inputs.tp
        vision = dict(pixel_values_videos=pv, video_grid_thw=grid)
        if "second_per_grid_ts" in _rope_index_args(self.model):
            vision["second_per_grid_ts"] = torch.tensor([tp / fps if fps else 1.0])
        if self.cache.mrope.rule.split_video:
            ids, per, fmt = [], n // t, frame_text or "<{t:.1f} seconds>"
            for k in range(t):
                i = first + k * tp
                ids += self._ids(fmt.format(i=i, t=i / fps if fps else float(i)))[0].tolist() + self._vision_ids(2, per)
        else:
            ids = self._vision_ids(2, n)
            if frame_text:
                self.append(frame_text.format(i=first, t=first / fps if fps else float(first)))
        return self._stream_vision(ids, 2, **vision)

    @torch.no_grad()
    def append_image(self, image, text_before: Optional[str] = None, text_after: Optional[str] = None):
        """Stream one image: the VLM's vision tower + projector, then its tokens (tagged ``image``).

        ``text_before`` / ``text_after`` are streamed as text around the image tokens, where the
        model's template puts ``<image>`` (e.g. LLaVA-1.5: ``"USER: "`` and ``"\n"``). A Qwen-VL
        model gets its own layout (``<|vision_start|>``, the image tokens, ``<|vision_end|>``) at
        the 3-D positions the cache computes.
        """
        if self.cache.mrope is not None:
            self._text(text_before)
            out = self._qwen_image(image)
            self.images += 1
            self._text(text_after)
            return self._last_logits if text_after else out
        feats = self.encoder.encode([image])[0]
        self._text(text_before)
        out = self.append_embeds(feats, modality="image")
        self.images += 1
        self._text(text_after)
        return self._last_logits if text_after else out

    @torch.no_grad()
    def append_video(self, frames: Iterable, fps: Optional[float] = None, frames_per_chunk: Optional[int] = None,
                     frame_text: Optional[str] = None, max_frames: Optional[int] = None, progress: Optional[bool] = None):
        """Stream video frames (any iterable, e.g. :func:`inf_mllm.video.read_frames`; consumed lazily).

        Frames are encoded ``frames_per_chunk`` at a time by the vision tower (the model's video path
        -- ``get_video_features`` -- when it has one, e.g. LLaVA-NeXT-Video); their tokens (tagged
        ``video``) go through chunked prefill with eviction after each chunk, so memory stays flat
        however many frames. ``frame_text`` (a format string with ``{i}`` = index of the group's
        first frame and ``{t}`` = its time in seconds when ``fps`` is given, else ``{i}``) is
        streamed as text before each group, e.g. ``"Frame {i}: "``. Returns the number of frames read.

        Qwen-VL models: each group of ``frames_per_chunk`` frames (even, default 2: one temporal
        patch) is one video clip in the model's own layout, at the 3-D positions the cache computes;
        ``fps`` sets Qwen2.5-VL's ``second_per_grid_ts`` and Qwen3-VL's timestamps.
        """
        qwen = self.cache.mrope is not None
        if frames_per_chunk is None:
            frames_per_chunk = 2 if qwen else 1
        if not isinstance(frames_per_chunk, int) or frames_per_chunk < 1:
            raise ValueError(f"inf_mllm: frames_per_chunk must be an int >= 1, got {frames_per_chunk!r}")
        n = 0
        group: list = []
        bar = None
        if self.progress if progress is None else progress:
            from tqdm.auto import tqdm

            bar = tqdm(unit="frame", desc=f"inf_mllm[{self.cache.policy.name}] video")

        if qwen and frames_per_chunk % 2:
            raise ValueError(f"inf_mllm: a Qwen-VL model encodes frames in pairs (temporal patch 2): frames_per_chunk "
                             f"must be even, got {frames_per_chunk}")

        def flush(first: int):
            if qwen:
                self._qwen_clip(group, first, fps, frame_text)
                if bar is not None:
                    bar.update(len(group))
                return
            if frame_text:
                t = first / fps if fps else float(first)
                self.append(frame_text.format(i=first, t=t))
            self.append_embeds(self.encoder.encode_video(group), modality="video")
            if bar is not None:
                bar.update(len(group))

        if max_frames is not None:
            frames = itertools.islice(frames, max(0, int(max_frames)))  # never pulls a frame it will not use
        for frame in frames:
            group.append(frame)
            n += 1
            if len(group) == frames_per_chunk:
                flush(n - len(group))
                group = []
        if group:
            flush(n - len(group))
        if bar is not None:
            bar.close()
        self.frames += n
        return n

    def _prompt(self, question: str) -> str:
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            return tok.apply_chat_template(
                [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
            )
        return f"{question}\n"

    def _eos_ids(self):
        ids = set()
        for src in (getattr(self.model, "generation_config", None), self.tokenizer):
            e = getattr(src, "eos_token_id", None)
            if isinstance(e, int):
                ids.add(e)
            elif isinstance(e, (list, tuple)):
                ids.update(int(x) for x in e)
        return ids

    @torch.no_grad()
    def ask(self, question: str, max_new_tokens: int = 64) -> str:
        """Append ``question`` (chat template when the tokenizer has one) and answer greedily; the
        answer (and the end-of-turn token) stay in the cache, as in a chat."""
        if not isinstance(question, str):
            raise TypeError(f"inf_mllm: question must be a string, got {type(question).__name__}")
        if self.tokenizer is None:
            raise ValueError("inf_mllm: ask() needs a tokenizer")
        self.append(self._prompt(question))
        out, self._last_logits = greedy(self.model, self.cache, self._last_logits, max_new_tokens, self._eos_ids())
        self.questions += 1
        return self.tokenizer.decode(out, skip_special_tokens=True)

    def stats(self) -> dict:
        """The cache's numbers (``tokens_seen``, ``slots_used``, ``slots_by_modality``, ``capacity``,
        ``budget``, ``evictions``, ``cache_bytes``) and this session's calls: ``appends`` (text
        appends, the prompts of ``ask`` included), ``questions`` (``ask`` calls), ``images``,
        ``frames``."""
        s = self.cache.stats()
        s["appends"] = self.appends
        s["questions"] = self.questions
        s["images"] = self.images
        s["frames"] = self.frames
        return s

    def reset(self):
        self.cache.reset()
        self.appends = self.questions = 0
        self.images = self.frames = 0
        self._last_logits = None

    # ---- persistence (inf_mllm.persist) ------------------------------------------------
    def save(self, path) -> dict:
        """Write the session (its cache, counters and last logits) to ``path``: one safetensors
        file, written atomically (:mod:`inf_mllm.persist`). Returns ``{path, bytes, seconds, MiB_per_s}``."""
        from .persist import save_session

        return save_session(self, path)

    @classmethod
    def load(cls, path, model, tokenizer=None, processor=None) -> "Session":
        """The session saved at ``path``, over ``model`` (the model it was saved with: checked) and
        ``tokenizer`` / ``processor`` (not saved). Refuses another model, a truncated or corrupted
        file, a newer format, a path that is not a file, each with one line."""
        from .persist import load_session

        return load_session(cls, path, model, tokenizer, processor)

    def to_json(self) -> dict:
        """The session's host state (JSON): its counters and settings."""
        return {"appends": self.appends, "questions": self.questions, "images": self.images, "frames": self.frames,
                "progress": self.progress}

    def from_json(self, d: dict) -> None:
        self.appends, self.questions = int(d["appends"]), int(d["questions"])
        self.images, self.frames = int(d["images"]), int(d["frames"])
        self.progress = bool(d.get("progress", True))

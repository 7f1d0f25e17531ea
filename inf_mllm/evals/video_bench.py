"""Frames per second and peak memory vs frames streamed into a VLM (``inf-mllm bench video``).

For each policy a :class:`~inf_mllm.session.Session` streams real video frames (OpenCV decode of
``vtest.avi`` from Debian's ``opencv-doc``, looped when more frames are asked for than the clip
has) through the VLM's vision tower + projector and chunked prefill; at each checkpoint (number of
frames) it records the throughput since the previous checkpoint, the cache's slots / bytes, the
process RSS and, on CUDA, ``max_memory_allocated`` since the previous checkpoint.

Model: a tiny **random** LLaVA (real ``LlavaForConditionalGeneration`` architecture: small CLIP
vision tower + the tiny Llama of :func:`inf_mllm.models.tiny_llama_config`; real ``LlavaProcessor`` with a PIL CLIP image processor and a byte-level
tokenizer built locally) by default, or a local checkpoint directory (``--model PATH``). Random
weights measure speed and memory only, never accuracy.
"""
from __future__ import annotations

import gc
import time
from typing import Any, Dict, List, Optional, Sequence

import torch

from .common import record

__all__ = ["tiny_llava", "run_video_bench", "load_vlm", "TINY_QWEN"]

#: ``--model`` names of the tiny random Qwen-VL models (M-RoPE; speed and memory only)
TINY_QWEN = {"tiny-qwen2-vl": "qwen2_vl", "tiny-qwen2.5-vl": "qwen2_5_vl", "tiny-qwen3-vl": "qwen3_vl"}


def tiny_llava(seed: int = 0, image_size: int = 32, patch_size: int = 16, n_layers: int = 2, hidden: int = 96,
               dtype=torch.float32, sharpen: float = 8.0):
    """``(model, processor)``: a random LlavaForConditionalGeneration (tiny CLIP + tiny Llama) and its
    real LlavaProcessor. ``(image_size / patch_size) ** 2`` tokens per image ("default" strategy drops CLS)."""
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    from .._compat import clip_image_processor
    from ..models import byte_tokenizer, sharpen_attention, tiny_llama_config

    tok = byte_tokenizer(extra=("<image>",))
    image_token_id = tok.convert_tokens_to_ids("<image>")
    torch.manual_seed(seed)
    vc = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                          image_size=image_size, patch_size=patch_size, projection_dim=32)
    tc = tiny_llama_config(n_layers=n_layers, vocab=len(tok), hidden=hidden, bos_token_id=tok.bos_token_id,
                           eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_id=image_token_id, vision_feature_layer=-2,
                      vision_feature_select_strategy="default")
    model = LlavaForConditionalGeneration(cfg).eval().to(dtype)
    sharpen_attention(model.model.language_model.layers, sharpen)
    ip = clip_image_processor(image_size)
    proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=patch_size,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1)
    return model, proc


def load_vlm(path: Optional[str], device: str = "cpu", dtype=torch.float32, **tiny_kw):
    """``(model, processor)``: the tiny random LLaVA (``path`` None or ``"tiny-random"``) or a local
    checkpoint directory (``from_pretrained``, offline)."""
    if path in (None, "", "tiny-random", "tiny-llava"):
        model, proc = tiny_llava(dtype=dtype, **tiny_kw)
        return model.to(device), proc
    if path in TINY_QWEN:
        from ..models import tiny_qwen_vl_session_parts

        model, proc = tiny_qwen_vl_session_parts(TINY_QWEN[path])
        return model.to(device, dtype), proc
    from transformers import AutoModelForImageTextToText, AutoProcessor

    proc = AutoProcessor.from_pretrained(path, local_files_only=True)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, local_files_only=True).eval().to(device)
    return model, proc


def _rss() -> int:
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except Exception:  # pragma: no cover
        return 0


def run_video_bench(model, processor, *, policies: Sequence[str], policy_args: Dict[str, Any], checkpoints: List[int],
                    frames_per_chunk: Optional[int] = None, every: int = 1, video: Optional[str] = None, frame_size: Optional[int] = None,
                    chunk: int = 64, question: Optional[str] = "What happens in the video?", max_new_tokens: int = 4,
                    model_name: str = "tiny-random") -> Dict[str, Any]:
    """Stream ``checkpoints[-1]`` frames per policy; a row per (policy, checkpoint)."""
    from ..session import Session
    from ..video import find_sample_video, read_frames, video_info

    dev = str(next(model.parameters()).device)
    cuda = dev.startswith("cuda")
    path = video or find_sample_video()
    info = video_info(path)
    rows: List[Dict[str, Any]] = []
    series: Dict[str, Dict[str, list]] = {}
    n_max = checkpoints[-1]
    for policy in policies:
        kw = dict(policy_args)
        if policy != "inf_mllm":
            kw.pop("min_text_slots", None)
        if policy == "full":
            kw = {}
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        s = Session(model, None, processor=processor, policy=policy, chunk=chunk, progress=False, **kw)
        frames = read_frames(path, every=every, max_frames=n_max, size=frame_size, loop=True)
        ser = {k: [] for k in ("frames", "fps", "cache_MiB", "rss_MiB", "peak_MiB", "cache_slots")}
        done = 0
        t_start = time.perf_counter()
        status = "ok"
        for cp in checkpoints:
            t0 = time.perf_counter()
            try:
                done += s.append_video(frames, frames_per_chunk=frames_per_chunk, max_frames=cp - done,
                                       fps=info["fps"] / every if info.get("fps") else None)
            except torch.cuda.OutOfMemoryError:  # pragma: no cover
                status = "out of memory"
                break
            if cuda:
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            st = s.stats()
            row = {
                "policy": policy, "frames": done, "tokens_seen": st["tokens_seen"], "cache_slots": st["slots_used"],
                "capacity": st["capacity"], "slots_by_modality": st["slots_by_modality"],
                "fps": round((cp - (ser["frames"][-1] if ser["frames"] else 0)) / dt, 3) if dt > 0 else None,
                "cache_MiB": round(st["cache_bytes"] / 2**20, 4), "rss_MiB": round(_rss() / 2**20, 1),
                "peak_MiB": round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else None,
            }
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            rows.append(row)
            record("row", row)
            for k in ser:
                ser[k].append(row[k] if k != "cache_slots" else st["slots_used"])
        answer = None
        if status == "ok" and question and getattr(s, "tokenizer", None) is not None:
            answer = s.ask(question, max_new_tokens=max_new_tokens)
        rows.append({"policy": policy, "frames": done, "status": status, "total_s": round(time.perf_counter() - t_start, 3),
                     "answer": answer})
        series[policy] = ser
        del s
    return {
        "model": model_name, "device": dev, "video": {"path": path, **info, "every": every, "frame_size": frame_size},
        "frames_per_chunk": frames_per_chunk, "chunk": chunk, "policy_args": policy_args, "checkpoints": checkpoints,
        "rows": rows, "series": series,
        "notes": ["random weights: speed and memory only, no accuracy" if model_name.startswith("tiny-") else ""],
    }


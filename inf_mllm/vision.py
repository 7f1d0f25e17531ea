"""Frames -> language-model embeddings for vision-language models (LLaVA family).

:class:`FrameEncoder` preprocesses images (the model's real image processor when one is given,
else a plain resize + normalize) and runs the VLM's own vision tower + projector
(``get_image_features``), returning one ``[T_img, hidden]`` tensor per frame, ready to be fed
as ``inputs_embeds`` into the language side.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np
import torch

from ._compat import image_features, is_multimodal, video_features

# CLIP normalisation (the LLaVA family's vision towers); used only by the fallback preprocessing
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _to_chw_float(img) -> torch.Tensor:
    """PIL image / HWC uint8 RGB array / CHW or HWC tensor -> float ``[3, H, W]`` in [0, 1]."""
    if hasattr(img, "convert") and hasattr(img, "size"):  # PIL
        img = np.asarray(img.convert("RGB"))
    if isinstance(img, np.ndarray):
        if img.ndim == 2:
            img = np.stack([img] * 3, -1)
        t = torch.from_numpy(np.ascontiguousarray(img[..., :3])).permute(2, 0, 1)
    elif isinstance(img, torch.Tensor):
        t = img
        if t.dim() == 3 and t.shape[0] not in (1, 3) and t.shape[-1] in (1, 3):
            t = t.permute(2, 0, 1)
        if t.shape[0] == 1:
            t = t.expand(3, -1, -1)
    else:
        raise TypeError(f"inf_mllm: unsupported image type {type(img).__name__} (PIL image, HxWx3 array or tensor)")
    if not t.is_floating_point():
        t = t.float() / 255.0
    return t.float()


def fallback_preprocess(images: Sequence, size: int, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """Resize (bicubic, to ``size x size``) + normalize: ``[N, 3, size, size]`` float32."""
    out = []
    for img in images:
        t = _to_chw_float(img)[None]
        t = torch.nn.functional.interpolate(t, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
        out.append(t[0])
    x = torch.stack(out)
    m = torch.tensor(mean, dtype=x.dtype)[:, None, None]
    s = torch.tensor(std, dtype=x.dtype)[:, None, None]
    return (x - m) / s


class FrameEncoder:
    """Runs a VLM's vision tower + projector on frames.

    Args:
        model: a vision-language model (``LlavaForConditionalGeneration`` ...).
        processor: the model's processor (``AutoProcessor`` / ``LlavaProcessor``) or image
            processor; ``None``: resize to the vision config's ``image_size`` + CLIP normalisation.
    """

    def __init__(self, model, processor=None):
        if not is_multimodal(model):
            raise ValueError(
                f"inf_mllm: {type(model).__name__} is not a vision-language model (no vision sub-config); "
                "append_image/append_video need a VLM such as LlavaForConditionalGeneration"
            )
        self.model = model
        self.image_processor = getattr(processor, "image_processor", processor)
        self.has_video_path = any(hasattr(o, "get_video_features") for o in (model, getattr(model, "model", None)) if o is not None)
        vc = model.config.vision_config
        self.size = int(getattr(vc, "image_size", 336))
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype

    def pixel_values(self, images: Sequence) -> torch.Tensor:
        if self.image_processor is not None:
            arrs = [np.asarray(_to_chw_float(im).mul(255).round().clamp(0, 255).byte().permute(1, 2, 0))
                    if isinstance(im, torch.Tensor) else im for im in images]
            pv = self.image_processor(images=list(arrs), return_tensors="pt")["pixel_values"]
            if pv.dim() != 4:  # any-resolution processors (LLaVA-NeXT) tile images: frames use the plain path
                pv = fallback_preprocess(images, self.size, *self._norm())
        else:
            pv = fallback_preprocess(images, self.size)
        return pv.to(self.device, self.dtype)

    @torch.no_grad()
    def encode(self, images: Sequence) -> List[torch.Tensor]:
        """One ``[T_img, hidden]`` tensor per image (the tokens that replace LLaVA's ``<image>``)."""
        return image_features(self.model, self.pixel_values(images))

    def _norm(self):
        ip = self.image_processor
        mean, std = getattr(ip, "image_mean", None), getattr(ip, "image_std", None)
        return (tuple(mean), tuple(std)) if mean is not None and std is not None else (CLIP_MEAN, CLIP_STD)

    @torch.no_grad()
    def encode_video(self, frames: Sequence) -> torch.Tensor:
        """``[T, hidden]`` tokens of a group of frames: the model's video path when it has one
        (LLaVA-NeXT-Video, LLaVA-OneVision), else the image path per frame, concatenated."""
        if self.has_video_path:
            out = video_features(self.model, self.pixel_values(frames)[None])
            if out is not None:
                return out
        return torch.cat(self.encode(frames), 0)



class QwenVLInputs:
    """Pixel inputs of a Qwen-VL model (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) for images and video clips.

    ``processor``: the model's processor or its image processor; ``None``: transformers' Qwen2-VL
    image processor (PIL backend, no torchvision) with the model's patch, merge and temporal patch
    sizes. Video clips are built from the same image processor frame by frame (the video
    processors import torchvision): consecutive frames fill a temporal patch, in the layout of the
    model's own processors (per patch ``C x temporal x p x p``)."""

    def __init__(self, model, processor=None, min_pixels: Optional[int] = None, max_pixels: Optional[int] = None):
        vc = model.config.vision_config
        ip = getattr(processor, "image_processor", processor)
        if ip is None:
            from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

            kw = dict(patch_size=vc.patch_size, merge_size=vc.spatial_merge_size, temporal_patch_size=vc.temporal_patch_size)
            if min_pixels or max_pixels:
                kw["size"] = {"shortest_edge": int(min_pixels or 56 * 56), "longest_edge": int(max_pixels or 28 * 28 * 1280)}
            ip = Qwen2VLImageProcessorPil(**kw)
        self.ip = ip
        self.tp = int(getattr(ip, "temporal_patch_size", vc.temporal_patch_size))
        self.merge = int(vc.spatial_merge_size)
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype

    def _one(self, img):
        if isinstance(img, torch.Tensor):
            img = np.asarray(_to_chw_float(img).mul(255).round().clamp(0, 255).byte().permute(1, 2, 0))
        out = self.ip(images=[img], return_tensors="pt")
        return out["pixel_values"], out["image_grid_thw"]

    def image(self, img):
        """``(pixel_values [N, C*tp*p*p], image_grid_thw [1, 3], tokens)`` of one image."""
        pv, grid = self._one(img)
        return pv.to(self.device, self.dtype), grid, int(grid.prod()) // self.merge ** 2

    def video(self, frames: Sequence):
        """``(pixel_values_videos, video_grid_thw [1, 3], tokens)`` of a clip (an odd last frame is repeated,
        as the model's processors do)."""
        frames = list(frames)
        if not frames:
            raise ValueError("inf_mllm: an empty video clip")
        while len(frames) % self.tp:
            frames.append(frames[-1])
        per, grid = [], None
        for f in frames:
            pv, g = self._one(f)
            if grid is not None and not torch.equal(g, grid):
                raise ValueError(f"inf_mllm: the frames of one clip must have one size (grids {grid.tolist()} and {g.tolist()})")
            grid = g
            n, d = pv.shape
            c = d // (self.tp * self.ip.patch_size ** 2)
            per.append(pv.reshape(n, c, self.tp, -1)[:, :, 0])  # the image processor repeats a frame over time
        pairs = [torch.stack(per[i:i + self.tp], dim=2).reshape(per[0].shape[0], -1) for i in range(0, len(per), self.tp)]
        t = len(frames) // self.tp
        grid = torch.tensor([[t, int(grid[0, 1]), int(grid[0, 2])]])
        return torch.cat(pairs).to(self.device, self.dtype), grid, int(grid.prod()) // self.merge ** 2

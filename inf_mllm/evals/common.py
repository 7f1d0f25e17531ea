"""Helpers shared by the evaluations: progress bars, checkpoints, policy grids."""
from __future__ import annotations

import json
import math
import os
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

__all__ = ["progress", "doubling", "parse_int_list", "parse_sweep", "policy_grid", "SIZE_SUFFIX", "parse_size",
           "record", "start_partial", "end_partial"]


# ---- finished cases as they come (so that an interrupted run keeps what it measured) -------
_PARTIAL: Dict[str, Any] = {"path": None, "n": 0}


def start_partial(path: str) -> None:
    """From now on, :func:`record` appends each finished case to ``path`` (JSON lines, emptied now)."""
    with open(path, "w", encoding="utf-8"):
        pass
    _PARTIAL.update(path=path, n=0)


def record(kind: str, obj: Dict[str, Any]) -> None:
    """Append one finished case (``kind``: ``"case"``, ``"row"``; written as the line's ``"record"``
    key) to the run's partial file, if one is open (the CLI opens it; the evaluations call this as
    they go)."""
    path = _PARTIAL["path"]
    if path is None:
        return
    from ..results import _jsonable

    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(_jsonable({"record": kind, **obj}), allow_nan=False) + "\n")
        f.flush()
    _PARTIAL["n"] += 1


def end_partial(remove: bool) -> Tuple[Optional[str], int]:
    """Stop recording; ``remove``: delete the file (the full JSON is written). Returns ``(path, cases)``."""
    path, n = _PARTIAL["path"], _PARTIAL["n"]
    _PARTIAL.update(path=None, n=0)
    if path is not None and (remove or n == 0) and os.path.exists(path):
        os.unlink(path)
    return path, n

SIZE_SUFFIX = {"k": 1024, "m": 1024 * 1024}


def parse_size(s, *, minimum: Optional[int] = None, name: str = "size") -> int:
    """``"4K"`` -> 4096, ``"1M"`` -> 1048576, ``"300"`` -> 300, ``"1.5K"`` -> 1536.

    Raises ``ValueError`` naming ``name`` for anything else (``"1x"``, ``"0.3"``, ``""``) and for
    values below ``minimum``."""
    if isinstance(s, bool):
        raise ValueError(f"{name} must be a whole number, got {s!r}")
    if isinstance(s, int):
        v = s
    else:
        txt = str(s).strip()
        t = txt.lower()
        mult = SIZE_SUFFIX.get(t[-1:], 1) if t else 1
        num = t[:-1] if mult != 1 else t
        try:
            f = float(num)
        except ValueError:
            raise ValueError(f"{name}: {txt!r} is not a size (a whole number with an optional K or M suffix: 300, 4K, 1M)") from None
        if not math.isfinite(f) or f * mult != int(f * mult):
            raise ValueError(f"{name}: {txt!r} is not a whole number of tokens")
        v = int(f * mult)
    if minimum is not None and v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {s}")
    return v


def parse_int_list(s: Optional[str], *, minimum: Optional[int] = None, name: str = "list") -> Optional[List[int]]:
    """``"256,1K,4K"`` -> ``[256, 1024, 4096]`` (``None`` for ``None``/empty; a list passes through
    checked, e.g. a value the CLI already parsed)."""
    if s is None or s == "":
        return None
    items = list(s) if isinstance(s, (list, tuple)) else [x for x in str(s).split(",") if x.strip()]
    out = [parse_size(x, minimum=minimum, name=name) for x in items]
    if not out:
        raise ValueError(f"{name}: no value in {s!r}")
    return out


def doubling(lo: int, hi: int) -> List[int]:
    """``lo, 2lo, 4lo, ...`` up to and including ``hi`` (``hi`` appended if not a power step;
    ``[hi]`` when ``hi < lo``). Both must be >= 1."""
    lo, hi = int(lo), int(hi)
    if lo < 1 or hi < 1:
        raise ValueError(f"doubling: values must be >= 1, got {lo}, {hi}")
    out, x = [], lo
    while x < hi:
        out.append(x)
        x *= 2
    out.append(hi)
    return sorted(set(out))


def parse_sweep(s: Optional[str]) -> Optional[Tuple[str, List[Any]]]:
    """``"bias=0,1e-4,1e-3"`` -> ``("bias", [0, 0.0001, 0.001])``."""
    if not s:
        return None
    if "=" not in s:
        raise ValueError(f"--sweep must look like name=v1,v2,...; got {s!r}")
    from .engine import _num

    k, vals = s.split("=", 1)
    return k.strip().replace("-", "_"), [_num(v.strip()) for v in vals.split(",") if v.strip()]


def policy_grid(policies: Sequence[str], base: Dict[str, Any], sweep) -> List[Tuple[str, str, Dict[str, Any]]]:
    """``[(label, policy, args)]``: each policy once with ``base``; a sweep expands ``inf_mllm``
    (or, if absent from ``policies``, every non-``full`` policy; a ``budget`` sweep: every
    non-``full`` policy) over the swept values."""
    out = []
    for p in policies:
        swept = sweep and p != "full" and (sweep[0] == "budget" or p == "inf_mllm" or "inf_mllm" not in policies)
        if swept:
            key, vals = sweep
            for v in vals:
                args = dict(base)
                args[key] = v
                args["__explicit__"] = (key,)  # passed to the policy even if it is not one of its usual keys
                out.append((f"{p} {key}={v}", p, args))
        else:
            out.append((p, p, dict(base)))
    return out


def progress(total: int, desc: str, unit: str = "tok", disable: Optional[bool] = None):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, dynamic_ncols=True, leave=False,
                disable=disable, file=sys.stderr, mininterval=0.5)


def fmt_tokens(n: int) -> str:
    if n >= 1024 * 1024 and n % (1024 * 1024) == 0:
        return f"{n // (1024 * 1024)}M"
    if n >= 1024 and n % 1024 == 0:
        return f"{n // 1024}K"
    return str(n)

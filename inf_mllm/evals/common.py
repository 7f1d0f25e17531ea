"""Helpers shared by the evaluations: progress bars, checkpoints, policy grids."""
from __future__ import annotations

import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

__all__ = ["progress", "doubling", "parse_int_list", "parse_sweep", "policy_grid", "SIZE_SUFFIX", "parse_size"]

SIZE_SUFFIX = {"k": 1024, "m": 1024 * 1024}


def parse_size(s) -> int:
    """``"4K"`` -> 4096, ``"1M"`` -> 1048576, ``"300"`` -> 300."""
    if isinstance(s, int):
        return s
    s = str(s).strip().lower()
    if s and s[-1] in SIZE_SUFFIX:
        return int(float(s[:-1]) * SIZE_SUFFIX[s[-1]])
    return int(float(s))


def parse_int_list(s: Optional[str]) -> Optional[List[int]]:
    if s is None or s == "":
        return None
    return [parse_size(x) for x in str(s).split(",") if x.strip()]


def doubling(lo: int, hi: int) -> List[int]:
    """``lo, 2lo, 4lo, ...`` up to and including ``hi`` (``hi`` appended if not a power step)."""
    out, x = [], int(lo)
    while x < hi:
        out.append(x)
        x *= 2
    out.append(int(hi))
    return sorted(set(v for v in out if v <= hi))


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

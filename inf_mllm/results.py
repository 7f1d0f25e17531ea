"""Result files for benchmarks and evaluations: metadata, JSON, tables and plots.

Every result JSON written by the ``inf-mllm`` CLI has the same envelope::

    {"kind": "bench_ops" | "bench_stream" | "eval_ppl" | ...,
     "meta": {command, argv, device, device_name, versions{python, torch, triton,
              transformers, inf_mllm}, model, policy, date, host, threads, notes[]},
     "rows": [ {...}, ... ],          # one dict per table row
     ...                               # command-specific extras (curves, sweep, ...)}

Plots are written with matplotlib's Agg backend (no display needed).
"""
from __future__ import annotations

import datetime as _dt
import functools
import json
import math
import os
import platform
import re
import shlex
import sys
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

__all__ = [
    "device_slug",
    "device_name",
    "default_out_dir",
    "environment",
    "make_meta",
    "write_json",
    "read_json",
    "format_table",
    "print_table",
    "plot_lines",
]


# --------------------------------------------------------------------------------------
# Device and environment
# --------------------------------------------------------------------------------------


def device_name(device: Optional[str] = None) -> str:
    """Human-readable name of the device: the GPU's name, or ``cpu (<processor>)``."""
    import torch

    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if str(dev).startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(dev))
    proc = platform.processor() or platform.machine()
    return f"cpu ({proc})" if proc else "cpu"


def device_slug(device: Optional[str] = None) -> str:
    """``cpu``, or a filesystem-safe slug of the GPU name (``nvidia-h100-80gb-hbm3``)."""
    import torch

    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if not str(dev).startswith("cuda") or not torch.cuda.is_available():
        return "cpu"
    slug = re.sub(r"[^a-z0-9]+", "-", device_name(dev).lower()).strip("-")
    return slug or "cuda"


def default_out_dir(device: Optional[str] = None) -> str:
    """``bench/results/<device slug>/`` relative to the current directory (the committed results'
    layout; the CLI's default output is a new ``inf_mllm_results/...`` directory instead)."""
    return os.path.join("bench", "results", device_slug(device))


def _version(mod: str) -> Optional[str]:
    try:
        m = __import__(mod)
        v = getattr(m, "__version__", None)
        if v is None:
            from importlib.metadata import version

            v = version(mod)
        return str(v)
    except Exception:
        return None


@functools.lru_cache(maxsize=None)
def _git_commit() -> Optional[str]:
    """The commit of the inf_mllm checkout (with ``-dirty`` when it has local changes), if any.
    Read once per process: the CLI reads it when a command starts, so a result records the code
    it ran, not a commit made while it was running."""
    import subprocess

    here = os.path.dirname(os.path.abspath(__file__))
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10)
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except Exception:
        return None


def environment() -> Dict[str, Any]:
    import torch

    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "inf_mllm": _version("inf_mllm"),
        "inf_mllm_commit": _git_commit(),
        "cuda": torch.version.cuda,
    }
    try:
        from . import ops

        versions["native_ops"] = bool(ops.native_available())
    except Exception:
        versions["native_ops"] = None
    return {
        "versions": versions,
        "host": platform.node(),
        "platform": platform.platform(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }


def make_meta(
    command: str,
    *,
    device: Optional[str] = None,
    model: Optional[Dict[str, Any]] = None,
    policy: Optional[Dict[str, Any]] = None,
    args: Optional[Dict[str, Any]] = None,
    argv: Optional[Sequence[str]] = None,
    notes: Iterable[str] = (),
) -> Dict[str, Any]:
    """Metadata block recorded in every result file."""
    argv = list(sys.argv if argv is None else argv)
    meta: Dict[str, Any] = {
        "command": command,
        "command_line": " ".join(shlex.quote(a) for a in argv),
        "argv": argv,
        "device": device_slug(device),
        "device_name": device_name(device),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": model,
        "policy": policy,
        "args": _jsonable(args) if args is not None else None,
        "notes": list(notes),
    }
    meta.update(environment())
    return meta


# --------------------------------------------------------------------------------------
# JSON
# --------------------------------------------------------------------------------------


def _jsonable(x: Any) -> Any:
    """Make ``x`` JSON-serialisable: tensors/numpy to lists, NaN/inf to None-safe strings."""
    try:
        import numpy as np
    except Exception:  # pragma: no cover
        np = None
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float):
        if math.isnan(x) or math.isinf(x):
            return None
        return x
    if isinstance(x, (str, int, bool)) or x is None:
        return x
    if np is not None and isinstance(x, np.generic):
        return _jsonable(x.item())
    if np is not None and isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    try:
        import torch

        if isinstance(x, torch.Tensor):
            return _jsonable(x.detach().cpu().tolist())
        if isinstance(x, (torch.dtype, torch.device)):
            return str(x)
    except Exception:  # pragma: no cover
        pass
    return str(x)


def write_json(path: str, payload: Dict[str, Any]) -> str:
    """Write ``payload`` (made JSON-safe; NaN/inf become null) to ``path``; returns the path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(_jsonable(payload), f, indent=1, allow_nan=False)
        f.write("\n")
    return path


def read_json(path: str) -> Dict[str, Any]:
    with open(path) as f:
        return json.load(f)


# --------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if v == 0:
            return "0"
        a = abs(v)
        if a >= 1e5 or a < 1e-3:
            return f"{v:.3g}"
        if a >= 100:
            return f"{v:.1f}"
        return f"{v:.4g}"
    return str(v)


def format_table(rows: Sequence[Dict[str, Any]], columns: Optional[Sequence[str]] = None, title: str = "") -> str:
    """A plain-text (Markdown-compatible) table of ``rows`` over ``columns``."""
    if not rows:
        return f"{title}\n(no rows)" if title else "(no rows)"
    if columns is None:
        columns = []
        for r in rows:
            for k in r:
                if k not in columns:
                    columns.append(k)
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(str(c)), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = lambda vals: "| " + " | ".join(v.rjust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
    out = []
    if title:
        out.append(title)
    out.append(line([str(c) for c in columns]))
    out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    out.extend(line(r) for r in cells)
    return "\n".join(out)


def print_table(rows, columns=None, title: str = "", file=None) -> str:
    text = format_table(rows, columns, title)
    print("\n" + text, file=file or sys.stdout, flush=True)
    return text


# --------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------


def _tok_label(v: float) -> str:
    v = int(round(v))
    if v >= 1 << 20 and v % (1 << 20) == 0:
        return f"{v >> 20}M"
    if v >= 1 << 10 and v % (1 << 10) == 0:
        return f"{v >> 10}K"
    return str(v)


_STYLES = [("o", "-"), ("s", "--"), ("^", "-."), ("D", ":"), ("v", (0, (5, 1))), ("P", (0, (3, 1, 1, 1))),
           ("X", (0, (1, 1))), ("*", "-")]


def _same(a, b) -> bool:
    return len(a[0]) == len(b[0]) and all(
        xa == xb and math.isclose(ya, yb, rel_tol=1e-6, abs_tol=1e-9) for xa, ya, xb, yb in zip(a[0], a[1], b[0], b[1]))


def plot_lines(
    path: str,
    series: Dict[str, Sequence[Sequence[float]]],
    *,
    xlabel: str,
    ylabel: str,
    title: str = "",
    logx: bool = False,
    logy: bool = False,
    markers: bool = True,
    notes: Optional[Dict[str, str]] = None,
    from_zero: bool = False,
    xticks: Optional[Sequence[float]] = None,
    x_from: Optional[float] = None,
    hline: Optional[Tuple[float, str]] = None,
) -> str:
    """Plot ``{label: (xs, ys)}`` as lines into a PNG at ``path`` (Agg backend).

    Every line has its own marker and dash pattern, and a line whose values equal an earlier
    one's is drawn thinner on top of it and labelled "(= other)", so that no legend entry is
    invisible. ``from_zero``: linear axes that start at 0 (x and y); ``x_from``: the x axis starts
    there instead; ``hline``: ``(y, label)`` of a dotted reference line."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    drawn: List = []
    for i, (label, (xs, ys)) in enumerate(series.items()):
        pts = [(x, y) for x, y in zip(xs, ys) if y is not None and isinstance(y, (int, float)) and math.isfinite(y)]
        if not pts:
            continue
        px, py = zip(*pts)
        lab = label + (f" ({notes[label]})" if notes and label in notes else "")
        twin = next((other for other, xy in drawn if _same(xy, (px, py))), None)
        if twin is not None:
            lab += f" (= {twin})"
        marker, dash = _STYLES[i % len(_STYLES)]
        n_twins = sum(1 for _, xy in drawn if _same(xy, (px, py)))
        ax.plot(px, py, marker=marker if markers and len(px) < 40 else None, linestyle=dash,
                markersize=max(3.0, 7.0 - 1.6 * n_twins), linewidth=max(0.8, 1.8 - 0.4 * n_twins),
                markerfacecolor="none" if n_twins else None, label=lab, zorder=2 + i)
        drawn.append((label, (px, py)))
    if logx:
        from matplotlib.ticker import FuncFormatter

        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: _tok_label(v)))
    if logy:
        ax.set_yscale("log")
    if hline is not None:
        ax.axhline(hline[0], color="0.35", linestyle=":", linewidth=1.2, label=hline[1], zorder=1)
    if from_zero:
        if not logx:
            ax.set_xlim(left=0)
        if not logy:
            top = max([1e-9] + [max(xy[1]) for _, xy in drawn] + ([hline[0]] if hline is not None else []))
            ax.set_ylim(bottom=0, top=top * 1.08)
    if x_from is not None:
        ax.set_xlim(left=x_from)
    if xticks is not None and not logx:
        from matplotlib.ticker import FuncFormatter

        ax.set_xticks(list(xticks))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: _tok_label(v)))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    if drawn or hline is not None:
        ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path

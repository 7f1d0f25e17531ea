"""inf-mllm command line: benchmarks and evaluations.

    inf-mllm bench ops        operator timings (attention_with_scores, compact_) vs baselines
    inf-mllm bench stream     decode latency and cache memory vs tokens streamed, per policy
    inf-mllm bench video      frames/s and memory vs video frames streamed into a VLM
    inf-mllm eval ppl         streaming perplexity on long real text (Austen, KJV, --text)
    inf-mllm eval retrieval   LongEval-style line retrieval, accuracy vs distance
    inf-mllm eval rounds      multi-round streaming QA, accuracy per round bucket
    inf-mllm eval needle      needle in a haystack of prose: accuracy per length x depth, heatmaps
    inf-mllm report           collect the result JSONs into docs/results_tables.md

Every command checks all its arguments before it loads a model, prints a table and writes
<stem>.json (+ PNG plots) under --out (default: a new directory
inf_mllm_results/<command>-<date>-<time>/ under the current directory; give
--out bench/results/cpu to update the committed results). A mistake in the arguments prints one
line "inf-mllm: error: ..." and exits with status 2 (--debug shows the traceback).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import math
import os
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence

__all__ = ["main", "build_parser", "UsageError"]

DEFAULT_POLICIES = "full,h2o,streaming_llm,inf_mllm"
STREAM_POLICIES = "transformers,full,streaming_llm,inf_mllm"


class UsageError(Exception):
    """A mistake of the user (an argument, a file): reported as one line, exit status 2."""


# --------------------------------------------------------------------------------------
# Argument types: each checks one value at parse time (reusable by any command)
# --------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        self.exit(2, f"inf-mllm: error: {message} (see: {self.prog} --help)\n")


def int_arg(minimum: Optional[int] = None, maximum: Optional[int] = None) -> Callable[[str], int]:
    def conv(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{s!r} is not a whole number") from None
        if minimum is not None and v < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {v}")
        if maximum is not None and v > maximum:
            raise argparse.ArgumentTypeError(f"must be <= {maximum}, got {v}")
        return v

    conv.__name__ = "int"
    return conv


def float_arg(minimum: Optional[float] = None) -> Callable[[str], float]:
    def conv(s: str) -> float:
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{s!r} is not a number") from None
        if not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {s}")
        if minimum is not None and v < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {s}")
        return v

    conv.__name__ = "float"
    return conv


def size_arg(minimum: int = 1) -> Callable[[str], int]:
    """A token count with an optional K/M suffix (``300``, ``4K``, ``1M``), at least ``minimum``."""
    from .evals.common import parse_size

    def conv(s: str) -> int:
        try:
            return parse_size(s, minimum=minimum, name="value")
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e).replace("value: ", "").replace("value ", "")) from None

    conv.__name__ = "size"
    return conv


def size_list_arg(minimum: int = 1) -> Callable[[str], List[int]]:
    """Comma-separated sizes (``256,1K,4K``), each at least ``minimum``; sorted, no duplicates."""
    one = size_arg(minimum)

    def conv(s: str) -> List[int]:
        vals = [one(x) for x in str(s).split(",") if x.strip()]
        if not vals:
            raise argparse.ArgumentTypeError(f"no value in {s!r}")
        return sorted(set(vals))

    conv.__name__ = "size list"
    return conv


def heads_arg(s: str):
    """``"32,8"`` -> ``(32, 8)``: query heads, KV heads; a valid GQA shape (Hq a multiple of Hkv)."""
    parts = [x.strip() for x in str(s).split(",")]
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"give query heads and KV heads as two whole numbers, e.g. 32,8 (got {s!r})")
    hq, hkv = int(parts[0]), int(parts[1])
    if hq < 1 or hkv < 1:
        raise argparse.ArgumentTypeError(f"head counts must be >= 1, got {s}")
    if hq % hkv:
        raise argparse.ArgumentTypeError(f"{hq} query heads over {hkv} KV heads is not a GQA shape (query heads must be a multiple of KV heads)")
    return hq, hkv


def text_file_arg(path: str) -> str:
    """An existing, readable, non-empty UTF-8 text file."""
    if not os.path.exists(path):
        raise argparse.ArgumentTypeError(f"{path}: no such file")
    if os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"{path} is a directory, not a text file")
    if not os.access(path, os.R_OK):
        raise argparse.ArgumentTypeError(f"{path} is not readable")
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    if not head.strip():
        raise argparse.ArgumentTypeError(f"{path} is empty")
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 4:  # not just a multi-byte character cut at the end of the sample
            raise argparse.ArgumentTypeError(f"{path} is not UTF-8 text (byte {e.start})") from None
    if b"\x00" in head:
        raise argparse.ArgumentTypeError(f"{path} is a binary file, not text")
    return path


def existing_file_arg(path: str) -> str:
    if not os.path.isfile(path):
        raise argparse.ArgumentTypeError(f"{path}: no such file")
    if not os.access(path, os.R_OK):
        raise argparse.ArgumentTypeError(f"{path} is not readable")
    return path


def out_dir_arg(path: str) -> str:
    """A directory that exists and is writable, or can be created."""
    if not path.strip():
        raise argparse.ArgumentTypeError("empty path")
    p = os.path.abspath(path)
    if os.path.exists(p) and not os.path.isdir(p):
        raise argparse.ArgumentTypeError(f"{path} exists and is not a directory")
    q = p
    while not os.path.exists(q):
        q = os.path.dirname(q)
    if not os.path.isdir(q):
        raise argparse.ArgumentTypeError(f"cannot create {path}: {q} is not a directory")
    if not os.access(q, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot write to {path}: {q} is not writable")
    return path


def tag_arg(s: str) -> str:
    if os.sep in s or (os.altsep and os.altsep in s) or s in (".", ".."):
        raise argparse.ArgumentTypeError(f"a tag is part of a file name: no path separators ({s!r})")
    return s


def device_arg(s: str) -> str:
    import re

    if not re.fullmatch(r"cpu|cuda(:\d+)?", s):
        raise argparse.ArgumentTypeError(f"{s!r}: use cpu, cuda or cuda:N")
    return s


# --------------------------------------------------------------------------------------
# Shared options
# --------------------------------------------------------------------------------------


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=out_dir_arg, default=None,
                   help="output directory (default: a new inf_mllm_results/<command>-<date>-<time>/)")
    p.add_argument("--tag", type=tag_arg, default="", help="suffix for the output file names (e.g. a sweep name)")
    p.add_argument("--device", type=device_arg, default=None, help="cpu or cuda[:i] (default: cuda when available)")
    p.add_argument("--threads", type=int_arg(1), default=None, help="torch CPU threads (default 1 on the CPU, see bench/README.md)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the traceback of an error")


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2",
                   help="smollm2 (default; packaged GGUF), qwen2.5-coder-0.5b, qwen2.5-coder-1.5b, tiny-random (a 2-layer random "
                   "Llama with a byte tokenizer: smoke tests, no answers), a .gguf file or a local checkpoint dir")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="model dtype (default float32)")


def _default_chunk() -> int:
    import inspect

    from .policies import Policy

    return inspect.signature(Policy.__init__).parameters["chunk"].default


def _add_policy(p: argparse.ArgumentParser, policies: str = DEFAULT_POLICIES) -> None:
    p.add_argument("--policies", default=policies, help=f"comma-separated policies (default {policies})")
    p.add_argument("--budget", type=int_arg(1), default=None, help="cache budget L in slots (default: the policy's, 2048)")
    p.add_argument("--n-recent", type=int_arg(0), default=None, help="recent tokens kept by inf_mllm (default: the policy's)")
    p.add_argument("--window", type=int_arg(0), default=None, help="retrieval window w of inf_mllm (default: the policy's)")
    p.add_argument("--bias", type=float_arg(0.0), default=None, help="attention bias beta of inf_mllm (default: the policy's)")
    p.add_argument("--n-sink", type=int_arg(0), default=None, help="attention sinks of inf_mllm and streaming_llm (default: the policy's)")
    p.add_argument("--policy-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="extra keyword for inf_mllm.enable, given to every policy but full (repeatable)")
    p.add_argument("--chunk", type=int_arg(1), default=None,
                   help=f"prefill chunk in tokens (default: the policy's, {_default_chunk()})")
    p.add_argument("--full-past-context", action="store_true",
                   help="keep running full past the model's trained context (default: stop there)")


def _add_text(p: argparse.ArgumentParser, corpora: Sequence[str] = ("austen", "kjv"), default: str = "austen") -> None:
    p.add_argument("--corpus", default=default, choices=list(corpora),
                   help="austen: Debian r-cran-janeaustenr; kjv: Debian bible-kjv" +
                   ("; random: random token ids" if "random" in corpora else "") + f" (default {default})")
    p.add_argument("--text", type=text_file_arg, default=None, metavar="FILE", help="any UTF-8 text file instead of --corpus")


def _add_sweep(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sweep", default=None, metavar="KEY=V1,V2,...",
                   help="sweep one policy argument over values for inf_mllm, e.g. bias=0,1e-4,1e-3,1e-2")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="inf-mllm", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--debug", action="store_true", default=False, help="show the traceback of an error")
    sub = ap.add_subparsers(dest="group", required=True)

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="cmd", required=True)
    p = bench.add_parser("ops", help="operator timings vs SDPA / eager / reference")
    _add_common(p)
    p.add_argument("--sizes", type=size_list_arg(1), default=None,
                   help="cache sizes C in slots, e.g. 256,1K,4K (default: 256..64K doubling on GPU, 256..8K on CPU)")
    p.add_argument("--dtype", default=None, choices=["float16", "bfloat16", "float32"],
                   help="default bfloat16 on GPU, float32 on CPU")
    p.add_argument("--batch", type=int_arg(1), default=None, help="batch rows B (default 8 on GPU, 1 on CPU)")
    p.add_argument("--heads", type=heads_arg, default=(32, 8), help="query heads,KV heads (default 32,8)")
    p.add_argument("--head-dim", type=int_arg(2), default=128, help="head dimension, even (default 128)")
    p.add_argument("--prefill-chunk", type=int_arg(1), default=256, help="tokens of the timed prefill chunk (default 256)")
    p.add_argument("--window", type=int_arg(0), default=32, help="scoring window (default 32)")
    p.add_argument("--only", choices=["attention", "compact"], default=None)
    p.set_defaults(func=cmd_bench_ops, check=_check_bench_ops, needs=("matplotlib",))

    p = bench.add_parser("stream", help="decode latency and cache memory vs tokens streamed (the main job)")
    _add_common(p)
    _add_model(p)
    _add_policy(p, STREAM_POLICIES)
    _add_text(p, ("austen", "kjv", "random"))
    p.add_argument("--max-tokens", type=size_arg(2), default=None, help="longest stream (default 4K on CPU, 1M on GPU)")
    p.add_argument("--min-tokens", type=size_arg(2), default=None, help="first checkpoint (default 1K); checkpoints double")
    p.add_argument("--checkpoints", type=size_list_arg(2), default=None,
                   help="stream lengths to measure at, e.g. 1K,2K,3K,4K (default on CPU without --max-tokens/--min-tokens: "
                   "1K,2K,3K,4K; otherwise doubling from --min-tokens to --max-tokens)")
    p.add_argument("--decode-steps", type=int_arg(1), default=8,
                   help="decode steps timed at each checkpoint (best and median reported; default 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of --corpus random")
    p.set_defaults(func=cmd_bench_stream, check=_check_bench_stream, extra_policies=("transformers",),
                   needs=("transformers", "matplotlib", "psutil"))

    p = bench.add_parser("video", help="frames/s and memory vs video frames streamed into a VLM")
    _add_common(p)
    p.add_argument("--model", default="tiny-random", help="tiny-random (random LLaVA), tiny-qwen2-vl, tiny-qwen2.5-vl, "
                   "tiny-qwen3-vl (random Qwen-VL, M-RoPE): speed/memory only; or a local VLM checkpoint dir")
    _add_policy(p)
    p.set_defaults(chunk=64)
    p.add_argument("--frames", type=int_arg(1), default=None, help="last checkpoint in frames (default 256 on CPU, 4096 on GPU)")
    p.add_argument("--min-frames", type=int_arg(1), default=8, help="first checkpoint (default 8); checkpoints double")
    p.add_argument("--frames-per-chunk", type=int_arg(1), default=None,
                   help="frames encoded together (default 1; Qwen-VL: 2, one temporal patch)")
    p.add_argument("--checkpoint-every", type=int_arg(1), default=None,
                   help="checkpoints every N frames (default: doubling from --min-frames)")
    p.add_argument("--every", type=int_arg(1), default=1, help="use every n-th frame of the video")
    p.add_argument("--video", type=existing_file_arg, default=None, help="video file (default: the sample clip of Debian's opencv-doc)")
    p.add_argument("--frame-size", type=int_arg(1), default=None)
    p.set_defaults(func=cmd_bench_video, check=_check_bench_video, model_kind="vlm", needs=("transformers", "matplotlib", "cv2"))

    ev = sub.add_parser("eval", help="evaluations").add_subparsers(dest="cmd", required=True)
    p = ev.add_parser("ppl", help="streaming perplexity on long text")
    _add_common(p)
    _add_model(p)
    _add_policy(p)
    _add_text(p)
    p.add_argument("--max-tokens", type=size_arg(2), default="64K", help="tokens of text to stream (default 64K)")
    p.add_argument("--checkpoints", type=size_list_arg(2), default=None,
                   help="token counts for the table (default 4K,16K,64K,... and the end)")
    _add_sweep(p)
    p.add_argument("--block", type=int_arg(1), default=1024, help="block size for block perplexity (default 1024)")
    p.set_defaults(func=cmd_eval_ppl, check=_check_eval_ppl, needs=("transformers", "matplotlib"))

    p = ev.add_parser("retrieval", help="LongEval-style line retrieval, accuracy vs distance")
    _add_common(p)
    _add_model(p)
    _add_policy(p)
    p.add_argument("--distances", type=size_list_arg(1), default="256,1K,2K,4K",
                   help="token distances of the asked line from the question (default 256,1K,2K,4K)")
    p.add_argument("--context", type=size_arg(1), default="4K", help="record length in tokens (at least distance + 64)")
    p.add_argument("--trials", type=int_arg(1), default=5, help="questions per distance (default 5)")
    p.add_argument("--seed", type=int, default=0)
    _add_sweep(p)
    p.set_defaults(func=cmd_eval_retrieval, needs=("transformers", "matplotlib"))

    p = ev.add_parser("rounds", help="multi-round streaming QA")
    _add_common(p)
    _add_model(p)
    _add_policy(p)
    _add_text(p)
    p.add_argument("--rounds", type=int_arg(1), default=40, help="rounds (default 40)")
    p.add_argument("--passage-tokens", type=int_arg(8), default=400, help="approximate tokens of text per round (default 400)")
    p.add_argument("--bucket", type=int_arg(1), default=10, help="rounds per accuracy bucket (default 10)")
    p.add_argument("--seed", type=int, default=0)
    _add_sweep(p)
    p.set_defaults(func=cmd_eval_rounds, needs=("transformers", "matplotlib"))

    p = ev.add_parser("needle", help="needle in a haystack of real prose: length x depth heatmaps per policy and budget")
    _add_common(p)
    _add_model(p)
    _add_policy(p, policies="full,streaming_llm,h2o,snapkv,look_m,inf_mllm")
    _add_text(p)
    # window, bias, n_sink: each policy's own defaults unless given; n_recent 32 as in issue 10
    p.set_defaults(chunk=64, n_recent=32, window=None, bias=None, n_sink=None, budget=None)
    p.add_argument("--budgets", default=None, help="budgets swept by every fixed-size policy (default 256,512,1024; full runs once)")
    p.add_argument("--lengths", default="1K,2K,4K,8K", help="context lengths in tokens, answer included (default 1K,2K,4K,8K)")
    p.add_argument("--depths", default="11", help="number of depths from 0%% to 100%% (default 11), or percents like 0,50,100")
    p.add_argument("--needles-per-cell", type=int, default=3, help="seeded cases per length x depth cell and kind (default 3)")
    p.add_argument("--kind", default="both", choices=["passkey", "fact", "both"], help="needle kind (default both)")
    p.add_argument("--needles", type=int, default=1, help="needles per case, each asked separately (default 1)")
    p.add_argument("--seeds", default="report", help="tune, report (default) or a list: two disjoint fixed seed sets")
    p.add_argument("--max-new-tokens", type=int, default=16,
                   help="greedy tokens at most per answer (default 16: room to restate the question; decoding stops once the answer is decided)")
    p.add_argument("--doc-start", default="auto",
                   help="tokens each stream starts with: auto (the tokenizer's own, e.g. a BOS), none, or a text such as '<|endoftext|>'")
    p.add_argument("--sweep", default=None, metavar="KEY=V1,V2,...")
    p.add_argument("--no-share", action="store_true", help="stream every case from scratch (no shared prose prefix)")
    p.add_argument("--estimate-only", action="store_true", help="print the plan and a time estimate (short calibration), then stop")
    p.add_argument("--preset", default=None, choices=["passkey-prose"],
                   help="passkey-prose: issue 10's pass key in ~600 tokens of prose, budgets 256,128 (given options win)")
    p.set_defaults(func=cmd_eval_needle, needs=("transformers", "matplotlib"))

    p = sub.add_parser("report", help="collect result JSONs into a Markdown page (docs/results_tables.md)")
    p.add_argument("--results", default=os.path.join("bench", "results"), help="results root (default bench/results)")
    p.add_argument("--out", default=os.path.join("docs", "results_tables.md"), help="Markdown file to write (default docs/results_tables.md; docs/results.md is the hand-written summary)")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the traceback of an error")
    p.set_defaults(func=cmd_report, check=_check_report)
    return ap


# --------------------------------------------------------------------------------------
# Checks that need more than one value (run before anything is loaded)
# --------------------------------------------------------------------------------------


def _policies(args) -> List[str]:
    return [p.strip() for p in str(args.policies).split(",") if p.strip()]


def _policy_args(args) -> Dict[str, Any]:
    """The CLI's policy options (``None`` = the policy's default) and ``--policy-arg`` extras."""
    from .evals.engine import parse_policy_args

    d = {"budget": args.budget, "n_recent": args.n_recent, "window": args.window, "bias": args.bias, "n_sink": args.n_sink}
    try:
        d.update(parse_policy_args(args.policy_arg))
    except ValueError as e:
        raise UsageError(f"--policy-arg: {e}") from None
    return d


def check_policies(args) -> None:
    """Policy names, their arguments and any ``--sweep``: each (policy, arguments) the command will
    run is built once with :func:`inf_mllm.policies.make_policy`, so a bad value is reported now,
    not after the first policies have run."""
    from .evals.common import parse_sweep, policy_grid
    from .evals.engine import policy_kwargs
    from .policies import available_policies, make_policy

    names = _policies(args)
    extra = tuple(getattr(args, "extra_policies", ()))
    known = list(available_policies()) + list(extra)
    if not names:
        raise UsageError(f"--policies is empty; give one or more of {','.join(known)}")
    unknown = [n for n in names if n not in known]
    if unknown:
        import difflib

        hint = difflib.get_close_matches(unknown[0], known, n=1)
        raise UsageError(f"unknown policy {unknown[0]!r} in --policies" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                         + f"; available: {','.join(known)}")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UsageError(f"--policies names {dup[0]!r} twice")
    base = _policy_args(args)
    try:
        sweep = parse_sweep(getattr(args, "sweep", None))
    except ValueError as e:
        raise UsageError(str(e)) from None
    if sweep is not None and not sweep[1]:
        raise UsageError(f"--sweep {args.sweep!r} gives no value")
    chunk = {} if args.chunk is None else {"chunk": args.chunk}
    for label, pol, pargs in policy_grid([n for n in names if n not in extra], base, sweep):
        try:
            make_policy(pol, **chunk, **policy_kwargs(pol, pargs))
        except (ValueError, TypeError) as e:
            msg = str(e).replace("inf_mllm: ", "")
            raise UsageError(f"policy {label}: {msg}") from None


def check_model(args) -> None:
    from .models import check_model as _check

    try:
        _check(args.model)
    except (ValueError, OSError) as e:
        raise UsageError(f"--model: {str(e).replace('inf_mllm: ', '')}") from None


def _check_bench_ops(args) -> None:
    if args.head_dim % 2:
        raise UsageError(f"--head-dim must be even (RoPE rotates pairs of dimensions), got {args.head_dim}")
    if args.sizes and args.prefill_chunk > min(args.sizes):
        raise UsageError(f"--prefill-chunk {args.prefill_chunk} is larger than the smallest cache size {min(args.sizes)}")


def stream_checkpoints(args, cuda: bool) -> List[int]:
    """The checkpoints of ``bench stream``: ``--checkpoints``; else doubling from ``--min-tokens``
    (1K) to ``--max-tokens`` (1M on GPU); on the CPU with neither given, 1K,2K,3K,4K (evenly
    spaced on the plots' linear axis, ~2-3 minutes with the default policies)."""
    from .evals.common import doubling, fmt_tokens

    if args.checkpoints:
        return list(args.checkpoints)
    if not cuda and args.max_tokens is None and args.min_tokens is None:
        return [1024, 2048, 3072, 4096]
    hi = args.max_tokens or (1 << 20 if cuda else 4096)
    lo = args.min_tokens or min(1024, hi)
    if lo > hi:
        raise UsageError(f"--min-tokens {fmt_tokens(lo)} is larger than --max-tokens {fmt_tokens(hi)}")
    return doubling(lo, hi)


def _check_bench_stream(args) -> None:
    if args.checkpoints and (args.min_tokens is not None or args.max_tokens is not None):
        raise UsageError("give --checkpoints or --min-tokens/--max-tokens, not both")
    first = min(stream_checkpoints(args, cuda=False))
    if first <= args.decode_steps:
        raise UsageError(f"--decode-steps ({args.decode_steps}) must be smaller than the first checkpoint ({first} tokens)")


def _check_bench_video(args) -> None:
    if args.frames is not None and args.min_frames > args.frames:
        raise UsageError(f"--min-frames {args.min_frames} is larger than --frames {args.frames}")
    from .evals.video_bench import TINY_QWEN

    if args.model not in ("tiny-random", *TINY_QWEN) and not os.path.isdir(args.model):
        raise UsageError(f"--model: {args.model}: give tiny-random, {', '.join(TINY_QWEN)} or a local VLM checkpoint "
                         "directory")
    if args.frames_per_chunk is not None and args.model in TINY_QWEN and args.frames_per_chunk % 2:
        raise UsageError(f"--frames-per-chunk {args.frames_per_chunk}: Qwen-VL encodes frames in pairs; give an even number")


def _check_eval_ppl(args) -> None:
    if args.checkpoints:
        over = [c for c in args.checkpoints if c > args.max_tokens]
        if over:
            raise UsageError(f"--checkpoints {over[0]} is beyond --max-tokens {args.max_tokens}")


def _check_report(args) -> None:
    if not os.path.isdir(args.results):
        raise UsageError(f"--results {args.results}: no such directory")
    out_dir_arg(os.path.dirname(os.path.abspath(args.out)))


#: optional dependencies: import name -> (pip package, the extra of pyproject.toml, what for)
OPTIONAL_DEPS = {
    "transformers": ("transformers", "hf", "the models"),
    "gguf": ("gguf", "hf", "reading GGUF models"),
    "matplotlib": ("matplotlib", "eval", "the plots"),
    "psutil": ("psutil", "eval", "the process memory"),
    "cv2": ("opencv-python-headless", "video", "reading video frames"),
}


def _has_module(name: str) -> bool:
    import importlib.util

    if name in sys.modules:
        return sys.modules[name] is not None
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def check_dependencies(args) -> None:
    """The optional packages the command needs (``needs`` of its parser, and ``gguf`` for a GGUF
    model) are importable; else one line naming what to install. Runs before any slow work."""
    needs = list(getattr(args, "needs", ()))
    model = getattr(args, "model", None)
    if model is not None and getattr(args, "model_kind", "lm") == "lm" and model != "tiny-random" and not os.path.isdir(model):
        needs.append("gguf")
    missing = [m for m in dict.fromkeys(needs) if not _has_module(m)]
    if missing:
        pkgs = " ".join(OPTIONAL_DEPS[m][0] for m in missing)
        extras = ",".join(dict.fromkeys(OPTIONAL_DEPS[m][1] for m in missing))
        what = ", ".join(f"{OPTIONAL_DEPS[m][0]} ({OPTIONAL_DEPS[m][2]})" for m in missing)
        raise UsageError(f"{args.group} {args.cmd} needs {what}, not installed: pip install {pkgs}  "
                         f"(or pip install -e '.[{extras}]')")


def validate(args) -> None:
    """Every check of ``args`` that the command's parser could not make alone; raises
    :class:`UsageError`. Runs before any model or corpus is loaded."""
    check_dependencies(args)
    try:
        if hasattr(args, "policies"):
            check_policies(args)
        if hasattr(args, "model") and getattr(args, "model_kind", "lm") == "lm":
            check_model(args)
        check = getattr(args, "check", None)
        if check is not None:
            check(args)
    except argparse.ArgumentTypeError as e:
        raise UsageError(str(e)) from None


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


def _setup(args) -> str:
    import torch

    from .results import _git_commit

    _git_commit()  # the commit the run starts from (results.py reads it once)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda but no CUDA device is available")
    # CPU: 1 thread unless asked (measured in bench/README.md: on a 2-core machine shared with another
    # job, OpenMP threads spinning against it made runs slower and erratic with 2 threads)
    threads = args.threads or (1 if dev == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    if args.no_progress:
        os.environ["TQDM_DISABLE"] = "1"
    from .evals.common import start_partial

    # each finished case is appended here as the run goes; removed once the JSON is written
    start_partial(_out_path(args, f"{args.group}_{args.cmd}", "partial.jsonl"))
    return dev


def default_out_dir(args) -> str:
    """``inf_mllm_results/<group>-<cmd>-<YYYYmmdd-HHMMSS>/`` under the current directory (new; a
    suffix ``-2``, ``-3``, ... when it exists)."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = os.path.join("inf_mllm_results", f"{args.group}-{args.cmd}-{stamp}")
    out, i = base, 2
    while os.path.exists(out):
        out, i = f"{base}-{i}", i + 1
    return out


def _out_path(args, *parts: str) -> str:
    """``<out>/<stem>[_<tag>].<ext>`` for ``_out_path(args, stem, ext)`` (the older form
    ``_out_path(args, device, stem, ext)`` is accepted too)."""
    stem, ext = parts[-2:]
    if not getattr(args, "_out", None):
        args._out = args.out or default_out_dir(args)
    os.makedirs(args._out, exist_ok=True)
    tag = f"_{args.tag}" if args.tag else ""
    return os.path.join(args._out, f"{stem}{tag}.{ext}")


def _load(args, device):
    from .evals.engine import load_bundle

    print(f"inf-mllm: loading model {args.model} on {device} ...", file=sys.stderr, flush=True)
    return load_bundle(args.model, device=device, dtype=args.dtype)


def _finish(args, device, kind, payload, *, model=None, policy=None, notes=(), columns=None, title="", plots=None):
    """Print the table, write ``<kind>.json``, then draw the plots (``plots()`` returns their paths;
    they are listed in the JSON, written again): the JSON is on disk before any plotting starts."""
    from .evals.common import end_partial
    from .results import make_meta, print_table, write_json

    import time

    meta = make_meta(f"{args.group} {args.cmd}", device=device, model=model, policy=policy, argv=args._argv,
                     args={k: v for k, v in vars(args).items() if k not in ("func", "check", "needs", "_argv", "_out", "_t0")},
                     notes=list(notes) + list(payload.get("notes", [])))
    meta["seconds"] = round(time.perf_counter() - args._t0, 1) if getattr(args, "_t0", None) else None
    payload = dict(payload, kind=kind, meta=meta)
    table = print_table(payload["rows"], columns=columns, title=title)
    payload["table"] = table
    for n in meta["notes"]:
        print(f"note: {n}")
    path = write_json(_out_path(args, kind, "json"), payload)
    end_partial(remove=True)  # everything is in the JSON now
    print(f"wrote {path}")
    if plots is not None:
        pngs = [p for p in (plots() or []) if p]
        if pngs:
            payload["plots"] = [os.path.basename(p) for p in pngs]
            write_json(path, payload)
            print(f"wrote {len(pngs)} plot(s): {', '.join(payload['plots'])}")
    if payload.get("summary"):
        print(payload["summary"])
    if meta["seconds"] is not None:
        print(f"took {meta['seconds']:.0f} s")
    return path


def _cols(rows, first: Sequence[str], skip: Sequence[str] = ("args",)) -> List[str]:
    cols = list(first)
    for r in rows:
        for k in r:
            if k not in cols and k not in skip:
                cols.append(k)
    return cols


def _load_text(args, corpus: Optional[str] = None) -> str:
    from .data import CorpusUnavailable, load_corpus

    try:
        text = load_corpus(corpus or args.corpus, text_file=args.text)
    except CorpusUnavailable as e:
        raise UsageError(f"corpus unavailable: {e}") from None
    if not text.strip():
        raise UsageError(f"{args.text or args.corpus}: no text")
    return text


# --------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------


def cmd_bench_ops(args) -> int:
    import torch

    from .evals.common import doubling
    from .evals.ops_bench import run_ops_bench
    from .results import plot_lines

    dev = _setup(args)
    cuda = dev.startswith("cuda")
    notes = []
    sizes = args.sizes
    if sizes is None:
        sizes = doubling(256, 65536 if cuda else 8192)
        if not cuda:
            notes.append("CPU run: default cache sizes stop at 8K slots (64K on GPU)")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if cuda else torch.float32)
    Hq, Hkv = args.heads
    which = [args.only] if args.only else ["attention", "compact"]
    batch = args.batch or (8 if cuda else 1)
    res = run_ops_bench(sizes=sizes, device=dev, dtype=dtype, B=batch, Hq=Hq, Hkv=Hkv, D=args.head_dim,
                        prefill_chunk=args.prefill_chunk, window=args.window, which=which)
    bw = res["copy_bandwidth"]
    notes.append(f"measured device copy bandwidth: {bw['GBps']:.1f} GB/s (read+write, {bw['bytes'] >> 20} MiB copy)")
    notes += [f"{k}: {v}" for k, v in res["sources"].items()]
    # plot: time vs C per (op, mode, impl)
    series = {}
    for r in res["rows"]:
        if r.get("GBps") is None:
            continue
        key = f"{r['op']} {r.get('mode', '')} {r.get('impl', '')}".strip()
        xs, ys = series.setdefault(key, ([], []))
        xs.append(r["C"])
        ys.append(r["median_ms"])

    def plots():
        if series:
            return [plot_lines(_out_path(args, "bench_ops", "png"), series, xlabel="cache size C (slots)",
                               ylabel="median time (ms)", title=f"operators, {res['shape']}", logx=True, logy=True)]

    cols = ["op", "mode", "C", "impl", "median_ms", "GBps"] + (["frac_copy_bw"] if cuda else [])
    if any(r.get("error") for r in res["rows"]):
        cols.append("error")
    _finish(args, dev, "bench_ops", res, notes=notes, columns=cols,
            title=f"bench ops on {dev} ({res['shape']['dtype']})", plots=plots)
    return 0


def cmd_bench_stream(args) -> int:
    from .evals.common import fmt_tokens
    from .evals.stream_bench import GROWING, run_stream_bench, summary_line
    from .results import plot_lines

    dev = _setup(args)
    cuda = dev.startswith("cuda")
    notes = []
    checkpoints = stream_checkpoints(args, cuda)
    max_tokens = checkpoints[-1]
    if not cuda and args.max_tokens is None and args.min_tokens is None and not args.checkpoints:
        notes.append("CPU run: default checkpoints 1K,2K,3K,4K (GPU: 1K to 1M, doubling)")
    if checkpoints[0] <= args.decode_steps:
        raise UsageError(f"--decode-steps ({args.decode_steps}) must be smaller than the first checkpoint ({checkpoints[0]})")
    text = None if (args.corpus == "random" and not args.text) else _load_text(args)
    bundle = _load(args, dev)
    text_ids, text_name = None, None
    if text is not None:
        from .evals.ppl import tokenize_text

        text_ids = tokenize_text(bundle.tokenizer, text, max_tokens)
        text_name = os.path.basename(args.text) if args.text else args.corpus
    pol_args = _policy_args(args)
    policies = _policies(args)
    res = run_stream_bench(bundle, policies=policies, policy_args=pol_args, checkpoints=checkpoints,
                           chunk=args.chunk, decode_steps=args.decode_steps, seed=args.seed, text_ids=text_ids,
                           text_name=text_name or "text", full_past_context=args.full_past_context)
    from .api import DEFAULT_CHUNK

    notes.append(f"stream source: {res['source']}; prefill chunk {args.chunk or DEFAULT_CHUNK}; policies run interleaved; "
                 f"{args.decode_steps} decode steps timed per checkpoint (the last {args.decode_steps} tokens of each "
                 "checkpoint); latency_min_ms is the best of them (the least disturbed by other jobs), latency_ms "
                 "the median; relative = latency_min_ms / the best time of a 1-token forward without cache timed in "
                 "the same rounds (what the context costs, with the machine's changing load divided out; plotted)")
    if "transformers" in policies:
        notes.append("transformers: the plain model, transformers' default attention (SDPA) and DynamicCache")
    if not cuda:
        notes.append("CPU: memory is the cache's tensor bytes (cache_MiB); rss_MiB is the process RSS with all caches alive")
    for r in res["rows"]:
        if r.get("status", "ok") != "ok":
            notes.append(f"{r['policy']}: stopped at {fmt_tokens(r['tokens'])} tokens: {r['status']}")
    ser = res["series"]
    budget = (res["rows"][0].get("args") or {}).get("budget") if res["rows"] else None
    budget = next((r["args"].get("budget") for r in res["rows"] if r.get("args") and r["policy"] not in GROWING), budget)
    what = f"budget {budget} slots" if budget else ""
    mem_notes = {}
    full_args = next((r.get("args") for r in res["rows"] if r["policy"] == "full" and r.get("args")), None)
    if full_args and full_args.get("budget"):
        ahead = full_args["budget"] + max(full_args.get("window") or 0, full_args.get("chunk") or DEFAULT_CHUNK, 1)
        mem_notes["full"] = f"buffers allocated ahead: {ahead} slots, doubled when full"
        notes.append(f"full: our cache without eviction allocates its buffers ahead ({full_args['budget']} budget + one "
                     f"chunk = {ahead} slots at the first token) and doubles them when full, so its cache_MiB is above "
                     "transformers' DynamicCache, which holds exactly the tokens seen")
    first = checkpoints[0] - 0.04 * (checkpoints[-1] - checkpoints[0]) if len(checkpoints) > 1 else None

    def plots():
        out = []
        rel = {p: (s["tokens"], s["relative"]) for p, s in ser.items()}
        out.append(plot_lines(_out_path(args, "bench_stream_latency", "png"), rel, xlabel="tokens in the stream",
                              ylabel="decode time per token / time of a step without context",
                              title=f"{bundle.name}: decode cost vs context ({what}, {res['source']})",
                              from_zero=True, xticks=checkpoints, x_from=first, hline=(1.0, "1.0 = a step without context")))
        lat = {p: (s["tokens"], s["latency_min_ms"]) for p, s in ser.items()}
        lat["reference (no context)"] = (res["reference"]["tokens"], res["reference"]["latency_min_ms"])
        out.append(plot_lines(_out_path(args, "bench_stream_latency_ms", "png"), lat, xlabel="tokens in the stream",
                              ylabel=f"decode latency (ms/token, best of {args.decode_steps})",
                              title=f"{bundle.name}: decode latency in ms ({what}); the reference shows the machine's load",
                              from_zero=True, xticks=checkpoints, x_from=first))
        memkey = "peak_MiB" if cuda else "cache_MiB"
        mem = {p: (s["tokens"], s[memkey]) for p, s in ser.items()}
        out.append(plot_lines(_out_path(args, "bench_stream_memory", "png"), mem, xlabel="tokens in the stream",
                              ylabel="peak CUDA memory (MiB)" if cuda else "KV cache (MiB, allocated buffers)",
                              title=f"{bundle.name}: memory ({what})", from_zero=True, xticks=checkpoints, notes=mem_notes))
        if not cuda:
            rss = {"process": (ser[policies[0]]["tokens"], ser[policies[0]]["rss_MiB"])} if ser.get(policies[0]) else {}
            out.append(plot_lines(_out_path(args, "bench_stream_rss", "png"), rss, xlabel="tokens in the stream",
                                  ylabel="process RSS (MiB)", title=f"{bundle.name}: process RSS (one process, all caches alive)",
                                  from_zero=True, xticks=checkpoints))
        return out

    cols = ["policy", "tokens", "relative", "latency_ms", "latency_min_ms", "cache_slots", "cache_MiB"] + \
        (["peak_MiB"] if cuda else ["rss_MiB"]) + ["status"]
    summary = summary_line(ser, "relative")
    res["summary"] = summary
    _finish(args, dev, "bench_stream", res, model=bundle.info, policy=pol_args, notes=notes, columns=cols,
            title=f"bench stream: {bundle.name} on {dev}", plots=plots)
    return 0


def cmd_bench_video(args) -> int:
    from .evals.common import doubling
    from .results import plot_lines

    try:
        from .evals.video_bench import load_vlm, run_video_bench
    except ImportError as e:
        raise UsageError(f"bench video is not available in this build ({e})")
    dev = _setup(args)
    cuda = dev.startswith("cuda")
    n_max = args.frames or (4096 if cuda else 256)
    if args.min_frames > n_max:
        raise UsageError(f"--min-frames {args.min_frames} is larger than the last checkpoint ({n_max} frames)")
    checkpoints = (list(range(args.checkpoint_every, n_max, args.checkpoint_every)) + [n_max]
                   if args.checkpoint_every else doubling(args.min_frames, n_max))
    model, proc = load_vlm(None if args.model == "tiny-random" else args.model, device=dev)
    pol_args = _policy_args(args)
    from .evals.engine import policy_kwargs

    res: Dict[str, Any] = {}
    for pol in _policies(args):  # one call per policy: each gets only the arguments it takes
        part = run_video_bench(model, proc, policies=[pol], policy_args=policy_kwargs(pol, pol_args), checkpoints=checkpoints,
                               frames_per_chunk=args.frames_per_chunk, every=args.every, video=args.video,
                               frame_size=args.frame_size, chunk=args.chunk, model_name=args.model)
        if not res:
            res = dict(part, rows=[], series={})
        res["rows"] += part.get("rows", [])
        res["series"].update(part.get("series", {}))
    res["policy_args"] = pol_args
    ser = res.get("series", {})

    def plots():
        key = "peak_MiB" if cuda else "cache_MiB"
        return [plot_lines(_out_path(args, "bench_video_fps", "png"), {p: (v["frames"], v["fps"]) for p, v in ser.items()},
                           xlabel="frames streamed", ylabel="frames/s", title=f"{args.model}: video streaming throughput",
                           logx=True, from_zero=True),
                plot_lines(_out_path(args, "bench_video_memory", "png"), {p: (v["frames"], v[key]) for p, v in ser.items()},
                           xlabel="frames streamed", ylabel="peak CUDA memory (MiB)" if cuda else "KV cache (MiB)",
                           title=f"{args.model}: memory vs frames", logx=True, logy=True)]

    rows = res.get("rows", [])
    cols = _cols(rows, ["policy", "frames", "fps", "cache_slots", "cache_MiB"] + (["peak_MiB"] if cuda else ["rss_MiB"]),
                 skip=("args", "slots_by_modality", "capacity", "tokens_seen", "answer"))
    res["notes"] = [n for n in res.get("notes", []) if n]
    _finish(args, dev, "bench_video", res, model={"name": args.model}, policy=pol_args, columns=cols,
            title=f"bench video: {args.model} on {dev}", plots=plots)
    return 0


def cmd_eval_ppl(args) -> int:
    from .evals.common import fmt_tokens, parse_sweep
    from .evals.ppl import run_ppl
    from .results import plot_lines

    dev = _setup(args)
    text = _load_text(args)
    bundle = _load(args, dev)
    from .evals.ppl import tokenize_text

    if tokenize_text(bundle.tokenizer, text, 2).shape[1] < 2:
        raise UsageError(f"{args.text or args.corpus}: less than 2 tokens of text, no perplexity to measure")
    pol_args = _policy_args(args)
    res = run_ppl(bundle, text, policies=_policies(args), policy_args=pol_args, max_tokens=args.max_tokens,
                  chunk=args.chunk, checkpoints=args.checkpoints, sweep=parse_sweep(args.sweep), block=args.block,
                  full_past_context=args.full_past_context)
    src = os.path.basename(args.text) if args.text else args.corpus

    def plots():
        # running log-perplexity from 64 tokens on (the first few tokens dominate the scale otherwise)
        curves = {}
        for k, v in res["curves"].items():
            pts = [(t, y) for t, y in zip(v["tokens"], v["log_ppl"]) if t >= min(64, res["tokens"] // 4)]
            curves[k] = ([t for t, _ in pts], [y for _, y in pts])
        blocks = {}
        for k, v in res["curves"].items():
            b = v.get("block_nll") or []
            blocks[k] = ([(i + 1) * args.block for i in range(len(b))], b)
        return [plot_lines(_out_path(args, "eval_ppl", "png"), curves, xlabel="tokens streamed",
                           ylabel="running log-perplexity (nat)", title=f"{bundle.name} on {src}, {_budget_label(args)}",
                           logx=True, markers=False),
                plot_lines(_out_path(args, "eval_ppl_blocks", "png"), blocks, xlabel="tokens streamed",
                           ylabel=f"log-perplexity of each {args.block}-token block (nat)",
                           title=f"{bundle.name} on {src}, {_budget_label(args)}: per-block", logx=False)]

    cols = ["policy", "tokens"] + [f"ppl@{fmt_tokens(c)}" for c in res["checkpoints"]] + \
        [f"block_ppl@{fmt_tokens(res['checkpoints'][-1])}", "cache_slots", "cache_MiB", "tok_per_s", "status"]
    res["text"] = {"source": args.text or args.corpus, "tokens": res["tokens"]}
    _finish(args, dev, "eval_ppl", res, model=bundle.info, policy=dict(pol_args, sweep=args.sweep), columns=cols,
            title=f"eval ppl: {bundle.name} on {src} ({res['tokens']} tokens), {_budget_label(args)}", plots=plots)
    return 0


def _budget_label(args) -> str:
    return f"budget {args.budget}" if args.budget else "default budget"


def cmd_eval_retrieval(args) -> int:
    from .evals.common import fmt_tokens, parse_sweep
    from .evals.retrieval import run_retrieval
    from .results import plot_lines

    dev = _setup(args)
    bundle = _load(args, dev)
    pol_args = _policy_args(args)
    distances = args.distances
    res = run_retrieval(bundle, policies=_policies(args), policy_args=pol_args, distances=distances,
                        context=args.context, trials=args.trials, seed=args.seed, chunk=args.chunk,
                        sweep=parse_sweep(args.sweep), full_past_context=args.full_past_context)
    series = {}
    for r in res["rows"]:
        ys = [r.get(f"acc@{fmt_tokens(d)}") for d in distances]
        if any(y is not None for y in ys):
            series[r["policy"]] = (distances, ys)

    def plots():
        return [plot_lines(_out_path(args, "eval_retrieval", "png"), series, xlabel="distance of the asked line (tokens)",
                           ylabel="accuracy", title=f"{bundle.name}: line retrieval, {_budget_label(args)}", logx=True)]

    cols = ["policy"] + [f"acc@{fmt_tokens(d)}" for d in distances] + ["acc", "n", "status"]
    _finish(args, dev, "eval_retrieval", res, model=bundle.info, policy=dict(pol_args, sweep=args.sweep), columns=cols,
            title=f"eval retrieval: {bundle.name}, context >= {fmt_tokens(args.context)} tokens, {args.trials} per distance",
            plots=plots)
    return 0


def cmd_eval_rounds(args) -> int:
    from .evals.common import parse_sweep
    from .evals.rounds import run_rounds
    from .results import plot_lines

    dev = _setup(args)
    text = _load_text(args)
    bundle = _load(args, dev)
    pol_args = _policy_args(args)
    res = run_rounds(bundle, text, policies=_policies(args), policy_args=pol_args, rounds=args.rounds,
                     passage_tokens=args.passage_tokens, seed=args.seed, chunk=args.chunk, bucket=args.bucket,
                     sweep=parse_sweep(args.sweep), full_past_context=args.full_past_context)
    acc, mem = {}, {}
    for label, recs in res["per_round"].items():
        if not recs:
            continue
        xs = [r["round"] for r in recs]
        # running accuracy over the last `bucket` rounds
        ys = []
        for i in range(len(recs)):
            w = recs[max(0, i - args.bucket + 1): i + 1]
            ys.append(sum(r["correct"] for r in w) / len(w))
        acc[label] = (xs, ys)
        mem[label] = (xs, [r["cache_bytes"] / 2**20 for r in recs])

    def plots():
        return [plot_lines(_out_path(args, "eval_rounds_acc", "png"), acc, xlabel="round",
                           ylabel=f"accuracy (last {args.bucket} rounds)",
                           title=f"{bundle.name}: multi-round QA, {_budget_label(args)}"),
                plot_lines(_out_path(args, "eval_rounds_mem", "png"), mem, xlabel="round", ylabel="KV cache (MiB)",
                           title=f"{bundle.name}: cache memory per round", logy=True)]

    rows = res["rows"]
    cols = _cols(rows, ["policy", "rounds", "tokens"], skip=("args", "seconds"))
    cols = [c for c in cols if c != "status"] + ["status"]
    _finish(args, dev, "eval_rounds", res, model=bundle.info, policy=dict(pol_args, sweep=args.sweep), columns=cols,
            title=f"eval rounds: {bundle.name}, {args.rounds} rounds of ~{args.passage_tokens} tokens", plots=plots)
    return 0


def cmd_eval_needle(args) -> int:
    from .evals.common import parse_int_list, parse_sweep
    from .evals.needle import apply_preset, parse_depths, plot_heatmaps, resolve_seeds, run_needle

    apply_preset(args, args._argv)
    dev = _setup(args)
    seed_set, seeds = resolve_seeds(args.seeds, args.needles_per_cell)
    budgets = parse_int_list(args.budgets) or ([args.budget] if args.budget else [256, 512, 1024])
    text = _load_text(args)
    bundle = _load(args, dev)
    pol_args = _policy_args(args)
    res = run_needle(bundle, text, policies=_policies(args), policy_args=pol_args, budgets=budgets,
                     lengths=parse_int_list(args.lengths), depths=parse_depths(args.depths), seeds=seeds, seed_set=seed_set,
                     kinds=["passkey", "fact"] if args.kind == "both" else [args.kind], needles=args.needles,
                     chunk=args.chunk, sweep=parse_sweep(args.sweep), max_new_tokens=args.max_new_tokens,
                     doc_start=args.doc_start, full_past_context=args.full_past_context, share=not args.no_share,
                     estimate_only=args.estimate_only)
    if args.estimate_only:
        return 0
    res["text"] = {"source": args.text or args.corpus}
    rows = res["rows"]
    cols = _cols(rows, ["policy", "budget", "acc", "vs_full"], skip=("args", "seconds", "status")) + ["seconds", "status"]
    _finish(args, dev, "eval_needle", res, model=bundle.info, policy=dict(pol_args, budgets=budgets, sweep=args.sweep),
            columns=cols, title=f"eval needle: {bundle.name}, {res['seed_set']} seeds, {len(res['seeds'])} per cell, "
            f"kind {args.kind}, {args.needles} needle(s) per case, chunk {args.chunk}",
            plots=lambda: plot_heatmaps(res, lambda stem: _out_path(args, dev, stem, "png"), bundle.name))
    return 0


_ORDER = ["bench_ops", "bench_stream", "bench_video", "eval_ppl", "eval_retrieval", "eval_rounds"]
_PLOTS = {
    "bench_ops": ["bench_ops"],
    "bench_stream": ["bench_stream_latency", "bench_stream_latency_ms", "bench_stream_memory", "bench_stream_rss"],
    "eval_ppl": ["eval_ppl", "eval_ppl_blocks"],
    "eval_retrieval": ["eval_retrieval"],
    "eval_rounds": ["eval_rounds_acc", "eval_rounds_mem"],
    "bench_video": ["bench_video_fps", "bench_video_memory"],
}


def cmd_report(args) -> int:
    """Write a Markdown page with every result's table, command line, environment and plots."""
    import glob

    from .results import read_json

    root = args.results
    out_dir = os.path.dirname(os.path.abspath(args.out))
    lines = ["# Results", "",
             "Generated by `inf-mllm report` from the JSON files under `bench/results/`; the commands that",
             "produce them are listed in `bench/README.md`. Each section gives the exact command line, the",
             "device and versions recorded in the JSON, the printed table and the plots.", ""]
    found = 0
    for dev_dir in sorted(d for d in glob.glob(os.path.join(root, "*")) if os.path.isdir(d)):
        files = sorted(glob.glob(os.path.join(dev_dir, "*.json")))
        if not files:
            continue
        lines += [f"## {os.path.basename(dev_dir)}", ""]

        def key(f):
            stem = os.path.basename(f)[:-5]
            base = next((k for k in _ORDER if stem.startswith(k)), stem)
            return (_ORDER.index(base) if base in _ORDER else 99, stem)

        for f in sorted(files, key=key):
            try:
                d = read_json(f)
            except Exception as e:  # noqa: BLE001
                lines += [f"* `{f}`: unreadable ({e})", ""]
                continue
            meta = d.get("meta", {})
            stem = os.path.basename(f)[:-5]
            v = meta.get("versions", {})
            model = (meta.get("model") or {}).get("name")
            lines += [f"### {stem}", "",
                      f"`{meta.get('command_line', '?')}`", "",
                      f"{meta.get('device_name', '?')}, {meta.get('date', '?')}; torch {v.get('torch')}, triton "
                      f"{v.get('triton')}, transformers {v.get('transformers')}, native ops {v.get('native_ops')}"
                      + (f"; model {model} ({(meta.get('model') or {}).get('params', '?')} parameters)" if model else "")
                      + f"; {meta.get('threads', '?')} threads.", ""]
            if d.get("table"):
                tbl = d["table"].splitlines()
                if tbl and not tbl[0].startswith("|"):
                    lines += [f"*{tbl[0]}*", ""]
                    tbl = tbl[1:]
                lines += tbl + [""]
            for n in meta.get("notes", []):
                lines.append(f"* {n}")
            if meta.get("notes"):
                lines.append("")
            tag = stem[len(d.get("kind", stem)):]
            for p in _PLOTS.get(d.get("kind", ""), []):
                png = os.path.join(dev_dir, p + tag + ".png")
                if os.path.exists(png):
                    lines += [f"![{p}{tag}]({os.path.relpath(png, out_dir)})", ""]
            found += 1
    if not found:
        lines += ["No results yet: run the commands in `bench/README.md`.", ""]
    os.makedirs(out_dir, exist_ok=True)
    with open(args.out, "w") as fh:
        fh.write("\n".join(lines))
    print(f"wrote {args.out} ({found} result files)")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = ap.parse_args(argv)  # a bad value: one line, exit 2
    args._argv = ["inf-mllm"] + argv
    import time

    args._t0 = time.perf_counter()
    from .evals.common import end_partial

    try:
        validate(args)
        rc = int(args.func(args) or 0)
        end_partial(remove=True)  # (a command that wrote no JSON, e.g. an estimate, recorded nothing)
        return rc
    except UsageError as e:
        end_partial(remove=True)
        if getattr(args, "debug", False):
            raise
        print(f"inf-mllm: error: {e}", file=sys.stderr, flush=True)
        return 2
    except BaseException as e:  # a crash or Ctrl-C mid-run: say where the finished cases are
        path, n = end_partial(remove=False)
        if n:
            print(f"inf-mllm: stopped by {type(e).__name__}; the {n} cases finished before are in {path}",
                  file=sys.stderr, flush=True)
        raise


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

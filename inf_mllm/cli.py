"""``inf-mllm`` command line: benchmarks and evaluations.

    inf-mllm bench ops        operator timings (attention_with_scores, compact_) vs baselines
    inf-mllm bench stream     decode latency and peak memory vs tokens streamed, per policy
    inf-mllm bench video      frames/s and memory vs video frames streamed into a VLM
    inf-mllm eval ppl         streaming perplexity on long real text (Austen, KJV, --text)
    inf-mllm eval retrieval   LongEval-style line retrieval, accuracy vs distance
    inf-mllm eval rounds      multi-round streaming QA, accuracy per round bucket
    inf-mllm eval needle      needle in a haystack of prose: accuracy per length x depth, heatmaps
    inf-mllm report           collect the result JSONs into docs/results_tables.md

Every command prints a table and writes ``<stem>.json`` (+ PNG plots) under ``--out``
(default ``bench/results/<device>/``).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Dict, List, Optional, Sequence

__all__ = ["main", "build_parser"]

DEFAULT_POLICIES = "full,h2o,streaming_llm,inf_mllm"


# --------------------------------------------------------------------------------------
# Shared options
# --------------------------------------------------------------------------------------


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=None, help="output directory (default bench/results/<device>/)")
    p.add_argument("--tag", default="", help="suffix for the output file names (e.g. a sweep name)")
    p.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2",
                   help="smollm2 (default; packaged GGUF), any name inf_mllm.models supports, a .gguf file or a local checkpoint dir")
    p.add_argument("--dtype", default=None, help="model dtype (float32, bfloat16, float16; default: the loader's)")


def _add_policy(p: argparse.ArgumentParser, policies: str = DEFAULT_POLICIES) -> None:
    p.add_argument("--policies", default=policies, help=f"comma-separated policies (default {policies})")
    p.add_argument("--budget", type=int, default=2048, help="cache budget L in slots (default 2048)")
    p.add_argument("--n-recent", type=int, default=256, help="recent tokens kept (default 256)")
    p.add_argument("--window", type=int, default=32, help="retrieval window w (default 32)")
    p.add_argument("--bias", type=float, default=1e-3, help="attention bias beta (default 1e-3)")
    p.add_argument("--n-sink", type=int, default=4, help="attention sinks (default 4)")
    p.add_argument("--policy-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="extra keyword for inf_mllm.enable (repeatable)")
    p.add_argument("--chunk", type=int, default=256, help="prefill chunk in tokens (default 256)")
    p.add_argument("--full-past-context", action="store_true",
                   help="keep running `full` past the model's trained context (default: stop there)")


def _add_text(p: argparse.ArgumentParser) -> None:
    p.add_argument("--corpus", default="austen", choices=["austen", "kjv"],
                   help="austen: Debian r-cran-janeaustenr; kjv: Debian bible-kjv (default austen)")
    p.add_argument("--text", default=None, metavar="FILE", help="any UTF-8 text file instead of --corpus")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="inf-mllm", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="group", required=True)

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="cmd", required=True)
    p = bench.add_parser("ops", help="operator timings vs SDPA / eager / reference")
    _add_common(p)
    p.add_argument("--sizes", default=None,
                   help="cache sizes C in slots, e.g. 256,1K,4K (default: 256..64K doubling on GPU, 256..8K on CPU)")
    p.add_argument("--dtype", default=None, help="float16/bfloat16/float32 (default bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--batch", type=int, default=None, help="batch rows B (default 8 on GPU, 1 on CPU)")
    p.add_argument("--heads", default="32,8", help="query heads,kv heads (default 32,8)")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--prefill-chunk", type=int, default=256)
    p.add_argument("--window", type=int, default=32)
    p.add_argument("--only", choices=["attention", "compact"], default=None)
    p.set_defaults(func=cmd_bench_ops)

    p = bench.add_parser("stream", help="decode latency and peak memory vs tokens streamed")
    _add_common(p)
    _add_model(p)
    _add_policy(p)
    p.add_argument("--max-tokens", default=None, help="longest stream (default 64K on CPU, 1M on GPU)")
    p.add_argument("--min-tokens", default="1K", help="first checkpoint (default 1K); checkpoints double")
    p.add_argument("--decode-steps", type=int, default=8, help="decode steps timed at each checkpoint (median)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--text", default=None, metavar="FILE", help="stream this text instead of random token ids")
    p.set_defaults(func=cmd_bench_stream)

    p = bench.add_parser("video", help="frames/s and memory vs video frames streamed into a VLM")
    _add_common(p)
    p.add_argument("--model", default="tiny-random", help="tiny-random (random LLaVA; speed/memory only) or a local VLM checkpoint dir")
    _add_policy(p)
    p.set_defaults(chunk=64)
    p.add_argument("--frames", type=int, default=None, help="last checkpoint in frames (default 256 on CPU, 4096 on GPU)")
    p.add_argument("--min-frames", type=int, default=8, help="first checkpoint (default 8); checkpoints double")
    p.add_argument("--frames-per-chunk", type=int, default=1)
    p.add_argument("--every", type=int, default=1, help="use every n-th frame of the video")
    p.add_argument("--video", default=None, help="video file (default: the sample clip of Debian's opencv-doc)")
    p.add_argument("--frame-size", type=int, default=None)
    p.set_defaults(func=cmd_bench_video)

    ev = sub.add_parser("eval", help="evaluations").add_subparsers(dest="cmd", required=True)
    p = ev.add_parser("ppl", help="streaming perplexity on long text")
    _add_common(p)
    _add_model(p)
    _add_policy(p)
    _add_text(p)
    p.add_argument("--max-tokens", default="64K", help="tokens of text to stream (default 64K)")
    p.add_argument("--checkpoints", default=None, help="token counts for the table (default 4K,16K,64K,... and the end)")
    p.add_argument("--sweep", default=None, metavar="KEY=V1,V2,...",
                   help="sweep one policy argument over values for inf_mllm, e.g. bias=0,1e-4,1e-3,1e-2")
    p.add_argument("--block", type=int, default=1024, help="block size for block perplexity (default 1024)")
    p.set_defaults(func=cmd_eval_ppl)

    p = ev.add_parser("retrieval", help="LongEval-style line retrieval, accuracy vs distance")
    _add_common(p)
    _add_model(p)
    _add_policy(p)
    p.add_argument("--distances", default="256,1K,2K,4K", help="token distances of the asked line from the question")
    p.add_argument("--context", default="4K", help="record length in tokens (at least distance + 64)")
    p.add_argument("--trials", type=int, default=5, help="questions per distance")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sweep", default=None, metavar="KEY=V1,V2,...")
    p.set_defaults(func=cmd_eval_retrieval)

    p = ev.add_parser("rounds", help="multi-round streaming QA")
    _add_common(p)
    _add_model(p)
    _add_policy(p)
    _add_text(p)
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--passage-tokens", type=int, default=400, help="approximate tokens of text per round")
    p.add_argument("--bucket", type=int, default=10, help="rounds per accuracy bucket")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sweep", default=None, metavar="KEY=V1,V2,...")
    p.set_defaults(func=cmd_eval_rounds)

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
    p.set_defaults(func=cmd_eval_needle)

    p = sub.add_parser("report", help="collect result JSONs into a Markdown page (docs/results_tables.md)")
    p.add_argument("--results", default=os.path.join("bench", "results"), help="results root (default bench/results)")
    p.add_argument("--out", default=os.path.join("docs", "results_tables.md"), help="Markdown file to write (default docs/results_tables.md; docs/results.md is the hand-written summary)")
    p.set_defaults(func=cmd_report)
    return ap


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


def _setup(args) -> str:
    import torch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.no_progress:
        os.environ["TQDM_DISABLE"] = "1"
    dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("inf-mllm: --device cuda but no CUDA device is available")
    return dev


def _out_path(args, device: str, stem: str, ext: str) -> str:
    from .results import default_out_dir

    out = args.out or default_out_dir(device)
    os.makedirs(out, exist_ok=True)
    tag = f"_{args.tag}" if args.tag else ""
    return os.path.join(out, f"{stem}{tag}.{ext}")


def _policy_args(args) -> Dict[str, Any]:
    from .evals.engine import parse_policy_args

    d = {"budget": args.budget, "n_recent": args.n_recent, "window": args.window, "bias": args.bias, "n_sink": args.n_sink}
    d.update(parse_policy_args(args.policy_arg))
    return d


def _policies(args) -> List[str]:
    return [p.strip() for p in args.policies.split(",") if p.strip()]


def _load(args, device):
    from .evals.engine import load_bundle

    print(f"inf-mllm: loading model {args.model} on {device} ...", file=sys.stderr, flush=True)
    return load_bundle(args.model, device=device, dtype=args.dtype)


def _finish(args, device, kind, payload, *, model=None, policy=None, notes=(), columns=None, title=""):
    from .results import make_meta, print_table, write_json

    meta = make_meta(f"{args.group} {args.cmd}", device=device, model=model, policy=policy, argv=args._argv,
                     args={k: v for k, v in vars(args).items() if k not in ("func", "_argv")}, notes=list(notes) + list(payload.get("notes", [])))
    payload = dict(payload, kind=kind, meta=meta)
    table = print_table(payload["rows"], columns=columns, title=title)
    payload["table"] = table
    for n in meta["notes"]:
        print(f"note: {n}")
    path = write_json(_out_path(args, device, kind, "json"), payload)
    print(f"wrote {path}")
    return path


def _cols(rows, first: Sequence[str], skip: Sequence[str] = ("args",)) -> List[str]:
    cols = list(first)
    for r in rows:
        for k in r:
            if k not in cols and k not in skip:
                cols.append(k)
    return cols


# --------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------


def cmd_bench_ops(args) -> int:
    import torch

    from .evals.common import doubling, parse_int_list
    from .evals.ops_bench import run_ops_bench
    from .results import plot_lines

    dev = _setup(args)
    cuda = dev.startswith("cuda")
    notes = []
    sizes = parse_int_list(args.sizes)
    if sizes is None:
        sizes = doubling(256, 65536 if cuda else 8192)
        if not cuda:
            notes.append("CPU run: default cache sizes stop at 8K slots (64K on GPU)")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if cuda else torch.float32)
    Hq, Hkv = (int(x) for x in args.heads.split(","))
    which = [args.only] if args.only else ["attention", "compact"]
    batch = args.batch or (8 if cuda else 1)
    res = run_ops_bench(sizes=sizes, device=dev, dtype=dtype, B=batch, Hq=Hq, Hkv=Hkv, D=args.head_dim,
                        prefill_chunk=args.prefill_chunk, window=args.window, which=which)
    bw = res["copy_bandwidth"]
    notes.append(f"measured device copy bandwidth: {bw['GBps']:.1f} GB/s (read+write, {bw['bytes'] >> 20} MiB copy)")
    notes += [f"{k}: {v}" for k, v in res["sources"].items()]
    # plot: GB/s vs C per (op, mode, impl)
    series = {}
    for r in res["rows"]:
        if r.get("GBps") is None:
            continue
        key = f"{r['op']} {r.get('mode', '')} {r.get('impl', '')}".strip()
        xs, ys = series.setdefault(key, ([], []))
        xs.append(r["C"])
        ys.append(r["median_ms"])
    if series:
        plot_lines(_out_path(args, dev, "bench_ops", "png"), series, xlabel="cache size C (slots)", ylabel="median time (ms)",
                   title=f"operators, {res['shape']}", logx=True, logy=True)
    cols = ["op", "mode", "C", "impl", "median_ms", "GBps"] + (["frac_copy_bw"] if cuda else [])
    if any(r.get("error") for r in res["rows"]):
        cols.append("error")
    _finish(args, dev, "bench_ops", res, notes=notes, columns=cols,
            title=f"bench ops on {dev} ({res['shape']['dtype']})")
    return 0


def cmd_bench_stream(args) -> int:
    import torch

    from .evals.common import doubling, parse_size
    from .evals.stream_bench import run_stream_bench
    from .results import plot_lines

    dev = _setup(args)
    cuda = dev.startswith("cuda")
    notes = []
    max_tokens = parse_size(args.max_tokens) if args.max_tokens else (1 << 20 if cuda else 1 << 16)
    if not args.max_tokens and not cuda:
        notes.append("CPU run: default --max-tokens 64K (1M on GPU)")
    checkpoints = doubling(parse_size(args.min_tokens), max_tokens)
    bundle = _load(args, dev)
    text_ids = None
    if args.text:
        from .evals.ppl import tokenize_text
        from .data import load_corpus

        text_ids = tokenize_text(bundle.tokenizer, load_corpus(text_file=args.text), max_tokens)
    pol_args = _policy_args(args)
    res = run_stream_bench(bundle, policies=_policies(args), policy_args=pol_args, checkpoints=checkpoints,
                           chunk=args.chunk, decode_steps=args.decode_steps, seed=args.seed, text_ids=text_ids,
                           full_past_context=args.full_past_context)
    notes.append(f"stream source: {res['source']}; prefill chunk {args.chunk}; {args.decode_steps} decode steps timed per checkpoint")
    if not cuda:
        notes.append("CPU: memory is the cache's tensor bytes (cache_MiB) and the process RSS (rss_MiB)")
    for r in res["rows"]:
        if r.get("status", "ok") != "ok":
            notes.append(f"{r['policy']}: {r['status']} at {r['tokens']} tokens")
    ser = res["series"]
    lat = {p: (s["tokens"], s["latency_ms"]) for p, s in ser.items()}
    plot_lines(_out_path(args, dev, "bench_stream_latency", "png"), lat, xlabel="tokens streamed", ylabel="decode latency (ms/token)",
               title=f"{bundle.name}: decode latency, budget {pol_args['budget']}", logx=True)
    memkey = "peak_MiB" if cuda else "cache_MiB"
    mem = {p: (s["tokens"], s[memkey]) for p, s in ser.items()}
    plot_lines(_out_path(args, dev, "bench_stream_memory", "png"), mem, xlabel="tokens streamed",
               ylabel="peak CUDA memory (MiB)" if cuda else "KV cache (MiB)",
               title=f"{bundle.name}: memory, budget {pol_args['budget']}", logx=True, logy=True)
    if not cuda:
        rss = {p: (s["tokens"], s["rss_MiB"]) for p, s in ser.items()}
        plot_lines(_out_path(args, dev, "bench_stream_rss", "png"), rss, xlabel="tokens streamed", ylabel="process RSS (MiB)",
                   title=f"{bundle.name}: process RSS (one process, policies run in sequence)", logx=True)
    cols = ["policy", "tokens", "latency_ms", "cache_slots", "cache_MiB"] + (["peak_MiB"] if cuda else ["rss_MiB"]) + ["status"]
    _finish(args, dev, "bench_stream", res, model=bundle.info, policy=pol_args, notes=notes, columns=cols,
            title=f"bench stream: {bundle.name} on {dev}")
    return 0


def cmd_bench_video(args) -> int:
    from .evals.common import doubling
    from .results import plot_lines

    try:
        from .evals.video_bench import load_vlm, run_video_bench
    except ImportError as e:
        raise SystemExit(f"inf-mllm: bench video is not available in this build ({e})")
    dev = _setup(args)
    cuda = dev.startswith("cuda")
    n_max = args.frames or (4096 if cuda else 256)
    checkpoints = doubling(args.min_frames, n_max)
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
    plot_lines(_out_path(args, dev, "bench_video_fps", "png"), {p: (v["frames"], v["fps"]) for p, v in ser.items()},
               xlabel="frames streamed", ylabel="frames/s", title=f"{args.model}: video streaming throughput", logx=True)
    key = "peak_MiB" if cuda else "cache_MiB"
    plot_lines(_out_path(args, dev, "bench_video_memory", "png"), {p: (v["frames"], v[key]) for p, v in ser.items()},
               xlabel="frames streamed", ylabel="peak CUDA memory (MiB)" if cuda else "KV cache (MiB)",
               title=f"{args.model}: memory vs frames", logx=True, logy=True)
    rows = res.get("rows", [])
    cols = _cols(rows, ["policy", "frames", "fps", "cache_slots", "cache_MiB"] + (["peak_MiB"] if cuda else ["rss_MiB"]),
                 skip=("args", "slots_by_modality", "capacity", "tokens_seen", "answer"))
    res["notes"] = [n for n in res.get("notes", []) if n]
    _finish(args, dev, "bench_video", res, model={"name": args.model}, policy=pol_args, columns=cols,
            title=f"bench video: {args.model} on {dev}")
    return 0


def _load_text(args) -> str:
    from .data import CorpusUnavailable, load_corpus

    try:
        return load_corpus(args.corpus, text_file=args.text)
    except CorpusUnavailable as e:
        raise SystemExit(f"inf-mllm: corpus unavailable:\n{e}")


def cmd_eval_ppl(args) -> int:
    import math

    from .evals.common import fmt_tokens, parse_int_list, parse_size, parse_sweep
    from .evals.ppl import run_ppl
    from .results import plot_lines

    dev = _setup(args)
    text = _load_text(args)
    bundle = _load(args, dev)
    pol_args = _policy_args(args)
    sweep = parse_sweep(args.sweep)
    res = run_ppl(bundle, text, policies=_policies(args), policy_args=pol_args, max_tokens=parse_size(args.max_tokens),
                  chunk=args.chunk, checkpoints=parse_int_list(args.checkpoints), sweep=sweep, block=args.block,
                  full_past_context=args.full_past_context)
    # running log-perplexity from 64 tokens on (the first few tokens dominate the scale otherwise)
    curves = {}
    for k, v in res["curves"].items():
        pts = [(t, y) for t, y in zip(v["tokens"], v["log_ppl"]) if t >= min(64, res["tokens"] // 4)]
        curves[k] = ([t for t, _ in pts], [y for _, y in pts])
    src = os.path.basename(args.text) if args.text else args.corpus
    plot_lines(_out_path(args, dev, "eval_ppl", "png"), curves, xlabel="tokens streamed", ylabel="running log-perplexity (nat)",
               title=f"{bundle.name} on {src}, budget {pol_args['budget']}", logx=True, markers=False)
    blocks = {}
    for k, v in res["curves"].items():
        b = v.get("block_nll") or []
        blocks[k] = ([(i + 1) * args.block for i in range(len(b))], b)
    plot_lines(_out_path(args, dev, "eval_ppl_blocks", "png"), blocks, xlabel="tokens streamed",
               ylabel=f"log-perplexity of each {args.block}-token block (nat)",
               title=f"{bundle.name} on {src}, budget {pol_args['budget']}: per-block", logx=False)
    cols = ["policy", "tokens"] + [f"ppl@{fmt_tokens(c)}" for c in res["checkpoints"]] + \
        [f"block_ppl@{fmt_tokens(res['checkpoints'][-1])}", "cache_slots", "cache_MiB", "tok_per_s", "status"]
    res["text"] = {"source": args.text or args.corpus, "tokens": res["tokens"]}
    _finish(args, dev, "eval_ppl", res, model=bundle.info, policy=dict(pol_args, sweep=args.sweep), columns=cols,
            title=f"eval ppl: {bundle.name} on {src} ({res['tokens']} tokens), budget {pol_args['budget']}")
    return 0


def cmd_eval_retrieval(args) -> int:
    from .evals.common import fmt_tokens, parse_int_list, parse_size, parse_sweep
    from .evals.retrieval import run_retrieval
    from .results import plot_lines

    dev = _setup(args)
    bundle = _load(args, dev)
    pol_args = _policy_args(args)
    distances = parse_int_list(args.distances)
    res = run_retrieval(bundle, policies=_policies(args), policy_args=pol_args, distances=distances,
                        context=parse_size(args.context), trials=args.trials, seed=args.seed, chunk=args.chunk,
                        sweep=parse_sweep(args.sweep), full_past_context=args.full_past_context)
    series = {}
    for r in res["rows"]:
        ys = [r.get(f"acc@{fmt_tokens(d)}") for d in distances]
        if any(y is not None for y in ys):
            series[r["policy"]] = (distances, ys)
    plot_lines(_out_path(args, dev, "eval_retrieval", "png"), series, xlabel="distance of the asked line (tokens)",
               ylabel="accuracy", title=f"{bundle.name}: line retrieval, budget {pol_args['budget']}", logx=True)
    cols = ["policy"] + [f"acc@{fmt_tokens(d)}" for d in distances] + ["acc", "n", "status"]
    _finish(args, dev, "eval_retrieval", res, model=bundle.info, policy=dict(pol_args, sweep=args.sweep), columns=cols,
            title=f"eval retrieval: {bundle.name}, context >= {args.context} tokens, {args.trials} per distance")
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
    plot_lines(_out_path(args, dev, "eval_rounds_acc", "png"), acc, xlabel="round",
               ylabel=f"accuracy (last {args.bucket} rounds)", title=f"{bundle.name}: multi-round QA, budget {pol_args['budget']}")
    plot_lines(_out_path(args, dev, "eval_rounds_mem", "png"), mem, xlabel="round", ylabel="KV cache (MiB)",
               title=f"{bundle.name}: cache memory per round", logy=True)
    rows = res["rows"]
    cols = _cols(rows, ["policy", "rounds", "tokens"], skip=("args", "seconds"))
    cols = [c for c in cols if c != "status"] + ["status"]
    _finish(args, dev, "eval_rounds", res, model=bundle.info, policy=dict(pol_args, sweep=args.sweep), columns=cols,
            title=f"eval rounds: {bundle.name}, {args.rounds} rounds of ~{args.passage_tokens} tokens")
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
    res["plots"] = [os.path.basename(p) for p in plot_heatmaps(res, lambda stem: _out_path(args, dev, stem, "png"), bundle.name)]
    res["text"] = {"source": args.text or args.corpus}
    rows = res["rows"]
    cols = _cols(rows, ["policy", "budget", "acc", "vs_full"], skip=("args", "seconds", "status")) + ["seconds", "status"]
    _finish(args, dev, "eval_needle", res, model=bundle.info, policy=dict(pol_args, budgets=budgets, sweep=args.sweep),
            columns=cols, title=f"eval needle: {bundle.name}, {res['seed_set']} seeds, {len(res['seeds'])} per cell, "
            f"kind {args.kind}, {args.needles} needle(s) per case, chunk {args.chunk}")
    return 0


_ORDER = ["bench_ops", "bench_stream", "bench_video", "eval_ppl", "eval_retrieval", "eval_rounds"]
_PLOTS = {
    "bench_ops": ["bench_ops"],
    "bench_stream": ["bench_stream_latency", "bench_stream_memory", "bench_stream_rss"],
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
    args = ap.parse_args(argv)
    args._argv = ["inf-mllm"] + list(sys.argv[1:] if argv is None else argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

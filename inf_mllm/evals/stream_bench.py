"""Per-token decode latency and memory vs tokens streamed (``inf-mllm bench stream``).

Every policy (and ``transformers``: the plain model with its SDPA attention and a
``DynamicCache``, what a user runs without inf_mllm) streams the same tokens. The policies run
**interleaved**: at each checkpoint (1K, 2K, 4K, ... tokens in the stream) every policy is
brought to the checkpoint by chunked prefill, then the decode steps are timed in rounds, one
step of each policy per round (in a rotating order), so that a change in the machine's load
hits all policies alike and the comparison at a checkpoint stays fair. The last
``decode_steps`` tokens of each checkpoint are the decoded ones: "tokens" is the stream length
after the timed steps, so a model trained for 8192 positions is measured up to 8K exactly.

A reference is timed in the same rounds: one forward of a single token with no cache (the
model's cost per token when there is no context to attend to). ``relative`` = a policy's best
decode time / the reference's best time in the same rounds: what the context costs, with the
machine's speed at that moment divided out (on a shared machine the load changes between
checkpoints, and raw milliseconds then mix the two).

Memory: the cache's tensor bytes (``cache_MiB``; for ``transformers`` the DynamicCache's keys and
values), the process RSS on the CPU (one process, all caches alive together: it only grows),
and on CUDA ``max_memory_allocated`` since the previous checkpoint.
``full`` and ``transformers`` stop past the model's trained context (or when out of memory).
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Dict, List, Optional, Sequence

import torch

from .common import progress, record
from .engine import TRANSFORMERS, ModelBundle, PolicyRunner, free_memory, is_oom, process_rss, sync

__all__ = ["run_stream_bench", "summary_line"]

GROWING = ("full", TRANSFORMERS)
REFERENCE = "reference"


def run_stream_bench(
    bundle: ModelBundle,
    *,
    policies: Sequence[str],
    policy_args: Dict[str, Any],
    checkpoints: List[int],
    chunk: Optional[int] = None,
    decode_steps: int = 8,
    seed: int = 0,
    text_ids: Optional[torch.Tensor] = None,
    text_name: str = "text",
    full_past_context: bool = False,
) -> Dict[str, Any]:
    dev = bundle.device
    cuda = dev.startswith("cuda")
    n_max = checkpoints[-1]
    if checkpoints[0] <= decode_steps:
        raise ValueError(f"the first checkpoint ({checkpoints[0]}) must be larger than decode_steps ({decode_steps})")
    vocab = bundle.model.config.vocab_size
    if text_ids is None:
        g = torch.Generator().manual_seed(seed)
        src = torch.randint(0, vocab, (1, n_max), generator=g)
        source = f"random token ids (seed {seed})"
    else:
        reps = -(-n_max // text_ids.shape[1])
        src = text_ids.repeat(1, reps)[:, :n_max]
        source = text_name + (f" (repeated x{reps})" if reps > 1 else "")
    max_ctx = bundle.max_context
    runners = {p: PolicyRunner(bundle, p, policy_args, chunk=chunk) for p in policies}
    caches, fed, last, length, stopped = {}, {}, {}, {}, {}
    series: Dict[str, Dict[str, list]] = {
        p: {"tokens": [], "latency_ms": [], "latency_min_ms": [], "relative": [], "peak_MiB": [], "cache_MiB": [],
            "rss_MiB": [], "cache_slots": []} for p in policies}
    ref_runner = PolicyRunner(bundle, TRANSFORMERS, {}, chunk=chunk)
    reference: Dict[str, list] = {"tokens": [], "latency_min_ms": []}
    rows: List[Dict[str, Any]] = []
    free_memory(dev)
    for p, r in runners.items():
        with r.active():
            caches[p] = r.new_cache()
        fed[p], length[p], last[p] = 0, 0, None
    bar = progress(n_max * len(policies), "stream " + ",".join(policies))
    for c in checkpoints:
        live = [p for p in policies if p not in stopped]
        if not live:
            break
        for p in live:
            if p in GROWING and max_ctx and c > max_ctx and not full_past_context:
                stopped[p] = f"past trained context ({max_ctx})"
                rows.append({"policy": p, "tokens": c, "status": stopped[p]})
        live = [p for p in live if p not in stopped]
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        # prefill each policy to `c - decode_steps` tokens in the stream
        for p in list(live):
            r = runners[p]
            n_new = c - decode_steps - length[p]
            try:
                with r.active():
                    if n_new > 0:
                        _, last[p] = r.feed(caches[p], src[:, fed[p]: fed[p] + n_new], progress=bar)
                        fed[p] += n_new
                        length[p] += n_new
            except Exception as e:  # noqa: BLE001
                if not is_oom(e):
                    raise
                stopped[p] = "out of memory"
                rows.append({"policy": p, "tokens": c, "status": stopped[p]})
                live.remove(p)
                caches.pop(p, None)
                free_memory(dev)
        # timed decode steps, one per policy (and the reference) per round, rotating the order
        times: Dict[str, List[float]] = {p: [] for p in live + [REFERENCE]}
        tok = {p: int(torch.argmax(last[p])) for p in live}
        order = live + [REFERENCE]
        for step in range(decode_steps):
            k = step % len(order)
            for p in order[k:] + order[:k]:
                if p == REFERENCE:
                    with ref_runner.active(), torch.inference_mode():
                        ids = torch.tensor([[tok[live[0]] if live else 0]], device=dev)
                        sync(dev)
                        t0 = time.perf_counter()
                        int(torch.argmax(bundle.model(input_ids=ids, use_cache=False, logits_to_keep=1).logits))
                        times[p].append(time.perf_counter() - t0)
                    continue
                r = runners[p]
                with r.active():
                    sync(dev)
                    t0 = time.perf_counter()
                    logits = r.decode(caches[p], tok[p])
                    tok[p] = int(torch.argmax(logits))  # forces the result (a sync) like real decoding
                    times[p].append(time.perf_counter() - t0)
                last[p] = logits
                length[p] += 1
        ref_ms = min(times[REFERENCE]) * 1e3
        reference["tokens"].append(c)
        reference["latency_min_ms"].append(ref_ms)
        peak = torch.cuda.max_memory_allocated() if cuda else None
        rss = process_rss()
        for p in live:
            r = runners[p]
            lat = statistics.median(times[p]) * 1e3
            row = {"policy": p, "tokens": length[p], "latency_ms": lat, "latency_min_ms": min(times[p]) * 1e3,
                   "relative": min(times[p]) * 1e3 / ref_ms,
                   "cache_slots": r.cache_len(caches[p]), "cache_MiB": r.cache_bytes(caches[p]) / 2**20,
                   "peak_MiB": peak / 2**20 if peak is not None else None, "rss_MiB": rss / 2**20, "status": "ok",
                   "args": r.effective_args or r.policy_args}
            rows.append(row)
            record("row", row)
            ser = series[p]
            for key in ("tokens", "latency_ms", "latency_min_ms", "relative", "peak_MiB", "cache_MiB", "rss_MiB", "cache_slots"):
                ser[key].append(row[key])
    bar.close()
    caches.clear()
    free_memory(dev)
    rows.sort(key=lambda r: (list(policies).index(r["policy"]), r["tokens"]))
    return {"rows": rows, "series": series, "reference": reference, "checkpoints": checkpoints,
            "decode_steps": decode_steps, "source": source, "max_context": max_ctx, "policies": list(policies)}


def summary_line(series: Dict[str, Dict[str, list]], key: str = "relative") -> Optional[str]:
    """``decode cost at 4K tokens vs at 1K (...): transformers 1.60x, ..., inf_mllm 1.00x; cache at 4K:
    180 MiB (transformers), ...``: ``key`` at the last checkpoint every policy reached over ``key``
    at the first one; ``None`` when there is nothing to compare."""
    from .common import fmt_tokens

    ok = {p: s for p, s in series.items() if s["tokens"]}
    if not ok:
        return None
    common = set.intersection(*(set(s["tokens"]) for s in ok.values()))
    if len(common) < 2:
        return None
    first, end = min(common), max(common)
    parts, mem = [], []
    for p, s in ok.items():
        i0, i1 = s["tokens"].index(first), s["tokens"].index(end)
        a, b = s[key][i0], s[key][i1]
        if a and b:
            parts.append(f"{p} {b / a:.2f}x")
        mem.append(f"{s['cache_MiB'][i1]:.0f} MiB ({p})")
    what = " (decode time relative to a step without context, timed in the same rounds)" if key == "relative" else ""
    return (f"decode cost at {fmt_tokens(end)} tokens vs at {fmt_tokens(first)}{what}: " + ", ".join(parts)
            + f"; cache at {fmt_tokens(end)}: " + ", ".join(mem))

"""Per-token decode latency and peak memory vs tokens streamed (``inf-mllm bench stream``).

For each policy, one stream is grown by chunked prefill up to each checkpoint (1K, 2K, 4K,
...); at every checkpoint a few single-token decode steps are timed (median). Memory: on
CUDA ``max_memory_allocated`` since the previous checkpoint (peak of the prefill chunks and
the decode steps); on the CPU the cache's tensor bytes and the process RSS.
``full`` runs until it is out of memory or past the model's trained context.
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Dict, List, Optional, Sequence

import torch

from .common import progress
from .engine import ModelBundle, PolicyRunner, free_memory, is_oom, process_rss, sync

__all__ = ["run_stream_bench"]


def run_stream_bench(
    bundle: ModelBundle,
    *,
    policies: Sequence[str],
    policy_args: Dict[str, Any],
    checkpoints: List[int],
    chunk: int,
    decode_steps: int = 8,
    seed: int = 0,
    text_ids: Optional[torch.Tensor] = None,
    full_past_context: bool = False,
) -> Dict[str, Any]:
    dev = bundle.device
    cuda = dev.startswith("cuda")
    n_max = checkpoints[-1]
    vocab = bundle.model.config.vocab_size
    if text_ids is None:
        g = torch.Generator().manual_seed(seed)
        src = torch.randint(0, vocab, (1, n_max), generator=g)
        source = f"random token ids (seed {seed})"
    else:
        reps = -(-n_max // text_ids.shape[1])
        src = text_ids.repeat(1, reps)[:, :n_max]
        source = "text"
    max_ctx = bundle.max_context
    rows: List[Dict[str, Any]] = []
    series: Dict[str, Dict[str, list]] = {}
    for policy in policies:
        runner = PolicyRunner(bundle, policy, policy_args, chunk=chunk)
        free_memory(dev)
        cache = runner.new_cache()
        fed = 0
        last = None
        ser = {"tokens": [], "latency_ms": [], "peak_MiB": [], "cache_MiB": [], "rss_MiB": [], "cache_slots": []}
        bar = progress(n_max, f"stream {policy}")
        for c in checkpoints:
            if policy == "full" and max_ctx and c + decode_steps > max_ctx and not full_past_context:
                if c <= max_ctx and max_ctx - decode_steps > fed:
                    c = max_ctx - decode_steps  # last point inside the trained context
                else:
                    rows.append({"policy": policy, "tokens": c, "status": f"past trained context ({max_ctx})"})
                    break
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            try:
                if c > fed:
                    _, last = runner.feed(cache, src[:, fed:c], progress=bar)
                    fed = c
                times = []
                tok = int(torch.argmax(last))
                for _ in range(decode_steps):
                    sync(dev)
                    t0 = time.perf_counter()
                    logits = runner.decode(cache, tok)
                    tok = int(torch.argmax(logits))  # forces the result (a sync) like real decoding
                    times.append(time.perf_counter() - t0)
                last = logits
            except Exception as e:  # noqa: BLE001
                if not is_oom(e):
                    raise
                rows.append({"policy": policy, "tokens": c, "status": "out of memory"})
                break
            lat = statistics.median(times) * 1e3
            cache_b = runner.cache_bytes(cache)
            peak = torch.cuda.max_memory_allocated() if cuda else None
            rss = process_rss()
            row = {"policy": policy, "tokens": c, "latency_ms": lat, "latency_min_ms": min(times) * 1e3,
                   "cache_slots": runner.cache_len(cache), "cache_MiB": cache_b / 2**20,
                   "peak_MiB": peak / 2**20 if peak is not None else None, "rss_MiB": rss / 2**20, "status": "ok"}
            rows.append(row)
            ser["tokens"].append(c)
            ser["latency_ms"].append(lat)
            ser["peak_MiB"].append(row["peak_MiB"])
            ser["cache_MiB"].append(row["cache_MiB"])
            ser["rss_MiB"].append(row["rss_MiB"])
            ser["cache_slots"].append(row["cache_slots"])
        bar.close()
        del cache, last
        free_memory(dev)
        series[policy] = ser
    return {"rows": rows, "series": series, "checkpoints": checkpoints, "decode_steps": decode_steps,
            "source": source, "max_context": max_ctx}

"""Streaming perplexity on long real text (``inf-mllm eval ppl``).

The text is tokenised once and fed to the model in chunks (chunked prefill), per policy at
the same budget; the NLL of every token given everything the policy kept before it is
recorded. Reported: cumulative perplexity ``exp(mean NLL over tokens 1..c)`` at checkpoints
``c``, perplexity of the last block before each checkpoint, and the running log-perplexity
curve.
"""
from __future__ import annotations

import math
import time
from typing import Any, Dict, List, Optional, Sequence

import torch

from .common import doubling, fmt_tokens, policy_grid, progress, record
from .engine import ModelBundle, PolicyRunner, free_memory, is_oom

__all__ = ["run_ppl", "tokenize_text"]


def tokenize_text(tokenizer, text: str, max_tokens: int) -> torch.Tensor:
    """Token ids ``[1, <=max_tokens]`` of the start of ``text`` (tokenises only what is needed)."""
    n_chars = max(4096, max_tokens * 8)
    while True:
        ids = tokenizer.encode(text[:n_chars], add_special_tokens=False)
        if len(ids) >= max_tokens or n_chars >= len(text):
            break
        n_chars *= 2
    return torch.tensor([ids[:max_tokens]], dtype=torch.long)


def run_ppl(
    bundle: ModelBundle,
    text: str,
    *,
    policies: Sequence[str],
    policy_args: Dict[str, Any],
    max_tokens: int,
    chunk: int,
    checkpoints: Optional[List[int]] = None,
    sweep=None,
    block: int = 1024,
    full_past_context: bool = False,
    curve_points: int = 256,
) -> Dict[str, Any]:
    ids = tokenize_text(bundle.tokenizer, text, max_tokens)
    n = ids.shape[1]
    if checkpoints is None:
        checkpoints = [c for c in doubling(4096, n) if c <= n]
        if not checkpoints or checkpoints[-1] != n:
            checkpoints.append(n)
        # 4K, 16K, 64K, ... plus the end
        checkpoints = [c for c in checkpoints if c == n or (c >= 4096 and (c // 4096) in (1, 4, 16, 64, 256))]
    checkpoints = sorted(set(min(c, n) for c in checkpoints))
    max_ctx = bundle.max_context
    rows: List[Dict[str, Any]] = []
    curves: Dict[str, Dict[str, List[float]]] = {}
    notes: List[str] = []
    for label, policy, args in policy_grid(policies, policy_args, sweep):
        limit = n
        status = "ok"
        if policy == "full" and max_ctx and n > max_ctx and not full_past_context:
            limit = max_ctx
            status = f"stopped at trained context {max_ctx}"
        runner = PolicyRunner(bundle, policy, args, chunk=chunk)
        cache = runner.new_cache()
        t0 = time.perf_counter()
        bar = progress(limit, f"ppl {label}")
        try:
            nll, _ = runner.feed(cache, ids[:, :limit], want_nll=True, progress=bar)
        except Exception as e:  # noqa: BLE001
            if not is_oom(e):
                raise
            bar.close()
            rows.append({"policy": label, "tokens": 0, "status": "out of memory"})
            del cache
            free_memory(bundle.device)
            continue
        bar.close()
        elapsed = time.perf_counter() - t0
        cache_len = runner.cache_len(cache)
        cache_bytes = runner.cache_bytes(cache)
        del cache
        free_memory(bundle.device)
        valid = nll[1:].double()  # token 0 has no prediction
        csum = torch.cumsum(valid, 0)
        counts = torch.arange(1, valid.numel() + 1, dtype=torch.float64)
        running = (csum / counts)  # mean NLL over tokens 1..i+1
        row: Dict[str, Any] = {"policy": label, "tokens": limit, "status": status}
        for c in checkpoints:
            key = f"ppl@{fmt_tokens(c)}"
            if c <= limit and c >= 2:
                row[key] = math.exp(float(running[c - 2]))
                lo = max(1, c - block)
                row[f"block_ppl@{fmt_tokens(c)}"] = math.exp(float(valid[lo - 1: c - 1].mean()))
            else:
                row[key] = None
        row["ppl"] = math.exp(float(running[-1])) if running.numel() else None
        row["tok_per_s"] = limit / elapsed if elapsed > 0 else None
        row["cache_slots"] = cache_len
        row["cache_MiB"] = cache_bytes / 2**20
        row["args"] = runner.effective_args or runner.policy_args
        rows.append(row)
        record("row", row)
        # running log-perplexity curve, subsampled on a log grid
        m = running.numel()
        if m:
            pts = sorted(set(int(round(math.exp(x))) for x in torch.linspace(0, math.log(m), curve_points).tolist()))
            pts = [p for p in pts if 1 <= p <= m]
            curves[label] = {"tokens": [p + 1 for p in pts], "log_ppl": [float(running[p - 1]) for p in pts]}
            blocks = valid[: (m // block) * block].view(-1, block).mean(1) if m >= block else valid.mean()[None]
            curves[label]["block_nll"] = [float(x) for x in blocks]
    if max_ctx and n > max_ctx and "full" in policies and not full_past_context:
        notes.append(f"full stops at the model's trained context ({max_ctx} tokens)")
    return {"rows": rows, "curves": curves, "checkpoints": checkpoints, "tokens": n, "block": block, "notes": notes}

"""Decode step latency, eager vs ``torch.compile`` (fullgraph), inf_mllm vs plain transformers.

    python bench/compile_decode.py [--threads 1] [--prompt 1024] [--steps 32] [--out DIR]

SmolLM2-135M on the CPU; a ``--prompt``-token prompt of Austen, then ``--steps`` greedy decode
steps timed one by one (median and best). Four ways to decode:

* ``transformers``: the model as loaded (SDPA + ``DynamicCache``), eager;
* ``transformers-static-compiled``: ``StaticCache`` with ``torch.compile(fullgraph=True)``
  (inductor), transformers' own recipe for a compiled decode;
* ``inf_mllm``: ``inf_mllm.enable(policy="inf_mllm", budget=--budget)``, eager;
* ``inf_mllm-compiled``: ``inf_mllm.compile_decode`` (the forward under ``torch.compile(fullgraph=True)``,
  inductor; the policy's decisions and evictions eager around it).

The compile time (first calls until the graphs are cached) is reported apart. Every variant
produces the same greedy tokens as ``transformers`` (checked; a mismatch is reported).
"""
import argparse
import os
import statistics
import sys
import time

import torch

import inf_mllm
from inf_mllm._compat import CACHE_KW  # the cache keyword of the installed transformers
from inf_mllm.data import load_corpus
from inf_mllm.results import make_meta, format_table, write_json

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--threads", type=int, default=1)
p.add_argument("--prompt", type=int, default=1024)
p.add_argument("--steps", type=int, default=32)
p.add_argument("--budget", type=int, default=2048, help="inf_mllm budget (default 2048: no eviction)")
p.add_argument("--warmup", type=int, default=6, help="decode steps before timing (compiles happen here)")
p.add_argument("--out", default=None, help="directory for compile_decode.json (default: print only)")
args = p.parse_args()
torch.set_num_threads(args.threads)

model, tok = inf_mllm.load_model("smollm2", dtype=torch.float32)
ids = tok(load_corpus("austen"), return_tensors="pt").input_ids[:, : args.prompt]
P = ids.shape[1]


def decode(step, first_tok):
    """Greedy decode with ``step(tok, pos) -> logits[1, V]``; returns (tokens, per-step seconds)."""
    toks, times, t = [], [], first_tok
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        logits = step(t, torch.tensor([[P + i]]))
        t = logits.argmax(-1).view(1, 1)
        times.append(time.perf_counter() - t0)
        toks.append(int(t))
    return toks, times


@torch.no_grad()
def run(name):
    torch._dynamo.reset()
    if name.startswith("transformers"):
        model.set_attn_implementation("sdpa")
        if name == "transformers":
            from transformers import DynamicCache

            cache = DynamicCache()
        else:
            from transformers import StaticCache

            cache = StaticCache(config=model.config, max_cache_len=P + args.warmup + args.steps + 8)
        t0 = time.perf_counter()
        out = model(ids, **{CACHE_KW: cache}, cache_position=torch.arange(P), use_cache=True)
        prefill = time.perf_counter() - t0

        def step(t, pos):
            return model(t, **{CACHE_KW: cache}, position_ids=pos, cache_position=pos[0], use_cache=True).logits[:, -1]
    else:
        cache = inf_mllm.enable(model, "inf_mllm", budget=args.budget)
        t0 = time.perf_counter()
        out = model(ids, **{CACHE_KW: cache}, use_cache=True)
        prefill = time.perf_counter() - t0

        # compiled: bookkeeping and evictions outside the graph, one graph for every step
        fast = inf_mllm.compile_decode(model, cache) if name.endswith("compiled") else None

        def step(t, pos):
            if fast is not None:
                return fast(t)
            return model(t, **{CACHE_KW: cache}, position_ids=pos, use_cache=True).logits[:, -1]
    first = out.logits[:, -1].argmax(-1).view(1, 1)
    if name.startswith("transformers") and name.endswith("compiled"):
        step = torch.compile(step, fullgraph=True)
    toks, times = decode(step, first)
    timed = times[args.warmup:]
    return dict(impl=name, prefill_s=prefill, warmup_s=sum(times[: args.warmup]),
                decode_ms_median=1e3 * statistics.median(timed), decode_ms_best=1e3 * min(timed)), [int(first)] + toks


names = ["transformers", "transformers-static-compiled", "inf_mllm", "inf_mllm-compiled"]
rows, seqs = [], {}
for name in names:
    print(f"compile_decode: {name} ...", file=sys.stderr, flush=True)
    r, seq = run(name)
    seqs[name] = seq
    rows.append(r)
ref = rows[0]["decode_ms_median"]
for r in rows:
    r["vs_transformers"] = r["decode_ms_median"] / ref
    r["same_tokens"] = seqs[r["impl"]] == seqs["transformers"]
title = (f"SmolLM2-135M, CPU, {args.threads} thread(s): {P}-token prompt, decode step latency over {args.steps} steps "
         f"after {args.warmup} warm-up steps")
table = format_table(rows, ["impl", "prefill_s", "warmup_s", "decode_ms_median", "decode_ms_best", "vs_transformers",
                            "same_tokens"], title=title)
print(table)
if args.out:
    os.makedirs(args.out, exist_ok=True)
    meta = make_meta("bench compile_decode", device="cpu", argv=["python"] + sys.argv)
    print("wrote", write_json(os.path.join(args.out, "compile_decode.json"),
                              {"kind": "compile_decode", "meta": meta, "rows": rows, "table": table}))

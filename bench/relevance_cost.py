"""Prefill and decode cost of inf_mllm's scoring modes against streaming_llm (issue 20's cost bounds).

    PYTHONPATH=$PWD python bench/relevance_cost.py [--threads 1] [--rounds 7] [--out bench/results/cpu]

SmolLM2-135M on the CPU. Two settings, each over budget: the needle preset's (640 tokens of
Austen in chunks of 64, budget 128, ``n_recent`` 32) and a longer stream (2048 tokens in chunks of
256, budget 1024, ``n_recent`` 256). For every round, each variant (in an order reversed every
round, so that all see the same load) streams the text into a fresh cache (prefill, eviction
after every chunk) and then decodes ``--steps`` greedy tokens one at a time; reported per variant:
the best and the median over rounds of the prefill time per token and the decode time per token,
and their ratios to ``streaming_llm`` (best to best: the least disturbed runs of a shared machine).
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from inf_mllm.data import load_corpus  # noqa: E402
from inf_mllm.evals.engine import PolicyRunner, load_bundle, parse_policy_args  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--threads", type=int, default=1)
p.add_argument("--rounds", type=int, default=7)
p.add_argument("--steps", type=int, default=16)
p.add_argument("--variants", default="streaming_llm;inf_mllm;inf_mllm:accumulate=peak",
               help="';'-separated policy[:key=value,...]")
p.add_argument("--settings", default="needle,long")
p.add_argument("--out", default=None)
args = p.parse_args()
torch.set_num_threads(args.threads)

SETTINGS = {"needle": dict(tokens=640, chunk=64, budget=128, n_recent=32),
            "long": dict(tokens=2048, chunk=256, budget=1024, n_recent=256)}
bundle = load_bundle("smollm2", device="cpu")
text = load_corpus("austen")
ids_all = bundle.tokenizer.encode(text[200_000:230_000], add_special_tokens=False)
variants = []
for v in args.variants.split(";"):
    name, _, kv = v.partition(":")
    variants.append((v, name, parse_policy_args([x for x in kv.split(",") if x])))

res = {"command": " ".join(sys.argv), "threads": args.threads, "rounds": args.rounds, "steps": args.steps, "settings": {}}
for sname in args.settings.split(","):
    st = SETTINGS[sname]
    ids = torch.tensor([ids_all[: st["tokens"]]])
    runners = {label: PolicyRunner(bundle, pol, dict(kw, budget=st["budget"], n_recent=st["n_recent"]), chunk=st["chunk"])
               for label, pol, kw in variants}
    times = {label: {"prefill": [], "decode": []} for label in runners}
    for r in range(args.rounds + 1):  # round 0: warm-up, not counted
        order = list(runners) if r % 2 else list(reversed(runners))
        for label in order:
            run = runners[label]
            cache = run.new_cache()
            t0 = time.perf_counter()
            _, logits = run.feed(cache, ids)
            t1 = time.perf_counter()
            tok = int(torch.argmax(logits))
            t2 = time.perf_counter()
            for _ in range(args.steps):
                tok = int(torch.argmax(run.decode(cache, tok)))
            t3 = time.perf_counter()
            if r:
                times[label]["prefill"].append((t1 - t0) / ids.shape[1])
                times[label]["decode"].append((t3 - t2) / args.steps)
            del cache
    base = times["streaming_llm"]
    rows = []
    for label, t in times.items():
        row = {"variant": label}
        for k in ("prefill", "decode"):
            row[f"{k}_ms_best"] = 1e3 * min(t[k])
            row[f"{k}_ms_median"] = 1e3 * statistics.median(t[k])
            row[f"{k}_vs_streaming_llm"] = min(t[k]) / min(base[k])
        rows.append(row)
        print(f"{sname:6s} {label:32s} prefill {row['prefill_ms_best']:.3f} ms/token (x{row['prefill_vs_streaming_llm']:.3f}), "
              f"decode {row['decode_ms_best']:.1f} ms/token (x{row['decode_vs_streaming_llm']:.3f})", flush=True)
    res["settings"][sname] = dict(st, rows=rows, raw=times)

if args.out:
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "relevance_cost.json")
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    print(f"wrote {path}")

"""The share of a reconstruction probe's attention that goes to the chunk it repeats, the sinks
and the older slots (docs/method.md §9.2).

    HF_HUB_OFFLINE=1 PYTHONPATH=$PWD python bench/probe_share.py [--out bench/results/cpu]
"""
import argparse
import json
import os
import statistics

import torch

import inf_mllm
from inf_mllm.data import load_corpus

ap = argparse.ArgumentParser()
ap.add_argument("--out", default=None)
args = ap.parse_args()
torch.set_num_threads(1)
model, tok = inf_mllm.load_model("smollm2", dtype=torch.float32)
ids = tok.encode(load_corpus("austen")[100_000:104_000], add_special_tokens=False)[:640]
cache = inf_mllm.enable(model, "inf_mllm", budget=128, n_recent=32, chunk=64, reconstruct=1.0)
shares = []
hook = cache.policy.probed
def rec(buf, rows, gained, n):
    T = buf.lengths[0]
    g = gained[0, :, :T]
    tot = g.sum(-1)
    new = g[:, T - n:].sum(-1)        # the chunk just fed (its original copy)
    sink = g[:, :cache.policy.n_sink].sum(-1)
    shares.append((T, float((new / tot).mean()), float((sink / tot).mean())))
    hook(buf, rows, gained, n)
cache.policy.probed = rec
inf_mllm.stream(model, torch.tensor([ids]), cache=cache, chunk=64)
L = len(cache.layers)
later = [s for i, s in enumerate(shares) if i // L >= 2]  # chunks after the cache is over budget
res = {"text": "austen[100000:104000], 640 tokens", "budget": 128, "n_recent": 32, "chunk": 64, "chunks": "3-10",
       "share_chunk": statistics.mean(s[1] for s in later), "share_sinks": statistics.mean(s[2] for s in later)}
res["share_older"] = 1 - res["share_chunk"] - res["share_sinks"]
print("probe attention share: the chunk's own tokens %.3f, sinks %.3f, older middle+recent %.3f (mean over layers, "
      "heads, chunks 3-10)" % (res["share_chunk"], res["share_sinks"], res["share_older"]))
if args.out:
    with open(os.path.join(args.out, "probe_share.json"), "w") as f:
        json.dump(res, f, indent=1)

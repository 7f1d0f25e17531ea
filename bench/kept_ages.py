"""How old the tokens a cache holds are, along a long stream: is it drifting onto stale tokens?

    PYTHONPATH=$PWD python bench/kept_ages.py [--tokens 32K] [--budget 1024] [--every 4K]
        [--variant "inf_mllm" --variant "inf_mllm:novelty=0" ...] [--out bench/results/cpu/kept_ages.json]
    python bench/kept_ages.py --merge A.json B.json ... --out OUT.json   # one file and one plot from several runs

Streams Austen (the ``eval ppl`` text) in chunks through each variant (``policy[:k=v,...]``, the
``relevance_cost.py`` syntax) and, every ``--every`` tokens, records over all layers and KV heads
what the slots past the sinks hold: the age of each token (stream position now minus its
position), as quantiles, and the share older than 4K / 16K tokens. ``streaming_llm`` holds ages
``0 .. budget - n_sink - 1``; a cache that keeps tokens from tens of thousands of tokens ago while its
perplexity rises against ``streaming_llm`` points at stale credit. Diagnostic only (no test, no tuning), plotted per variant.
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from inf_mllm.data import load_corpus  # noqa: E402
from inf_mllm.evals.engine import PolicyRunner, load_bundle  # noqa: E402


def _tokens(s: str) -> int:
    s = s.strip().upper()
    return int(float(s[:-1]) * 1024) if s.endswith("K") else int(s)


def _variant(spec: str):
    name, _, rest = spec.partition(":")
    kw = {}
    for item in filter(None, rest.split(",")):
        k, _, v = item.partition("=")
        try:
            kw[k] = float(v) if "." in v or "e" in v else int(v)
        except ValueError:
            kw[k] = v
    return name, kw


p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--tokens", default="32K")
p.add_argument("--budget", type=int, default=1024)
p.add_argument("--n-recent", type=int, default=None, help="default: the policy's")
p.add_argument("--chunk", type=int, default=None, help="default: the policies' (as eval ppl)")
p.add_argument("--every", default="4K")
p.add_argument("--variant", action="append", default=[])
p.add_argument("--threads", type=int, default=1)
p.add_argument("--out", default="bench/results/cpu/kept_ages.json")
p.add_argument("--merge", nargs="+", default=None, help="runs to merge into --out (and plot); nothing is streamed")
args = p.parse_args()


def save(out, path):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
        for spec, v in out["variants"].items():
            x = [r["tokens"] / 1024 for r in v["rows"]]
            ax[0].plot(x, [r["quantiles"][2] for r in v["rows"]], marker="o", label=spec)
            ax[1].plot(x, [r["older_4K"] for r in v["rows"]], marker="o", label=spec)
        ax[0].set(xlabel="tokens streamed (K)", ylabel="median age held (tokens)", yscale="log")
        ax[1].set(xlabel="tokens streamed (K)", ylabel="share held older than 4K")
        ax[0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.splitext(path)[0] + ".png", dpi=110)
    except ImportError:
        pass
    print(f"wrote {path}")


if args.merge:
    runs = [json.load(open(f)) for f in args.merge]
    keys = ("tokens", "budget", "chunk", "every")
    for f, r in zip(args.merge[1:], runs[1:]):
        if any(r[k] != runs[0][k] for k in keys):
            sys.exit(f"kept_ages: {f} differs from {args.merge[0]} in {keys}")
    merged = dict(runs[0], command=[r["command"] for r in runs], variants={})
    for r in runs:
        merged["variants"].update(r["variants"])
    save(merged, args.out)
    sys.exit(0)
torch.set_num_threads(args.threads)
n_tok, every = _tokens(args.tokens), _tokens(args.every)
variants = args.variant or ["streaming_llm", "inf_mllm"]

bundle = load_bundle("smollm2", device="cpu")
ids = bundle.tokenizer.encode(load_corpus("austen"), add_special_tokens=False)[:n_tok]
if len(ids) < n_tok:
    sys.exit(f"kept_ages: the text has {len(ids)} tokens, fewer than --tokens {n_tok}")
QS = (0.1, 0.25, 0.5, 0.75, 0.9)
out = {"command": " ".join(sys.argv), "tokens": n_tok, "budget": args.budget, "chunk": args.chunk, "every": every,
       "quantiles": QS, "variants": {}}
for spec in variants:
    name, kw = _variant(spec)
    kw = dict(budget=args.budget, **kw)
    if args.n_recent is not None:
        kw["n_recent"] = args.n_recent
    runner = PolicyRunner(bundle, name, kw, chunk=args.chunk)
    cache = runner.new_cache()
    pol, step = cache.policy, runner.chunk
    out["chunk"] = step
    rows, t0, nxt = [], time.perf_counter(), every
    for s in range(0, n_tok, step):
        runner.feed(cache, torch.tensor([ids[s:s + step]]))
        now = s + len(ids[s:s + step])
        if now < nxt:
            continue
        nxt += every
        ages = []
        for L in cache.layers:
            T = L.buf.lengths[0]
            ages.append((now - 1 - L.buf.position[0, :, pol.n_sink:T]).reshape(-1).double())
        a = torch.cat(ages)
        rows.append({"tokens": now, "quantiles": [float(x) for x in torch.quantile(a, torch.tensor(QS, dtype=a.dtype))],
                     "older_4K": float((a > 4096).double().mean()), "older_16K": float((a > 16384).double().mean()),
                     "mean": float(a.mean())})
        r = rows[-1]
        print(f"{spec}: {now} tokens, age median {r['quantiles'][2]:.0f}, p90 {r['quantiles'][4]:.0f}, "
              f">4K {r['older_4K']:.3f}, >16K {r['older_16K']:.3f}", flush=True)
    out["variants"][spec] = {"policy": name, "args": kw, "rows": rows, "seconds": time.perf_counter() - t0}

save(out, args.out)

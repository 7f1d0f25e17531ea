"""Drift or text? Windowed perplexity of several ``eval ppl`` runs over the same stream (issue 20, part 5).

    python bench/ppl_drift.py RUN.json [RUN.json ...] [--window 16] [--labels A,B,...] [--out bench/results/cpu/ppl_drift]

Each run's ``block_nll`` (mean NLL per block of ``block`` tokens) is averaged over windows of
``--window`` blocks, over the tokens every run covered. A cache that drifts (keeps worse and worse
tokens as the stream grows) shows a ratio to ``streaming_llm`` (which keeps the recent window, so
it cannot drift) that grows with the tokens; text that gets harder raises every policy's
perplexity together and leaves the ratio flat. Writes ``<out>.json`` and ``<out>.png``.
"""
import argparse
import json
import math
import os

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("runs", nargs="+")
p.add_argument("--window", type=int, default=16, help="blocks per window (default 16)")
p.add_argument("--base", default="streaming_llm", help="the policy the others are divided by")
p.add_argument("--labels", default=None,
               help="comma-separated, one per run: names a one-policy run's curve (e.g. 'inf_mllm h_life 4096'); "
                    "the run's policy names are kept for 'streaming_llm' (the base) and multi-policy runs get it as a suffix")
p.add_argument("--out", default=None)
a = p.parse_args()
labels = a.labels.split(",") if a.labels else [None] * len(a.runs)
if len(labels) != len(a.runs):
    raise SystemExit(f"--labels has {len(labels)} names for {len(a.runs)} runs")

curves, block = {}, None
for path, label in zip(a.runs, labels):
    d = json.load(open(path))
    if block is not None and d["block"] != block:
        raise SystemExit(f"{path}: block {d['block']} != {block}")
    block = d["block"]
    for pol, c in d["curves"].items():
        if label and pol != a.base:
            pol = label if len(d["curves"]) == 1 else f"{pol} [{label}]"
        if pol in curves:  # the same policy label in two runs (e.g. different --policy-arg): name it by its file
            pol = f"{pol} [{os.path.basename(path)}]"
        curves[pol] = c["block_nll"]
if a.base not in curves:
    raise SystemExit(f"no {a.base!r} run among {sorted(curves)}")
n = min(len(v) for v in curves.values())
W = a.window
wins = []
for s in range(0, n - W + 1, W):
    row = {"tokens_end": (s + W) * block}
    for pol, v in curves.items():
        row[pol] = math.exp(sum(v[s:s + W]) / W)
    wins.append(row)
others = [pol for pol in curves if pol != a.base]
print(f"windows of {W * block} tokens over the first {n * block} tokens (block {block})")
print("tokens_end  " + "  ".join(f"{pol:>14s}" for pol in curves) + "  " + "  ".join(f"{pol + '/' + a.base:>24s}" for pol in others))
for r in wins:
    print(f"{r['tokens_end']:10d}  " + "  ".join(f"{r[pol]:14.2f}" for pol in curves) + "  " +
          "  ".join(f"{r[pol] / r[a.base]:24.4f}" for pol in others))


def fit(xs, ys):
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0


summary = {"window_tokens": W * block, "tokens": n * block, "base": a.base, "runs": a.runs, "windows": wins, "ratio": {}}
for pol in others:
    ratio = [r[pol] / r[a.base] for r in wins]
    half = len(ratio) // 2
    slope = fit([r["tokens_end"] / 1e5 for r in wins], ratio)
    summary["ratio"][pol] = {"first_half_mean": sum(ratio[:half]) / half, "second_half_mean": sum(ratio[half:]) / (len(ratio) - half),
                             "slope_per_100K_tokens": slope, "min": min(ratio), "max": max(ratio)}
    print(f"{pol}/{a.base}: mean {summary['ratio'][pol]['first_half_mean']:.4f} (first half) -> "
          f"{summary['ratio'][pol]['second_half_mean']:.4f} (second half), slope {slope:+.4f} per 100K tokens")
if a.out:
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    json.dump(summary, open(a.out + ".json", "w"), indent=1)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, gridspec_kw=dict(height_ratios=[2, 1]))
    x = [r["tokens_end"] / 1e3 for r in wins]
    color = {pol: f"C{i}" for i, pol in enumerate(curves)}  # one colour per run in both panels
    for pol in curves:
        ax.plot(x, [r[pol] for r in wins], label=pol, color=color[pol])
    ax.set_ylabel(f"perplexity per {W * block // 1024}K-token window")
    ax.legend()
    ax.set_title("Same stream, budget 1024: does the cache drift, or does the text get harder?")
    for pol in others:
        bx.plot(x, [r[pol] / r[a.base] for r in wins], label=f"{pol} / {a.base}", color=color[pol])
    bx.axhline(1.0, color="grey", lw=0.5)
    bx.set_ylabel("ratio")
    bx.set_xlabel("tokens streamed (K)")
    bx.legend()
    fig.tight_layout()
    fig.savefig(a.out + ".png", dpi=110)
    print(f"wrote {a.out}.json, {a.out}.png")

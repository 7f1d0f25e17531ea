"""compact_ at the operators issue's target shape: B=1, Hkv=8, C=4352, budget=4096, D=128.

    python bench/compact_target.py [--threads 1] [--out bench/results/cpu]

Times the native ``compact_`` against the sort-and-gather reference (``bench_compact``) in
float32 and bfloat16 and writes ``compact_target.json`` with the usual metadata.
"""
import argparse
import os

import torch

from inf_mllm.benchmarks.compact import bench_compact
from inf_mllm.results import default_out_dir, format_table, make_meta, write_json

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--threads", type=int, default=None)
p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
p.add_argument("--out", default=None)
args = p.parse_args()
if args.threads:
    torch.set_num_threads(args.threads)
rows = []
for dtype in (torch.float32, torch.bfloat16):
    got = bench_compact(args.device, dtype, B=1, Hkv=8, C=4352, budget=4096, D=128, reps=30)
    ref = {r["impl"]: r["time_ms"] for r in got}
    for r in got:
        r["speedup_vs_reference"] = ref["reference"] / r["time_ms"]
    rows += got
cols = ["impl", "dtype", "C", "budget", "time_ms", "gbps", "speedup_vs_reference"]
table = format_table(rows, [c for c in cols if c in rows[0]], title="compact_ at B=1, Hkv=8, C=4352, budget=4096, D=128")
print(table)
out = args.out or default_out_dir(args.device)
os.makedirs(out, exist_ok=True)
meta = make_meta("bench compact_target", device=args.device, argv=["python", "bench/compact_target.py"] + [
    a for a in (f"--threads {args.threads}" if args.threads else "").split() if a])
print("wrote", write_json(os.path.join(out, "compact_target.json"), {"kind": "compact_target", "meta": meta, "rows": rows, "table": table}))

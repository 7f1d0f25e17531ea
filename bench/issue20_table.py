"""Issue 20's report table from the committed runs (JSONs and the partial JSONL of runs stopped early).

    python bench/issue20_table.py [bench/results/cpu]

Per kind (passkey, fact), policy and budget: correct / cases, and ``vs full`` = correct / full's
correct over the same cases (``full`` from the same seeds, 2000-2007). Every case is read from the
files; a run stopped before its 48 cases shows how many it finished.
"""
import glob
import json
import os
import sys

root = sys.argv[1] if len(sys.argv) > 1 else "bench/results/cpu"
recs = {}
for path in sorted(glob.glob(os.path.join(root, "eval_needle_issue20_*"))):
    if path.endswith(".json"):
        cases = json.load(open(path))["cases"]
    elif path.endswith(".partial.jsonl"):
        cases = [r for r in map(json.loads, open(path)) if r.get("record") == "case"]
    else:
        continue
    for c in cases:
        key = (c["kind"], c["policy"], c["budget"], c["seed"], c["depth"])
        recs[key] = c["correct"]  # the same case in two files is the same computation

kinds = sorted({k[0] for k in recs}, key=lambda k: k != "passkey")
for kind in kinds:
    full = {(s, d): ok for (k, p, b, s, d), ok in recs.items() if k == kind and p == "full"}
    print(f"\n{kind}: full {sum(full.values())}/{len(full)}")
    print("| policy | budget | correct | vs full |")
    print("| --- | --- | --- | --- |")
    runs = sorted({(p, b) for (k, p, b, s, d) in recs if k == kind and p != "full"}, key=lambda r: (-r[1], r[0]))
    for p, b in runs:
        mine = {(s, d): ok for (k, pp, bb, s, d), ok in recs.items() if k == kind and pp == p and bb == b}
        both = [sd for sd in mine if sd in full]
        f = sum(full[sd] for sd in both)
        vs = f"{sum(mine[sd] for sd in both) / f:.2f}" if f else "-"
        print(f"| {p} | {b} | {sum(mine.values())}/{len(mine)} | {vs} (full {f}/{len(both)} on these) |")

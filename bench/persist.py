"""Save and load speed of a Session (``Session.save`` / ``Session.load``, :mod:`inf_mllm.persist`).

    python bench/persist.py [--threads 1] [--tokens 4096] [--budgets 1024,4096] [--repeats 5] [--dir DIR] [--out DIR]

SmolLM2-135M on the CPU: ``--tokens`` tokens of Austen streamed into a Session per budget, then
the session is saved ``--repeats`` times to ``--dir`` (default: a new temporary directory) and
loaded as many times; median and best seconds, file MiB and MiB/s. A save includes the model
fingerprint, the SHA-256 of every tensor, the write, the fsyncs and the rename; a load the read,
the checks and the rebuilt buffers. Each row also checks that the next logits after a load equal
the saved session's bit for bit (``same_next_logits``).
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

import inf_mllm
from inf_mllm.data import load_corpus
from inf_mllm.results import format_table, make_meta, write_json

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--threads", type=int, default=1)
p.add_argument("--tokens", type=int, default=4096)
p.add_argument("--budgets", default="1024,4096")
p.add_argument("--repeats", type=int, default=5)
p.add_argument("--dir", default=None, help="where the files are written (default: a new temporary directory)")
p.add_argument("--out", default=None, help="directory for persist.json (default: print only)")
args = p.parse_args()
torch.set_num_threads(args.threads)

model, tok = inf_mllm.load_model("smollm2", dtype=torch.float32)
ids = tok(load_corpus("austen")[: 8 * args.tokens], return_tensors="pt").input_ids[:, : args.tokens]
work = args.dir or tempfile.mkdtemp(prefix="inf_mllm_persist_")
probe = tok(" and then", return_tensors="pt").input_ids
rows = []
for budget in [int(b) for b in args.budgets.split(",")]:
    print(f"persist: budget {budget}: streaming {ids.shape[1]} tokens ...", file=sys.stderr, flush=True)
    s = inf_mllm.Session(model, tok, policy="inf_mllm", budget=budget, progress=False)
    s.append(ids)
    path = os.path.join(work, f"session_{budget}.safetensors")
    saves, loads = [], []
    for _ in range(args.repeats):
        info = s.save(path)
        saves.append(info["seconds"])
    size = os.path.getsize(path)
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        t = inf_mllm.Session.load(path, model, tok)
        loads.append(time.perf_counter() - t0)
    same = torch.equal(inf_mllm.stream(model, probe, cache=t.cache), inf_mllm.stream(model, probe, cache=s.cache))
    mib = size / 2**20
    rows.append(dict(budget=budget, tokens=ids.shape[1], slots=s.stats()["slots_used"], file_MiB=mib,
                     cache_MiB=s.stats()["cache_bytes"] / 2**20, save_s_median=statistics.median(saves),
                     save_s_best=min(saves), save_MiB_per_s=mib / statistics.median(saves),
                     load_s_median=statistics.median(loads), load_s_best=min(loads),
                     load_MiB_per_s=mib / statistics.median(loads), same_next_logits=same))
    os.unlink(path)
title = (f"Session.save / Session.load, SmolLM2-135M fp32, CPU, {args.threads} thread(s), policy inf_mllm, "
         f"{args.repeats} repeats (median), files in {work}")
table = format_table(rows, ["budget", "tokens", "slots", "file_MiB", "cache_MiB", "save_s_median", "save_MiB_per_s",
                            "load_s_median", "load_MiB_per_s", "same_next_logits"], title=title)
print(table)
if args.out:
    os.makedirs(args.out, exist_ok=True)
    meta = make_meta("bench persist", device="cpu", argv=["python"] + sys.argv,
                     notes=["file_MiB: the saved file (slots up to each row's length, metadata, header); cache_MiB: "
                            "the buffers in memory at their full capacity",
                            f"files written to {work} (the filesystem there sets the fsync cost)"])
    print("wrote", write_json(os.path.join(args.out, "persist.json"),
                              {"kind": "persist", "meta": meta, "rows": rows, "table": table}))

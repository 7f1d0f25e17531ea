"""Where a pass key is lost: per layer and KV head, when the needle's slots are evicted and by what.

    PYTHONPATH=$PWD python bench/needle_trace.py [--seeds 1000,1001] [--depths 10,42,74] [--budget 128]
        [--policy-arg novelty=2.0 ...] [--out bench/results/cpu/tune/needle_trace.json]

Streams the ``passkey-prose`` cases (``inf-mllm eval needle --preset passkey-prose``: ~640 tokens of
Austen, chunks of 64, ``n_recent=32``) through ``inf_mllm`` (its defaults unless ``--policy-arg``)
and records, at every eviction of every layer, for every KV head:

* which of the needle's tokens (the whole needle sentence, and the key digits apart) are kept or
  evicted, and the eviction (chunk) at which each is first lost;
* for an evicted needle token: its rank value, its raw score, the z-scores of score and key
  novelty that make the rank (``rank = pool(z(score) + novelty * z(nov))``), the z-scores of two
  signals the rank does not use (the value norm, VATP's factor, and minus the key norm, K-norm's), the cut (the lowest
  rank kept in the middle) and what outranked it: how many of the kept middle slots came from
  before / after the needle, and their mean raw score, z(score) and z(nov) (under
  ``accumulate="mean"``, the default, the rank standardises the score over its age factor, while
  the recorded ``z(score)`` is of the raw score; the rank values and places are the policy's own);

then asks the question and records the answer. Only tune seeds belong here (docs/method.md §9).
The recorder wraps ``KVBuffers.compact`` (the only way tokens leave); nothing else changes.
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from inf_mllm.buffers import KVBuffers  # noqa: E402
from inf_mllm.data import load_corpus  # noqa: E402
from inf_mllm.evals.engine import PolicyRunner, load_bundle, parse_policy_args  # noqa: E402
from inf_mllm.evals.needle import PRESETS, _ask, judge, parse_depths, plan_cases  # noqa: E402
from inf_mllm.policies.inf_mllm import _standardise, key_novelty  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--seeds", default="1000,1001")
p.add_argument("--depths", default="10,42,74")
p.add_argument("--budget", type=int, default=128)
p.add_argument("--kind", default="passkey", choices=["passkey", "fact"])
p.add_argument("--policy", default="inf_mllm")
p.add_argument("--policy-arg", action="append", default=[])
p.add_argument("--threads", type=int, default=1)
p.add_argument("--out", default="bench/results/cpu/tune/needle_trace.json")
args = p.parse_args()
torch.set_num_threads(args.threads)
seeds = [int(s) for s in args.seeds.split(",")]
if any(2000 <= s < 3000 for s in seeds):
    sys.exit("needle_trace: report seeds (2000+) are not for diagnosis; use tune seeds (1000+)")

preset = PRESETS["passkey-prose"]
bundle = load_bundle("smollm2", device="cpu")
tok = bundle.tokenizer
text = load_corpus("austen")
cases = plan_cases(tok, text, lengths=[int(preset["lengths"])], depths=parse_depths(args.depths), seeds=seeds,
                   kinds=[args.kind], needles=1, max_new_tokens=16)
pol_args = dict(budget=args.budget, n_recent=preset["n_recent"], **parse_policy_args(args.policy_arg))
chunk = preset["chunk"]

EVENTS = []  # filled by the recorder for the current case
CTX = {}


def _recorder(orig):
    def compact(self, rows, budget, n_sink, n_recent, *, rank=None, keep_scores=False):
        rows_over = [b for b in rows if self.lengths[b] > budget]
        if not rows_over or "needle" not in CTX:
            return orig(self, rows, budget, n_sink, n_recent, rank=rank, keep_scores=keep_scores)
        b = 0
        T = self.lengths[b]
        pos = self.position[b, :, :T].clone()  # [H, T] original stream positions
        sc = self.scores[b, :, :T].clone()
        rk = (self.scores if rank is None else rank)[b, :, :T].clone()
        lo, hi = n_sink, T - n_recent
        zs = _standardise(sc, lo, hi)
        zn = _standardise(key_novelty(self.k[b, :, :T]), lo, hi)
        zv = _standardise(self.v[b, :, :T].float().norm(dim=-1), lo, hi)  # value norm (VATP's factor)
        zk = _standardise(-self.k[b, :, :T].float().norm(dim=-1), lo, hi)  # minus key norm (K-norm press)
        orig(self, rows, budget, n_sink, n_recent, rank=rank, keep_scores=keep_scores)
        kept_pos = self.position[b, :, :budget].clone()
        layer = self.owner.layer_idx
        needle, digits = CTX["needle"], CTX["digits"]
        for h in range(pos.shape[0]):
            kept = set(kept_pos[h].tolist())
            here = {int(x): j for j, x in enumerate(pos[h].tolist())}
            nd_here = [t for t in needle if t in here]
            if not nd_here:
                continue
            lost = [t for t in nd_here if t not in kept]
            mid_kept = [j for j in range(lo, hi) if int(pos[h, j]) in kept]
            cut = min(float(rk[h, j]) for j in mid_kept) if mid_kept else None
            ev = {"layer": layer, "head": h, "chunk": CTX["chunk"], "T": T, "held": len(nd_here), "lost": len(lost),
                  "digits_held": sum(t in here for t in digits), "digits_lost": sum(t in here and t not in kept for t in digits)}
            if lost:
                js = [here[t] for t in lost]
                ev["lost_rank"] = statistics.mean(float(rk[h, j]) for j in js)
                ev["lost_score"] = statistics.mean(float(sc[h, j]) for j in js)
                ev["lost_zs"] = statistics.mean(float(zs[h, j]) for j in js)
                ev["lost_zn"] = statistics.mean(float(zn[h, j]) for j in js)
                ev["lost_zv"] = statistics.mean(float(zv[h, j]) for j in js)
                ev["lost_zk"] = statistics.mean(float(zk[h, j]) for j in js)
                ev["cut"] = cut
                n0 = needle[0]
                before = [j for j in mid_kept if int(pos[h, j]) < n0]
                after = [j for j in mid_kept if int(pos[h, j]) > needle[-1]]
                ev["outranked_by"] = {"before_needle": len(before), "after_needle": len(after),
                                      "needle_itself": len(mid_kept) - len(before) - len(after)}
                for name, js2 in (("before", before), ("after", after)):
                    if js2:
                        ev[f"kept_{name}_score"] = statistics.mean(float(sc[h, j]) for j in js2)
                        ev[f"kept_{name}_zs"] = statistics.mean(float(zs[h, j]) for j in js2)
                        ev[f"kept_{name}_zn"] = statistics.mean(float(zn[h, j]) for j in js2)
                        ev[f"kept_{name}_zv"] = statistics.mean(float(zv[h, j]) for j in js2)
                        ev[f"kept_{name}_zk"] = statistics.mean(float(zk[h, j]) for j in js2)
                # position-in-rank of the needle's best token among the middle candidates
                mids = sorted((float(rk[h, j]) for j in range(lo, hi)), reverse=True)
                best = max(float(rk[h, j]) for j in js)
                ev["lost_best_rank_place"] = sum(m > best for m in mids)
                ev["n_mid_kept"] = len(mid_kept)
                ev["n_candidates"] = hi - lo
            EVENTS.append(ev)
    return compact


KVBuffers.compact = _recorder(KVBuffers.compact)

out_cases = []
t0 = time.perf_counter()
for c in cases:
    nd = c["needles"][0]
    start = c["positions"][0]
    needle_ids = tok.encode(" " + nd["needle"], add_special_tokens=False)
    if start == 0:
        needle_ids = tok.encode(nd["needle"] + "\n\n", add_special_tokens=False)
    needle = list(range(start, start + len(needle_ids)))
    assert c["ids"][start:start + len(needle_ids)] == needle_ids
    digits = [start + i for i, t in enumerate(needle_ids) if tok.decode([t]).strip().isdigit()]
    CTX.clear()
    CTX.update(needle=needle, digits=digits)
    EVENTS.clear()
    runner = PolicyRunner(bundle, args.policy, pol_args, chunk=chunk)
    cache = runner.new_cache()
    ids = c["ids"]
    for ci, s in enumerate(range(0, len(ids), chunk)):
        CTX["chunk"] = ci
        runner.feed(cache, torch.tensor([ids[s:s + chunk]]))
    CTX.pop("needle")
    layers = cache.layers
    # what each layer/head holds of the needle at the end of the stream
    end = []
    for L in layers:
        pos = L.buf.position[0, :, :L.buf.lengths[0]]
        end.append([{"needle": sum(int((pos[h] == t).any()) for t in needle),
                     "digits": sum(int((pos[h] == t).any()) for t in digits)} for h in range(pos.shape[0])])
    stop = [tok.eos_token_id] if tok.eos_token_id is not None else []
    gen, _ = _ask(runner, cache, tok, c["question_ids"][0], 16, stop, nd)
    ok = judge(gen, nd["answer"])[0]
    out_cases.append({"seed": c["seed"], "depth": c["depth"], "needle_start": start, "needle_len": len(needle),
                      "digits": len(digits), "tokens": len(ids), "answer": nd["answer"], "generated": gen, "correct": ok,
                      "end": end, "events": list(EVENTS)})
    held = [sum(h["digits"] == len(digits) for h in layer) for layer in end]
    print(f"seed {c['seed']} depth {c['depth']:.2f}: correct={ok} gen={gen!r}; heads holding all key digits "
          f"per layer: {held}", flush=True)

res = {"command": " ".join(sys.argv), "policy": args.policy, "policy_args": pol_args, "chunk": chunk,
       "seeds": seeds, "depths": args.depths, "kind": args.kind, "seconds": time.perf_counter() - t0, "cases": out_cases}
os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
with open(args.out, "w") as f:
    json.dump(res, f, indent=1)
print(f"wrote {args.out}")

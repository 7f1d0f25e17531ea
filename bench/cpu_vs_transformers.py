"""The CPU issue's targets: inf_mllm against plain transformers, and scoring against no scoring.

    python bench/cpu_vs_transformers.py [--threads 1] [--rounds 3] [--out DIR]

SmolLM2-135M on the CPU, one thread, a ``--prompt``-token prompt of Austen then ``--new`` greedy
tokens through ``model.generate``, interleaved rounds (best of ``--rounds`` per variant):

* under budget (no eviction): ``transformers`` (the model as loaded: SDPA + ``DynamicCache``)
  against ``inf_mllm.enable(model, policy="inf_mllm", budget=4096)``: prefill time, decode time
  per token, total (targets: <= 1.10x, <= 1.05x, <= 1.10x);
* over budget (budget 1024 after a 2048-token prompt): decode time per token of ``inf_mllm``
  against ``streaming_llm`` at the same budget (target <= 1.05x: scoring nearly free).

Prefill and decode are timed apart: prefill = one forward over the prompt (``stream`` in chunks
of the default chunk for the caches), decode = ``--new`` steps of ``model(tok, cache=...)``.
"""
import argparse
import os
import sys
import time

import torch

import inf_mllm
from inf_mllm._compat import CACHE_KW
from inf_mllm.data import load_corpus
from inf_mllm.results import format_table, make_meta, write_json

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--threads", type=int, default=1)
p.add_argument("--prompt", type=int, default=1024)
p.add_argument("--over-prompt", type=int, default=2048)
p.add_argument("--new", type=int, default=32)
p.add_argument("--rounds", type=int, default=3)
p.add_argument("--out", default=None)
args = p.parse_args()
torch.set_num_threads(args.threads)
model, tok = inf_mllm.load_model("smollm2")
text_ids = tok(load_corpus("austen")[:400_000], return_tensors="pt").input_ids


@torch.no_grad()
def run(variant, prompt_len):
    ids = text_ids[:, :prompt_len]
    if variant == "transformers":
        from transformers import DynamicCache

        model.set_attn_implementation("sdpa")
        cache = DynamicCache()
        t0 = time.perf_counter()
        out = model(ids, **{CACHE_KW: cache}, use_cache=True, logits_to_keep=1)
        prefill = time.perf_counter() - t0
    else:
        policy, budget = variant.split("@")
        cache = inf_mllm.enable(model, policy, budget=int(budget))
        t0 = time.perf_counter()
        logits = inf_mllm.stream(model, ids, cache=cache)
        prefill = time.perf_counter() - t0

        class _O:
            pass

        out = _O()
        out.logits = logits[:, None]
    t = out.logits[:, -1:].argmax(-1)
    t0 = time.perf_counter()
    for _ in range(args.new):
        t = model(t, **{CACHE_KW: cache}, use_cache=True).logits[:, -1:].argmax(-1)
    decode = (time.perf_counter() - t0) / args.new
    return prefill, decode


def measure(variants, prompt_len):
    best = {v: [float("inf"), float("inf")] for v in variants}
    for r in range(args.rounds):
        for v in (variants if r % 2 == 0 else variants[::-1]):  # interleaved, alternating order
            pf, dc = run(v, prompt_len)
            best[v][0] = min(best[v][0], pf)
            best[v][1] = min(best[v][1], dc)
            print(f"round {r}: {v:22s} prefill {pf:.3f} s  decode {1e3 * dc:.1f} ms/token", file=sys.stderr, flush=True)
    return best


rows = []
under = measure(["transformers", "inf_mllm@4096"], args.prompt)
t_pf, t_dc = under["transformers"]
o_pf, o_dc = under["inf_mllm@4096"]
rows.append(dict(case=f"under budget: {args.prompt}-token prompt + {args.new} tokens", metric="prefill (s)",
                 transformers=t_pf, inf_mllm=o_pf, ratio=o_pf / t_pf, target="<= 1.10"))
rows.append(dict(case="", metric="decode (ms/token)", transformers=1e3 * t_dc, inf_mllm=1e3 * o_dc, ratio=o_dc / t_dc,
                 target="<= 1.05"))
tt, to = t_pf + args.new * t_dc, o_pf + args.new * o_dc
rows.append(dict(case="", metric="total (s)", transformers=tt, inf_mllm=to, ratio=to / tt, target="<= 1.10"))
over = measure(["streaming_llm@1024", "inf_mllm@1024"], args.over_prompt)
s_dc, i_dc = over["streaming_llm@1024"][1], over["inf_mllm@1024"][1]
rows.append(dict(case=f"over budget: budget 1024 after {args.over_prompt} tokens", metric="decode (ms/token)",
                 transformers=None, streaming_llm=1e3 * s_dc, inf_mllm=1e3 * i_dc, ratio=i_dc / s_dc,
                 target="<= 1.05 (vs streaming_llm)"))
title = (f"SmolLM2-135M, CPU, {args.threads} thread(s), best of {args.rounds} interleaved rounds "
         f"(inf_mllm defaults: {inf_mllm.policies.get_policy_class('inf_mllm').defaults})")
table = format_table(rows, ["case", "metric", "transformers", "streaming_llm", "inf_mllm", "ratio", "target"], title=title)
print(table)
if args.out:
    os.makedirs(args.out, exist_ok=True)
    meta = make_meta("bench cpu_vs_transformers", device="cpu", argv=["python"] + sys.argv)
    print("wrote", write_json(os.path.join(args.out, "cpu_vs_transformers.json"),
                              {"kind": "cpu_vs_transformers", "meta": meta, "rows": rows, "table": table}))

"""Where a decode step's time goes, per layer: transformers (SDPA + DynamicCache) against inf_mllm.

    python bench/decode_breakdown.py [--threads 1] [--prompt 1024] [--steps 16] [--rounds 5]

SmolLM2-135M, one prefill of ``--prompt`` tokens of Austen for each variant, then rounds of
``--steps`` decode steps, alternating transformers / inf_mllm (budget 4096: no eviction). The
functions below are wrapped with wall-clock timers (about 1 us each, nested ones counted in
their callers too); reported: the best round's step time and, per layer call, the time inside
each function (best round). Meant to show what a decode step pays besides attention, not as a
precise figure.

transformers: ``DynamicLayer.update`` (the cache's ``cat``), the ``"sdpa"`` attention function.
inf_mllm: ``StreamingLayer.update`` (holds the new k/v), the ``"inf_mllm"`` attention function,
``StreamingLayer.attend``, ``Rope.undo`` (undo the model's RoPE on q and the new k),
``StreamingLayer._feed`` (writes, scoring, eviction check), ``KVBuffers.append``,
``ops.attention_with_scores`` (public op: checks + dispatch) and
``torch.ops.inf_mllm.attention_decode`` (the fused kernel).
"""
import argparse
import functools
import time

import torch

import inf_mllm
import inf_mllm.attention  # noqa: F401  (registers the "inf_mllm" attention)
import inf_mllm.buffers as buffers
import inf_mllm.cache as cache_mod
from inf_mllm._compat import CACHE_KW, set_attn_implementation
from inf_mllm.cache import ATTN_IMPL
from inf_mllm.data import load_corpus

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--threads", type=int, default=1)
p.add_argument("--prompt", type=int, default=1024)
p.add_argument("--steps", type=int, default=16)
p.add_argument("--rounds", type=int, default=5)
args = p.parse_args()
torch.set_num_threads(args.threads)

from transformers import DynamicCache  # noqa: E402
from transformers.cache_utils import DynamicLayer  # noqa: E402
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS  # noqa: E402

model, tok = inf_mllm.load_model("smollm2")
ids = tok(load_corpus("austen")[:200_000], return_tensors="pt").input_ids[:, : args.prompt]
n_layers = model.config.num_hidden_layers
acc = {}


def timed(key, f):
    @functools.wraps(f)
    def g(*a, **k):
        t0 = time.perf_counter()
        try:
            return f(*a, **k)
        finally:
            acc[key] = acc.get(key, 0.0) + time.perf_counter() - t0

    return g


def wrap(obj, name, key):
    setattr(obj, name, timed(key, getattr(obj, name)))


with torch.no_grad():
    set_attn_implementation(model, "sdpa")
    dc = DynamicCache()
    tok_tr = model(ids, **{CACHE_KW: dc}, use_cache=True, logits_to_keep=1).logits[:, -1:].argmax(-1)
    set_attn_implementation(model, ATTN_IMPL)
    sc = inf_mllm.enable(model, "inf_mllm", budget=4096)
    tok_im = inf_mllm.stream(model, ids, cache=sc)[:, None].argmax(-1)

    wrap(DynamicLayer, "update", "tr: DynamicLayer.update")
    ALL_ATTENTION_FUNCTIONS["sdpa"] = timed("tr: sdpa attention function", ALL_ATTENTION_FUNCTIONS["sdpa"])
    wrap(cache_mod.StreamingLayer, "update", "im: StreamingLayer.update")
    ALL_ATTENTION_FUNCTIONS[ATTN_IMPL] = timed("im: inf_mllm attention function", ALL_ATTENTION_FUNCTIONS[ATTN_IMPL])
    wrap(cache_mod.StreamingLayer, "attend", "im:   attend")
    wrap(cache_mod.Rope, "undo", "im:     Rope.undo (q, k)")
    wrap(cache_mod.StreamingLayer, "_feed", "im:     _feed")
    wrap(buffers.KVBuffers, "append", "im:       KVBuffers.append")
    wrap(cache_mod.ops, "attention_with_scores", "im:       ops.attention_with_scores")
    wrap(torch.ops.inf_mllm, "attention_decode", "im:         attention_decode kernel")

    def run(variant, steps):
        global tok_tr, tok_im
        t0 = time.perf_counter()
        if variant == "transformers":
            set_attn_implementation(model, "sdpa")
            t = tok_tr
            for _ in range(steps):
                t = model(t, **{CACHE_KW: dc}, use_cache=True).logits[:, -1:].argmax(-1)
            tok_tr = t
        else:
            set_attn_implementation(model, ATTN_IMPL)
            t = tok_im
            for _ in range(steps):
                t = model(t, **{CACHE_KW: sc}, use_cache=True).logits[:, -1:].argmax(-1)
            tok_im = t
        return (time.perf_counter() - t0) / steps

    run("transformers", 2)
    run("inf_mllm", 2)
    best = {}
    for r in range(args.rounds):
        for variant in (("transformers", "inf_mllm") if r % 2 == 0 else ("inf_mllm", "transformers")):
            acc.clear()
            step = run(variant, args.steps)
            if variant not in best or step < best[variant][0]:
                best[variant] = (step, dict(acc))

print(f"SmolLM2-135M, CPU, {args.threads} thread(s), {args.prompt}-token prompt, best of {args.rounds} rounds of "
      f"{args.steps} decode steps (timers included), native ISA {torch.ops.inf_mllm.cpu_isa()}")
for variant, (step, parts) in best.items():
    print(f"## {variant}: {1e3 * step:.2f} ms/step")
    for key, t in parts.items():
        print(f"  {key:42s} {1e6 * t / args.steps / n_layers:7.1f} us/layer  {1e3 * t / args.steps:6.2f} ms/step")

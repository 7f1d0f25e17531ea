"""Decode cost per token, interleaved step blocks: transformers against inf_mllm in one process.

    python bench/decode_interleaved.py [--threads 1] [--prompt 1024] [--blocks 16] [--steps 4]
                                       [--variants transformers,inf_mllm,inf_mllm-torchpath]

``bench/cpu_vs_transformers.py`` times each variant's 32 decode steps in one go, best of a few
rounds; on a shared machine the load moves between rounds by more than the difference being
measured. Here every variant keeps its cache from one prefill of the same ``--prompt`` tokens of
Austen, and the decode steps alternate in blocks of ``--steps`` tokens (the order reversed every
block), so the variants see the same load and the same cache lengths. Reported per variant: the
median and the minimum over blocks of the time per token, and their ratios to the first variant.

Variants: ``transformers`` (the model as loaded: SDPA + ``DynamicCache``); ``inf_mllm``
(``inf_mllm.enable(model, "inf_mllm", budget=4096)``: no eviction); ``inf_mllm-torchpath``
(the same with the native decode kernel switched off: the PyTorch path of
``inf_mllm/_torch_path.py``); ``streaming_llm`` (budget 4096).
"""
import argparse
import statistics
import sys
import time

import torch

import inf_mllm
import inf_mllm._torch_path as tp
import inf_mllm.attention  # noqa: F401  (registers the "inf_mllm" attention)
from inf_mllm._compat import CACHE_KW, set_attn_implementation
from inf_mllm.cache import ATTN_IMPL
from inf_mllm.data import load_corpus

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--threads", type=int, default=1)
p.add_argument("--prompt", type=int, default=1024)
p.add_argument("--blocks", type=int, default=16)
p.add_argument("--steps", type=int, default=4)
p.add_argument("--budget", type=int, default=4096)
p.add_argument("--variants", default="transformers,inf_mllm,inf_mllm-torchpath")
args = p.parse_args()
torch.set_num_threads(args.threads)
model, tok = inf_mllm.load_model("smollm2")
ids = tok(load_corpus("austen")[:200_000], return_tensors="pt").input_ids[:, : args.prompt]
variants = args.variants.split(",")


class Variant:
    def __init__(self, name):
        self.name, self.times = name, []
        self.native = not name.endswith("-torchpath")
        policy = name.replace("-torchpath", "")
        with torch.no_grad(), self.mode():
            if policy == "transformers":
                from transformers import DynamicCache

                self.cache = DynamicCache()
                out = model(ids, **{CACHE_KW: self.cache}, use_cache=True, logits_to_keep=1).logits
            else:
                self.cache = inf_mllm.enable(model, policy, budget=args.budget)
                out = inf_mllm.stream(model, ids, cache=self.cache)[:, None]
        self.tok = out[:, -1:].argmax(-1)

    def mode(self):
        v = self

        class _Mode:
            def __enter__(self):
                set_attn_implementation(model, "sdpa" if v.name == "transformers" else ATTN_IMPL)
                tp._NATIVE_DECODE = None if v.native else False

            def __exit__(self, *exc):
                tp._NATIVE_DECODE = None

        return _Mode()

    @torch.no_grad()
    def block(self, steps):
        with self.mode():
            t = self.tok
            t0 = time.perf_counter()
            for _ in range(steps):
                t = model(t, **{CACHE_KW: self.cache}, use_cache=True).logits[:, -1:].argmax(-1)
            self.times.append((time.perf_counter() - t0) / steps)
            self.tok = t


runs = [Variant(v) for v in variants]
for r in runs:  # warm-up block, not recorded
    r.block(1)
    r.times.clear()
for b in range(args.blocks):
    for r in (runs if b % 2 == 0 else runs[::-1]):
        r.block(args.steps)
ref_med = statistics.median(runs[0].times)
ref_min = min(runs[0].times)
print(f"SmolLM2-135M, CPU, {args.threads} thread(s), {args.prompt}-token prompt, {args.blocks} interleaved blocks of "
      f"{args.steps} decode steps; native ISA {torch.ops.inf_mllm.cpu_isa()}")
print(f"| variant | median ms/token | min ms/token | median / {runs[0].name} | min / {runs[0].name} |")
print("|---|---|---|---|---|")
for r in runs:
    med, mn = statistics.median(r.times), min(r.times)
    print(f"| {r.name} | {1e3 * med:.2f} | {1e3 * mn:.2f} | {med / ref_med:.3f} | {mn / ref_min:.3f} |")
# paired per block: the ratio of each block to the first variant's block of the same round
for r in runs[1:]:
    ratios = sorted(a / b for a, b in zip(r.times, runs[0].times))
    print(f"{r.name} / {runs[0].name} per block: median {statistics.median(ratios):.3f}, "
          f"quartiles {ratios[len(ratios) // 4]:.3f}-{ratios[3 * len(ratios) // 4]:.3f}", file=sys.stderr)

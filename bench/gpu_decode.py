"""GPU: decode latency and memory vs tokens streamed, and a decode step in a CUDA graph.

    python bench/gpu_decode.py [--out DIR] [--max-tokens 1M] [--deadline 240]

The model is Qwen2.5-Coder-1.5B's architecture (28 layers, 12 query / 2 KV heads of 128,
hidden 1536, MLP 8960) with RANDOM weights in bfloat16: its weights (about 1 GB) cannot travel
to the GPU machine, and latency and memory do not depend on the weights' values. Random token
ids are streamed in chunks of ``--chunk``; at each checkpoint (4K, 16K, 64K, ... doubling by 4)
``--steps`` decode steps are timed with CUDA events (median), per policy:

* ``transformers``: the model's own SDPA attention + ``DynamicCache`` (grows), up to 64K;
* ``full`` (ours, grows, up to 64K), ``inf_mllm``, ``streaming_llm``, ``h2o`` (budget 2048).

Then, at 4K tokens: one decode step of ``inf_mllm`` compiled with
``torch.compile(mode="reduce-overhead", fullgraph=True)`` (CUDA-graph replay) against the eager
step and against transformers' ``StaticCache`` compiled the same way. Stops cleanly at
``--deadline`` seconds and writes what it has (``gpu_decode.json``).
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

import inf_mllm
from inf_mllm._compat import CACHE_KW  # the cache keyword of the installed transformers

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--out", default=os.environ.get("OUT", "."))
p.add_argument("--max-tokens", default="1M")
p.add_argument("--chunk", type=int, default=1024)
p.add_argument("--budget", type=int, default=2048)
p.add_argument("--steps", type=int, default=16)
p.add_argument("--deadline", type=float, default=240.0)
p.add_argument("--policies", default="transformers,full,inf_mllm,streaming_llm,h2o")
p.add_argument("--skip-graph", action="store_true")
p.add_argument("--device", default="cuda")
p.add_argument("--tiny", action="store_true", help="a 2-layer model (dry run of this script on a CPU)")
args = p.parse_args()
T0 = time.time()
MAXT = int(args.max_tokens.upper().rstrip("MK")) * {"M": 1 << 20, "K": 1 << 10}.get(args.max_tokens.upper()[-1], 1)
dev = torch.device(args.device)
rows, graph_rows = [], []


def left():
    return args.deadline - (time.time() - T0)


def save():
    os.makedirs(args.out, exist_ok=True)
    info = dict(device=torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu", torch=torch.__version__, argv=sys.argv,
                model="Qwen2.5-Coder-1.5B architecture, random weights, bfloat16", elapsed_s=time.time() - T0)
    with open(os.path.join(args.out, "gpu_decode.json"), "w") as f:
        json.dump(dict(kind="gpu_decode", meta=info, rows=rows, graph=graph_rows), f, indent=1)


def model_():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                      num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
                      rope_theta=1e6, tie_word_embeddings=True, use_sliding_window=False)
    if args.tiny:
        cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads = 2, 256, 512, 2
    with torch.device(dev):
        m = Qwen2ForCausalLM(cfg).to(torch.bfloat16).eval()
    return m


def timed(fn, n):
    if dev.type != "cuda":
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            ts.append(1e3 * (time.perf_counter() - t0))
        return statistics.median(ts), min(ts)
    ts = []
    for _ in range(n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts), min(ts)


@torch.no_grad()
def stream_policy(m, policy):
    from transformers import DynamicCache

    grows = policy in ("transformers", "full")
    limit = min(MAXT, 65536) if grows else MAXT
    if policy == "transformers":
        m.set_attn_implementation("sdpa")
        cache = DynamicCache()
    else:
        kw = dict(budget=args.budget, chunk=args.chunk)
        if policy in ("inf_mllm", "h2o"):
            kw["n_recent"] = 256
        cache = inf_mllm.enable(m, policy, **kw)
    g = torch.Generator(device=dev).manual_seed(0)
    fed, ckpt = 0, 4096
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t_start = time.time()
    while ckpt <= limit and left() > 5:
        while fed < ckpt:
            n = min(args.chunk, ckpt - fed)
            ids = torch.randint(0, 151936, (1, n), device=dev, generator=g)
            m(ids, **{CACHE_KW: cache}, use_cache=True, logits_to_keep=1)
            fed += n
        tok = torch.randint(0, 151936, (1, 1), device=dev, generator=g)

        def step():
            m(tok, **{CACHE_KW: cache}, use_cache=True, logits_to_keep=1)

        for _ in range(2):
            step()
        med, best = timed(step, args.steps)
        fed += 2 + args.steps
        mem = torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else 0.0
        rows.append(dict(policy=policy, tokens=ckpt, decode_ms=med, decode_ms_best=best, peak_mib=mem,
                         stream_s=time.time() - t_start))
        print(f"{policy:14s} {ckpt:>8d} tokens  decode {med:7.2f} ms (best {best:.2f})  peak {mem:8.0f} MiB  "
              f"[{time.time() - T0:.0f}s]", flush=True)
        save()
        ckpt *= 4
    if policy == "transformers":
        m.set_attn_implementation("inf_mllm")


@torch.no_grad()
def graph_step(m):
    from transformers import StaticCache

    P = 4096
    ids = torch.randint(0, 151936, (1, P), device=dev, generator=torch.Generator(device=dev).manual_seed(1))
    tok = ids[:, -1:]
    for name in ("inf_mllm", "inf_mllm-graph", "transformers-static-graph"):
        if left() < 40:
            break
        torch._dynamo.reset()
        t0 = time.time()
        try:
            if name.startswith("transformers"):
                m.set_attn_implementation("sdpa")
                cache = StaticCache(config=m.config, max_cache_len=P + 256)
                m(ids, **{CACHE_KW: cache}, cache_position=torch.arange(P, device=dev), use_cache=True,
                  logits_to_keep=1)
                pos = torch.tensor([P], device=dev)

                def f():
                    return m(tok, **{CACHE_KW: cache}, cache_position=pos, position_ids=pos[None], use_cache=True,
                             logits_to_keep=1).logits

            else:
                m.set_attn_implementation("inf_mllm")
                cache = inf_mllm.enable(m, "inf_mllm", budget=P + 256, n_recent=256, chunk=args.chunk)
                for s in range(0, P, args.chunk):
                    m(ids[:, s : s + args.chunk], **{CACHE_KW: cache}, use_cache=True, logits_to_keep=1)

                # graph: bookkeeping and evictions outside the graph (one graph, replayed every step)
                fast = inf_mllm.compile_decode(m, cache, mode="reduce-overhead") if name.endswith("graph") else None

                def f():
                    if fast is not None:
                        return fast(tok)
                    return m(tok, **{CACHE_KW: cache}, use_cache=True, logits_to_keep=1).logits

            step = torch.compile(f, mode="reduce-overhead", fullgraph=True) if name == "transformers-static-graph" else f
            for _ in range(4):  # compile + record
                step()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            warm = time.time() - t0
            med, best = timed(step, 32)
            graph_rows.append(dict(impl=name, tokens=P, decode_ms=med, decode_ms_best=best, warmup_s=warm))
            print(f"graph: {name:26s} decode {med:7.2f} ms (best {best:.2f}), warm-up {warm:.1f}s", flush=True)
        except Exception as e:  # report and go on
            graph_rows.append(dict(impl=name, error=f"{type(e).__name__}: {str(e)[:400]}"))
            print(f"graph: {name} FAILED {type(e).__name__}: {str(e)[:400]}", flush=True)
        save()
    m.set_attn_implementation("inf_mllm")


m = model_()
inf_mllm.enable(m, "inf_mllm")  # switches the attention implementation
if not args.skip_graph:
    graph_step(m)
for pol in args.policies.split(","):
    if left() < 10:
        print(f"deadline: {pol} skipped", flush=True)
        continue
    stream_policy(m, pol)
save()
print(f"gpu_decode: done in {time.time() - T0:.0f}s")

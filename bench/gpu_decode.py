"""GPU: decode latency and memory vs tokens streamed, and a decode step in a CUDA graph.

    python bench/gpu_decode.py [--out DIR] [--max-tokens 1M] [--deadline 240]

The model is Qwen2.5-Coder-1.5B's architecture (28 layers, 12 query / 2 KV heads of 128,
hidden 1536, MLP 8960) with RANDOM weights in bfloat16: its weights (about 1 GB) cannot travel
to the GPU machine, and latency and memory do not depend on the weights' values. Random token
ids are streamed in chunks of ``--chunk``; at each checkpoint (4K, 16K, 64K, ... doubling by 4)
``--steps`` decode steps are timed with CUDA events (median), per policy:

* ``transformers``: the model's own SDPA attention + ``DynamicCache`` (grows), up to 64K;
* ``full`` (ours, grows, up to 64K), ``inf_mllm``, ``streaming_llm``, ``h2o`` (budget 2048).

First (unless ``--skip-graph``), :func:`graph_compare`: inf_mllm's decode step eager and through
``compile_decode(mode="reduce-overhead")`` at ``--graph-tokens`` tokens streamed, against
transformers' ``StaticCache`` compiled the same way at ``--static-tokens``. Stops cleanly at
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
p.add_argument("--graph-tokens", default="4K,64K,256K,1M", help="tokens streamed at which compile_decode is timed")
p.add_argument("--static-tokens", default="4K,64K", help="StaticCache sizes timed compiled (one compile each)")
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


def _tokens(spec):
    out = []
    for t in filter(None, spec.split(",")):
        t = t.strip().upper()
        out.append(int(float(t[:-1]) * {"K": 1 << 10, "M": 1 << 20}[t[-1]]) if t[-1] in "KM" else int(t))
    return out


def _graph_row(impl, tokens, fn, n, warm=None):
    med, best = timed(fn, n)
    row = dict(impl=impl, tokens=tokens, decode_ms=med, decode_ms_best=best)
    if warm is not None:
        row["warmup_s"] = warm
    graph_rows.append(row)
    print(f"graph: {impl:26s} {tokens:>8d} tokens  decode {med:7.2f} ms (best {best:.2f})"
          + (f", warm-up {warm:.1f}s" if warm is not None else "") + f"  [{time.time() - T0:.0f}s]", flush=True)
    save()


@torch.no_grad()
def graph_compare(m):
    """Per-token decode latency of inf_mllm (budget ``--budget``), eager and through
    ``compile_decode(mode="reduce-overhead")`` (one CUDA graph, replayed every step), at each of
    ``--graph-tokens`` tokens streamed (random ids, eager chunks in between: the same graph keeps
    replaying); then transformers' ``StaticCache`` with the forward under ``torch.compile(mode=
    "reduce-overhead", fullgraph=True)`` at each of ``--static-tokens`` (its K/V filled directly
    with random values, no O(T^2) prefill; one compile per size)."""
    from transformers import StaticCache

    g = torch.Generator(device=dev).manual_seed(1)
    tok = torch.randint(0, 151936, (1, 1), device=dev, generator=g)
    m.set_attn_implementation("inf_mllm")
    torch._dynamo.reset()
    cache = inf_mllm.enable(m, "inf_mllm", budget=args.budget, n_recent=256, chunk=args.chunk)
    fed, fast = 0, None
    for T in _tokens(args.graph_tokens):
        if left() < 30:
            print(f"deadline: inf_mllm at {T} tokens skipped", flush=True)
            break
        try:
            while fed < T and left() > 20:
                n = min(args.chunk, T - fed)
                m(torch.randint(0, 151936, (1, n), device=dev, generator=g), **{CACHE_KW: cache}, use_cache=True,
                  logits_to_keep=1)
                fed += n
            if fed < T:
                break
            warm = None
            if fast is None:
                t0 = time.time()
                fast = inf_mllm.compile_decode(m, cache, mode="reduce-overhead")
                for _ in range(4):  # compile + record
                    fast(tok)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                warm = time.time() - t0
            _graph_row("inf_mllm-graph", T, lambda: fast(tok), 32, warm)
            _graph_row("inf_mllm", T, lambda: m(tok, **{CACHE_KW: cache}, use_cache=True, logits_to_keep=1), 8)
            fed += 32 + 4 + 8 + (4 if warm is not None else 0)
        except Exception as e:  # report and go on
            graph_rows.append(dict(impl="inf_mllm-graph", tokens=T, error=f"{type(e).__name__}: {str(e)[:400]}"))
            print(f"graph: inf_mllm at {T} FAILED {type(e).__name__}: {str(e)[:400]}", flush=True)
            save()
            break
    del cache, fast
    m.set_attn_implementation("sdpa")
    for T in _tokens(args.static_tokens):
        if left() < 60:
            print(f"deadline: StaticCache at {T} tokens skipped", flush=True)
            break
        torch._dynamo.reset()
        t0 = time.time()
        try:
            cache = StaticCache(config=m.config, max_cache_len=T + 64)
            zero = torch.zeros(1, dtype=torch.long, device=dev)
            m(tok, **{CACHE_KW: cache}, cache_position=zero, position_ids=zero[None], use_cache=True, logits_to_keep=1)
            for layer in getattr(cache, "layers", []):  # the first T slots: random K/V, no prefill
                for name in ("keys", "values"):
                    t = getattr(layer, name, None)
                    if isinstance(t, torch.Tensor):
                        t.normal_()
            pos = torch.tensor([T], device=dev)

            def f():
                return m(tok, **{CACHE_KW: cache}, cache_position=pos, position_ids=pos[None], use_cache=True,
                         logits_to_keep=1).logits

            step = torch.compile(f, mode="reduce-overhead", fullgraph=True)
            for _ in range(4):
                step()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            _graph_row("transformers-static-graph", T, step, 32, time.time() - t0)
            del cache, step
        except Exception as e:  # report and go on
            graph_rows.append(dict(impl="transformers-static-graph", tokens=T, error=f"{type(e).__name__}: {str(e)[:400]}"))
            print(f"graph: StaticCache at {T} FAILED {type(e).__name__}: {str(e)[:400]}", flush=True)
            save()
    m.set_attn_implementation("inf_mllm")


m = model_()
inf_mllm.enable(m, "inf_mllm")  # switches the attention implementation
if not args.skip_graph:
    graph_compare(m)
for pol in filter(None, args.policies.split(",")):
    if left() < 10:
        print(f"deadline: {pol} skipped", flush=True)
        continue
    stream_policy(m, pol)
save()
print(f"gpu_decode: done in {time.time() - T0:.0f}s")

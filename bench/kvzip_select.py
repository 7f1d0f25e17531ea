"""Which part of KVzip keeps the key at budget 128: its one-shot probe, or its selection across heads?

    PYTHONPATH=$PWD python bench/kvzip_select.py [--seeds 1000,1001,1002] [--depths 10,26,42,58,74,90]
        [--probe-chunks 64,0] [--select uniform,layer,layerbudget,global] [--prompt] [--local 1] [--stream] [--out ...json]

For evidence only (issue 20, tune seeds). Each ``passkey-prose`` case is streamed with no eviction
(budget 2048) through ``inf_mllm_kz`` (``bench/kvzip_stream.py``): every chunk of ``--probe-chunks``
tokens (0: the whole context at once, KVzip's one-shot probe on these 640-token cases) is fed again
as a probe, and each token gets KVzip's score (the largest attention probability from any probe
query and any query head of its group, softmax over sinks + chunk + probe). Then the 128-slot
budget is applied as kvpress applies KVzip, by masking (original positions kept, nothing moved):
every KV head keeps its 4 sinks and last 32 tokens, and the ``92 x 90`` middle slots of SmolLM2's
90 KV heads go

* ``uniform``: 92 to every head, by its own scores (what ``inf_mllm``'s buffers do);
* ``layer``: ``3 x 92`` per layer, over its 3 KV heads together;
* ``layerbudget``: each layer as many as ``global`` gives it, split equally over its KV heads, each
  head by its own scores (per-layer budgets: possible without SPEC §2's per-head lengths);
* ``global``: over all layers and heads together (kvpress's KVzip default, ``layerwise=False``).

The question is then fed and answered with the dropped slots masked out of every attention.
With ``--probe-chunks 64`` and ``uniform`` the kept sets are exactly what the streamed
``inf_mllm_kz mix=0`` keeps (a fixed score streams exactly); only the positions differ (here the
original ones, there rolling).

``--local 0``: the probe's softmax runs over every slot before it (not dropped), not only sinks +
chunk. ``--stream`` (with ``global``): the cut is made after every chunk and its probe, over the
middle slots still there, and a dropped slot is masked from then on, from the next chunks' forwards
and probes too: a stream with a budget pooled over all heads and layers, at original positions
(memory is not freed: the emulation of method.md §9.4's pool).
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from inf_mllm import ops  # noqa: E402
from inf_mllm.buffers import OWNER_ATTR  # noqa: E402
from inf_mllm.cache import StreamingLayer  # noqa: E402
from inf_mllm.data import load_corpus  # noqa: E402
from inf_mllm.evals.engine import PolicyRunner, load_bundle  # noqa: E402
from inf_mllm.evals.needle import PRESETS, _ask, judge, parse_depths, plan_cases  # noqa: E402
from inf_mllm.policies.base import register_policy  # noqa: E402
import kvzip_stream as kzs  # noqa: E402
import per_head_budget as ph  # noqa: E402

_op = ops.attention_with_scores


def dropped_attention(q, k, v, length, scores=None, *, scale=None, window=32, bias=0.0, cos=None, sin=None,
                      bias_mode="absolute", decay=1.0, inv_freq=None, rope_scale=1.0, rope_pos=None,
                      rope_sections=None, check_values=None):
    """SPEC §4.1's attention with the slots in ``buf.drop [B, Hkv, C]`` masked out (scores not kept:
    nothing is evicted in this diagnostic)."""
    layer = getattr(k, OWNER_ATTR, None)
    buf = getattr(layer, "buf", None)
    drop = getattr(buf, "drop", None)
    if drop is None or k.data_ptr() != buf.k.data_ptr():
        return _op(q, k, v, length, scores, scale=scale, window=window, bias=bias, cos=cos, sin=sin,
                   bias_mode=bias_mode, decay=decay, inv_freq=inv_freq, rope_scale=rope_scale, rope_pos=rope_pos,
                   rope_sections=rope_sections, check_values=check_values)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = torch.zeros_like(q)
    for b in range(q.shape[0]):
        L = int(length[b])
        out[b] = ph.attend_row(q, k, v, b, L, drop[b, :, :L], scale,
                               (cos, sin, inv_freq, rope_scale, rope_pos, rope_sections))[0].to(q.dtype)
    return out


def select(bufs, mode, T, n_sink, n_recent, mid):
    """Sets ``buf.drop`` on every layer: the middle slots ``n_sink .. T - n_recent`` not chosen."""
    lo, hi = n_sink, T - n_recent
    scores = torch.stack([b.kz[0, :, lo:hi] for b in bufs])  # [layers, Hkv, M]
    nl, H, M = scores.shape
    keep = torch.zeros(nl, H, M, dtype=torch.bool)
    if mode == "uniform":
        idx = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :mid]
        keep.scatter_(-1, idx, True)
    elif mode == "layer":
        flat = scores.reshape(nl, H * M)
        idx = torch.sort(flat, dim=-1, descending=True, stable=True).indices[:, : H * mid]
        keep.view(nl, H * M).scatter_(-1, idx, True)
    elif mode == "layerbudget":
        # per-layer budgets only (no SPEC §2 change): each layer gets as many slots as the global cut
        # gives it, shared equally by its heads, each head choosing by its own scores
        flat = scores.reshape(-1)
        gidx = torch.sort(flat, descending=True, stable=True).indices[: nl * H * mid]
        per_layer = torch.bincount(gidx // (H * M), minlength=nl)
        m = (per_layer // H).tolist()
        rest = int(nl * H * mid - H * sum(m))  # the remainders, H at a time, to the layers with the largest leftovers
        for li in torch.argsort(per_layer - H * per_layer.new_tensor(m), descending=True, stable=True).tolist():
            if rest < H:
                break
            m[li] += 1
            rest -= H
        for li in range(nl):
            mm = min(m[li], M)
            idx = torch.sort(scores[li], dim=-1, descending=True, stable=True).indices[:, :mm]
            keep[li].scatter_(-1, idx, True)
    elif mode == "global":
        flat = scores.reshape(-1)
        idx = torch.sort(flat, descending=True, stable=True).indices[: nl * H * mid]
        keep.view(-1)[idx] = True
    else:
        raise ValueError(mode)
    for li, buf in enumerate(bufs):
        d = torch.zeros_like(buf.scores, dtype=torch.bool)
        d[0, :, lo:hi] = ~keep[li]
        buf.drop = d
    return keep


def cut_stream(bufs, T, n_sink, n_recent, mid):
    """``--stream``: after a chunk (and its probe), the global cut over the middle slots not dropped
    yet; a dropped slot stays dropped (the stream never sees it again)."""
    lo, hi = n_sink, T - n_recent
    if hi <= lo:
        return
    for b in bufs:
        if getattr(b, "drop", None) is None:
            b.drop = torch.zeros_like(b.scores, dtype=torch.bool)
    alive = torch.stack([~b.drop[0, :, lo:hi] for b in bufs])  # [layers, Hkv, M]
    if int(alive.sum()) <= alive.shape[0] * alive.shape[1] * mid:
        return
    scores = torch.stack([b.kz[0, :, lo:hi] for b in bufs]).masked_fill(~alive, float("-inf"))
    idx = torch.sort(scores.reshape(-1), descending=True, stable=True).indices[: scores[:, :, :1].numel() * mid]
    keep = torch.zeros(scores.numel(), dtype=torch.bool)
    keep[idx] = True
    keep = keep.view_as(scores)
    for li, b in enumerate(bufs):
        b.drop[0, :, lo:hi] |= ~keep[li]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="1000,1001,1002")
    p.add_argument("--depths", default="10,26,42,58,74,90")
    p.add_argument("--kind", default="passkey", choices=["passkey", "fact"])
    p.add_argument("--budget", type=int, default=128)
    p.add_argument("--probe-chunks", default="64,0")
    p.add_argument("--select", default="uniform,layer,global")
    p.add_argument("--prompt", action="store_true", help="KVzip's instruction before every probe")
    p.add_argument("--local", type=int, default=1,
                   help="1: the probe's softmax over sinks + its chunk + probe (KVzip's); 0: over everything before")
    p.add_argument("--stream", action="store_true",
                   help="cut over all heads and layers after every chunk, the chunks after it seeing only what "
                        "was kept (a stream with original positions); only with --select global")
    p.add_argument("--report", action="store_true", help="allow report seeds (the run pre-registered in method.md §9.4)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="bench/results/cpu/tune/kvzip_select.json")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    seeds = [int(s) for s in a.seeds.split(",")]
    if any(2000 <= s < 3000 for s in seeds) and not a.report:
        sys.exit("kvzip_select: report seeds (2000+) are not for diagnosis; use tune seeds (1000+), or --report "
                 "for the run pre-registered in method.md §9.4")
    register_policy(kzs.KVzipStream)
    StreamingLayer._probe = kzs.kz_probe
    ops.attention_with_scores = dropped_attention
    if a.prompt:
        import transformers

        transformers.LlamaForCausalLM.forward = kzs.with_prompt(transformers.LlamaForCausalLM.forward)
    preset = PRESETS["passkey-prose"]
    bundle = load_bundle("smollm2", device="cpu")
    tok = bundle.tokenizer
    cases = plan_cases(tok, load_corpus("austen"), lengths=[int(preset["lengths"])], depths=parse_depths(a.depths),
                       seeds=seeds, kinds=[a.kind], needles=1, max_new_tokens=16)
    n_sink, n_recent = 4, preset["n_recent"]
    mid = a.budget - n_sink - n_recent
    modes = a.select.split(",")
    if a.stream and modes != ["global"]:
        sys.exit("kvzip_select: --stream cuts over all heads and layers; give --select global")
    stop = [tok.eos_token_id] if tok.eos_token_id is not None else []
    res = {"command": " ".join(sys.argv), "budget": a.budget, "seeds": seeds, "depths": a.depths, "kind": a.kind,
           "prompt": a.prompt, "local": a.local,
           "stream": a.stream, "runs": {}}
    t0 = time.perf_counter()
    for pc in [int(x) for x in a.probe_chunks.split(",")]:
        for mode in modes:
            res["runs"][f"chunk{pc or 'all'}_{mode}"] = {"correct": 0, "cases": []}
        for c in cases:
            ids = c["ids"]
            chunk = pc or len(ids)
            nd = c["needles"][0]
            start = c["positions"][0]
            pol_args = dict(budget=2048, n_recent=n_recent, n_sink=n_sink, local=a.local,
                            prompt_len=16 if a.prompt else 0)
            runner = PolicyRunner(bundle, "inf_mllm_kz", pol_args, chunk=chunk)
            needle_len = len(tok.encode(" " + nd["needle"], add_special_tokens=False))
            for mode in modes:
                cache = runner.new_cache()
                if a.stream:
                    for s in range(0, len(ids), chunk):
                        runner.feed(cache, torch.tensor([ids[s : s + chunk]]), chunk=chunk)
                        bufs = [layer.buf for layer in cache.layers]
                        cut_stream(bufs, bufs[0].lengths[0], n_sink, n_recent, mid)
                else:
                    runner.feed(cache, torch.tensor([ids]), chunk=chunk)
                bufs = [layer.buf for layer in cache.layers]
                T = bufs[0].lengths[0]
                if a.stream:  # what the stream kept (its last cut was after the last chunk)
                    keep = torch.stack([~b.drop[0, :, n_sink : T - n_recent] for b in bufs])
                else:
                    keep = select(bufs, mode, T, n_sink, n_recent, mid)
                # heads that keep every needle token (middle slots start at n_sink)
                nl = keep[:, :, start - n_sink : start - n_sink + needle_len]
                held = int(nl.all(-1).sum()) if start >= n_sink else -1
                gen, _ = _ask(runner, cache, tok, c["question_ids"][0], 16, stop, nd)
                ok = judge(gen, nd["answer"])[0]
                run = res["runs"][f"chunk{pc or 'all'}_{mode}"]
                run["correct"] += int(ok)
                per_layer = keep.sum(-1).sum(-1).tolist()
                run["cases"].append({"seed": c["seed"], "depth": c["depth"], "correct": ok, "generated": gen,
                                     "heads_holding_needle": held, "slots_per_layer": per_layer})
                print(f"probe chunk {pc or 'all'} {mode:7s} seed {c['seed']} depth {c['depth']:.2f}: {ok} {gen!r} "
                      f"heads holding the needle {held}", flush=True)
        for mode in modes:
            r = res["runs"][f"chunk{pc or 'all'}_{mode}"]
            print(f"== probe chunk {pc or 'all'} {mode}: {r['correct']}/{len(cases)}", flush=True)
    res["seconds"] = time.perf_counter() - t0
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()

"""End-to-end check of the cache on a CUDA device (tiny random models, no weights needed).

For every policy, in float32 and bfloat16: a stream with evictions runs on CUDA, never exceeds
the capacity, and (float32) gives the same next-token logits as the same stream on the CPU (the
CUDA path is Triton + the CUDA compact_, the CPU path is PyTorch + C++; bfloat16 is compared
too, for information); below the budget every policy equals the model's own SDPA attention. Prints one line per check and exits 1 on any
failure.

    python tools/gpu_smoke.py
"""
from __future__ import annotations

import sys

import torch

import inf_mllm
from inf_mllm._compat import CACHE_KW  # the cache keyword of the installed transformers
from inf_mllm.policies import available_policies, get_policy_class


def tiny(dtype, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, head_dim=64, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096)
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in m.model.layers:  # sharper attention, so that eviction choices matter
            layer.self_attn.q_proj.weight.mul_(4)
            layer.self_attn.k_proj.weight.mul_(4)
    return m.to(device=device, dtype=dtype)


def kwargs(policy, budget):
    cls = get_policy_class(policy)
    kw = dict(budget=budget, chunk=32)
    if cls.defaults.get("n_recent") is not None and policy != "tova":
        kw["n_recent"] = 16
    if cls.defaults.get("window", 0) > 1:
        kw["window"] = 16
    return kw


@torch.no_grad()
def run(model, policy, ids, budget):
    cache = inf_mllm.enable(model, policy, **kwargs(policy, budget))
    lg = inf_mllm.stream(model, ids[:, :-8], cache=cache)
    for t in range(ids.shape[1] - 8, ids.shape[1]):
        lg = model(ids[:, t : t + 1], **{CACHE_KW: cache}).logits[:, -1].float()
    return lg, cache


def main() -> int:
    assert torch.cuda.is_available(), "needs a CUDA device"
    fails = 0
    ids = torch.randint(0, 256, (2, 600), generator=torch.Generator().manual_seed(1))
    for dtype, tol in ((torch.float32, 2e-3), (torch.bfloat16, 8e-2)):
        gpu, cpu = tiny(dtype, "cuda"), tiny(torch.float32, "cpu")
        for policy in available_policies():
            budget = 4096 if get_policy_class(policy).grows else 128
            try:
                lg_g, cache = run(gpu, policy, ids.cuda(), budget)
                lg_c, _ = run(cpu, policy, ids, budget)
                err = float((lg_g.cpu() - lg_c).abs().max() / lg_c.abs().max())
                fits = max(cache.lengths()) <= cache.capacity
                # bf16 may evict other tokens than the float32 CPU run (near ties): informative only
                ok = fits and bool(torch.isfinite(lg_g).all()) and (err < tol or dtype != torch.float32)
                # below the budget: equal to the model's own SDPA attention over everything
                short = ids[:, :100].cuda()
                c2 = inf_mllm.enable(gpu, policy, **kwargs(policy, 512))
                ours = inf_mllm.stream(gpu, short, cache=c2).float()
                gpu.set_attn_implementation("sdpa")
                ref = gpu(short).logits[:, -1].float()
                gpu.set_attn_implementation("inf_mllm")
                err2 = float((ours - ref).abs().max() / ref.abs().max())
                ok = ok and err2 < tol
                print(f"{'ok  ' if ok else 'FAIL'} {policy:14s} {str(dtype):15s} cuda-vs-cpu rel.err {err:.2e}  "
                      f"below-budget-vs-sdpa {err2:.2e}  lengths {cache.lengths()} (C={cache.capacity})", flush=True)
                fails += not ok
            except Exception as e:  # report and go on: one line per check
                print(f"FAIL {policy:14s} {str(dtype):15s} {type(e).__name__}: {e}", flush=True)
                fails += 1
    print(f"gpu_smoke: {fails} failure(s)")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())

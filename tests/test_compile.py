"""A decode step with a StreamingCache compiles whole: ``torch.compile(fullgraph=True)`` (no graph
break), evictions included, with the same logits as eager."""
import pytest
import torch

import inf_mllm
from inf_mllm._compat import CACHE_KW  # the cache keyword of the installed transformers

from _model import tiny_llama


@pytest.mark.parametrize("policy", ["inf_mllm"])
def test_decode_step_fullgraph(policy):
    torch._dynamo.reset()
    m = tiny_llama(n_layers=2)
    ids = torch.randint(0, 128, (1, 70), generator=torch.Generator().manual_seed(0))
    kw = dict(budget=48, chunk=16)
    if policy != "streaming_llm":
        kw.update(n_recent=8)
    if policy == "inf_mllm":
        kw.update(window=8)

    def run(compile_):
        cache = inf_mllm.enable(m, policy, **kw)
        inf_mllm.stream(m, ids[:, :40], cache=cache, chunk=16)

        @torch.no_grad()
        def step(tok, pos):
            return m(tok, **{CACHE_KW: cache}, position_ids=pos).logits[:, -1]

        # aot_eager: dynamo + functionalisation of the in-place custom ops, without inductor's
        # (slow) C++ compile; fullgraph=True turns any graph break into an error
        f = torch.compile(step, fullgraph=True, backend="aot_eager") if compile_ else step
        out = [f(ids[:, t : t + 1], torch.tensor([[t]])) for t in range(40, 70)]
        return torch.cat(out), cache

    ref, c_ref = run(False)
    got, c_got = run(True)
    assert c_got.stats()["evictions"] == c_ref.stats()["evictions"] > 0  # evictions happened inside the graph
    assert c_got.lengths() == c_ref.lengths()
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("policy", ["inf_mllm", "streaming_llm"])
def test_compile_decode_one_replayable_graph(policy):
    """compile_decode: host bookkeeping and evictions outside the graph, so the graph has no
    SymInt input (a CUDA graph would be re-recorded for each new value) and is reused every step."""
    torch._dynamo.reset()
    m = tiny_llama(n_layers=2)
    ids = torch.randint(0, 128, (1, 80), generator=torch.Generator().manual_seed(1))
    kw = dict(budget=48, chunk=16)
    if policy == "inf_mllm":
        kw.update(n_recent=8, window=8, h_life=256, bias_mode="relative")
    graphs = []

    def recording(gm, example_inputs):
        graphs.append([type(n.meta.get("example_value")).__name__ for n in gm.graph.nodes if n.op == "placeholder"])
        return gm.forward

    def run(compiled):
        cache = inf_mllm.enable(m, policy, **kw)
        lg = inf_mllm.stream(m, ids[:, :40], cache=cache)
        step = inf_mllm.compile_decode(m, cache, backend=recording) if compiled else None
        out = []
        for t in range(40, 80):
            tok = ids[:, t : t + 1]
            if compiled:
                out.append(step(tok))
            else:
                with torch.no_grad():
                    out.append(m(tok, **{CACHE_KW: cache}).logits[:, -1])
        return torch.cat(out), cache

    ref, c_ref = run(False)
    got, c_got = run(True)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert c_got.stats() == c_ref.stats() and c_got.stats()["evictions"] > 0
    assert c_got.get_seq_length() == c_ref.get_seq_length() == 80
    assert len(graphs) == 1, f"{len(graphs)} graphs compiled for 40 steps"
    assert not [t for t in graphs[0] if "Sym" in t or t == "int"], graphs[0]


def test_compile_decode_refuses_growing_cache():
    m = tiny_llama(n_layers=1)
    with pytest.raises(ValueError, match="fixed-size"):
        inf_mllm.compile_decode(m, inf_mllm.enable(m, "full"))

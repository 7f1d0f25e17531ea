"""RoPE from the model's rotary frequencies (SPEC §3, §4.1): the operator's frequency form against
the table form and the float64 reference, per-slot multimodal positions, and the snapshot and
check that :class:`inf_mllm.rope.Rope` makes at ``enable``."""
from __future__ import annotations

import warnings

import pytest
import torch

import inf_mllm.ops as ops
from inf_mllm.reference import attention_with_scores_ref, rope_cos_sin, rope_cos_sin_blocked
from inf_mllm.rope import Rope, RopeMismatch

from test_attention import make_inputs


def _inv_freq(D, base=10000.0):
    return 1.0 / (base ** (torch.arange(0, D, 2, dtype=torch.float32) / D))


def _args(B=2, Hkv=2, G=3, D=64, n=1, C=96, lens=(96, 40), dtype=torch.float32, seed=0):
    q, k, v, length, scores, _, _ = make_inputs(B, Hkv, G, D, n, C, list(lens), dtype, poison="huge", seed=seed)
    return q, k, v, length, scores


def _gold(q, k, v, length, scores, **kw):
    sc = None if scores is None else scores.double().clone()
    out = attention_with_scores_ref(q.double(), k.double(), v.double(), length, sc, **kw)
    return out, sc


# ---- the operator ----------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 5, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_freq_form_equals_table_form(n, dtype):
    # the frequency form on the CPU builds one table by slot from the same definition: same result
    q, k, v, length, scores = _args(n=n, lens=(96, 41), dtype=dtype)
    inv = _inv_freq(64)
    cos, sin = rope_cos_sin(torch.arange(96), inv, 0.7)
    a, b = scores.clone(), scores.clone()
    kw = dict(window=4, bias=0.5, bias_mode="relative", decay=0.5)
    oa = ops.attention_with_scores(q, k, v, length, a, inv_freq=inv, rope_scale=0.7, **kw)
    ob = ops.attention_with_scores(q, k, v, length, b, cos=cos, sin=sin, **kw)
    torch.testing.assert_close(oa, ob, rtol=0, atol=0)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("n", [1, 5, 40])
def test_freq_form_matches_float64_reference(n):
    q, k, v, length, scores = _args(n=n, lens=(96, 41))
    inv = _inv_freq(64)
    sc = scores.clone()
    out = ops.attention_with_scores(q, k, v, length, sc, window=8, bias=1e-3, inv_freq=inv)
    ref, ref_sc = _gold(q, k, v, length, scores, window=8, bias=1e-3, inv_freq=inv)
    # float32 angles (as transformers computes them) vs exact float64 angles at slots < 96
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(sc.double(), ref_sc, rtol=1e-4, atol=1e-5)


def _sections(D):
    half = D // 2
    return torch.tensor([i % 3 for i in range(half)], dtype=torch.int32)  # interleaved, as Qwen3-VL


@pytest.mark.parametrize("n", [1, 5, 40])
@pytest.mark.parametrize("G", [1, 3])
def test_positions_match_float64_reference(n, G):
    # every slot at its own 3-D positions (rope_pos, per KV head), queries at their slot's positions
    q, k, v, length, scores = _args(G=G, n=n, lens=(96, 41), seed=n)
    gen = torch.Generator().manual_seed(n)
    pos = torch.randint(0, 400, (3, 2, 2, 96), generator=gen, dtype=torch.int32)
    kw = dict(window=6, bias=2.0, bias_mode="relative", inv_freq=_inv_freq(64), rope_scale=1.1, rope_pos=pos,
              rope_sections=_sections(64))
    sc = scores.clone()
    out = ops.attention_with_scores(q, k, v, length, sc, **kw)
    ref, ref_sc = _gold(q, k, v, length, scores, **kw)
    torch.testing.assert_close(out.double(), ref, rtol=2e-4, atol=2e-4)
    torch.testing.assert_close(sc.double(), ref_sc, rtol=2e-4, atol=2e-5)
    # the heads differ: rotating every head at head 0's positions changes the result
    pos0 = pos[:, :, :1].expand_as(pos).contiguous()
    other = ops.attention_with_scores(q, k, v, length, None, **dict(kw, rope_pos=pos0))
    assert (other - out).abs().max() > 1e-3


def test_positions_at_the_slot_equal_the_1d_form():
    q, k, v, length, scores = _args(n=5, lens=(96, 41))
    inv = _inv_freq(64)
    pos = torch.arange(96, dtype=torch.int32).expand(3, 2, 2, 96).contiguous()
    a = ops.attention_with_scores(q, k, v, length, None, inv_freq=inv, rope_pos=pos, rope_sections=_sections(64))
    b = ops.attention_with_scores(q, k, v, length, None, inv_freq=inv)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_positions_ignore_poisoned_slots():
    # positions past a row's length may hold anything: never read
    q, k, v, length, scores = _args(n=1, lens=(96, 30))
    pos = torch.randint(0, 100, (3, 2, 2, 96), dtype=torch.int32)
    kw = dict(inv_freq=_inv_freq(64), rope_sections=_sections(64), window=2, bias=0.0)
    a = ops.attention_with_scores(q, k, v, length, scores.clone(), rope_pos=pos, **kw)
    pos2 = pos.clone()
    pos2[:, 1, :, 30:] = 2 ** 30
    b = ops.attention_with_scores(q, k, v, length, scores.clone(), rope_pos=pos2, **kw)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_blocked_form_is_close_to_the_definition():
    inv = _inv_freq(128)
    c, s = rope_cos_sin(torch.arange(4096), inv)
    cb, sb = rope_cos_sin_blocked(4096, inv)
    err = max((c - cb).abs().max().item(), (s - sb).abs().max().item())
    assert err < 8 * 4096 * 2.0 ** -24, err
    gold, _ = rope_cos_sin(torch.arange(4096), inv.double(), dtype=torch.float64)
    # as close to the exact rotation as transformers' own float32 angles are (within 2x)
    assert (cb.double() - gold).abs().max() <= 2 * (c.double() - gold).abs().max() + 1e-6


BAD_ROPE = [
    (dict(inv_freq=_inv_freq(64).double()), TypeError, "inv_freq must be float32"),
    (dict(inv_freq=_inv_freq(32)), ValueError, "inv_freq must have shape"),
    (dict(inv_freq=_inv_freq(64), cos=torch.ones(96, 64), sin=torch.ones(96, 64)), ValueError, "not both"),
    (dict(inv_freq=_inv_freq(64), rope_pos=torch.zeros(3, 2, 2, 96, dtype=torch.int32)), ValueError, "together"),
    (dict(rope_pos=torch.zeros(3, 2, 2, 96, dtype=torch.int32), rope_sections=_sections(64)), ValueError, "need inv_freq"),
    (dict(inv_freq=_inv_freq(64), rope_pos=torch.zeros(3, 2, 2, 95, dtype=torch.int32), rope_sections=_sections(64)),
     ValueError, "rope_pos must have shape"),
    (dict(inv_freq=_inv_freq(64), rope_pos=torch.zeros(3, 2, 2, 96, dtype=torch.long), rope_sections=_sections(64)),
     TypeError, "rope_pos must be int32"),
    (dict(inv_freq=_inv_freq(64), rope_pos=torch.zeros(2, 2, 2, 96, dtype=torch.int32), rope_sections=_sections(64)),
     ValueError, "rope_sections values must be in"),
    (dict(inv_freq=_inv_freq(64), rope_scale=0.0), ValueError, "rope_scale must be a positive"),
]


@pytest.mark.parametrize("kw, exc, match", BAD_ROPE)
def test_bad_rope_arguments(kw, exc, match):
    q, k, v, length, scores = _args()
    with pytest.raises(exc, match=match):
        ops.attention_with_scores(q, k, v, length, scores, **kw)


def test_opcheck_with_frequencies_and_positions():
    q, k, v, length, scores = _args(n=4, C=32, lens=(32, 9))
    inv = _inv_freq(64)
    pos = torch.randint(0, 50, (3, 2, 2, 32), dtype=torch.int32)
    op = torch.ops.inf_mllm.attention_with_scores.default
    torch.library.opcheck(op, (q, k, v, length, scores, 0.125, 3, 1e-3, None, None, "relative", 0.5, inv, 1.0, None, None))
    torch.library.opcheck(op, (q, k, v, length, scores, 0.125, 3, 1e-3, None, None, "absolute", 1.0, inv, 0.9, pos,
                               _sections(64)))


def test_torch_compile_with_frequencies():
    q, k, v, length, scores = _args(n=2, C=48, lens=(48, 20))
    inv = _inv_freq(64)

    def f(q, k, v, length, scores, inv):
        return ops.attention_with_scores(q, k, v, length, scores, window=2, bias=1.0, bias_mode="relative",
                                         inv_freq=inv) * 2.0

    torch._dynamo.reset()
    sc = scores.clone()
    out = torch.compile(f, backend="aot_eager", fullgraph=True)(q, k, v, length, sc, inv)
    ref_sc = scores.double().clone()
    ref = attention_with_scores_ref(q.double(), k.double(), v.double(), length, ref_sc, window=2, bias=1.0,
                                    bias_mode="relative", inv_freq=inv)
    torch.testing.assert_close(out.double(), 2 * ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(sc.double(), ref_sc, rtol=1e-4, atol=1e-5)


# ---- the snapshot at enable --------------------------------------------------------------------

def _llama_rotary(**rope):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    rp = dict(rope_type="default", rope_theta=10000.0)
    rp.update(rope)
    cfg = LlamaConfig(hidden_size=64, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                      rope_parameters=rp)
    return LlamaRotaryEmbedding(cfg)


def test_snapshot_default_rope():
    r = _llama_rotary()
    rope = Rope(r, 300)
    assert rope.kind == "freq" and rope.scale == 1.0
    torch.testing.assert_close(rope.inv_freq, r.inv_freq.float(), rtol=0, atol=0)
    kw = rope.op_kwargs("cpu")
    assert set(kw) == {"inv_freq", "rope_scale"}


def test_snapshot_scaled_rope_takes_the_scaled_frequencies():
    r = _llama_rotary(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=64)
    plain = _llama_rotary()
    rope = Rope(r, 200)
    assert rope.kind == "freq"
    assert not torch.equal(rope.inv_freq, plain.inv_freq.float())  # llama3 scaling comes for free
    torch.testing.assert_close(rope.inv_freq, r.inv_freq.float(), rtol=0, atol=0)


def test_snapshot_leaves_a_dynamic_rotary_as_it_was_and_is_frozen():
    r = _llama_rotary(rope_type="dynamic", factor=4.0)
    before = r.inv_freq.clone()
    rope = Rope(r, 1000)  # longer than max_position_embeddings: the module rescales when called there
    assert torch.equal(r.inv_freq, before), "the snapshot changed the model's rotary module"
    snap = rope.inv_freq.clone()
    r(torch.empty(0), torch.arange(4000)[None])  # the model, called at long positions, rewrites its inv_freq
    assert not torch.equal(r.inv_freq, before)
    assert torch.equal(rope.inv_freq, snap), "the snapshot follows the module"


def test_snapshot_falls_back_to_the_table_and_says_why():
    r = _llama_rotary()
    orig = type(r).forward

    def warped(self, x, position_ids):  # not a * cos(p * f): a phase offset
        cos, sin = orig(self, x, position_ids + 0)
        return (cos * 0.9 + 0.1), sin

    r.forward = warped.__get__(r)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        rope = Rope(r, 128)
    assert rope.kind == "table" and "do not reproduce" in rope.reason
    msgs = [str(x.message) for x in w if "inf_mllm" in str(x.message)]
    assert len(msgs) == 1 and "\n" not in msgs[0] and "table" in msgs[0]
    kw = rope.op_kwargs("cpu")
    cos, _ = r(torch.empty(0), torch.arange(128)[None])
    torch.testing.assert_close(kw["cos"], cos[0].float())


def test_check_tolerance_follows_the_model_dtype():
    # a 1e-3 error in cos/sin is below a bfloat16 model's own rounding, not below float32's
    r = _llama_rotary()
    orig = type(r).forward
    r.forward = (lambda self, x, p: tuple(t * (1 + 1e-3) for t in orig(self, x, p))).__get__(r)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert Rope(r, 64, torch.bfloat16).kind == "freq"
        assert Rope(r, 64, torch.float32).kind == "table"


def _qwen_rotary(kind):
    if kind == "qwen2_vl":
        from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLTextConfig
        from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLRotaryEmbedding

        cfg = Qwen2VLTextConfig(hidden_size=128, num_attention_heads=2, num_key_value_heads=1,
                                rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[8, 12, 12]))
        return Qwen2VLRotaryEmbedding(cfg), [0] * 8 + [1] * 12 + [2] * 12
    from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLTextConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding

    cfg = Qwen3VLTextConfig(hidden_size=128, num_attention_heads=2, num_key_value_heads=1, head_dim=64,
                            rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[12, 10, 10],
                                                 mrope_interleaved=True))
    return Qwen3VLTextRotaryEmbedding(cfg), None


@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen3_vl"])
def test_snapshot_finds_the_multimodal_sections(kind):
    r, expect = _qwen_rotary(kind)
    rope = Rope(r, 200, mrope=True)
    assert rope.kind == "mrope"
    sec = rope.sections.tolist()
    assert sorted(set(sec)) == [0, 1, 2] and len(sec) == 32
    if expect is not None:
        assert sec == expect
    else:  # Qwen3-VL interleaves height and width with the temporal frequencies
        assert sec[:6] == [0, 1, 2, 0, 1, 2]
    # the definition with these sections is the module at random 3-D positions
    pos = torch.randint(0, 500, (3, 1, 64))
    cos, sin = r(torch.empty(0), pos)
    c2, s2 = rope_cos_sin(pos[:, 0], rope.inv_freq, rope.scale, rope.sections)
    torch.testing.assert_close(c2, cos[0], rtol=0, atol=1e-6)
    assert set(rope.op_kwargs("cpu")) == {"inv_freq", "rope_scale", "rope_sections"}


def test_snapshot_refuses_a_multimodal_rotary_it_cannot_reproduce():
    r, _ = _qwen_rotary("qwen2_vl")
    orig = type(r).forward
    r.forward = (lambda self, x, p: (orig(self, x, p)[0] * 0.9, orig(self, x, p)[1])).__get__(r)
    with pytest.raises(RopeMismatch, match="do not reproduce"):
        Rope(r, 100, mrope=True)
    r.forward = (lambda self, x, p: tuple(t * 0.5 + 0.5 for t in orig(self, x, p))).__get__(r)
    with pytest.raises(RopeMismatch, match="could not find the rotary section"):
        Rope(r, 100, mrope=True)


def test_freq_form_with_an_inference_tensor_of_frequencies():
    # an inference tensor has no version counter: the CPU path still builds its table from it
    q, k, v, length, scores = _args(n=1, lens=(96, 41))
    with torch.inference_mode():
        inv = _inv_freq(64)
        out = ops.attention_with_scores(q, k, v, length, None, inv_freq=inv)
    cos, sin = rope_cos_sin(torch.arange(96), _inv_freq(64))
    ref = ops.attention_with_scores(q, k, v, length, None, cos=cos, sin=sin)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)

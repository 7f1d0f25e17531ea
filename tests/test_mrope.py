"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL under the fixed-size cache (issue 19): the cache owns the
3-D rotary positions (inf_mllm/mrope.py, docs/method.md §3b). Random tiny models (no VLM weights
exist offline), random pixels; the reference is the model itself on the whole input at once
(its SDPA attention and DynamicCache)."""
import pytest
import torch

import inf_mllm
from inf_mllm._compat import cache_kwargs
from inf_mllm.models import QWEN_VL_IDS as IDS
from inf_mllm.models import tiny_qwen_vl
from inf_mllm.policies import available_policies, get_policy_class

KINDS = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]
FIXED = ["streaming_llm", "inf_mllm", "snapkv", "h2o", "window"]


@pytest.fixture(scope="module", params=KINDS)
def vlm(request):
    torch.set_num_threads(1)
    return request.param, tiny_qwen_vl(request.param)


def layout(parts, kind, seed=0):
    """Model inputs of ``parts``: ``("text", n)``, ``("image", (t, h, w))``, ``("video", (t, h, w))``
    (a grid in patches; merge 2: ``t*h*w/4`` tokens; Qwen3-VL lays a video out frame by frame with
    two timestamp tokens before each frame)."""
    g = torch.Generator().manual_seed(seed)
    ids, types, pv, pvv, ig, vg = [], [], [], [], [], []
    for what, arg in parts:
        if what == "text":
            ids += torch.randint(3, 140, (arg,), generator=g).tolist()
            types += [0] * arg
            continue
        t, h, w = arg
        n = t * h * w // 4
        vals = torch.randn(t * h * w, 3 * 2 * 14 * 14, generator=g)
        if what == "image":
            ids += [IDS["vision_start_token_id"]] + [IDS["image_token_id"]] * n + [IDS["vision_end_token_id"]]
            types += [0] + [1] * n + [0]
            pv.append(vals)
            ig.append([t, h, w])
        else:
            frames = [(h * w // 4, True)] * t if kind == "qwen3_vl" else [(n, False)]
            for per, stamp in frames:
                if stamp:
                    ids += torch.randint(3, 140, (2,), generator=g).tolist()
                    types += [0, 0]
                ids += [IDS["vision_start_token_id"]] + [IDS["video_token_id"]] * per + [IDS["vision_end_token_id"]]
                types += [0] + [2] * per + [0]
            pvv.append(vals)
            vg.append([t, h, w])
    kw = dict(input_ids=torch.tensor([ids]), mm_token_type_ids=torch.tensor([types]),
              attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    if pv:
        kw.update(pixel_values=torch.cat(pv), image_grid_thw=torch.tensor(ig))
    if pvv:
        kw.update(pixel_values_videos=torch.cat(pvv), video_grid_thw=torch.tensor(vg))
        if kind == "qwen2_5_vl":
            kw["second_per_grid_ts"] = torch.tensor([0.5 + i for i in range(len(vg))])
    return kw


MIXED = [("text", 5), ("image", (1, 4, 6)), ("text", 7), ("video", (2, 4, 4)), ("text", 4)]


def _vision(kw):
    return {k: v for k, v in kw.items() if k not in ("input_ids", "attention_mask")}


def _policy_args(pol, budget=256):
    return dict(budget=budget, chunk=16, **({} if pol in ("full", "streaming_llm", "window") else {"n_recent": 32}))


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def _plus_token(kw, tok=7):
    ids = torch.cat([kw["input_ids"], torch.tensor([[tok]])], 1)
    return dict(kw, input_ids=ids, attention_mask=torch.ones_like(ids),
                mm_token_type_ids=torch.cat([kw["mm_token_type_ids"], torch.zeros(1, 1, dtype=torch.long)], 1))


@torch.no_grad()
def test_every_policy_is_accepted(vlm):
    kind, m = vlm
    for pol in available_policies():
        if getattr(get_policy_class(pol), "pooled", False):  # not yet: refused, saying why
            with pytest.raises(ValueError, match="pooled budget.*M-RoPE"):
                inf_mllm.enable(m, pol, **_policy_args(pol))
            continue
        cache = inf_mllm.enable(m, pol, **_policy_args(pol))
        assert cache.mrope is not None and cache.rope.kind == "mrope", (kind, pol)


@pytest.mark.parametrize("pol", ["full", "streaming_llm", "inf_mllm", "snapkv"])
@torch.no_grad()
def test_below_budget_one_call_and_chunks_equal_the_model(vlm, pol):
    """An image, a video and text, below the budget: fed as one call and as a stream of 4-token
    chunks, prefill and the next decode step give the model's own logits (float32, 1e-5)."""
    kind, m = vlm
    kw = layout(MIXED, kind)
    ref = m(**kw).logits[0].float()
    ref2 = m(**_plus_token(kw)).logits[0, -1].float()
    for how in ("call", "stream"):
        cache = inf_mllm.enable(m, pol, **_policy_args(pol))
        if how == "call":
            got = m(**kw, **cache_kwargs(cache), use_cache=True).logits[0].float()
            assert _rel(got, ref) < 1e-5, (kind, pol, how)
        else:
            got = inf_mllm.stream(m, kw["input_ids"], cache=cache, chunk=4, **_vision(kw))[0]
            assert _rel(got, ref[-1]) < 1e-5, (kind, pol, how)
        nxt = m(input_ids=torch.tensor([[7]]), **cache_kwargs(cache), use_cache=True).logits[0, -1].float()
        assert _rel(nxt, ref2) < 1e-5, (kind, pol, how, "decode")
        assert cache.stats()["slots_by_modality"] == {
            "text": int((kw["mm_token_type_ids"] == 0).sum()) + 1, "image": int((kw["mm_token_type_ids"] == 1).sum()),
            "video": int((kw["mm_token_type_ids"] == 2).sum())}


@torch.no_grad()
def test_the_positions_are_the_cache_s_not_the_models_fallback(vlm):
    """Without the cache's positions a chunked stream is not the model (the check above can fail):
    fed chunk by chunk as plain embeddings, the model itself would give later chunks text positions."""
    kind, m = vlm
    kw = layout(MIXED, kind)
    ref = m(**kw).logits[0, -1].float()
    cache = inf_mllm.enable(m, "full", budget=256, chunk=16)
    cache.mrope = None  # a cache that does not own the positions: the language model's own fallback
    from inf_mllm._compat import language_model, language_model_inputs

    emb = language_model_inputs(m, **kw)
    assert "inputs_embeds" in emb
    try:
        last = None
        for s in range(0, emb["inputs_embeds"].shape[1], 4):
            e = s + 4
            extra = {}
            if "visual_pos_masks" in emb:
                vm = emb["visual_pos_masks"][:, s:e]
                before = int(emb["visual_pos_masks"][:, :s].sum())
                if vm.any():
                    extra = dict(visual_pos_masks=vm, deepstack_visual_embeds=[
                        d[before:before + int(vm.sum())] for d in emb["deepstack_visual_embeds"]])
            h = language_model(m)(inputs_embeds=emb["inputs_embeds"][:, s:e], **cache_kwargs(cache), use_cache=True,
                                  **extra).last_hidden_state
            last = m.lm_head(h[:, -1]).float()[0]
    except RuntimeError as err:  # the cache's glue refuses a forward without its positions
        assert "positions" in str(err)
        return
    assert _rel(last, ref) > 1e-3


def _own_positions(m, kw):
    pos, _ = m.model.get_rope_index(kw["input_ids"], mm_token_type_ids=kw["mm_token_type_ids"],
                                    image_grid_thw=kw.get("image_grid_thw"), video_grid_thw=kw.get("video_grid_thw"),
                                    **({"second_per_grid_ts": kw["second_per_grid_ts"]} if "second_per_grid_ts" in kw else {}))
    return pos[:, 0]  # [3, T]


def _groups(parts, kind):
    """Token count of every group of ``layout(parts, kind)``, in order (a text token is a group)."""
    out = []
    for what, arg in parts:
        if what == "text":
            out += [1] * arg
            continue
        t, h, w = arg
        frames = [(h * w // 4, 3)] * t if (what == "video" and kind == "qwen3_vl") else [(t * h * w // 4, 1)]
        for per, before in frames:
            out += [1] * before + [per] + [1]  # (timestamps,) vision start, the tokens, vision end
    return out


def _units(pos, sizes):
    """From the definition (docs/method.md §3b), independently of inf_mllm.mrope: per token its
    unit id, its unit's start and advance in the model's own positions (a group's start: its first
    token's height position, which is the start for text and for vision alike)."""
    unit, start, advance, firsts, at = [], [], [], [], 0
    for k, n in enumerate(sizes):
        firsts.append(at)
        at += n
    starts = [int(pos[1, f]) for f in firsts]
    for k, n in enumerate(sizes):
        adv = starts[k + 1] - starts[k] if k + 1 < len(sizes) else 10 ** 6
        unit += [k] * n
        start += [starts[k]] * n
        advance += [adv] * n
    return unit, start, advance


def _expected_rolling(own, unit, start, advance, kept):
    """Rolling positions of the kept stream indices ``kept`` (one KV head): units laid out from 0
    in order, each at the previous kept unit's end, every token at its offset in its unit."""
    out, at, last = [], 0, None
    for t in kept:
        if unit[t] != last:
            if last is not None:
                at += advance_of_last
            last, advance_of_last, base = unit[t], advance[t], at
        out.append([int(own[s, t]) - start[t] + base for s in range(3)])
    return out


@pytest.mark.parametrize("pol", ["streaming_llm", "inf_mllm", "h2o"])
@torch.no_grad()
def test_positions_under_eviction_follow_the_definition(vlm, pol):
    """A stream of images, video and text many times the budget, in chunks: never over capacity;
    every kept key's stored 3-D positions equal an independent recomputation (rolling: the
    definition's layout of the kept units; original: the model's own positions)."""
    kind, m = vlm
    parts = []
    for r in range(6):
        parts += [("text", 6), ("image", (1, 4, 4) if r % 2 else (1, 4, 6)), ("text", 3), ("video", (2, 4, 4))]
    parts += [("text", 5)]
    kw = layout(parts, kind, seed=1)
    args = dict(budget=40, chunk=8) if pol == "streaming_llm" else dict(budget=40, chunk=8, n_recent=16)
    cache = inf_mllm.enable(m, pol, **args)
    inf_mllm.stream(m, kw["input_ids"], cache=cache, chunk=8, **_vision(kw))
    buf = cache.layers[1].buf
    assert buf.evictions > 0 and max(buf.lengths) <= cache.capacity
    own = _own_positions(m, kw)
    unit, start, advance = _units(own, _groups(parts, kind))
    assert len(unit) == own.shape[1]
    L = buf.lengths[0]
    for h in range(buf.heads):
        kept = buf.position[0, h, :L].tolist()
        got = torch.stack([buf.mpos_t[0, h, :L], buf.mpos_h[0, h, :L], buf.mpos_w[0, h, :L]], 1).tolist()
        if cache.policy.rolling:
            want = _expected_rolling(own, unit, start, advance, kept)
            assert max(max(p) for p in got) <= cache.capacity + 8  # bounded by about the capacity
        else:
            want = own[:, kept].T.tolist()
        assert got == want, (kind, pol, h)
        assert kept == sorted(kept)


@torch.no_grad()
def test_rolling_positions_stay_bounded_over_many_frames():
    """Qwen-VL positions advance more slowly than tokens; after 150 frame pairs (Qwen2-VL, video
    clips with text between) the largest position is still about the capacity, not the stream's."""
    m = tiny_qwen_vl("qwen2_vl", n_layers=1)
    cache = inf_mllm.enable(m, "streaming_llm", budget=32, chunk=8)
    hi = []
    for clip in range(150):
        kw = layout([("text", 2), ("video", (2, 4, 4))], "qwen2_vl", seed=clip)
        inf_mllm.stream(m, kw["input_ids"], cache=cache, **_vision(kw))
        buf = cache.layers[0].buf
        hi.append(int(buf.rope_pos()[:, 0, :, :buf.lengths[0]].max()))
    assert cache.mrope.rows[0].next > 150 * 4  # the model's own positions went far past the capacity
    assert max(hi) <= cache.capacity + 8 and max(hi[75:]) <= max(hi[:75]) + 2


@torch.no_grad()
def test_padded_batch_row_equals_the_row_alone():
    m = tiny_qwen_vl("qwen2_vl")
    a = layout([("text", 3), ("image", (1, 4, 4)), ("text", 5)], "qwen2_vl", seed=2)
    b = layout([("text", 6), ("image", (1, 4, 6)), ("text", 6)], "qwen2_vl", seed=3)
    Ta, Tb = a["input_ids"].shape[1], b["input_ids"].shape[1]
    pad = Tb - Ta
    assert pad > 0
    batch = dict(
        input_ids=torch.cat([torch.cat([torch.zeros(1, pad, dtype=torch.long), a["input_ids"]], 1), b["input_ids"]]),
        mm_token_type_ids=torch.cat([torch.cat([torch.zeros(1, pad, dtype=torch.long), a["mm_token_type_ids"]], 1),
                                     b["mm_token_type_ids"]]),
        attention_mask=torch.cat([torch.cat([torch.zeros(1, pad, dtype=torch.long), torch.ones(1, Ta, dtype=torch.long)], 1),
                                  torch.ones(1, Tb, dtype=torch.long)]),
        pixel_values=torch.cat([a["pixel_values"], b["pixel_values"]]),
        image_grid_thw=torch.cat([a["image_grid_thw"], b["image_grid_thw"]]))
    cache = inf_mllm.enable(m, "inf_mllm", budget=256, chunk=16, n_recent=32)
    got = m(**batch, **cache_kwargs(cache), use_cache=True).logits[:, -1].float()
    for row, kw in ((0, a), (1, b)):
        alone = inf_mllm.enable(m, "inf_mllm", budget=256, chunk=16, n_recent=32)
        want = m(**kw, **cache_kwargs(alone), use_cache=True).logits[0, -1].float()
        assert _rel(got[row], want) < 1e-5, row


@torch.no_grad()
def test_min_text_slots_keeps_the_question_through_frames():
    """A question (text) then 40 frame clips: with ``min_text_slots`` the question's tokens stay."""
    m = tiny_qwen_vl("qwen2_vl", n_layers=1)
    q = layout([("text", 12)], "qwen2_vl", seed=9)
    kept = {}
    for mts in (0, 24):
        cache = inf_mllm.enable(m, "inf_mllm", budget=48, chunk=8, n_recent=8, min_text_slots=mts)
        inf_mllm.stream(m, q["input_ids"], cache=cache)
        for clip in range(40):
            kw = layout([("video", (2, 4, 4))], "qwen2_vl", seed=clip)
            inf_mllm.stream(m, kw["input_ids"], cache=cache, **_vision(kw))
        buf = cache.layers[0].buf
        L = buf.lengths[0]
        kept[mts] = min(int((buf.position[0, h, :L] < 12).sum()) for h in range(buf.heads))
    assert kept[24] >= 8 and kept[24] > kept[0]


@torch.no_grad()
def test_save_load_and_clone_continue_bit_identically(tmp_path):
    m = tiny_qwen_vl("qwen2_5_vl")
    kw = layout(MIXED * 3, "qwen2_5_vl", seed=4)
    cache = inf_mllm.enable(m, "inf_mllm", budget=40, chunk=8, n_recent=16)
    inf_mllm.stream(m, kw["input_ids"], cache=cache, **_vision(kw))
    assert cache.layers[0].buf.evictions > 0
    path = tmp_path / "c.safetensors"
    cache.save(path)
    twin = cache.clone()
    loaded = type(cache).load(path, m)
    nxt = torch.tensor([[9]])
    outs = [m(input_ids=nxt, **cache_kwargs(c), use_cache=True).logits[0, -1] for c in (cache, twin, loaded)]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


@torch.no_grad()
def test_clear_refusals():
    m = tiny_qwen_vl("qwen2_vl", n_layers=1)
    cache = inf_mllm.enable(m, "streaming_llm", budget=32, chunk=8)
    inf_mllm.stream(m, torch.tensor([[5, 6, 7]]), cache=cache)
    with pytest.raises(ValueError, match="compiled decode steps do not take multimodal rotary positions"):
        inf_mllm.compile_decode(m, cache)(torch.tensor([[3]]))
    with pytest.raises(ValueError, match="n_recent >= 1"):
        inf_mllm.enable(m, "inf_mllm", budget=32, chunk=8, n_recent=0)
    llama = inf_mllm.models.tiny_llama()
    with pytest.raises(ValueError, match="Qwen-VL"):
        inf_mllm.stream(llama, torch.tensor([[5, 6]]), cache=inf_mllm.enable(llama, budget=32, n_recent=8),
                        pixel_values=torch.zeros(1))


def test_the_docs_snippet_runs(monkeypatch, capsys):
    """docs/multimodal.md's Qwen-VL block runs as pasted, with the tiny Qwen2.5-VL for the
    checkpoint and 8 frames for the hour (the lines replaced must each match once)."""
    import os
    import re

    import transformers

    from inf_mllm.models import tiny_qwen_vl_session_parts

    pytest.importorskip("cv2")
    from inf_mllm.video import find_sample_video

    try:
        find_sample_video("vtest.avi")
    except FileNotFoundError as e:
        pytest.skip(str(e))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    text = open(os.path.join(root, "docs", "multimodal.md"), encoding="utf-8").read()
    block = [b for b in re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M) if "Qwen2.5-VL" in b]
    assert len(block) == 1
    code = block[0]
    for old, new in (("max_frames=3600", "max_frames=8"), ("budget=4096, n_recent=512, chunk=512", "budget=72, n_recent=8, chunk=8")):
        assert code.count(old) == 1, old
        code = code.replace(old, new)
    model, proc = tiny_qwen_vl_session_parts("qwen2_5_vl")
    monkeypatch.setattr(transformers.AutoModelForImageTextToText, "from_pretrained", lambda *a, **k: model)
    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", lambda *a, **k: proc)
    exec(compile(code, "docs/multimodal.md", "exec"), {})
    out = capsys.readouterr().out
    assert "'video':" in out


@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen3_vl"])
@torch.no_grad()
def test_generate_after_a_stream_is_the_models_own_generate(kind):
    m = tiny_qwen_vl(kind)
    kw = layout(MIXED, kind)
    cache = inf_mllm.enable(m, "inf_mllm", budget=256, chunk=16, n_recent=32)
    inf_mllm.stream(m, kw["input_ids"], cache=cache, chunk=4, **_vision(kw))
    new = inf_mllm.generate(m, torch.tensor([[7, 8]]), cache=cache, max_new_tokens=4, do_sample=False)
    whole = _plus_token(_plus_token(kw, 7), 8)
    ref = m.generate(**whole, max_new_tokens=4, do_sample=False)[:, whole["input_ids"].shape[1]:]
    assert new.tolist() == ref.tolist()


@torch.no_grad()
def test_smolvlm_decoder_is_found():
    """Idefics3 / SmolVLM keeps its decoder at model.model.text_model."""
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration

    torch.manual_seed(0)
    cfg = Idefics3Config(text_config=dict(vocab_size=200, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2),
                         vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                                            image_size=64, patch_size=16), image_token_id=199)
    sm = Idefics3ForConditionalGeneration(cfg).eval()
    ids = torch.randint(3, 190, (1, 100), generator=torch.Generator().manual_seed(0))
    ref = sm(input_ids=ids).logits[0, -1].float()
    got = inf_mllm.stream(sm, ids, cache=inf_mllm.enable(sm, "full", budget=256), chunk=16)[0]
    assert _rel(got, ref) < 1e-5
    cache = inf_mllm.enable(sm, "inf_mllm", budget=32, n_recent=8, chunk=16)
    inf_mllm.stream(sm, ids, cache=cache)
    assert cache.stats()["slots_used"] == 32

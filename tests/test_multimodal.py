"""Multimodal streaming (issue 6): a tiny random LLaVA (real LlavaForConditionalGeneration with a
small CLIP vision tower and a small Llama, real LlavaProcessor), real frames from opencv-doc's
vtest.avi decoded with OpenCV. Random weights: shapes, memory bounds, exactness against ``full``
and against the model's own multimodal forward, modality accounting, policies; never accuracy."""
import numpy as np
import pytest
import torch

import inf_mllm
from inf_mllm.evals.video_bench import tiny_llava
from inf_mllm.modality import IMAGE, TEXT, VIDEO
from inf_mllm.policies import make_policy

from _buffers import filled_buffers

TOK_PER_IMG = 4  # 32x32 image, 16x16 patches, CLS dropped


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only add contention on a shared machine
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def vtest():
    pytest.importorskip("cv2", reason="needs OpenCV: pip install opencv-python-headless")
    from inf_mllm.video import find_sample_video

    try:
        return find_sample_video("vtest.avi")
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def frames(vtest):
    from inf_mllm.video import read_frames

    return list(read_frames(vtest, every=3, max_frames=210, size=48))


def test_video_helpers(vtest, monkeypatch, tmp_path):
    from inf_mllm import video

    info = video.video_info(vtest)
    assert info["frames"] > 700 and info["width"] == 768 and info["height"] == 576
    fr = list(video.read_frames(vtest, every=100, max_frames=3))
    assert len(fr) == 3 and fr[0].shape == (576, 768, 3) and fr[0].dtype == np.uint8
    assert not np.array_equal(fr[0], fr[1])  # real, moving frames
    small = list(video.read_frames(vtest, every=1, max_frames=2, size=32))
    assert small[0].shape == (32, 32, 3)
    mm = video.find_sample_video("Megamind.avi")
    assert len(list(video.read_frames(mm, every=20, max_frames=30, size=16, loop=True))) == 30  # 270 frames / 20 < 30
    monkeypatch.setenv("INF_MLLM_VIDEO_DIR", str(tmp_path))
    monkeypatch.setattr(video, "sample_dirs", lambda: [str(tmp_path)])
    with pytest.raises(FileNotFoundError, match="opencv-doc"):
        video.find_sample_video()


def test_enable_attaches_to_language_model_only():
    m, proc = tiny_llava()
    cache = inf_mllm.enable(m, "inf_mllm", budget=32, n_recent=4, window=4, chunk=8)
    assert m.config.get_text_config()._attn_implementation == "inf_mllm"
    assert m.config.vision_config._attn_implementation != "inf_mllm"
    assert m.model.vision_tower.config._attn_implementation != "inf_mllm"
    assert len(cache.layers) == m.config.text_config.num_hidden_layers
    assert cache.rope.rotary is m.model.language_model.rotary_emb
    from inf_mllm._compat import attention_modules

    assert len(attention_modules(m)) == m.config.text_config.num_hidden_layers
    feats = inf_mllm._compat.image_features(m, torch.randn(2, 3, 32, 32))  # vision tower still runs (sdpa)
    assert [tuple(f.shape) for f in feats] == [(TOK_PER_IMG, 96)] * 2


def test_other_mrope_family_refused_with_reason():
    """Qwen2-VL / 2.5-VL / 3-VL are supported (tests/test_mrope.py); an M-RoPE family that was not
    tested for exactness (here: a Qwen2-VL posing as GLM-4V) is refused in one line."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    cfg = Qwen2VLConfig(
        text_config=dict(vocab_size=300, hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, bos_token_id=0, eos_token_id=1,
                         rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e4}),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=1, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
    )
    m = Qwen2VLForConditionalGeneration(cfg)
    inf_mllm.enable(m, "inf_mllm", budget=64, n_recent=8)  # the family itself is accepted
    m.config.model_type = "glm4v"
    for pol in ("inf_mllm", "full", "h2o"):
        with pytest.raises(ValueError, match="multimodal rotary positions are supported for qwen2_vl.*not one of them"):
            inf_mllm.enable(m, pol, budget=64, n_recent=8)


def test_preprocessing_processor_and_fallback(frames):
    from inf_mllm.vision import FrameEncoder

    m, proc = tiny_llava()
    real = FrameEncoder(m, proc).pixel_values(frames[:3])
    plain = FrameEncoder(m, None).pixel_values(frames[:3])
    assert real.shape == plain.shape == (3, 3, 32, 32)
    assert (real - plain).abs().mean() < 0.1  # same normalisation; resampling differs slightly
    with pytest.raises(ValueError, match="not a vision-language model"):
        from tests._model import tiny_llama

        FrameEncoder(tiny_llama(), None)


def test_streamed_image_equals_model_forward(frames):
    """Session(text, image, text) == LlavaForConditionalGeneration's own forward with <image> + pixel_values."""
    ref, proc = tiny_llava()
    m, _ = tiny_llava()
    img = frames[5]
    inputs = proc(text="USER: <image>\nWhat is it?", images=[img], return_tensors="pt")
    assert int((inputs.input_ids == m.config.image_token_id).sum()) == TOK_PER_IMG
    with torch.no_grad():
        want = ref(**inputs).logits[0, -1].float()
    for policy, kw in (("full", {}), ("inf_mllm", dict(budget=64, n_recent=8, window=4, chunk=8))):
        s = inf_mllm.Session(m, None, processor=proc, policy=policy, **kw)
        s.append("USER: ")
        s.append_image(img, text_after="\nWhat is it?")
        got = s._last_logits[0]
        torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
        st = s.stats()
        assert st["images"] == 1 and st["slots_by_modality"]["image"] == TOK_PER_IMG
        assert st["slots_by_modality"]["text"] == st["tokens_seen"] - TOK_PER_IMG


def test_video_session_matches_full_under_budget(frames):
    m, proc = tiny_llava()
    out = {}
    for policy, kw in (("full", {}), ("inf_mllm", dict(budget=200, n_recent=16, window=8, chunk=16)),
                       ("streaming_llm", dict(budget=200, chunk=16))):
        s = inf_mllm.Session(m, None, processor=proc, policy=policy, **kw)
        s.append("USER: a video.\n")
        n = s.append_video(frames[:12], fps=10 / 3, frames_per_chunk=5, frame_text="t={t:.1f}s ")
        assert n == 12
        s.append("\nWhat happens?")
        out[policy] = s._last_logits[0]
        st = s.stats()
        assert st["slots_by_modality"]["video"] == 12 * TOK_PER_IMG and st["frames"] == 12
        assert st["evictions"] == 0
    torch.testing.assert_close(out["inf_mllm"], out["full"], atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(out["streaming_llm"], out["full"], atol=2e-4, rtol=1e-4)
    s = inf_mllm.Session(m, None, processor=proc, policy="inf_mllm", budget=200, n_recent=16, window=8, chunk=16)
    s.append_video(frames[:2])
    ans = s.ask("Who?", max_new_tokens=3)
    assert isinstance(ans, str) and s.stats()["questions"] == 1


def test_memory_flat_over_200_frames(frames):
    """200 real frames (800 frame tokens) into a 64-slot budget: never above C, bytes constant, RSS flat."""
    from inf_mllm.evals.engine import process_rss

    m, proc = tiny_llava()
    s = inf_mllm.Session(m, None, processor=proc, policy="inf_mllm", budget=64, n_recent=8, window=8, chunk=16)
    s.append("USER: watch.")
    C = s.cache.capacity
    seen_bytes, rss = set(), []
    maxlen = 0

    def spy(compact, buf):
        def f(*a, **k):
            nonlocal maxlen
            maxlen = max(maxlen, buf.max_length())
            return compact(*a, **k)
        return f

    for layer in s.cache.layers:
        layer.buf.compact = spy(layer.buf.compact, layer.buf)
    for i in range(0, 200, 10):
        s.append_video(frames[i : i + 10], frames_per_chunk=2)
        lens = [ln for layer in s.cache.layers for ln in layer.buf.lengths]
        assert max(lens) <= 64
        seen_bytes.add(s.stats()["cache_bytes"])
        rss.append(process_rss())
    st = s.stats()
    assert st["frames"] == 200 and st["tokens_seen"] == 200 * TOK_PER_IMG + len("USER: watch.")
    assert maxlen <= C and st["capacity"] == C
    assert len(seen_bytes) == 1
    assert st["evictions"] > 50
    if rss[5]:
        assert rss[-1] - rss[5] < 32 * 2**20  # no growth with the number of frames


def test_look_m_text_prior_keeps_text(frames):
    m, proc = tiny_llava()
    text = "USER: remember this short note.\n"
    res = {}
    for policy, kw in (("look_m", dict(budget=64, n_recent=8, chunk=16)),
                       ("inf_mllm", dict(budget=64, n_recent=8, window=8, chunk=16))):
        s = inf_mllm.Session(m, None, processor=proc, policy=policy, **kw)
        s.append(text)
        s.append_video(frames[:20], frames_per_chunk=4)
        s.ask("?", max_new_tokens=2)
        res[policy] = s.stats()["slots_by_modality"]
    n_text = len(text) + 2 + 1  # note, "?\n" prompt and the first generated token
    assert res["look_m"]["text"] >= n_text - 1  # every text token kept (the last one or two may still be pending)
    assert res["inf_mllm"]["text"] < res["look_m"]["text"]  # no text prior: frames push text out


def test_min_text_slots_quota_model(frames):
    m, proc = tiny_llava()
    got = {}
    for q in (0, 24):
        # the first version's recency-leaning ranking, under which video frames push the text out
        # unless the quota keeps it (the default ranking may keep the text on its own)
        s = inf_mllm.Session(m, None, processor=proc, policy="inf_mllm", budget=48, n_recent=8, window=8, chunk=16,
                             min_text_slots=q, h_life=0, bias_mode="absolute", bias=1e-3, novelty=0, pool=1)
        s.append("USER: the key is 7391, the door is red, keep it.")  # 49 text tokens
        s.append_video(frames[:40], frames_per_chunk=4)
        layer = s.cache.layers[-1]
        got[q] = int((layer.buf.modality[0, :, : layer.buf.lengths[0]] == TEXT).sum(-1).min())
    assert got[24] >= 24
    assert got[0] < 24


@pytest.mark.parametrize("quota,n_text", [(0, 10), (6, 10), (10, 10), (10, 4), (16, 30)])
def test_min_text_slots_quota_synthetic(quota, n_text):
    # ranked by the scores alone (no novelty, no pooling: a pooled neighbour or a novel key could
    # lift a text slot), so that "scored worst" means ranked worst under any accumulate mode
    pol = make_policy("inf_mllm", budget=20, n_sink=2, n_recent=4, window=4, chunk=8, min_text_slots=quota,
                      novelty=0, pool=1)
    lay = filled_buffers(B=1, H=2, C=48, lengths=(40,), policy=pol, modality=IMAGE)
    text_slots = torch.arange(5, 5 + n_text)
    lay.modality[0, :, text_slots] = TEXT
    lay.scores[0, :, text_slots] = 0.0  # text scored worst: only the quota can keep it
    pol.evict(lay, [0])
    kept_text = (lay.modality[0, :, :20] == TEXT).sum(-1)
    assert lay.lengths == [20]
    want = min(quota, n_text, 20 - 2 - 4)
    assert (kept_text >= want).all() and (kept_text <= want).all()  # text scored worst: exactly the quota
    # sinks and recent are still kept: positions 0, 1 and the last 4
    pos = lay.position[0, 0, :20].tolist()
    assert pos[:2] == [0, 1] and pos[-4:] == [36, 37, 38, 39]


def test_min_text_slots_arguments():
    with pytest.raises(ValueError, match="exceeds budget"):
        make_policy("inf_mllm", budget=16, n_recent=4, min_text_slots=17)
    with pytest.raises(TypeError):
        make_policy("inf_mllm", budget=16, n_recent=4, min_text_slots=1.5)
    with pytest.raises(TypeError, match="unknown argument"):
        make_policy("h2o", budget=16, min_text_slots=2)


def _tiny_video_vlm(kind):
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaNextVideoConfig, LlavaNextVideoForConditionalGeneration,
                              LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration)

    torch.manual_seed(0)
    vc = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                          patch_size=8, projection_dim=32).to_dict() | {"model_type": "clip_vision_model"}
    tc = LlamaConfig(vocab_size=300, hidden_size=96, intermediate_size=128, head_dim=16, num_hidden_layers=2,
                     num_attention_heads=6, num_key_value_heads=2).to_dict() | {"model_type": "llama"}
    common = dict(vision_config=vc, text_config=tc, vision_feature_layer=-2, vision_feature_select_strategy="default",
                  image_token_index=298, video_token_index=299)
    if kind == "next_video":
        return LlavaNextVideoForConditionalGeneration(LlavaNextVideoConfig(spatial_pool_stride=2, **common)).eval()
    return LlavaOnevisionForConditionalGeneration(LlavaOnevisionConfig(**common)).eval()


@pytest.mark.parametrize("kind", ["next_video", "onevision"])
def test_video_path_llava_next_video_and_onevision(frames, kind):
    """LLaVA-NeXT-Video / LLaVA-OneVision: frames through the model's own video path (pooling,
    OneVision's newline), same language-side attachment; exact vs full under budget, bounded over it."""
    from inf_mllm.vision import FrameEncoder

    m = _tiny_video_vlm(kind)
    enc = FrameEncoder(m, None)
    # tokens of a group of 3 frames through the model's own video path (12 for NeXT-Video's pooling;
    # OneVision's newline makes 13 on transformers 5.24, 12 on 5.0)
    tok_per_group = int(enc.encode_video(frames[:3]).shape[0])
    assert tok_per_group in (12, 13)
    logits = {}
    for policy, kw in (("full", {}), ("inf_mllm", dict(budget=128, n_recent=8, window=4, chunk=16))):
        s = inf_mllm.Session(m, None, policy=policy, **kw)
        assert m.config.vision_config._attn_implementation != "inf_mllm"
        s.append_embeds(torch.randn(1, 5, 96, generator=torch.Generator().manual_seed(1)), modality="text")
        s.append_video(frames[:6], frames_per_chunk=3)
        assert s.stats()["slots_by_modality"]["video"] == 2 * tok_per_group
        logits[policy] = s._last_logits
    torch.testing.assert_close(logits["inf_mllm"], logits["full"], atol=2e-4, rtol=1e-4)
    s = inf_mllm.Session(m, None, policy="inf_mllm", budget=24, n_recent=4, window=4, chunk=8)
    s.append_video(frames[:60], frames_per_chunk=3)
    assert max(s.cache.lengths()) <= 24 and s.stats()["tokens_seen"] == 20 * tok_per_group


def test_append_video_generator_max_frames_drops_nothing(frames):
    m, proc = tiny_llava()
    s = inf_mllm.Session(m, None, processor=proc, policy="inf_mllm", budget=64, n_recent=8, window=8, chunk=16)
    it = iter(frames[:25])
    assert s.append_video(it, max_frames=10, frames_per_chunk=3) == 10
    assert s.append_video(it, max_frames=10, frames_per_chunk=4) == 10
    assert s.append_video(it, frames_per_chunk=4) == 5
    assert s.stats()["frames"] == 25 and s.stats()["tokens_seen"] == 25 * TOK_PER_IMG
    with pytest.raises(ValueError, match="frames_per_chunk"):
        s.append_video(frames[:2], frames_per_chunk=0)


def test_bench_video_cli_smoke(vtest, tmp_path):
    """``inf-mllm bench video`` end to end with tiny sizes (random tiny LLaVA, real frames)."""
    import json
    import os

    pytest.importorskip("matplotlib")
    from inf_mllm import cli

    threads = torch.get_num_threads()
    try:
        rc = cli.main(["bench", "video", "--policies", "full,inf_mllm,look_m", "--budget", "32", "--n-recent", "4",
                       "--window", "4", "--chunk", "16", "--min-frames", "8", "--frames", "16", "--frames-per-chunk", "4",
                       "--every", "5", "--frame-size", "32", "--no-progress", "--threads", "1", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    d = json.load(open(os.path.join(tmp_path, "bench_video.json")))
    rows = [r for r in d["rows"] if "fps" in r]
    assert {r["policy"] for r in rows} == {"full", "inf_mllm", "look_m"}
    assert sorted({r["frames"] for r in rows}) == [8, 16]
    for r in rows:
        assert r["fps"] > 0 and r["tokens_seen"] == r["frames"] * TOK_PER_IMG
        if r["policy"] != "full":
            assert r["cache_slots"] <= r["capacity"]
    assert os.path.exists(os.path.join(tmp_path, "bench_video_fps.png"))

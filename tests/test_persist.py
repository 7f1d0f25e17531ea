"""Saving and loading caches and sessions (``inf_mllm.persist``), and the Policy contract's JSON state."""
import json
import os

import pytest
import torch

import inf_mllm
from inf_mllm import persist
from inf_mllm._compat import CACHE_KW
from inf_mllm.buffers import OWNER_ATTR, KVBuffers
from inf_mllm.policies import available_policies, get_policy_class

from _model import policy_kwargs, tiny_llama

# a pooled cache (``kvzip``) cannot be saved yet: tests/test_pooled.py checks that save() says so
ALL = [p for p in available_policies() if not getattr(get_policy_class(p), "pooled", False)]
FIXED = [p for p in ALL if not get_policy_class(p).grows]


@pytest.fixture(scope="module")
def model():
    return tiny_llama(n_layers=2)


def _ids(n, seed=0, rows=1):
    return torch.randint(0, 128, (rows, n), generator=torch.Generator().manual_seed(seed))


def _streamed(model, policy, ids, decode=12, **kw):
    """A cache after a prompt and ``decode`` single-token steps, with evictions (budget 48)."""
    cache = inf_mllm.enable(model, policy, **policy_kwargs(policy, budget=48, chunk=16), **kw)
    inf_mllm.stream(model, ids[:, : ids.shape[1] - decode], cache=cache)
    for t in range(ids.shape[1] - decode, ids.shape[1]):
        model(ids[:, t : t + 1], **{CACHE_KW: cache})
    return cache


@pytest.mark.parametrize("policy", ALL)
def test_policy_state_is_json_and_selectable(model, policy):
    """The Policy contract: a layer's state survives a JSON round trip unchanged, and
    ``select_state`` picks rows (beam search)."""
    cache = _streamed(model, policy, _ids(150, rows=2))
    pol = cache.policy
    for layer in cache.layers:
        st = layer.buf.state
        assert json.loads(json.dumps(st)) == st
        assert json.dumps(json.loads(json.dumps(st))) == json.dumps(st)  # no tuple, no int key
        sel = pol.select_state(st, [1, 1, 0])
        if isinstance(st, list):
            assert sel == [st[1], st[1], st[0]]
        else:
            assert sel is None and st is None


@pytest.mark.parametrize("policy", ALL)
def test_next_logits_bit_identical_after_load(model, policy, tmp_path, monkeypatch):
    ids = _ids(200, seed=3)
    cache = _streamed(model, policy, ids[:, :160])
    if policy in FIXED:
        assert cache.stats()["evictions"] > 0
    info = cache.save(tmp_path / "c.safetensors")
    assert info["bytes"] == os.path.getsize(tmp_path / "c.safetensors") and info["MiB_per_s"] > 0
    loaded = inf_mllm.StreamingCache.load(tmp_path / "c.safetensors", model)
    assert loaded.stats() == cache.stats() and loaded.get_seq_length() == cache.get_seq_length()
    for a, b in zip(cache.layers, loaded.layers):
        assert getattr(b.buf.k, OWNER_ATTR) is b and b.buf.lengths == a.buf.lengths and b.buf.state == a.buf.state
        assert b.buf.capacity == a.buf.capacity
        for name, t in a.buf.slot_tensors().items():
            L = a.buf.lengths[0]
            assert torch.equal(t[:, :, :L], b.buf.slot_tensors()[name][:, :, :L]), name
    from inf_mllm import attention

    def never(*a, **k):
        raise AssertionError("a loaded cache reached the plain-attention fallback")

    monkeypatch.setattr(attention, "_plain_attention", never)
    for t in range(160, 200):  # past more evictions
        la = model(ids[:, t : t + 1], **{CACHE_KW: cache}).logits
        lb = model(ids[:, t : t + 1], **{CACHE_KW: loaded}).logits
        assert torch.equal(la, lb), t
    assert loaded.stats() == cache.stats()


def test_padded_batch_round_trip(model, tmp_path):
    """Rows of different lengths (a left-padded prefill): slots past a row's length are not data
    (written as zeros), and the rows go on as before."""
    ids = _ids(120, seed=5, rows=2)
    mask = torch.ones_like(ids)
    mask[1, :100] = 0  # row 1: 20 tokens, below budget; row 0 evicted to it
    cache = inf_mllm.enable(model, "inf_mllm", **policy_kwargs("inf_mllm", budget=48, chunk=16))
    inf_mllm.stream(model, ids, cache=cache, attention_mask=mask)
    assert len(set(cache.lengths())) == 2
    cache.save(tmp_path / "p.safetensors")
    loaded = inf_mllm.StreamingCache.load(tmp_path / "p.safetensors", model)
    nxt = _ids(6, seed=6, rows=2)
    for t in range(6):
        la = model(nxt[:, t : t + 1], **{CACHE_KW: cache}).logits
        lb = model(nxt[:, t : t + 1], **{CACHE_KW: loaded}).logits
        assert torch.equal(la, lb)


def test_session_round_trip(tmp_path):
    m, tok = inf_mllm.load_model("tiny-random")
    s = inf_mllm.Session(m, tok, policy="inf_mllm", budget=64, n_recent=16, window=8, chunk=32, progress=False)
    s.append("The red key is under the mat. " * 12)
    s.ask("Where is the key?", max_new_tokens=6)
    s.save(tmp_path / "s.safetensors")
    t = inf_mllm.Session.load(tmp_path / "s.safetensors", m, tok)
    assert t.stats() == s.stats() and t.progress is False
    assert torch.equal(t._last_logits, s._last_logits)
    assert t.ask("And the door?", max_new_tokens=8) == s.ask("And the door?", max_new_tokens=8)
    assert t.stats() == s.stats()
    s.cache.save(tmp_path / "c.safetensors")
    with pytest.raises(ValueError, match="holds a bare cache, not a Session"):
        inf_mllm.Session.load(tmp_path / "c.safetensors", m, tok)
    # a session file holds a whole cache: StreamingCache.load takes it too
    s.save(tmp_path / "s2.safetensors")
    assert inf_mllm.StreamingCache.load(tmp_path / "s2.safetensors", m).stats() == s.cache.stats()


def _one_line(excinfo, *words):
    msg = str(excinfo.value)
    assert "\n" not in msg and msg.startswith("inf_mllm: "), msg
    for w in words:
        assert w in msg, msg


def test_refusals(model, tmp_path):
    cache = _streamed(model, "inf_mllm", _ids(100))
    path = tmp_path / "c.safetensors"
    cache.save(path)
    load = inf_mllm.StreamingCache.load
    with pytest.raises(ValueError) as e:  # another checkpoint of the same architecture
        load(path, tiny_llama(n_layers=2, seed=1))
    _one_line(e, "another model", "other weights")
    with pytest.raises(ValueError) as e:  # another architecture
        load(path, tiny_llama(n_layers=3))
    _one_line(e, "another model", "num_hidden_layers 2 in the file, 3 here")
    with pytest.raises(ValueError) as e:
        load(path, model.to(torch.float64))
    model.to(torch.float32)
    _one_line(e, "dtype 'float32' in the file, 'float64' here")
    data = path.read_bytes()
    (tmp_path / "t.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError) as e:
        load(tmp_path / "t.safetensors", model)
    _one_line(e, "truncated or corrupted")
    bad = bytearray(data)
    bad[-50] ^= 0xFF  # one flipped byte in the tensor data
    (tmp_path / "x.safetensors").write_bytes(bytes(bad))
    with pytest.raises(ValueError) as e:
        load(tmp_path / "x.safetensors", model)
    _one_line(e, "corrupted", "checksum")
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        header = json.loads(f.metadata()["inf_mllm"])
    header["version"] = persist.VERSION + 1
    save_file(tensors, str(tmp_path / "n.safetensors"), metadata={"inf_mllm": json.dumps(header)})
    with pytest.raises(ValueError) as e:
        load(tmp_path / "n.safetensors", model)
    _one_line(e, f"format version {persist.VERSION + 1}", "upgrade inf_mllm")
    header["version"] = 0
    save_file(tensors, str(tmp_path / "o.safetensors"), metadata={"inf_mllm": json.dumps(header)})
    with pytest.raises(ValueError) as e:
        load(tmp_path / "o.safetensors", model)
    _one_line(e, "format version 0", "no longer reads")
    save_file({"w": torch.zeros(3)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(ValueError) as e:
        load(tmp_path / "w.safetensors", model)
    _one_line(e, "not a saved inf_mllm state")
    with pytest.raises(ValueError) as e:
        load(tmp_path, model)
    _one_line(e, "is not a file")
    with pytest.raises(ValueError) as e:
        load(tmp_path / "missing.safetensors", model)
    _one_line(e, "no such file")
    with pytest.raises(ValueError) as e:
        cache.save(tmp_path)
    _one_line(e, "is a directory")


def test_crash_between_write_and_rename_keeps_previous_file(model, tmp_path, monkeypatch):
    path = tmp_path / "c.safetensors"
    cache = _streamed(model, "streaming_llm", _ids(100))
    cache.save(path)
    before = path.read_bytes()
    model(_ids(1, seed=9), **{CACHE_KW: cache})  # the cache moves on

    def crash(tmp, dst):
        assert os.path.exists(tmp) and os.path.dirname(tmp) == os.path.dirname(os.path.abspath(dst))
        raise OSError("injected crash before the rename")

    monkeypatch.setattr(persist, "_before_replace", crash)
    with pytest.raises(OSError, match="injected"):
        cache.save(path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["c.safetensors"]  # no temporary file left
    assert inf_mllm.StreamingCache.load(path, model).get_seq_length() == 100
    monkeypatch.undo()
    cache.save(path)
    assert inf_mllm.StreamingCache.load(path, model).get_seq_length() == 101


def test_a_tensor_added_to_the_registry_is_saved_and_reordered(model, tmp_path, monkeypatch):
    """Save, load, clone and row selection go through ``KVBuffers.SLOT_TENSORS``: a per-slot tensor
    added there (as later metadata will be) needs no change to them."""
    monkeypatch.setattr(KVBuffers, "SLOT_TENSORS", KVBuffers.SLOT_TENSORS + ("extra",))
    alloc = KVBuffers._alloc

    def _alloc(self, B, H, C, D):
        alloc(self, B, H, C, D)
        self.extra = torch.zeros(B, H, C, dtype=torch.int32, device=self.device)

    monkeypatch.setattr(KVBuffers, "_alloc", _alloc)
    cache = _streamed(model, "window", _ids(80, rows=2))
    for layer in cache.layers:
        layer.buf.extra[:, :, :48] = torch.arange(2 * 2 * 48, dtype=torch.int32).view(2, 2, 48)
    cache.save(tmp_path / "e.safetensors")
    loaded = inf_mllm.StreamingCache.load(tmp_path / "e.safetensors", model)
    twin = loaded.clone()
    for a, b in zip(cache.layers, twin.layers):
        assert torch.equal(a.buf.extra[:, :, :48], b.buf.extra[:, :, :48])
    twin.reorder_cache(torch.tensor([1, 0]))
    for a, b in zip(cache.layers, twin.layers):
        assert torch.equal(a.buf.extra[[1, 0], :, :48], b.buf.extra[:, :, :48])

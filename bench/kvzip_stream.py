"""KVzip's scores, streamed: would a score fixed at insertion, from a reconstruction probe, keep the key?

    PYTHONPATH=$PWD python bench/kvzip_stream.py [--prompt] [--mix 0] [--local 1] \\
        -- <inf-mllm eval needle arguments, e.g. --preset passkey-prose --seeds tune ...>

For evidence only (issue 20). kvpress's KVzip keeps the pass key at 20% of these cases in one shot;
``reconstruct=r`` (the probe of ``inf_mllm``) added its attention to the running scores and did not
(method.md §9.2). This script streams KVzip's own recipe as closely as a stream allows:

* every chunk is fed again as a probe (``inf_mllm.stream``'s reconstruction pass), optionally after
  KVzip's instruction (``--prompt``: "\\n\\nRepeat the previous context exactly.\\n");
* the probe scores only the chunk it repeats: each of the chunk's slots gets the largest
  attention probability any probe query (instruction included) and any query head of its GQA
  group gives it, with the softmax over the sinks, the chunk's own keys and the probe's keys
  (KVzip's subsampled softmax; ``--local 0``: over the whole cache);
* that score is fixed at insertion (``buf.kz``, a slot tensor that moves with its token) and is
  the whole ranking (``--mix 0``; ``--mix w`` adds ``w * z(kz)`` to ``inf_mllm``'s own rank).
  A score fixed at insertion streams exactly: the best ``k`` kept chunk by chunk are the one-shot
  best ``k``. Sinks and the last ``n_recent`` tokens are kept as by every policy here.

Policy ``inf_mllm_kz`` is registered by :func:`main` only (importing this changes no policy list).
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from inf_mllm import ops  # noqa: E402
from inf_mllm._compat import CACHE_KW  # noqa: E402
from inf_mllm.cache import StreamingCache, StreamingLayer  # noqa: E402
from inf_mllm.policies.base import register_policy  # noqa: E402
from inf_mllm.policies.inf_mllm import InfMLLMPolicy, _standardise  # noqa: E402
import per_head_budget as ph  # noqa: E402

PROMPT = "\n\nRepeat the previous context exactly.\n"


class KVzipStream(InfMLLMPolicy):
    name = "inf_mllm_kz"
    defaults = dict(InfMLLMPolicy.defaults, reconstruct=1.0, probe="max", mix=0.0, local=1, prompt_len=0)

    def validate(self):
        super().validate()
        self._upto = {}  # id(buf) -> [B] tokens fed when the last probe ran

    @property
    def capacity(self):
        return super().capacity + int(self.params["prompt_len"])

    @staticmethod
    def kz(buf):
        if "kz" not in buf.SLOT_TENSORS:
            buf.SLOT_TENSORS = tuple(buf.SLOT_TENSORS) + ("kz",)
            buf.kz = torch.zeros_like(buf.scores)
        return buf.kz

    def chunk_slots(self, buf, b, L):
        """``[Hkv, L]`` bool: the slots of row ``b`` fed since the last probe (the chunk it repeats)."""
        upto = self._upto.get(id(buf))
        start = 0 if upto is None else int(upto[b])
        return buf.position[b, :, :L].long() >= start

    def probed(self, buf, rows, gained, n):
        kz = self.kz(buf)
        for b in rows:
            L = buf.lengths[b]
            new = self.chunk_slots(buf, b, L)
            kz[b, :, :L] = torch.where(new, gained[b, :, :L], kz[b, :, :L])
        self._upto[id(buf)] = buf.fed.clone()

    def evict(self, buf, rows, **kw):
        """The shared eviction (``kz`` is a registered slot tensor: it moves with its tokens); the
        slots freed past the new length are cleared, so a token never probed ranks at 0."""
        old_len = list(buf.lengths)
        out = super().evict(buf, rows, **kw)
        kz = self.kz(buf)
        for b in rows:
            if buf.lengths[b] != old_len[b]:
                kz[b, :, buf.lengths[b]:] = 0
        return out

    def rank(self, buf, rows):
        kz = self.kz(buf).clone()
        w = self.params["mix"]
        if not w:
            return kz
        r = super().rank(buf, rows)
        r = buf.scores.clone() if r is None else r.clone()
        for b in rows:
            T = buf.lengths[b]
            lo, hi = self.n_sink, T - self.n_recent
            if hi - lo > 1:
                r[b, :, :T] += w * _standardise(kz[b, :, :T], lo, hi)
        return r


def kz_probe(self, q, kn, vn, scaling, rope):
    """:meth:`StreamingLayer._probe` for ``inf_mllm_kz``: the model's probe attention as usual, and
    KVzip's per-slot peak over the probe, its softmax restricted to sinks + chunk + probe."""
    pol, buf = self.cache.policy, self.buf
    if not isinstance(pol, KVzipStream):
        return _orig_probe(self, q, kn, vn, scaling, rope)
    n = q.shape[2]
    before = list(buf.lengths)
    if max(before) + n > buf.capacity:
        raise RuntimeError("kvzip_stream: the probe does not fit")
    length, fed = buf.length.clone(), buf.fed.clone()
    buf.append(kn, vn, self.cache._modality)
    out = ops.attention_with_scores(q, buf.k, buf.v, buf.length, None, scale=scaling, **rope, window=0,
                                    check_values=False)
    Hkv = buf.k.shape[1]
    rope_args = tuple(rope.get(name, default) for name, default in
                      (("cos", None), ("sin", None), ("inv_freq", None), ("rope_scale", 1.0), ("rope_pos", None),
                       ("rope_sections", None)))
    gained = torch.zeros_like(buf.scores)
    for b in range(q.shape[0]):
        L = before[b] + n
        excluded = torch.zeros(Hkv, L, dtype=torch.bool)
        if pol.params["local"]:  # KVzip's subsampled softmax: sinks + the chunk + the probe
            excluded[:, : before[b]] = ~pol.chunk_slots(buf, b, before[b])
            excluded[:, : pol.n_sink] = False
        drop = getattr(buf, "drop", None)  # bench/kvzip_select.py --stream: a dropped slot is gone
        if drop is not None:
            excluded[:, : before[b]] |= drop[b, :, : before[b]]
        p = ph.attend_row(q, buf.k, buf.v, b, L, excluded, scaling, rope_args)[1]
        gained[b, :, :L] = p.reshape(Hkv, -1, n, L).amax(dim=(1, 2))
    buf.length.copy_(length)
    buf.fed.copy_(fed)
    buf.lengths = before
    for b, L in enumerate(before):
        gained[b, :, L:] = 0
    pol.probed(buf, list(range(buf.batch)), gained, n)
    return out


_orig_probe = StreamingLayer._probe
_prompt_ids = {}


def with_prompt(forward):
    """The model's forward, with KVzip's instruction put before every probe's tokens."""

    def f(self, input_ids=None, **kw):
        cache = kw.get(CACHE_KW)  # "cache" from transformers 5.24 on, "past_key_values" before
        if isinstance(cache, StreamingCache) and cache._probing is not None and input_ids is not None:
            if kw.get("attention_mask") is not None or kw.get("position_ids") is not None:
                raise ValueError("kvzip_stream: --prompt takes unpadded rows")
            key = self.config.name_or_path
            if key not in _prompt_ids:
                from transformers import AutoTokenizer

                tok = AutoTokenizer.from_pretrained(key)
                _prompt_ids[key] = torch.tensor([tok.encode(PROMPT, add_special_tokens=False)])
            ids = _prompt_ids[key].to(input_ids.device).expand(input_ids.shape[0], -1)
            input_ids = torch.cat([ids, input_ids], 1)
        return forward(self, input_ids=input_ids, **kw)

    return f


def main():
    argv = sys.argv[1:]
    if "--" not in argv:
        sys.exit(__doc__)
    cut = argv.index("--")
    p = argparse.ArgumentParser()
    p.add_argument("--prompt", action="store_true", help="put KVzip's instruction before every probe")
    p.add_argument("--mix", default="0", help="weights of z(kz) added to inf_mllm's rank to sweep (0: kz alone)")
    p.add_argument("--local", type=int, default=1, help="1: softmax over sinks + chunk + probe (KVzip's); 0: all")
    a = p.parse_args(argv[:cut])
    register_policy(KVzipStream)
    StreamingLayer._probe = kz_probe
    rest = argv[cut + 1 :] + ["--policies", "inf_mllm_kz", "--policy-arg", f"local={a.local}",
                              "--sweep", "mix=" + a.mix]
    if a.prompt:
        import transformers

        for cls in (transformers.LlamaForCausalLM, transformers.Qwen2ForCausalLM):
            cls.forward = with_prompt(cls.forward)
        rest += ["--policy-arg", "prompt_len=16"]
    from inf_mllm.cli import main as cli

    return cli(rest)


if __name__ == "__main__":
    sys.exit(main())

"""Would per-KV-head budgets keep the key at budget 128? An emulation, for evidence only.

    PYTHONPATH=$PWD python bench/per_head_budget.py --alloc uniform,z,raw [--head-cap 256] \\
        -- <inf-mllm eval needle arguments, e.g. --preset passkey-prose --seeds tune ...>

Issue 20 asks whether per-head budgets (``length [B, Hkv]``, a SPEC §2 change through every
kernel) would keep the needle, and to make that change only with evidence. kvpress's KVzip, which
keeps the key at 20% on these cases, selects across the KV heads of a layer (and across layers),
not per head. This script measures the per-head question inside the real streaming cache, without
touching SPEC's buffers, by emulating a per-head length:

* policy ``inf_mllm_hw`` (registered here only): ``inf_mllm`` with its defaults, except that at
  each eviction a layer keeps ``Hkv * (budget - n_sink - n_recent)`` middle slots chosen over all
  its KV heads together (each head keeps its own sinks and recent, and at most ``head_cap`` slots):
  ``--alloc z`` by the policy's own rank (``z(score per call) + 2 z(novelty)``, pooled, per head),
  ``raw`` by the pooled score per call alone (attention probabilities, comparable across heads, as
  KVzip's), ``uniform`` every head its ``budget`` (the control: the same selection as
  ``inf_mllm``; its answers must equal ``inf_mllm``'s);
* each head's kept tokens are packed at the end of the occupied slots, in order, after a run of
  "holes" at the front (``buf.hole [B, Hkv]``), so with rolling positions the distance from every
  query to every kept key is what it would be in a buffer of that head's own length (RoPE sees
  only distances; the relative attention bias sees the slot, so it shifts by the head's holes);
* ``ops.attention_with_scores`` is wrapped: a layer with holes attends through a masked PyTorch
  computation (SPEC §4.1 with the hole slots excluded), the others through the operator.

The slots held per layer are the same as ``inf_mllm``'s at the same budget (only their split
over heads changes), but the buffers are allocated at ``head_cap + slack`` slots.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from inf_mllm import ops  # noqa: E402
from inf_mllm.buffers import OWNER_ATTR  # noqa: E402
from inf_mllm.policies.base import register_policy  # noqa: E402
from inf_mllm.policies.inf_mllm import InfMLLMPolicy, _standardise, key_novelty  # noqa: E402
from inf_mllm.policies.snapkv import max_pool_slots  # noqa: E402
from inf_mllm.reference import apply_rope, rotate_row  # noqa: E402

ALLOCS = ("uniform", "z", "raw")


class HeadwiseInfMLLM(InfMLLMPolicy):  # registered by main() only, so importing it changes no policy list
    name = "inf_mllm_hw"
    defaults = dict(InfMLLMPolicy.defaults, alloc="z", head_cap=0, prior=0.0, head_floor=0.0)

    def validate(self):
        super().validate()
        if self.params["alloc"] not in ALLOCS:
            raise ValueError(f"alloc must be one of {ALLOCS}")
        if self.params["accumulate"] != "mean" or self.params["reconstruct"] or self.params["layer_slope"]:
            raise ValueError("inf_mllm_hw emulates the default ranking only (accumulate=mean)")
        self.head_cap = int(self.params["head_cap"]) or 2 * self.budget

    @property
    def capacity(self):
        return self.head_cap + self.slack

    @staticmethod
    def holes(buf):
        h = getattr(buf, "hole", None)
        if h is None or h.shape != (buf.batch, buf.heads):
            buf.hole = h = torch.zeros(buf.batch, buf.heads, dtype=torch.long)
        return h

    def held(self, buf, b):
        return [buf.lengths[b] - int(x) for x in self.holes(buf)[b]]

    def over_budget(self, buf, rows):
        cap = buf.heads * self.budget
        return [b for b in rows if sum(self.held(buf, b)) > cap or buf.lengths[b] > self.head_cap]

    def _head_rank(self, buf, b, h, lo, T):
        """The policy's rank of head ``h``'s slots ``lo..T-1`` (its valid ones), as ``rank()`` computes
        it for a buffer of that head alone, and the pooled score per call (for ``alloc=raw``)."""
        per_call = self._per_call(buf, b, T)[h, lo:T][None]  # [1, n]
        s, e = self.n_sink, (T - lo) - self.n_recent
        nov = key_novelty(buf.k[b, h : h + 1, lo:T])
        r = _standardise(per_call, s, e) + self.params["novelty"] * _standardise(nov, s, e)
        if self.params["prior"]:
            r = r + self.params["prior"] * _standardise(buf.prior[b, h : h + 1, lo:T], s, e)
        k = self.params["pool"]
        return max_pool_slots(r, k)[0], max_pool_slots(per_call, k)[0]

    def evict(self, buf, rows, **kw):
        rows = self.over_budget(buf, rows)
        hole = self.holes(buf)
        mid = self.budget - self.n_sink - self.n_recent
        cap_mid = self.head_cap - self.n_sink - self.n_recent
        for b in rows:
            T, H = buf.lengths[b], buf.heads
            cand = []  # (value, head, slot) of every middle candidate
            picks = [[] for _ in range(H)]
            for h in range(H):
                lo = int(hole[b, h])
                z, raw = self._head_rank(buf, b, h, lo, T)
                val = raw if self.params["alloc"] == "raw" else z
                s, e = lo + self.n_sink, T - self.n_recent
                picks[h] += list(range(lo, s)) + list(range(e, T))
                cand.append((val[self.n_sink : (T - lo) - self.n_recent], h, s))
            if self.params["alloc"] == "uniform":
                for v, h, s in cand:
                    top = torch.sort(v, descending=True, stable=True).indices[:mid]  # ties to the lower slot, as compact_
                    picks[h] += [s + int(i) for i in top]
            else:
                vals = torch.cat([v for v, _, _ in cand])
                owner = torch.cat([torch.full((v.numel(),), h) for v, h, _ in cand])
                slot = torch.cat([torch.arange(v.numel()) + s for v, _, s in cand])
                order = torch.argsort(vals, descending=True, stable=True)
                count = [0] * H
                floor = int(self.params["head_floor"] * mid)  # every head's own best first
                taken = set()
                if floor:
                    for h, (v, _, s) in enumerate(cand):
                        for i in torch.sort(v, descending=True, stable=True).indices[:floor].tolist():
                            picks[h].append(s + i)
                            taken.add((h, s + i))
                        count[h] = min(floor, v.numel())
                for i in order.tolist():
                    if sum(count) >= H * mid:
                        break
                    h = int(owner[i])
                    if count[h] < cap_mid and (h, int(slot[i])) not in taken:
                        picks[h].append(int(slot[i]))
                        count[h] += 1
            n = [len(p) for p in picks]
            L = max(n)
            for name, t in buf.slot_tensors().items():
                row = t[b]
                moved = [row[h, sorted(picks[h])].clone() for h in range(H)]
                for h in range(H):
                    row[h, L - n[h] : L] = moved[h]
            buf.scores[b, :, L:] = 0  # new tokens add to zeroed slots (as KVBuffers.compact leaves them)
            for h in range(H):
                buf.scores[b, h, : L - n[h]] = 0
                hole[b, h] = L - n[h]
            buf.length[b] = L
            buf.lengths[b] = L
            buf.evictions += 1
            self.evicted(buf, [b])


_op = ops.attention_with_scores


def masked_attention(q, k, v, length, scores=None, *, scale=None, window=32, bias=0.0, cos=None, sin=None,
                     bias_mode="absolute", decay=1.0, inv_freq=None, rope_scale=1.0, rope_pos=None,
                     rope_sections=None, check_values=None):
    """``ops.attention_with_scores`` with the emulated holes of the layer excluded (SPEC §4.1 otherwise)."""
    layer = getattr(k, OWNER_ATTR, None)
    buf = getattr(layer, "buf", None)
    if buf is not None and getattr(getattr(layer, "cache", None), "policy", None) is not None \
            and layer.cache.policy.params.get("prior") and k.data_ptr() == buf.k.data_ptr():
        insertion_prior(buf, q, length, scale, cos, sin, inv_freq, rope_scale)
    hole = getattr(buf, "hole", None)
    if hole is None or not bool((hole > 0).any()) or k.data_ptr() != buf.k.data_ptr():
        return _op(q, k, v, length, scores, scale=scale, window=window, bias=bias, cos=cos, sin=sin,
                   bias_mode=bias_mode, decay=decay, inv_freq=inv_freq, rope_scale=rope_scale, rope_pos=rope_pos,
                   rope_sections=rope_sections, check_values=check_values)
    B, Hq, n, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    scale = D ** -0.5 if scale is None else scale
    out = torch.zeros_like(q)
    rope = (cos, sin, inv_freq, rope_scale, rope_pos, rope_sections)
    for b in range(B):
        L = int(length[b])
        t, j = torch.arange(L - n, L), torch.arange(L)
        ob, p, ok = attend_row(q, k, v, b, L, j[None, :] < hole[b][:, None], scale, rope)
        out[b] = ob.to(q.dtype)
        if scores is not None and window > 0:
            scores[b, :, :L] *= decay
            for i in range(max(0, n - window), n):
                ti = int(t[i])
                row = p[:, i, : ti + 1].reshape(Hkv, G, ti + 1).mean(1)
                jj = j[: ti + 1].float()
                row = row + (bias * jj if bias_mode == "absolute" else bias * (jj + 1) / (ti + 1) ** 2)
                row = row * ok[::G, i, : ti + 1]
                scores[b, :, : ti + 1] += row
    return out


def attend_row(q, k, v, b, L, excluded, scale, rope):
    """Row ``b`` of SPEC §4.1's attention (causal, RoPE as the operators), its ``excluded [Hkv, L]``
    slots masked out: ``(out [Hq, n, D] float32, p [Hq, n, L], ok [Hq, n, L])``. ``rope``: ``(cos,
    sin, inv_freq, rope_scale, rope_pos, rope_sections)``. Shared by the emulations of bench/."""
    Hq, n = q.shape[1], q.shape[2]
    G = Hq // k.shape[1]
    t, j = torch.arange(L - n, L), torch.arange(L)
    qb, kb = rotate_row(q[b].float(), k[b, :, :L].float(), b, L, n, G, *rope)
    ok = ((j[None, None, :] <= t[None, :, None]) & ~excluded[:, None, :]).repeat_interleave(G, dim=0)
    logits = (qb @ kb.repeat_interleave(G, 0).transpose(-1, -2)) * scale
    p = torch.softmax(logits.masked_fill(~ok, float("-inf")), dim=-1)
    return p @ v[b, :, :L].float().repeat_interleave(G, 0), p, ok


def insertion_prior(buf, q, length, scale, cos, sin, inv_freq, rope_scale):
    """Compactor's attention term, per chunk at insertion (fixed from then on; moves with its token):
    the ``n`` new tokens' queries attend the ``n`` new keys non-causally (softmax over the chunk),
    summed over queries, mean over the GQA group, times the value norm. A decode step (``n = 1``)
    gets its head's mean prior. Stored in ``buf.prior [B, Hkv, C]`` (a registered slot tensor)."""
    if "prior" not in buf.SLOT_TENSORS:
        buf.SLOT_TENSORS = tuple(buf.SLOT_TENSORS) + ("prior",)
        buf.prior = torch.zeros_like(buf.scores)
    B, Hq, n, D = q.shape
    Hkv = buf.heads
    G = Hq // Hkv
    scale = D ** -0.5 if scale is None else scale
    for b in range(B):
        L = int(length[b])
        if n == 1:
            held = buf.prior[b, :, : L - 1]
            buf.prior[b, :, L - 1] = held.mean(-1) if held.numel() else 0.0
            continue
        kb = buf.k[b, :, L - n : L].float()
        vb = buf.v[b, :, L - n : L].float()
        qb = q[b].float()
        if cos is not None:
            c, s_ = cos[:n].float()[None], sin[:n].float()[None]
        elif inv_freq is not None:
            from inf_mllm.reference import rope_cos_sin
            c, s_ = rope_cos_sin(torch.arange(n)[None], inv_freq, rope_scale, dtype=torch.float32)
        else:
            c = None
        if c is not None:
            kb, qb = apply_rope(kb, c, s_), apply_rope(qb, c, s_)
        p = torch.softmax((qb @ kb.repeat_interleave(G, 0).transpose(-1, -2)) * scale, dim=-1)  # [Hq, n, n]
        a = p.sum(1).reshape(Hkv, G, n).mean(1)  # [Hkv, n]
        buf.prior[b, :, L - n : L] = a * vb.norm(dim=-1)


def main():
    argv = sys.argv[1:]
    if "--" not in argv:
        sys.exit(__doc__)
    cut = argv.index("--")
    p = argparse.ArgumentParser()
    p.add_argument("--alloc", default="uniform,z,raw")
    p.add_argument("--head-cap", type=int, default=0)
    p.add_argument("--head-floor", type=float, default=0.0, help="each head's own best first: this fraction of its middle slots")
    p.add_argument("--prior", default="", help="weights of the insertion prior to sweep (under the one --alloc)")
    a = p.parse_args(argv[:cut])
    register_policy(HeadwiseInfMLLM)
    ops.attention_with_scores = masked_attention
    from inf_mllm.cli import main as cli

    rest = argv[cut + 1 :] + ["--policies", "inf_mllm_hw"]
    if a.prior:  # one sweep at a time: the prior's weights under one allocation
        rest += ["--policy-arg", "alloc=" + a.alloc, "--sweep", "prior=" + a.prior]
    else:
        rest += ["--sweep", "alloc=" + a.alloc]
    if a.head_cap:
        rest += ["--policy-arg", f"head_cap={a.head_cap}"]
    if a.head_floor:
        rest += ["--policy-arg", f"head_floor={a.head_floor}"]
    return cli(rest)


if __name__ == "__main__":
    sys.exit(main())

"""``inf_mllm`` (Ning et al. 2024): ``n_sink`` sinks + top relevant tokens + ``n_recent`` recent.

How it scores (SPEC §5): each call adds the attention of its last ``window`` queries (mean over
the GQA group) plus the attention bias to ``scores``. With ``h_life > 0`` the scores persist:
before a call of ``n`` tokens they decay by ``2 ** (-n / h_life)`` (a half-life in tokens,
whatever the chunk size) and at eviction they move with their tokens. ``h_life=0`` is the first
version: scores restart at every scoring period (a prefill chunk of at least ``window`` tokens,
or ``window`` decode steps) and are dropped at eviction. ``bias_mode`` is ``"relative"``
(``bias * (slot + 1) / (t + 1)**2``: ``bias`` times the query's uniform share at the newest
slot, falling to 0 at the oldest; the same ``bias`` means the same at any budget) or
``"absolute"`` (``bias * slot``, the first version).

When it evicts: after every prefill chunk that leaves a row over budget, and every ``window``
decode steps once over budget. Rolling positions.

What it keeps: sinks, the last ``n_recent`` tokens, and the best of the rest by a ranking. With
``novelty=0`` the ranking is the score; with ``novelty=w > 0`` it is ``z(score) + w * z(novelty)``,
where ``novelty_j = -cos(k_j, mean direction of the cached keys)`` (key novelty, as in KeyDiff:
a key unlike the others carries something the others do not; computed at eviction in
``O(C * D)`` from the stored keys, which are position-free in rolling mode) and ``z`` standardises
over the candidate (middle) slots; with ``novelty_life=L > 0`` (opt-in; the default 0 does not
fade) the novelty term of a token ``age`` stream tokens old is weighed by ``2 ** (-age / L)``, so
an outlier key does not stay for ever on its novelty alone: less perplexity drift, but on
Qwen2.5-Coder-0.5B the distant pass keys were lost (method.md §9.3). With ``accumulate="mean"`` (the default) ``score`` there is the
score over what a token of its age would hold at a constant attention per call (:meth:`_per_call`;
the stored scores are unchanged), so a new token is not outranked merely for having lived through
fewer calls; ``"sum"`` ranks by the scores as they are. The ranking is max-pooled over ``pool``
neighbouring slots when ``pool > 1``, so a phrase is kept or evicted together.
``min_text_slots=N`` (multimodal quota, ours): after an eviction each KV head keeps at least
``min(N, text tokens held before it)`` text slots (sinks and recent count), so a stream of
video frames cannot push out the text (question, instructions).
``reconstruct=r > 0`` (opt-in, about twice the prefill work): ``inf_mllm.stream`` feeds every chunk
a second time as a probe that attends the cache (chunk included, nothing evicted yet) and writes
nothing; its attention is added to the scores before the chunk's eviction (:meth:`probed`).
``probe="max"`` credits each slot its largest attention from any probe query and query head (KVzip's
reduction) instead of the probe's sum; neither kept the key better on the tune seeds (method.md §9.2).
"""
import torch
import torch.nn.functional as F

from ..modality import TEXT
from ..ops import BIAS_MODES
from .base import ROLLING, Policy, Scoring, check_int, check_number, register_policy
from .snapkv import max_pool_slots


@register_policy
class InfMLLMPolicy(Policy):
    name = "inf_mllm"
    positions = ROLLING
    # bias/bias_mode/h_life/novelty/pool/accumulate: chosen on the needle evaluation's tune seeds and
    # on streaming perplexity (docs/method.md, "Defaults" and §9.3); the first version is h_life=0,
    # bias_mode="absolute", bias=1e-3, novelty=0, pool=1, accumulate="sum"; novelty_life stays 0,
    # against the rule's pick, because fading novelty lost the distant keys on Qwen (method.md §9.3)
    defaults = dict(budget=2048, n_sink=4, n_recent=256, window=32, bias=1.0, bias_mode="relative", h_life=1024.0,
                    novelty=2.0, pool=7, min_text_slots=0, accumulate="mean",
                    key_signal="novelty", layer_slope=0.0, reconstruct=0.0, probe="sum", novelty_life=0.0)

    ACCUMULATE = ("sum", "peak", "mean")
    KEY_SIGNALS = ("novelty", "leverage")
    PROBES = ("sum", "max")

    def validate(self):
        p = self.params
        if self.window < 1:
            raise ValueError(f"inf_mllm: policy 'inf_mllm' needs window >= 1, got {self.window}")
        if p["bias_mode"] not in BIAS_MODES:
            raise ValueError(f"inf_mllm: bias_mode must be one of {BIAS_MODES}, got {p['bias_mode']!r}")
        check_number("h_life", p["h_life"], 0.0)
        check_number("novelty", p["novelty"], 0.0)
        check_number("novelty_life", p["novelty_life"], 0.0)
        check_int("pool", p["pool"], 1)
        if p["pool"] % 2 == 0:
            raise ValueError(f"inf_mllm: pool must be odd, got {p['pool']}")
        if p["accumulate"] not in self.ACCUMULATE:
            raise ValueError(f"inf_mllm: accumulate must be one of {self.ACCUMULATE}, got {p['accumulate']!r}")
        if p["key_signal"] not in self.KEY_SIGNALS:
            raise ValueError(f"inf_mllm: key_signal must be one of {self.KEY_SIGNALS}, got {p['key_signal']!r}")
        check_number("layer_slope", p["layer_slope"], -0.95, 0.95)
        check_number("reconstruct", p["reconstruct"], 0.0)
        if p["probe"] not in self.PROBES:
            raise ValueError(f"inf_mllm: probe must be one of {self.PROBES}, got {p['probe']!r}")
        if p["accumulate"] == "peak" and not p["h_life"] > 0:
            raise ValueError("inf_mllm: accumulate='peak' needs persistent scores (h_life > 0)")
        self._prev = {}  # accumulate="peak": id(buf) -> the decayed scores before the call (scoring -> due)
        check_int("min_text_slots", p["min_text_slots"], 0)
        if p["min_text_slots"] > self.budget:
            raise ValueError(f"inf_mllm: min_text_slots={p['min_text_slots']} exceeds budget={self.budget}")
        self.keep_scores = p["h_life"] > 0

    def new_state(self, batch):
        return [0] * batch  # per row: decode steps since the scoring period began

    # -- how it scores --------------------------------------------------------------------
    def scoring(self, buf, n, phase, rows):
        steps = buf.state
        h = self.params["h_life"]
        if h > 0:
            restart, decay = (), 2.0 ** (-n / h)
        else:  # first version: a period is one prefill chunk (>= window tokens) or `window` decode steps
            restart = tuple(b for b in rows if (n >= self.window if phase == "prefill" else steps[b] == 0))
            decay = 1.0
        if phase == "prefill":
            for b in rows:
                steps[b] = 0
        if self.params["accumulate"] == "peak":  # the call scores from zero; due() keeps the max
            self._prev[id(buf)] = (list(rows), buf.scores[list(rows)] * decay, min(self.window, n))
            restart, decay = tuple(rows), 1.0
        return Scoring(window=self.window, bias=self.bias, bias_mode=self.params["bias_mode"], decay=decay,
                       restart=restart)

    def _peak(self, buf) -> None:
        """``accumulate="peak"``: each slot keeps the highest mean attention (+ bias) per scoring query
        that any call gave it, decayed, instead of the sum over calls: a token's credit does not
        grow with the number of calls it has lived through, so a new token competes with old ones on
        what it received, not on its age."""
        prev = self._prev.pop(id(buf), None)
        if prev is None:
            return
        rows, old, nq = prev
        idx = torch.tensor(rows, device=buf.scores.device) if rows != list(range(buf.batch)) else None
        new = (buf.scores if idx is None else buf.scores[idx]) / max(nq, 1)
        best = torch.maximum(old, new)
        if idx is None:
            buf.scores.copy_(best)
        else:
            buf.scores[idx] = best

    # -- reconstruction probing (opt-in) -------------------------------------------------------
    @property
    def probes(self) -> bool:
        return self.params["reconstruct"] > 0

    def probed(self, buf, rows, gained, n):
        """``reconstruct = r > 0`` (KVzip's idea, per chunk): the chunk fed again attends the cache
        before the chunk's eviction; its attention per slot counts as ``r`` ordinary scoring calls
        (``sum``: ``r * min(window, n) / n`` times the probe's sum over its ``n`` queries is added;
        ``peak``: a slot keeps the larger of its score and ``r`` times the probe's mean per query).
        A token that the text's own continuation would need to reproduce it is credited before it
        can be evicted. ``probe="max"``: ``gained`` is each slot's peak probability over the probe's
        queries and heads; ``r`` times it is added (``peak``: the larger of the score and it is kept)."""
        idx = list(rows)
        r = self.params["reconstruct"]
        if self.params["probe"] == "max":  # gained: each slot's peak probability over the probe
            if self.params["accumulate"] == "peak":
                buf.scores[idx] = torch.maximum(buf.scores[idx], gained[idx] * r)
            else:
                buf.scores[idx] += gained[idx] * r
            return
        if self.params["accumulate"] == "peak":
            buf.scores[idx] = torch.maximum(buf.scores[idx], gained[idx] * (r / max(n, 1)))
        else:
            buf.scores[idx] += gained[idx] * (r * min(self.window, n) / max(n, 1))

    @property
    def probe_reduce(self) -> str:
        return self.params["probe"]

    # -- per-layer budgets (opt-in) ------------------------------------------------------------
    @property
    def capacity(self) -> int:
        s = abs(self.params["layer_slope"])
        probe = self.slack if self.probes else 0  # room for the probe on top of the un-evicted chunk
        if not s:
            return self.budget + self.slack + probe
        mid = self.budget - self.n_sink - self.n_recent
        return self.n_sink + self.n_recent + int(mid * (1 + s)) + 1 + self.slack + probe

    def layer_budget(self, buf) -> int:
        """``layer_slope = s``: layer ``l`` of ``N`` gets ``mid * (1 + s * (1 - 2 l / (N - 1)))`` middle
        slots (``mid = budget - n_sink - n_recent``; ``s > 0``: more in the lower layers, as PyramidKV),
        so the slots summed over layers stay ``N * budget`` (up to rounding); 0: every layer ``budget``."""
        s, budget = self.params["layer_slope"], self.params["budget"]  # (self.budget is swapped in evict)
        layer = getattr(buf, "owner", None)
        if not s or layer is None or getattr(layer, "cache", None) is None:
            return budget
        n = len(layer.cache.layers)
        if n < 2:
            return budget
        mid = budget - self.n_sink - self.n_recent
        return self.n_sink + self.n_recent + max(0, int(round(mid * (1 + s * (1 - 2 * layer.layer_idx / (n - 1))))))

    def over_budget(self, buf, rows):
        return self.over_budget_rows(buf, rows, self.layer_budget(buf))

    def evict(self, buf, rows, **kw):
        b = self.layer_budget(buf)
        if b == self.params["budget"]:
            return super().evict(buf, rows, **kw)
        saved, self.budget = self.budget, b  # the shared selection step reads self.budget
        try:
            return super().evict(buf, rows, **kw)
        finally:
            self.budget = saved

    # -- when it evicts -------------------------------------------------------------------
    def due(self, buf, n, phase, rows):
        if self._prev:
            self._peak(buf)
        if phase == "prefill":
            return self.over_budget(buf, rows)
        steps = buf.state
        done = []
        for b in rows:
            steps[b] += 1
            if steps[b] >= self.window:
                done.append(b)
                steps[b] = 0  # the next decode step starts a new period
        return self.over_budget(buf, done)

    def evicted(self, buf, rows):
        for b in rows:
            buf.state[b] = 0

    # -- what it keeps --------------------------------------------------------------------
    def rank(self, buf, rows):
        w, k = self.params["novelty"], self.params["pool"]
        # "mean" with h_life=0 (the first version): the scores restart every period, so nothing
        # piles up over calls and the ranking is the period's score, as under "sum"
        mean = self.params["accumulate"] == "mean" and self.params["h_life"] > 0
        if not (w or mean) and k == 1:
            return None  # the scores as they are
        r = buf.scores.clone() if (w or mean) else buf.scores
        for b in rows:
            T = buf.lengths[b]
            if mean:
                r[b, :, :T] = self._per_call(buf, b, T)
            lo, hi = self.n_sink, T - self.n_recent
            if w and hi - lo > 1:
                kb = buf.k[b, :, :T]
                nov = key_leverage(kb) if self.params["key_signal"] == "leverage" else key_novelty(kb)
                zn = _standardise(nov, lo, hi)
                if self.params["novelty_life"] > 0:  # novelty fades with age: a stale outlier key is let go
                    pos = buf.position[b, :, :T].double()
                    zn = (zn * torch.exp2(-(pos[:, T - 1 : T] - pos) / self.params["novelty_life"])).float()
                r[b, :, :T] = _standardise(r[b, :, :T], lo, hi) + w * zn
        return max_pool_slots(r, k) if k > 1 else r

    def _per_call(self, buf, b, T):
        """``accumulate="mean"`` (ranking only; the scores stay SPEC §5's decayed sum): each slot's
        score over ``1 - 2 ** (-(age + window) / h_life)``, which is what a token of that age
        (stream tokens since it arrived) would hold, up to a constant, had it drawn the same
        attention at every call. A rate, then: a token that arrived a chunk ago competes with the
        survivors of many calls on what it drew per call, not on how many calls it has lived
        through (method.md §9.1: why the key is lost at budget 128); tokens much older than
        ``h_life`` rank by their sum as before. O(C) per eviction."""
        pos = buf.position[b, :, :T].double()
        age = pos[:, T - 1 : T] - pos
        lived = 1.0 - torch.exp2(-(age + self.window) / self.params["h_life"])
        return (buf.scores[b, :, :T].double() / lived).float()

    def protect(self, buf, rows, rank):
        """The best-ranked text slots of the middle, so that >= min_text_slots text slots stay."""
        N = self.params["min_text_slots"]
        if not N:
            return None
        rank = buf.scores if rank is None else rank
        prot = torch.zeros_like(buf.scores, dtype=torch.bool)
        n_mid = self.budget - self.n_sink - self.n_recent
        for b in rows:
            T = buf.lengths[b]
            text = buf.modality[b, :, :T] == TEXT  # [H, T]
            mid = torch.zeros_like(text)
            mid[:, self.n_sink : T - self.n_recent] = True
            need = (text.sum(-1).clamp(max=N) - (text & ~mid).sum(-1)).clamp(0, n_mid)  # [H]
            if not bool(need.any()):
                continue
            cand = torch.where(text & mid, rank[b, :, :T].double(), float("-inf"))
            order = torch.sort(cand, dim=-1, descending=True, stable=True).indices
            pick = torch.arange(T, device=cand.device)[None, :] < need[:, None]
            prot[b, :, :T].scatter_(1, order, pick.expand_as(text).contiguous())
        return prot


def key_novelty(k: torch.Tensor) -> torch.Tensor:
    """``[H, T]``: minus the cosine of each key ``k [H, T, D]`` with the mean direction of the ``T``
    keys of its head (higher: more unlike the others)."""
    kn = F.normalize(k.float(), dim=-1)
    anchor = F.normalize(kn.mean(1, keepdim=True), dim=-1)
    return -(kn * anchor).sum(-1)


def key_leverage(k: torch.Tensor, ridge: float = 1e-3) -> torch.Tensor:
    """``[H, T]``: the statistical leverage of each centred key of ``k [H, T, D]`` among the ``T``
    keys of its head, ``kc_j^T (Kc^T Kc + ridge * tr/D * I)^-1 kc_j`` (the leverage-score idea of
    Compactor, Chari et al. 2025: keys that span directions few others span). ``O(T D^2 + D^3)``."""
    kc = k.double() - k.double().mean(1, keepdim=True)
    g = kc.transpose(1, 2) @ kc  # [H, D, D]
    D = g.shape[-1]
    lam = ridge * g.diagonal(dim1=1, dim2=2).mean(-1).clamp_min(1e-12)  # [H]
    g = g + lam[:, None, None] * torch.eye(D, dtype=g.dtype, device=g.device)
    sol = torch.linalg.solve(g, kc.transpose(1, 2))  # [H, D, T]
    return (kc * sol.transpose(1, 2)).sum(-1).float()


def _standardise(x: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """``x [H, T]`` minus the mean, over the standard deviation, of its columns ``lo:hi``."""
    mid = x[:, lo:hi].double()
    return ((x.double() - mid.mean(-1, keepdim=True)) / mid.std(-1, keepdim=True).clamp_min(1e-12)).float()

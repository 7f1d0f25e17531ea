"""Needle in a haystack of real prose (``inf-mllm eval needle``).

A needle (a pass key, or a short fact) is inserted at a sentence boundary at a given depth of
a stretch of real prose (Austen by default); the prose with the needle is streamed through
``inf_mllm.stream`` in chunks, and only *then* the question arrives (query-agnostic, as in
real streaming: nothing before the end of the stream tells the cache what will be asked);
a few greedy tokens are decoded and matched against the answer.

Grid: context lengths x needle depths x seeds (needles per cell) x needle kinds; with
``needles=K`` every case holds K different needles at spread depths, each asked separately
(on a copy of the cache taken right after the stream), accuracy = fraction retrieved.

Construction, per seed (the same for every policy, kind, length and depth):

* the prose: a stretch of the corpus from a seeded paragraph start, split into sentences,
  each tokenised on its own (so sentence boundaries are exact token boundaries); the
  haystack of length ``L`` is the longest run of whole sentences that leaves room for the
  needles, the question and the answer inside ``L`` tokens -- the whole case, answer
  included, fits in ``L`` tokens. Longer lengths extend the same prose.
* the needles: a 5-digit pass key (``The pass key is 71432. Remember it. 71432 is the pass
  key.`` / ``What is the pass key? The pass key is``; labelled keys ``the pass key of the
  blue door`` when K > 1) or facts from :data:`FACTS` (distinct, chosen per seed).
* the stream starts with the tokenizer's own start tokens (``doc_start="auto"``; none for
  SmolLM2); ``--doc-start "<|endoftext|>"`` gives SmolLM2 its pretraining document separator
  (in a check on 3 tune seeds, full-cache SmolLM2 recalled 0/3 pass keys placed as the very
  first sentence without it, 2/3 with it).
* depth ``d``: the needle goes to the sentence boundary nearest ``d`` x the haystack's
  tokens (0: before the first sentence, 1: after the last); with K needles, needle ``j``
  goes to depth ``d + j (1 - d) / K``.

Sharing (identical results, less compute): for one seed every case starts with the same
prose up to its first needle, so each policy streams that prose once (the *trunk*) and every
case continues from a copy of the trunk's cache taken at the last chunk boundary before its
needle; chunk boundaries are those of a stream from scratch. ``full`` does not depend on the
budget and runs once. ``share=False`` streams every case from scratch instead.

Matching (:func:`judge`): the generated text up to its first sentence end must hold the
answer -- for a pass key its first number (so a list of numbers counts as its first), for a
fact the word (whole word, any case); a restatement (`` the pass key is 71432.``) counts. Decoding stops as
soon as more tokens cannot change the verdict (at most ``max_new_tokens``, default 16: room
to restate the question).

Seeds: two disjoint fixed sets, ``tune`` (1000, 1001, ...) for choosing defaults and
``report`` (2000, 2001, ...) for the reported numbers; the JSON says which was used.
"""
from __future__ import annotations

import random
import re
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .common import fmt_tokens, policy_grid, progress, record
from .engine import ModelBundle, PolicyRunner, free_memory, is_oom

__all__ = [
    "FACTS",
    "PRESETS",
    "SEED_SETS",
    "match_answer",
    "judge",
    "first_sentence",
    "resolve_seeds",
    "parse_depths",
    "make_needles",
    "prose_pieces",
    "build_case",
    "clone_cache",
    "run_needle",
    "plot_heatmaps",
    "apply_preset",
    "parse_budgets",
    "budget_slots",
]

# (needle sentence, question (the answer follows it), answer: one word absent from the corpora)
FACTS: List[Tuple[str, str, str]] = [
    ("The secret ingredient of the cake is cardamom.",
     "What is the secret ingredient of the cake? The secret ingredient of the cake is", "cardamom"),
    ("The name of the captain's parrot is Pistachio.",
     "What is the name of the captain's parrot? The name of the captain's parrot is", "Pistachio"),
    ("The password for the library door is marmalade.",
     "What is the password for the library door? The password for the library door is", "marmalade"),
    ("The colour of the wizard's hat is turquoise.",
     "What is the colour of the wizard's hat? The colour of the wizard's hat is", "turquoise"),
    ("The treaty was signed in the city of Lisbon.",
     "In which city was the treaty signed? The treaty was signed in the city of", "Lisbon"),
    ("The name of the old fishing boat is Albatross.",
     "What is the name of the old fishing boat? The name of the old fishing boat is", "Albatross"),
    ("The code word of the secret society is lantern.",
     "What is the code word of the secret society? The code word of the secret society is", "lantern"),
    ("The rarest stamp in the collection comes from Iceland.",
     "Where does the rarest stamp in the collection come from? The rarest stamp in the collection comes from", "Iceland"),
    ("The missing key was hidden inside a teapot.",
     "Where was the missing key hidden? The missing key was hidden inside a", "teapot"),
    ("The professor's dog is called Biscuit.",
     "What is the professor's dog called? The professor's dog is called", "Biscuit"),
    ("The magic word that opens the vault is pumpernickel.",
     "What is the magic word that opens the vault? The magic word that opens the vault is", "pumpernickel"),
    ("The instrument the duke plays is the bassoon.",
     "What instrument does the duke play? The instrument the duke plays is the", "bassoon"),
    ("The horse that won the race was named Thunderbolt.",
     "What was the name of the horse that won the race? The horse that won the race was named", "Thunderbolt"),
    ("The mountain the climbers reached was Kilimanjaro.",
     "Which mountain did the climbers reach? The mountain the climbers reached was", "Kilimanjaro"),
    ("The name of the merchant's cat is Saffron.",
     "What is the name of the merchant's cat? The name of the merchant's cat is", "Saffron"),
    ("The gem stolen from the museum was a sapphire.",
     "What gem was stolen from the museum? The gem stolen from the museum was a", "sapphire"),
    ("The secret meeting takes place in Vienna.",
     "Where does the secret meeting take place? The secret meeting takes place in", "Vienna"),
    ("The inventor's robot is named Copernicus.",
     "What is the inventor's robot named? The inventor's robot is named", "Copernicus"),
    ("The favourite game of the twins is chess.",
     "What is the favourite game of the twins? The favourite game of the twins is", "chess"),
    ("The lighthouse keeper's boat is painted orange.",
     "What colour is the lighthouse keeper's boat painted? The lighthouse keeper's boat is painted", "orange"),
]

# labels of the pass keys when a case holds several (``the pass key of <label>``)
PASSKEY_LABELS = ["the blue door", "the red box", "the green gate", "the iron safe", "the north tower",
                  "the garden shed", "the silver locker", "the west wing", "the old chest", "the wine cellar",
                  "the clock tower", "the boat house"]

KINDS = ("passkey", "fact")
SEED_SETS = {"tune": 1000, "report": 2000}  # seed set -> first seed (seeds base, base+1, ...)
MAX_SEEDS_PER_SET = 1000

MATCH_RULE = ("the generated text up to its first sentence end (. ! ? or line break) must hold the answer: for a "
              "pass key its first number equals the key (commas dropped), for a fact the answer occurs as a whole word "
              "(case-insensitive); restating the question first ('the pass key is 71432') counts")

# --preset NAME: options filled in when not given on the command line
PRESETS: Dict[str, Dict[str, Any]] = {
    # issue 10: pass key in ~600 tokens of prose, streamed in chunks of 64, then the question;
    # budgets 256 and 128 with n_recent 32; 6 depths (10%..90%: a distant fact, not the
    # document's first or last sentence) x 2 seeds = 12 cases per policy and budget
    "passkey-prose": dict(lengths="640", depths="10,26,42,58,74,90", needles_per_cell=2, kind="passkey", needles=1,
                          budgets="256,128", n_recent=32, chunk=64,
                          policies="full,streaming_llm,h2o,snapkv,look_m,tova,inf_mllm", tag="passkey_prose"),
}


# --------------------------------------------------------------------------------------
# Answers
# --------------------------------------------------------------------------------------

_SENT_STOP = re.compile(r"[.!?\n]")
_NUMBER = re.compile(r"\d[\d,]*\d|\d")


def first_sentence(text: str) -> Tuple[str, bool]:
    """``text`` (leading whitespace dropped) up to its first ``. ! ?`` or line break, and
    whether that end was reached."""
    t = text.lstrip()
    m = _SENT_STOP.search(t)
    return (t[: m.start()], True) if m else (t, False)


def judge(generated: str, answer: str, final: bool = True) -> Tuple[bool, bool]:
    """``(correct, decided)`` for ``generated`` (see :data:`MATCH_RULE`). ``final=False``: the
    text may go on, so an unfinished number or word at its end is not an answer yet;
    ``decided``: more tokens cannot change the verdict (decoding may stop)."""
    span, closed = first_sentence(generated)
    closed = closed or final
    answer = str(answer).strip()
    if answer.isdigit():
        for m in _NUMBER.finditer(span):
            complete = closed or re.match(r"[^\d,]|,\D", span[m.end():]) is not None
            ok = m.group(0).replace(",", "") == answer
            return (ok and complete), (complete or closed)
        return False, closed
    m = re.search(r"(?<![\w'\u2019-])" + re.escape(answer) + r"(?![\w'\u2019-])", span, re.I)
    if m and (closed or m.end() < len(span)):
        return True, True
    return False, closed


def match_answer(generated: str, answer: str) -> bool:
    """Whether ``generated`` answers ``answer`` (see :data:`MATCH_RULE`)."""
    return judge(generated, answer)[0]


# --------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------


def resolve_seeds(spec: str, n: int) -> Tuple[str, List[int]]:
    """``tune`` / ``report`` -> the first ``n`` seeds of that set; ``"3,5,7"`` -> those seeds."""
    spec = str(spec).strip()
    if spec in SEED_SETS:
        if not 1 <= n <= MAX_SEEDS_PER_SET:
            raise ValueError(f"--needles-per-cell must be in 1..{MAX_SEEDS_PER_SET}, got {n}")
        base = SEED_SETS[spec]
        return spec, [base + i for i in range(n)]
    try:
        seeds = [int(s) for s in spec.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--seeds must be tune, report or a comma-separated list of integers; got {spec!r}") from None
    if not seeds:
        raise ValueError("--seeds: empty list")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds: repeated seeds in {spec!r}")
    overlap = sorted({name for name, base in SEED_SETS.items() for s in seeds if base <= s < base + MAX_SEEDS_PER_SET})
    return ("custom" + (f" (within {'+'.join(overlap)})" if overlap else "")), seeds


def parse_budgets(spec) -> Optional[List[Any]]:
    """``"256,1K"`` -> ``[256, 1024]`` slots; ``"12.5%,25%"`` -> ``["12.5%", "25%"]``: fractions of each
    case's context length (:func:`budget_slots`), so one run covers several lengths at the same
    share. Both kinds may be mixed. ``None``/empty -> ``None``."""
    from .common import parse_size

    if spec is None or spec == "":
        return None
    items = list(spec) if isinstance(spec, (list, tuple)) else [x.strip() for x in str(spec).split(",") if x.strip()]
    out: List[Any] = []
    for x in items:
        if isinstance(x, str) and x.endswith("%"):
            try:
                f = float(x[:-1])
            except ValueError:
                raise ValueError(f"--budgets: {x!r} is not a percentage (e.g. 12.5%)") from None
            if not 0.0 < f <= 100.0:
                raise ValueError(f"--budgets: a fraction of the context must be in (0%, 100%], got {x!r}")
            out.append(f"{f:g}%")
        else:
            out.append(parse_size(x, minimum=1, name="--budgets"))
    if not out:
        raise ValueError(f"--budgets: no value in {spec!r}")
    if len(set(out)) != len(out):
        raise ValueError(f"--budgets: repeated budget in {spec!r}")
    return out


def budget_slots(budget, length: int) -> int:
    """Slots of ``budget`` for a case of ``length`` tokens: an int as it is, ``"x%"`` -> ``round(x/100 *
    length)`` (at least 1)."""
    if isinstance(budget, str):
        return max(1, int(round(float(budget.rstrip("%")) / 100.0 * length)))
    return int(budget)


def parse_depths(spec) -> List[float]:
    """``"11"`` -> 0, 0.1, ..., 1 (11 evenly spaced depths); ``"0,25,50"`` -> percents."""
    s = str(spec).strip()
    if "," in s or "%" in s:
        vals = [float(x.strip().rstrip("%")) / 100.0 for x in s.split(",") if x.strip()]
    else:
        n = int(s)
        if n < 1:
            raise ValueError(f"--depths must be >= 1, got {n}")
        vals = [0.5] if n == 1 else [i / (n - 1) for i in range(n)]
    if any(not 0.0 <= v <= 1.0 for v in vals):
        raise ValueError(f"--depths: depths must lie in 0..100%, got {spec!r}")
    return vals


def apply_preset(args, argv: Sequence[str]) -> None:
    """Fill ``args`` with ``args.preset``'s values for the options not given in ``argv``."""
    name = getattr(args, "preset", None)
    if not name:
        return
    given = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
    for dest, val in PRESETS[name].items():
        if "--" + dest.replace("_", "-") not in given:
            setattr(args, dest, val)


# --------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------


def make_needles(kind: str, seed: int, k: int) -> List[Dict[str, str]]:
    """``k`` distinct needles of ``kind`` for ``seed``: dicts with ``needle``, ``question``, ``answer``."""
    rng = random.Random(f"needle-{kind}-{seed}")
    if kind == "passkey":
        if k > len(PASSKEY_LABELS):
            raise ValueError(f"--needles: at most {len(PASSKEY_LABELS)} pass keys per case")
        vals = rng.sample(range(10000, 100000), k)
        if k == 1:
            v = vals[0]
            return [dict(needle=f"The pass key is {v}. Remember it. {v} is the pass key.",
                         question="What is the pass key? The pass key is", answer=str(v))]
        out = []
        for v, lab in zip(vals, rng.sample(PASSKEY_LABELS, k)):
            out.append(dict(needle=f"The pass key of {lab} is {v}. Remember it. {v} is the pass key of {lab}.",
                            question=f"What is the pass key of {lab}? The pass key of {lab} is", answer=str(v)))
        return out
    if kind == "fact":
        if k > len(FACTS):
            raise ValueError(f"--needles: at most {len(FACTS)} facts per case")
        return [dict(needle=n, question=q, answer=a) for n, q, a in rng.sample(FACTS, k)]
    raise ValueError(f"unknown needle kind {kind!r} (passkey, fact)")


_ABBREV = {"mr", "mrs", "dr", "st", "ms", "messrs", "col", "capt", "rev", "gen", "no", "vol", "ch"}
_SENT_END = re.compile(r"[.!?][\"'\u201d\u2019)\]]*(?=\s)")


def _sentence_spans(text: str) -> List[int]:
    """Character offsets where sentences end (after the punctuation and closing quotes)."""
    ends = []
    for m in _SENT_END.finditer(text):
        if text[m.start()] == ".":
            w = re.search(r"(\w+)$", text[max(0, m.start() - 12): m.start()])
            if w and (w.group(1).lower() in _ABBREV or len(w.group(1)) == 1):
                continue
        ends.append(m.end())
    return ends


def prose_pieces(tokenizer, text: str, seed: int, n_tokens: int) -> List[List[int]]:
    """Sentences of prose (token ids, each tokenised on its own with its leading whitespace)
    from a seeded paragraph start of ``text``, at least ``n_tokens`` in all. A text too short
    is read again from its start (cyclically)."""
    if not text.strip():
        raise ValueError("eval needle: empty text")
    rng = random.Random(f"needle-prose-{seed}")
    start = rng.randrange(len(text))
    p = text.find("\n\n", start)
    start = 0 if p < 0 else p
    while start < len(text) and text[start].isspace():
        start += 1
    if start >= len(text):
        start = 0
    n_chars = max(2048, n_tokens * 6)
    while True:
        src = text[start: start + n_chars]
        while len(src) < n_chars:  # cycle through a short text
            src += "\n\n" + text[: n_chars - len(src)]
        ends = _sentence_spans(src)
        pieces, s, total = [], 0, 0
        for e in ends:
            ids = tokenizer.encode(src[s:e], add_special_tokens=False)
            s = e
            if ids:
                pieces.append(ids)
                total += len(ids)
            if total >= n_tokens:
                return pieces
        n_chars *= 2
        if n_chars > 64 * max(n_tokens, 1024) + len(text):
            raise ValueError("eval needle: could not find enough sentences in the text")


def _encode(tokenizer, s: str) -> List[int]:
    return tokenizer.encode(s, add_special_tokens=False)


def build_case(pieces: List[List[int]], needle_ids: Sequence[List[int]], first_needle_ids: Sequence[List[int]],
               haystack: int, depth: float) -> Dict[str, Any]:
    """Token ids of the prose (whole sentences, at most ``haystack`` tokens) with the needles
    inserted at the sentence boundaries nearest their depths.

    ``needle_ids[j]`` is needle ``j`` as it reads mid-text (`` <needle>``), and
    ``first_needle_ids[j]`` as the very first paragraph (``<needle>\\n\\n``).
    Returns ``ids``, ``prose`` (the prose alone, a prefix of the seed's prose), ``positions``
    (token index of each needle in ``ids``) and ``depths`` (each needle's actual depth in the
    prose).
    """
    bounds = [0]
    for pc in pieces:
        if bounds[-1] + len(pc) > haystack:
            break
        bounds.append(bounds[-1] + len(pc))
    n_sent = len(bounds) - 1
    H = bounds[-1]
    if n_sent < 1:
        raise ValueError(f"eval needle: no room for prose (haystack budget {haystack} tokens)")
    K = len(needle_ids)
    targets = [depth + j * (1.0 - depth) / K for j in range(K)]
    at = []  # sentence index before which each needle goes (0..n_sent)
    for t in targets:
        at.append(min(range(n_sent + 1), key=lambda i: (abs(bounds[i] - t * H), i)))
    at = sorted(at)  # depths are increasing already; keep order stable
    prose = [t for pc in pieces[:n_sent] for t in pc]
    ids: List[int] = []
    positions, depths = [], []
    j = 0
    for i in range(n_sent + 1):
        while j < K and at[j] == i:
            positions.append(len(ids))
            depths.append(bounds[i] / H)
            ids += list(first_needle_ids[j] if i == 0 else needle_ids[j])
            j += 1
        if i < n_sent:
            ids += pieces[i]
    return {"ids": ids, "prose": prose, "positions": positions, "depths": depths, "haystack": H}


def doc_start_ids(tokenizer, spec: Optional[str]) -> List[int]:
    """Tokens every stream starts with: ``auto``: those the tokenizer puts before a text by
    itself (a BOS for Llama-style tokenizers; none for SmolLM2 or Qwen2.5); ``none``: nothing;
    any other string: its tokens (e.g. ``<|endoftext|>``, SmolLM2's document separator)."""
    if spec in (None, "", "none"):
        return []
    if spec == "auto":
        try:
            return [int(t) for t in tokenizer.encode("", add_special_tokens=True)]
        except Exception:  # noqa: BLE001
            return []
    return _encode(tokenizer, spec)


def plan_cases(tokenizer, text: str, *, lengths: Sequence[int], depths: Sequence[float], seeds: Sequence[int],
               kinds: Sequence[str], needles: int, max_new_tokens: int, doc_start: Optional[str] = "auto") -> List[Dict[str, Any]]:
    """Every case of the grid (policy-independent), grouped by seed in order. Each stream
    starts with :func:`doc_start_ids` (before any needle, even at depth 0)."""
    cases = []
    pre = doc_start_ids(tokenizer, doc_start)
    for seed in seeds:
        per_kind = {k: make_needles(k, seed, needles) for k in KINDS}
        enc = {}
        reserve = 0
        for k, nds in per_kind.items():
            mid = [_encode(tokenizer, " " + n["needle"]) for n in nds]
            first = [_encode(tokenizer, n["needle"] + "\n\n") for n in nds]
            qs = [_encode(tokenizer, "\n\n" + n["question"]) for n in nds]
            enc[k] = (mid, first, qs)
            reserve = max(reserve, max(max(len(a), len(b)) for a, b in zip(mid, first)) * len(nds)
                          + max(len(q) for q in qs) + max_new_tokens + len(pre))
        if min(lengths) <= reserve + 16:
            raise ValueError(f"eval needle: length {min(lengths)} leaves no room for prose (needles, question and "
                             f"answer take {reserve} tokens)")
        pieces = prose_pieces(tokenizer, text, seed, max(lengths) - reserve)
        for kind in kinds:
            mid, first, qs = enc[kind]
            for L in lengths:
                for d in depths:
                    c = build_case(pieces, mid, first, L - reserve, d)
                    c["ids"], c["prose"] = pre + c["ids"], pre + c["prose"]
                    c["positions"] = [p + len(pre) for p in c["positions"]]
                    c.update(seed=seed, kind=kind, length=L, depth=d, needles=per_kind[kind], question_ids=qs)
                    cases.append(c)
    return cases


# --------------------------------------------------------------------------------------
# Cache copies
# --------------------------------------------------------------------------------------


def clone_cache(runner: PolicyRunner, cache):
    """An independent copy of ``cache`` (``StreamingCache.clone``; checked against streaming from
    scratch in tests/test_needle.py for every policy)."""
    return cache.clone()


# --------------------------------------------------------------------------------------
# Cost model (for the estimate and the ETA)
# --------------------------------------------------------------------------------------


class _Cost:
    """Seconds per streamed token ``a + b * min(tokens in cache, cap)`` (cap: the policy's
    capacity) and per decode step ``dec``; calibrated on a short stream before the run."""

    def __init__(self, a: float, b: float, dec: float, a_fixed: Optional[float] = None):
        self.a, self.b, self.dec = a, b, dec
        self.a_fixed = a if a_fixed is None else a_fixed

    def feed(self, start: int, n: int, cap: Optional[int]) -> float:
        """Seconds to stream ``n`` tokens into a cache that has seen ``start`` tokens."""
        if n <= 0:
            return 0.0
        end = start + n
        if cap is None:  # full: the cache holds everything seen
            return n * self.a + self.b * (end * end - start * start) / 2.0
        lo, hi = min(start, cap), min(end, cap)
        ctx = (hi * hi - lo * lo) / 2.0 + cap * max(0, end - max(start, cap))
        return n * self.a_fixed + self.b * ctx


def _best_time(fn, repeats: int = 3) -> float:
    """Fastest of ``repeats`` runs (the machine is shared: the minimum is the least disturbed)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


@torch.inference_mode()
def _calibrate(bundle: ModelBundle, ids: List[int], chunk: int, fixed: Optional[Tuple[str, Dict[str, Any]]]) -> _Cost:
    """Time one chunk on copies of a ``full`` cache holding one chunk and ~1K tokens (the
    slope per cached token), one decode step, and one chunk of a fixed-size policy at its
    capacity (eviction included); each the best of 3."""
    far = max(2 * chunk, min(1024, len(ids) - chunk) // chunk * chunk)
    runner = PolicyRunner(bundle, "full", {}, chunk=chunk)
    cache = runner.new_cache()
    nxt = torch.tensor([ids[far: far + chunk]])

    def chunk_time(c, r=runner, piece=nxt):
        return _best_time(lambda: r.feed(clone_cache(r, c), piece)) - _best_time(lambda: clone_cache(r, c))

    runner.feed(cache, torch.tensor([ids[:chunk]]))
    t_lo = chunk_time(cache)
    runner.feed(cache, torch.tensor([ids[chunk:far]]))
    t_hi = chunk_time(cache)
    dec = _best_time(lambda: runner.decode(clone_cache(runner, cache), ids[0])) - _best_time(lambda: clone_cache(runner, cache))
    b = max(0.0, (t_hi - t_lo) / (chunk * (far - chunk)))
    a = max(1e-7, t_lo / chunk - b * 1.5 * chunk)
    a_fixed = None
    if fixed is not None:
        pol, args = fixed
        r = PolicyRunner(bundle, pol, args, chunk=chunk)
        c = r.new_cache()
        cap = c.capacity
        m = max(chunk, min(len(ids) - chunk, cap + 2 * chunk) // chunk * chunk)
        r.feed(c, torch.tensor([ids[:m]]))
        t = chunk_time(c, r, torch.tensor([ids[m: m + chunk]]))
        a_fixed = max(1e-7, t / chunk - b * cap)
        del c
    return _Cost(a, b, max(dec, 0.0), a_fixed)


# --------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------


def _ask(runner: PolicyRunner, cache, tokenizer, question_ids: List[int], max_new_tokens: int,
         stop_ids: Sequence[int], needle: Dict[str, str]) -> Tuple[str, int]:
    """Feed the question, decode greedily until the verdict is decided (:func:`judge`) or
    ``max_new_tokens``. Returns ``(generated text, decode steps)``."""
    _, logits = runner.feed(cache, torch.tensor([question_ids]))
    out: List[int] = []
    steps = 0
    for i in range(max_new_tokens):
        t = int(torch.argmax(logits))
        if t in stop_ids:
            break
        out.append(t)
        if judge(tokenizer.decode(out, skip_special_tokens=True), needle["answer"], final=False)[1] or i == max_new_tokens - 1:
            break
        logits = runner.decode(cache, t)
        steps += 1
    return tokenizer.decode(out, skip_special_tokens=True), steps


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_")


def _runs(policies, policy_args, budgets, sweep):
    """``[(label, policy, args, budget)]``: ``full`` once (it has no budget), every other policy
    per budget (and per swept value)."""
    if sweep and sweep[0] == "budget":
        budgets, sweep = list(sweep[1]), None
    out, have_full = [], False
    for B in budgets:
        for label, pol, args in policy_grid(policies, dict(policy_args, budget=B), sweep):
            if pol == "full":
                if have_full:
                    continue
                have_full = True
                out.append((label, pol, args, None))
            else:
                out.append((label, pol, args, B))
    out.sort(key=lambda r: r[1] != "full")  # the reference first
    return out


def _args_at(args: Dict[str, Any], budget, length: Optional[int]) -> Dict[str, Any]:
    """``args`` with a fractional ``budget`` (``"12.5%"``) resolved to slots at ``length``."""
    if isinstance(budget, str) and length is not None:
        return dict(args, budget=budget_slots(budget, length))
    return args


def _cap(policy: str, args: Dict[str, Any], chunk: int) -> Optional[int]:
    if policy == "full":
        return None
    return int(args.get("budget") or 2048) + max(chunk, int(args.get("window") or 0))


def run_needle(
    bundle: ModelBundle,
    text: str,
    *,
    policies: Sequence[str],
    policy_args: Dict[str, Any],
    budgets: Sequence[int],
    lengths: Sequence[int],
    depths: Sequence[float],
    seeds: Sequence[int],
    seed_set: str,
    kinds: Sequence[str] = ("passkey",),
    needles: int = 1,
    chunk: int = 64,
    sweep=None,
    max_new_tokens: int = 16,
    doc_start: Optional[str] = "auto",
    full_past_context: bool = False,
    share: bool = True,
    estimate: bool = True,
    estimate_only: bool = False,
    log=None,
) -> Dict[str, Any]:
    """Run the grid (module docstring); with ``estimate_only`` stop after printing the plan and
    the time estimate and return ``{"estimate": {...}}``."""
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    tok = bundle.tokenizer
    lengths = sorted(set(int(x) for x in lengths))
    depths = sorted(set(float(d) for d in depths))
    cases = plan_cases(tok, text, lengths=lengths, depths=depths, seeds=seeds, kinds=kinds, needles=needles,
                       max_new_tokens=max_new_tokens, doc_start=doc_start)
    runs = _runs(policies, policy_args, budgets, sweep)
    max_ctx = bundle.max_context
    stop_ids = [i for i in (getattr(tok, "eos_token_id", None),) if i is not None]
    notes: List[str] = []

    def skip_full(c, policy):
        if policy != "full" or full_past_context or not max_ctx:
            return False
        return len(c["ids"]) + max(len(q) for q in c["question_ids"]) + max_new_tokens > max_ctx

    def fork_of(c):
        return (c["positions"][0] // chunk) * chunk if share else 0

    def groups(budget):
        """``[(seed, length or None)]``: the cases that share a trunk and a runner (a budget given as a
        fraction of the context is a different number of slots at each length)."""
        if isinstance(budget, str):
            return [(seed, L) for seed in seeds for L in lengths]
        return [(seed, None) for seed in seeds]

    def in_group(c, seed, L):
        return c["seed"] == seed and (L is None or c["length"] == L)

    # --- work plan and estimate ---------------------------------------------------------
    def plan_cost(cost: _Cost, policy, args, budget):
        total, n_q = 0.0, 0
        for seed, L in groups(budget):
            cap = _cap(policy, _args_at(args, budget, L or max(lengths)), chunk)
            cs = [c for c in cases if in_group(c, seed, L) and not skip_full(c, policy)]
            if not cs:
                continue
            total += cost.feed(0, max(fork_of(c) for c in cs), cap)  # the trunk
            for c in cs:
                f, n = fork_of(c), len(c["ids"])
                total += cost.feed(f, n - f, cap)
                for q in c["question_ids"]:
                    total += cost.feed(n, len(q), cap) + cost.dec * (max_new_tokens - 1)
                    n_q += 1
        return total, n_q

    n_questions = sum(sum(len(c["question_ids"]) for c in cases if not skip_full(c, pol)) for _, pol, _, _ in runs)
    streamed = 0
    for _, pol, _, bud in runs:
        for seed, L in groups(bud):
            cs = [c for c in cases if in_group(c, seed, L) and not skip_full(c, pol)]
            if cs:
                streamed += max(fork_of(c) for c in cs) + sum(len(c["ids"]) - fork_of(c) + sum(len(q) for q in c["question_ids"]) for c in cs)
    log(f"eval needle: {len(runs)} runs (policy x budget) x {len(cases)} cases x {needles} question(s) = "
        f"{n_questions} questions, {streamed / 1e6:.2f}M tokens to stream"
        + ("" if share else " (--no-share: every case from scratch)"))
    cost = None
    est_runs: List[float] = []
    timing: Dict[str, Any] = {}
    calib_ids = max((c["prose"] for c in cases), key=len) if cases else []
    if estimate and len(calib_ids) >= 4 * chunk:
        fixed = next(((pol, _args_at(args, b, max(lengths))) for _, pol, args, b in runs if pol != "full"), None)
        t0 = time.perf_counter()
        cost = _calibrate(bundle, calib_ids, chunk, fixed)
        est_runs = [plan_cost(cost, pol, args, b)[0] for _, pol, args, b in runs]
        timing = {"calibration_s": time.perf_counter() - t0, "ms_per_token": 1e3 * cost.a,
                  "ms_per_token_fixed": 1e3 * cost.a_fixed, "ms_per_token_per_1K_cached": 1e6 * cost.b,
                  "ms_per_decode_step": 1e3 * cost.dec, "estimate_s": sum(est_runs)}
        log(f"eval needle: rough estimate {sum(est_runs) / 60:.1f} min ({1e3 * cost.a:.2f} ms/token streamed + "
            f"{1e6 * cost.b:.2f} ms per 1K cached tokens; fixed-size policies {1e3 * cost.a_fixed:.2f} ms/token; "
            f"decode {1e3 * cost.dec:.0f} ms/step; calibrated in {timing['calibration_s']:.1f} s)")

    if estimate_only:
        for (label, _, _, budget), e in zip(runs, est_runs):
            log(f"  {label}" + (f" budget {budget}" if budget else "") + f": ~{e / 60:.1f} min")
        return {"estimate": dict(timing, runs=len(runs), cases=len(cases), questions=n_questions, tokens=streamed,
                                 per_run_s={r[0] + (f" budget {r[3]}" if r[3] else ""): e for r, e in zip(runs, est_runs)})}

    # --- runs -----------------------------------------------------------------------------
    records: List[Dict[str, Any]] = []
    rows: List[Dict[str, Any]] = []
    heat: Dict[str, Any] = {}
    bar = progress(n_questions, "needle", unit="q")
    t_start = time.perf_counter()
    est_done = 0.0

    for ri, (label, policy, args, budget) in enumerate(runs):
        runners: Dict[Optional[int], PolicyRunner] = {}

        def runner_for(L, policy=policy, args=args, budget=budget, runners=runners):
            if L not in runners:
                runners[L] = PolicyRunner(bundle, policy, _args_at(args, budget, L), chunk=chunk)
            return runners[L]

        runner = runner_for(None) if not isinstance(budget, str) else None
        bar.set_description(f"needle {label}" + (f" b={budget}" if budget else ""))
        status: List[str] = []
        t0 = time.perf_counter()
        run_recs: List[Dict[str, Any]] = []
        cap = _cap(policy, args, chunk) if runner is not None else None

        def done_one(c, qi, gen, steps):
            nonlocal est_done
            nd = c["needles"][qi]
            ok = match_answer(gen, nd["answer"])
            run_recs.append({"policy": label, "budget": budget, "length": c["length"], "depth": c["depth"],
                             "seed": c["seed"], "kind": c["kind"], "needle": qi, "needle_depth": c["depths"][qi],
                             "position": c["positions"][qi], "tokens": len(c["ids"]) + len(c["question_ids"][qi]),
                             "answer": nd["answer"], "generated": gen, "correct": bool(ok)})
            if isinstance(budget, str) and policy != "full":
                run_recs[-1]["slots"] = budget_slots(budget, c["length"])
            record("case", run_recs[-1])
            if cost is not None:
                n = len(c["ids"])
                est_done += cost.feed(n, len(c["question_ids"][qi]), cap) + cost.dec * (max_new_tokens - 1)
            _tick()

        def _tick():
            bar.update(1)
            if cost is not None and est_done > 0:
                el = time.perf_counter() - t_start
                left = (sum(est_runs) - est_done) * el / est_done
                bar.set_postfix_str(f"ETA ~{left / 60:.0f} min", refresh=False)

        try:
            for seed, L in groups(budget):
                if L is not None:
                    runner = runner_for(L)
                    cap = _cap(policy, _args_at(args, budget, L), chunk)
                cs = [c for c in cases if in_group(c, seed, L)]
                todo = []
                for c in cs:
                    if skip_full(c, policy):
                        if f"past trained context {max_ctx}" not in status:
                            status.append(f"past trained context {max_ctx}")
                    else:
                        todo.append(c)
                if not todo:
                    continue
                todo.sort(key=fork_of)
                trunk = None
                pos = 0
                prose = max((c["prose"] for c in todo), key=len)
                for c in todo:
                    f = fork_of(c)
                    if f > 0:
                        if trunk is None:
                            trunk = runner.new_cache()
                        if f > pos:
                            runner.feed(trunk, torch.tensor([prose[pos:f]]))
                            if cost is not None:
                                est_done += cost.feed(pos, f - pos, cap)
                            pos = f
                        cache = clone_cache(runner, trunk)
                    else:
                        cache = runner.new_cache()
                    assert c["ids"][:f] == prose[:f]
                    runner.feed(cache, torch.tensor([c["ids"][f:]]))
                    if cost is not None:
                        est_done += cost.feed(f, len(c["ids"]) - f, cap)
                    nq = len(c["question_ids"])
                    for qi in range(nq):
                        qc = clone_cache(runner, cache) if qi < nq - 1 else cache
                        gen, steps = _ask(runner, qc, tok, c["question_ids"][qi], max_new_tokens, stop_ids, c["needles"][qi])
                        del qc
                        done_one(c, qi, gen, steps)
                    del cache
                del trunk
                free_memory(bundle.device)
        except Exception as e:  # noqa: BLE001
            if not is_oom(e):
                raise
            status.append("out of memory")
            free_memory(bundle.device)
        secs = time.perf_counter() - t0
        records += run_recs
        grid = _grid(run_recs, lengths, depths)
        key = f"{label}|{budget}" if budget else label
        heat[key] = {"policy": label, "budget": budget, "acc": grid}
        row = _row(label, policy, budget, run_recs, lengths, kinds)
        row["status"] = "; ".join(status) or "ok"
        row["seconds"] = secs
        row["args"] = ((runner.effective_args or runner.policy_args) if not isinstance(budget, str) else
                       {f"@{fmt_tokens(L)}": r.effective_args or r.policy_args for L, r in runners.items()})
        rows.append(row)
        record("row", row)
        free_memory(bundle.device)
        eta = ""
        if cost is not None and est_done > 0 and ri < len(runs) - 1:
            el = time.perf_counter() - t_start
            eta = f"; ETA ~{(sum(est_runs) - est_done) * el / est_done / 60:.1f} min"
        acc = "-" if row["acc"] is None else f"{row['acc']:.3f}"
        bar.write(f"eval needle: run {ri + 1}/{len(runs)} {label}" + (f" budget {budget}" if budget else "")
                  + f": accuracy {acc} over {row['n']} questions in {secs / 60:.1f} min{eta}", file=sys.stderr)
    bar.close()
    _rel_full(rows, records)
    wall = time.perf_counter() - t_start
    timing["run_s"] = wall
    if cost is not None:
        notes.append(f"time: {wall / 60:.1f} min measured vs {sum(est_runs) / 60:.1f} min estimated before the start")
    ex = cases[0] if cases else None
    example = None
    if ex is not None:
        n0 = ex["positions"][0]
        example = {"needle": ex["needles"][0]["needle"], "question": ex["needles"][0]["question"],
                   "answer": ex["needles"][0]["answer"],
                   "around_needle": tok.decode(ex["ids"][max(0, n0 - 40): n0 + 60]),
                   "end_of_stream_and_question": tok.decode(ex["ids"][-40:] + ex["question_ids"][0])}
    notes.append(f"seeds: {seed_set} set {list(seeds)}; " + ("tune on the tune set, report the report set" if seed_set in SEED_SETS else "not one of the fixed sets"))
    notes.append(f"question fed after the stream (separate call, chunk {chunk}); {MATCH_RULE}")
    return {"rows": rows, "cases": records, "heatmaps": heat, "lengths": lengths, "depths": depths,
            "seed_set": seed_set, "seeds": list(seeds), "kinds": list(kinds), "needles": needles, "chunk": chunk,
            "budgets": list(dict.fromkeys(r[3] for r in runs if r[3])), "max_new_tokens": max_new_tokens, "match": MATCH_RULE,
            "doc_start": {"spec": doc_start, "ids": doc_start_ids(tok, doc_start)},
            "shared_prefix": share, "timing": timing, "example": example, "notes": notes}


def _mean(v):
    return sum(v) / len(v) if v else None


def _grid(recs, lengths, depths) -> List[List[Optional[float]]]:
    """Accuracy ``[depth][length]`` (None where no case ran)."""
    return [[_mean([r["correct"] for r in recs if r["length"] == L and r["depth"] == d]) for L in lengths] for d in depths]


def _row(label, policy, budget, recs, lengths, kinds) -> Dict[str, Any]:
    row: Dict[str, Any] = {"policy": label, "budget": budget, "acc": _mean([r["correct"] for r in recs])}
    if len(kinds) > 1:
        for k in kinds:
            row[f"acc_{k}"] = _mean([r["correct"] for r in recs if r["kind"] == k])
    for L in lengths:
        row[f"acc@{fmt_tokens(L)}"] = _mean([r["correct"] for r in recs if r["length"] == L])
    row["n"] = len(recs)
    return row


def _rel_full(rows, records) -> None:
    """``vs_full``: accuracy / full's accuracy over the questions both answered."""
    full = {(r["length"], r["depth"], r["seed"], r["kind"], r["needle"]): r["correct"] for r in records if r["policy"] == "full"}
    if not full:
        return
    for row in rows:
        mine = [r for r in records if r["policy"] == row["policy"] and r["budget"] == row["budget"]]
        pairs = [(r["correct"], full[k]) for r in mine
                 if (k := (r["length"], r["depth"], r["seed"], r["kind"], r["needle"])) in full]
        f = sum(b for _, b in pairs)
        row["vs_full"] = (sum(a for a, _ in pairs) / f) if f else None


# --------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------


def plot_heatmaps(res: Dict[str, Any], path_for: Callable[[str], str], model_name: str = "") -> List[str]:
    """One heatmap per policy x budget (depth x length, red = missed, green = found); returns the paths."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    import numpy as np

    lengths, depths = res["lengths"], res["depths"]
    paths = []
    for key, h in res["heatmaps"].items():
        acc = np.array([[np.nan if v is None else v for v in row] for row in h["acc"]], dtype=float)
        row = next((r for r in res["rows"] if r["policy"] == h["policy"] and r["budget"] == h["budget"]), {})
        fig, ax = plt.subplots(figsize=(max(4.8, 1.8 + 0.9 * len(lengths)), max(3.0, 1.5 + 0.38 * len(depths))), dpi=110)
        cmap = matplotlib.colormaps["RdYlGn"].with_extremes(bad="#cccccc")
        im = ax.imshow(np.ma.masked_invalid(acc), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto", origin="upper")
        for i in range(len(depths)):
            for j in range(len(lengths)):
                v = acc[i, j]
                ax.text(j, i, "-" if np.isnan(v) else f"{v:.2f}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(lengths)), [fmt_tokens(L) for L in lengths])
        ax.set_yticks(range(len(depths)), [f"{100 * d:.0f}%" for d in depths])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("needle depth")
        acc_m = row.get("acc")
        title = f"{model_name + ': ' if model_name else ''}{h['policy']}" + (f", budget {h['budget']}" if h["budget"] else "")
        title += "\nmean accuracy " + ("-" if acc_m is None else f"{acc_m:.2f}") + f" ({row.get('n', 0)} q, {res['seed_set']} seeds)"
        ax.set_title(title, fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.05, pad=0.03)
        fig.tight_layout()
        stem = "eval_needle_" + _slug(h["policy"]) + (f"_b{_slug(str(h['budget']))}" if h["budget"] else "")
        path = path_for(stem)
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths

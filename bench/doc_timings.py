"""How long each Python block of README.md and docs/usage.md takes, run as pasted, on one thread.

    python bench/doc_timings.py [--out DIR]

Each file's ```python blocks run in order in one namespace (as ``tests/test_snippets.py`` runs
them, but at full size: no substitution), with ``torch.set_num_threads(1)``. Per block: seconds,
its first line, a SHA-256 of its code (comments left out) and the last lines it printed. ``tests/test_doc_figures.py``
checks every time the docs state for a block ("about N s / N min on one core") against this file,
and that the block is still the one measured (same hash): edit a timed block, rerun this.
"""
import argparse
import contextlib
import hashlib
import io
import os
import re
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
DOCS = ["README.md", os.path.join("docs", "usage.md")]


def python_blocks(path: str):
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return re.findall(r"^```python\n(.*?)^```", f.read(), flags=re.S | re.M)


def block_hash(code: str) -> str:
    """SHA-256 of the block's tokens without its comments (a stated time is a comment)."""
    import tokenize

    toks = [(t.type, t.string) for t in tokenize.generate_tokens(io.StringIO(code).readline)
            if t.type not in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT)]
    return hashlib.sha256(repr(toks).encode("utf-8")).hexdigest()


class _Tee(io.TextIOBase):
    def __init__(self, *streams):
        self.streams = streams

    def write(self, s):
        for st in self.streams:
            st.write(s)
        return len(s)

    def flush(self):
        for st in self.streams:
            st.flush()


def main():
    from inf_mllm.results import format_table, make_meta, write_json

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="directory for doc_timings.json (default: print only)")
    args = p.parse_args()
    torch.set_num_threads(1)
    rows = []
    for doc in DOCS:
        ns = {"__name__": "__doc_timings__"}
        for i, code in enumerate(python_blocks(doc)):
            buf = io.StringIO()
            print(f"--- {doc} block {i}: {code.splitlines()[0]}", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(_Tee(sys.stdout, buf)):
                exec(compile(code, f"<{doc} block {i}>", "exec"), ns)
            secs = time.perf_counter() - t0
            out = buf.getvalue().strip().splitlines()
            rows.append({"doc": doc, "block": i, "first_line": code.splitlines()[0], "sha256": block_hash(code),
                         "seconds": round(secs, 1), "output_tail": out[-3:]})
    table = format_table(rows, ["doc", "block", "seconds", "first_line"], title="doc blocks, one thread")
    print(table)
    if args.out:
        meta = make_meta("bench doc_timings", device="cpu", argv=["python"] + sys.argv,
                         notes=["each file's blocks run in order in one process; block 0 of a file includes loading the model"])
        print("wrote", write_json(os.path.join(args.out, "doc_timings.json"),
                                  {"kind": "doc_timings", "meta": meta, "rows": rows, "table": table}))


if __name__ == "__main__":
    main()

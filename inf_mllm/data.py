"""Long real-text corpora for streaming evaluations, fetched from Debian packages and cached.

* ``austen`` — the six Jane Austen novels of Debian's ``r-cran-janeaustenr`` (public domain).
  The package is downloaded with ``apt-get download`` and unpacked with ``dpkg-deb -x`` (R is
  *not* installed); the novels are read from R's lazy-load database (``data/Rdata.rdb`` +
  ``Rdata.rdx``) with the pip package ``rdata``.
* ``kjv`` — the King James Bible of Debian's ``bible-kjv`` (``bible -f 'gen1:1-rev22:21'``);
  the verse references (``Ge1:1``) are stripped.
* any path — a UTF-8 text file.

Texts are cached as plain UTF-8 under ``$INF_MLLM_CACHE`` (default ``~/.cache/inf_mllm/``).
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import struct
import subprocess
import tempfile
import zlib
from typing import Dict, List, Optional

__all__ = ["cache_dir", "load_corpus", "load_austen", "load_kjv", "CorpusUnavailable", "AUSTEN_BOOKS"]

AUSTEN_BOOKS = ["sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion"]

_AUSTEN_HELP = """\
The Jane Austen corpus comes from Debian's package r-cran-janeaustenr (no R needed):

    apt-get update && apt-get download r-cran-janeaustenr
    dpkg-deb -x r-cran-janeaustenr_*.deb /tmp/janeaustenr
    pip install rdata
    export INF_MLLM_JANEAUSTENR=/tmp/janeaustenr/usr/lib/R/site-library/janeaustenr

(or run inf-mllm again where apt-get is available), or pass any UTF-8 text with --text FILE."""

_KJV_HELP = """\
The King James Bible corpus comes from Debian's package bible-kjv:

    apt-get update && apt-get install -y bible-kjv     # provides the `bible` command

or pass any UTF-8 text with --text FILE."""


class CorpusUnavailable(RuntimeError):
    """The corpus is not cached and cannot be fetched here; the message says how to get it."""


def cache_dir() -> str:
    d = os.environ.get("INF_MLLM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "inf_mllm"
    )
    os.makedirs(d, exist_ok=True)
    return d


def _write_cache(name: str, text: str) -> str:
    path = os.path.join(cache_dir(), name)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
    return path


def _read_cache(name: str) -> Optional[str]:
    path = os.path.join(cache_dir(), name)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    return None


# --------------------------------------------------------------------------------------
# Jane Austen
# --------------------------------------------------------------------------------------


def _read_r_lazyload(pkg_dir: str) -> Dict[str, List[str]]:
    """Read every object of an R package's ``data/Rdata.rdb`` lazy-load database.

    ``Rdata.rdx`` is a gzip'd RDS list whose ``variables`` maps names to ``(offset, length)``
    in ``Rdata.rdb``; each record there is a 4-byte big-endian length followed by a zlib
    stream of a serialised R object.
    """
    try:
        import rdata
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise CorpusUnavailable("reading the Austen novels needs the pip package `rdata`: pip install rdata\n\n" + _AUSTEN_HELP) from e
    import warnings

    data_dir = os.path.join(pkg_dir, "data")
    rdx, rdb = os.path.join(data_dir, "Rdata.rdx"), os.path.join(data_dir, "Rdata.rdb")
    out: Dict[str, List[str]] = {}
    if os.path.exists(rdx):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            index = rdata.conversion.convert(rdata.parser.parse_file(rdx))
        with open(rdb, "rb") as f:
            blob = f.read()
        for name, (off, ln) in index["variables"].items():
            rec = blob[int(off): int(off) + int(ln)]
            raw = zlib.decompress(rec[4:])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "Unknown file type: assumed RDS": it is one
                obj = rdata.conversion.convert(rdata.parser.parse_data(raw))
            out[str(name)] = [str(s) for s in list(obj)]
        return out
    # Older packaging: one .rda per data set
    for path in sorted(glob.glob(os.path.join(data_dir, "*.rda")) + glob.glob(os.path.join(data_dir, "*.RData"))):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            conv = rdata.conversion.convert(rdata.parser.parse_file(path))
        for name, obj in conv.items():
            out[str(name)] = [str(s) for s in list(obj)]
    if not out:
        raise CorpusUnavailable(f"no R data found under {data_dir}\n\n" + _AUSTEN_HELP)
    return out


def _find_janeaustenr() -> Optional[str]:
    cands = [os.environ.get("INF_MLLM_JANEAUSTENR", ""), "/usr/lib/R/site-library/janeaustenr"]
    cands += glob.glob(os.path.join(cache_dir(), "janeaustenr_deb", "usr", "lib", "R", "*", "janeaustenr"))
    for c in cands:
        if c and os.path.isdir(os.path.join(c, "data")):
            return c
    return None


def _fetch_janeaustenr() -> str:
    if not shutil.which("apt-get") or not shutil.which("dpkg-deb"):
        raise CorpusUnavailable("apt-get/dpkg-deb are not available on this machine.\n\n" + _AUSTEN_HELP)
    dest = os.path.join(cache_dir(), "janeaustenr_deb")
    with tempfile.TemporaryDirectory() as tmp:
        r = subprocess.run(["apt-get", "download", "r-cran-janeaustenr"], cwd=tmp, capture_output=True, text=True)
        debs = glob.glob(os.path.join(tmp, "*.deb"))
        if r.returncode != 0 or not debs:
            raise CorpusUnavailable(
                "`apt-get download r-cran-janeaustenr` failed (run `apt-get update` first?):\n"
                + (r.stderr or r.stdout).strip()[-800:] + "\n\n" + _AUSTEN_HELP
            )
        os.makedirs(dest, exist_ok=True)
        subprocess.run(["dpkg-deb", "-x", debs[0], dest], check=True)
    found = _find_janeaustenr()
    if not found:
        raise CorpusUnavailable("unpacked r-cran-janeaustenr but found no data directory\n\n" + _AUSTEN_HELP)
    return found


def _join_lines(lines: List[str]) -> str:
    """Book lines (hard-wrapped prose, blank line between paragraphs) -> paragraphs."""
    paras, cur = [], []
    for ln in lines:
        ln = ln.strip()
        if ln:
            cur.append(ln)
        elif cur:
            paras.append(" ".join(cur))
            cur = []
    if cur:
        paras.append(" ".join(cur))
    return "\n\n".join(paras)


def load_austen(books: Optional[List[str]] = None) -> str:
    """The six novels (publication order) as one text; fetched once, then cached."""
    books = list(books or AUSTEN_BOOKS)
    key = "austen_" + "_".join(books) + ".txt"
    cached = _read_cache(key)
    if cached is not None:
        return cached
    pkg = _find_janeaustenr() or _fetch_janeaustenr()
    data = _read_r_lazyload(pkg)
    missing = [b for b in books if b not in data]
    if missing:
        raise CorpusUnavailable(f"janeaustenr lacks {missing}; has {sorted(data)}")
    text = "\n\n".join(_join_lines(data[b]) for b in books) + "\n"
    _write_cache(key, text)
    return text


# --------------------------------------------------------------------------------------
# King James Bible
# --------------------------------------------------------------------------------------

_VERSE_REF = re.compile(r"^\s*[1-3]?[A-Za-z]+\d+:\d+\s+")


def load_kjv() -> str:
    cached = _read_cache("kjv.txt")
    if cached is not None:
        return cached
    exe = shutil.which("bible")
    if exe is None:
        raise CorpusUnavailable("the `bible` command is not installed.\n\n" + _KJV_HELP)
    r = subprocess.run([exe, "-f", "gen1:1-rev22:21"], capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if r.returncode != 0 or len(r.stdout) < 1_000_000:
        raise CorpusUnavailable(f"`bible -f gen1:1-rev22:21` failed: {(r.stderr or '')[-500:]}\n\n" + _KJV_HELP)
    verses = [_VERSE_REF.sub("", ln).strip() for ln in r.stdout.splitlines()]
    text = "\n".join(v for v in verses if v) + "\n"
    _write_cache("kjv.txt", text)
    return text


# --------------------------------------------------------------------------------------


def load_corpus(corpus: str = "austen", text_file: Optional[str] = None) -> str:
    """Text of ``text_file`` if given, else of the named corpus (``austen`` or ``kjv``)."""
    if text_file:
        with open(text_file, encoding="utf-8", errors="replace") as f:
            return f.read()
    if corpus == "austen":
        return load_austen()
    if corpus == "kjv":
        return load_kjv()
    if os.path.exists(corpus):
        return load_corpus(text_file=corpus)
    raise ValueError(f"unknown corpus {corpus!r}: use 'austen', 'kjv' or a path (--text FILE)")

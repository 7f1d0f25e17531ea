#!/usr/bin/env bash
# GPU validation in as few device calls as the 10-minute-per-call limit allows.
#
#   bash bench/gpu_check.sh build-test   # build the CUDA extension, full test suite on CUDA
#   bash bench/gpu_check.sh sanitize     # compute-sanitizer memcheck + racecheck
#   bash bench/gpu_check.sh bench        # copy bandwidth, `inf-mllm bench ops`, short `bench stream`
#   bash bench/gpu_check.sh stream       # `inf-mllm bench stream` to 1M tokens with Qwen2.5-Coder-1.5B
#   bash bench/gpu_check.sh all          # everything (needs more than one call's 10 minutes)
#
# Everything lands under $OUT (the device tool's return folder; default bench/results/gpu-local):
# a log per stage and the CLI's JSON/PNG. The GPU machine has no network: packages it lacks
# (gguf for the GGUF model loader, rdata) travel as wheels in .whl/ (see the device README),
# installed here into /tmp/site. Use DRY_RUN=1 to print the commands on a machine without a GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu-local}
mkdir -p "$OUT"
stage=${1:-all}
run() {  # run a command, log it, keep going on failure (every stage reports)
  local log=$1; shift
  echo "+ $*" | tee -a "$OUT/$log"
  if [[ -n "${DRY_RUN:-}" ]]; then return 0; fi
  "$@" 2>&1 | tee -a "$OUT/$log"
  local rc=${PIPESTATUS[0]}
  echo "[exit $rc] $*" | tee -a "$OUT/$log"
  return 0
}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

setup() {
  if compgen -G ".whl/*.whl" >/dev/null; then
    run setup.log python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  if [[ -z "${DRY_RUN:-}" ]] && python3 -c "import inf_mllm.ops as o, sys; sys.exit(0 if o.native_available() and __import__('torch').cuda.is_available() else 1)" 2>/dev/null; then
    return 0  # already built on this (warm) machine
  fi
  run setup.log nvidia-smi
  run setup.log python3 -m pip install --no-build-isolation --no-deps -e .
}

build_test() {
  run tests.log python3 -m pytest -q -ra --durations=20 tests
}

sanitize() {
  # the compaction kernel and a decode+evict loop (attention + scores + compact_) on CUDA
  run sanitize.log compute-sanitizer --tool memcheck --error-exitcode 1 python3 tools/decode_evict_loop.py --device cuda --steps 60
  run sanitize.log compute-sanitizer --tool racecheck --error-exitcode 1 python3 tools/decode_evict_loop.py --device cuda --steps 30
  run sanitize.log compute-sanitizer --tool memcheck --error-exitcode 1 python3 -m pytest -q -x tests/test_compact.py -k cuda
}

bench() {
  run bench.log python3 -m inf_mllm bench ops --out "$OUT"
  run bench.log python3 -m inf_mllm bench stream --max-tokens 65536 --out "$OUT"
}

stream() {
  run stream.log python3 -m inf_mllm bench stream --model qwen2.5-coder-1.5b --max-tokens 1048576 --out "$OUT"
}

setup
case "$stage" in
  build-test) build_test ;;
  sanitize) sanitize ;;
  bench) bench ;;
  stream) stream ;;
  all) build_test; sanitize; bench; stream ;;
  *) echo "unknown stage $stage" >&2; exit 2 ;;
esac
echo "gpu_check: stage '$stage' done; logs in $OUT"

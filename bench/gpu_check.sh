#!/usr/bin/env bash
# GPU validation, staged for short device leases (each stage has its own time limit and logs
# under $OUT; a failing stage never stops the next).
#
#   bash bench/gpu_check.sh call1    # build, CUDA tests, end-to-end smoke, bench ops, GPU decode bench (short)
#   bash bench/gpu_check.sh call2    # compute-sanitizer (memcheck, racecheck), GPU decode bench (longer)
# CALL_BUDGET (default 570 s) bounds a call; the decode bench gets what is left of it.
#   bash bench/gpu_check.sh STAGE    # one of: setup tests smoke ops decode sanitize
#
# $OUT is the device tool's return folder (default bench/results/gpu-local). The machine has no
# network; nothing here needs a package beyond its image (torch, triton, transformers).
# DRY_RUN=1 prints the commands.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu-local}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TQDM_DISABLE=1
T0=$(date +%s)
CALL_BUDGET=${CALL_BUDGET:-570}  # seconds this call may take in all (the device tool allows 600)
remaining() { local r=$(( CALL_BUDGET - ($(date +%s) - T0) - 10 )); (( r < 30 )) && r=30; echo "$r"; }
run() {  # run LIMIT LOG CMD...: log it, keep going on failure or timeout
  local limit=$1 log=$2; shift 2
  echo "+ [$(date +%T) limit ${limit}s] $*" | tee -a "$OUT/$log"
  [[ -n "${DRY_RUN:-}" ]] && return 0
  timeout --kill-after=5 "$limit" "$@" >>"$OUT/$log" 2>&1
  local rc=$?
  echo "[exit $rc] $*" | tee -a "$OUT/$log"
  tail -n 25 "$OUT/$log"
  return 0
}

setup() {
  if [[ -z "${DRY_RUN:-}" ]] && python3 -c "import inf_mllm.ops as o, torch, sys; sys.exit(0 if o.native_available() and torch.cuda.is_available() and torch._C._dispatch_has_kernel_for_dispatch_key('inf_mllm::compact_', 'CUDA') else 1)" 2>/dev/null; then
    return 0  # already built on this (warm) machine
  fi
  run 30 setup.log nvidia-smi
  run 30 setup.log python3 -c "import torch, triton, transformers; print(torch.__version__, torch.version.cuda, triton.__version__, transformers.__version__, torch.cuda.get_device_name(0))"
  INF_MLLM_CUDA_ARCHS=${INF_MLLM_CUDA_ARCHS:-90} MAX_JOBS=${MAX_JOBS:-16} \
    run 180 setup.log python3 -m pip install --no-build-isolation --no-deps -e .
}
tests() {
  run "${TESTS_LIMIT:-180}" tests.log python3 -m pytest -q -ra -m gpu --durations=10 -p no:cacheprovider \
    tests/test_attention.py tests/test_compact.py
}
smoke() { run "${SMOKE_LIMIT:-75}" smoke.log python3 tools/gpu_smoke.py; }
ops() {
  run "${OPS_LIMIT:-110}" ops.log python3 -m inf_mllm bench ops --sizes "${OPS_SIZES:-1K,4K,16K,64K}" --out "$OUT" --no-progress
}
decode() {  # whatever time the call has left
  local lim; lim=$(remaining)
  run "$lim" decode.log python3 bench/gpu_decode.py --out "$OUT" --deadline "$(( lim - 15 ))" ${DECODE_ARGS:-}
}
sanitize() {
  # the compaction kernel and a decode+evict loop (attention + scores + compact_) on CUDA
  run 120 sanitize.log compute-sanitizer --tool memcheck --error-exitcode 1 python3 tools/decode_evict_loop.py --device cuda --steps 40
  run 120 sanitize.log compute-sanitizer --tool racecheck --error-exitcode 1 python3 tools/decode_evict_loop.py --device cuda --steps 12
  run 150 sanitize.log compute-sanitizer --tool memcheck --error-exitcode 1 python3 -m pytest -q -x -m gpu -p no:cacheprovider tests/test_compact.py
}

stage=${1:-call1}
setup
case "$stage" in
  setup) ;;
  call1) tests; smoke; ops; decode ;;
  call2) sanitize; DECODE_ARGS="--skip-graph ${DECODE_ARGS:-}" decode ;;
  tests|smoke|ops|decode|sanitize) "$stage" ;;
  *) echo "unknown stage $stage" >&2; exit 2 ;;
esac
echo "gpu_check: stage '$stage' done; logs in $OUT"

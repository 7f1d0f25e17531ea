#!/usr/bin/env bash
# GPU validation in ONE call of at most 8 minutes on a fresh machine (the device tool allows 10):
#
#   bash bench/gpu_check.sh            # = all: build, CUDA tests, bench ops, compile_decode comparison
#   bash bench/gpu_check.sh cpu        # the same plumbing on the CPU (tiny sizes, a 2-layer model): a dry run
#   bash bench/gpu_check.sh STAGE      # one of: setup tests ops graph sanitize smoke decode
#   DRY_RUN=1 bash bench/gpu_check.sh  # print the commands only
#
# Stages of `all`, each with its own time limit (a failing or timed-out stage never stops the next),
# within CALL_BUDGET (default 470 s) in all:
#   setup  (<= 150 s) nvidia-smi, versions, `pip install --no-build-isolation --no-deps -e .` (CMake, sm_90)
#   tests  (<= 120 s) pytest -m gpu: test_attention, test_compact, test_triton_rope, test_rope
#   ops    (<= 110 s) `python -m inf_mllm bench ops` at C = 1K, 4K, 16K, 64K (B=8, Hq=32, Hkv=8, D=128, bf16):
#                     decode/prefill vs SDPA and eager scoring, RoPE from the frequencies and the table
#                     fallback, compact_, measured copy bandwidth
#   graph  (the rest) bench/gpu_decode.py: Qwen2.5-Coder-1.5B architecture, random weights, per-token decode
#                     eager and through compile_decode(mode="reduce-overhead") at 4K/64K/256K/1M tokens
#                     streamed, vs transformers' StaticCache compiled the same way at 4K and 64K
# Output under $OUT (default bench/results/gpu-local): one log per stage, bench_ops.json, gpu_decode.json,
# and gpu_check.json (every stage's command, exit status, seconds, log). The machine has no network; nothing
# here needs a package beyond its image (torch, triton, transformers).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu-local}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TQDM_DISABLE=1
T0=$(date +%s)
CALL_BUDGET=${CALL_BUDGET:-470}
STAGES_TSV="$OUT/.gpu_check_stages.tsv"
: > "$STAGES_TSV"
remaining() { local r=$(( CALL_BUDGET - ($(date +%s) - T0) - 10 )); (( r < 30 )) && r=30; echo "$r"; }
run() {  # run LIMIT LOG CMD...: log it, keep going on failure or timeout, record the stage
  local limit=$1 log=$2; shift 2
  echo "+ [$(date +%T) limit ${limit}s] $*" | tee -a "$OUT/$log"
  [[ -n "${DRY_RUN:-}" ]] && return 0
  local t=$(date +%s)
  timeout --kill-after=5 "$limit" "$@" >>"$OUT/$log" 2>&1
  local rc=$?
  echo "[exit $rc after $(( $(date +%s) - t ))s] $*" | tee -a "$OUT/$log"
  tail -n 15 "$OUT/$log"
  printf '%s\t%s\t%s\t%s\n' "$log" "$rc" "$(( $(date +%s) - t ))" "$*" >> "$STAGES_TSV"
  return 0
}

setup() {
  if [[ -z "${DRY_RUN:-}" && -z "${CPU:-}" ]] && python3 -c "import inf_mllm.ops as o, torch, sys; sys.exit(0 if o.native_available() and torch.cuda.is_available() and torch._C._dispatch_has_kernel_for_dispatch_key('inf_mllm::compact_', 'CUDA') else 1)" 2>/dev/null; then
    return 0  # already built on this (warm) machine
  fi
  [[ -z "${CPU:-}" ]] && run 10 setup.log nvidia-smi
  run 30 setup.log python3 -c "import torch, triton, transformers; print(torch.__version__, torch.version.cuda, triton.__version__, transformers.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')"
  [[ -z "${CPU:-}" ]] && INF_MLLM_CUDA_ARCHS=${INF_MLLM_CUDA_ARCHS:-90} MAX_JOBS=${MAX_JOBS:-16} \
    run 150 setup.log python3 -m pip install --no-build-isolation --no-deps -e .
  return 0
}
tests() {
  if [[ -n "${CPU:-}" ]]; then  # the interpreter's share of the same files
    run "${TESTS_LIMIT:-120}" tests.log python3 -m pytest -q -ra -p no:cacheprovider tests/test_triton_rope.py
  else
    run "${TESTS_LIMIT:-120}" tests.log python3 -m pytest -q -ra -m gpu --durations=10 -p no:cacheprovider \
      tests/test_attention.py tests/test_compact.py tests/test_triton_rope.py tests/test_rope.py
  fi
}
ops() {
  if [[ -n "${CPU:-}" ]]; then
    run "${OPS_LIMIT:-110}" ops.log python3 -m inf_mllm bench ops --device cpu --sizes 256,1K --batch 1 --heads 4,2 \
      --head-dim 64 --prefill-chunk 32 --out "$OUT" --no-progress
  else
    run "${OPS_LIMIT:-110}" ops.log python3 -m inf_mllm bench ops --sizes "${OPS_SIZES:-1K,4K,16K,64K}" --out "$OUT" --no-progress
  fi
}
graph() {  # whatever time the call has left
  local lim; lim=$(remaining)
  if [[ -n "${CPU:-}" ]]; then
    run "$lim" graph.log python3 bench/gpu_decode.py --tiny --device cpu --policies "" --graph-tokens 2K,4K \
      --static-tokens 1K --chunk 512 --budget 1024 --out "$OUT" --deadline "$(( lim - 15 ))"
  else
    run "$lim" graph.log python3 bench/gpu_decode.py --out "$OUT" --deadline "$(( lim - 15 ))" --policies "" \
      --graph-tokens "${GRAPH_TOKENS:-4K,64K,256K,1M}" --static-tokens "${STATIC_TOKENS:-4K,64K}" ${DECODE_ARGS:-}
  fi
}
# not in `all` (each needs its own call): the earlier stages of the first H200 run
smoke() { run "${SMOKE_LIMIT:-75}" smoke.log python3 tools/gpu_smoke.py; }
decode() {
  local lim; lim=$(remaining)
  run "$lim" decode.log python3 bench/gpu_decode.py --out "$OUT" --deadline "$(( lim - 15 ))" --skip-graph ${DECODE_ARGS:-}
}
sanitize() {
  # the compaction kernel and a decode+evict loop (attention + scores + compact_) on CUDA
  run 120 sanitize.log compute-sanitizer --tool memcheck --error-exitcode 1 python3 tools/decode_evict_loop.py --device cuda --steps 40
  run 120 sanitize.log compute-sanitizer --tool racecheck --error-exitcode 1 python3 tools/decode_evict_loop.py --device cuda --steps 12
  run 150 sanitize.log compute-sanitizer --tool memcheck --error-exitcode 1 python3 -m pytest -q -x -m gpu -p no:cacheprovider tests/test_compact.py
}

summary() {  # gpu_check.json: every stage of this call
  [[ -n "${DRY_RUN:-}" ]] && return 0
  python3 - "$STAGES_TSV" "$OUT/gpu_check.json" "$1" "$(( $(date +%s) - T0 ))" <<'EOF'
import json, subprocess, sys
tsv, out, stage, secs = sys.argv[1:5]
rows = []
for line in open(tsv):
    log, rc, s, cmd = line.rstrip("\n").split("\t", 3)
    rows.append(dict(log=log, rc=int(rc), seconds=int(s), command=cmd))
try:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
except Exception:
    commit = None
try:
    import torch
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
except Exception:
    device = None
json.dump(dict(kind="gpu_check", stage=stage, device=device, commit=commit, seconds=int(secs), stages=rows),
          open(out, "w"), indent=1)
print(f"gpu_check: {out}: " + ", ".join(f"{r['log']} rc={r['rc']} {r['seconds']}s" for r in rows))
EOF
}

stage=${1:-all}
[[ "$stage" == cpu ]] && { export CPU=1; stage=all; }
setup
case "$stage" in
  setup) ;;
  all|call1) tests; ops; graph ;;  # call1: the first H200 run's name (its smoke and stream bench are `smoke`, `decode`)
  call2) sanitize; decode ;;
  tests|ops|graph|smoke|decode|sanitize) "$stage" ;;
  *) echo "unknown stage $stage" >&2; exit 2 ;;
esac
summary "$stage"
rm -f "$STAGES_TSV"
echo "gpu_check: stage '$stage' done in $(( $(date +%s) - T0 ))s; logs in $OUT"

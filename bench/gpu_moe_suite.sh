#!/usr/bin/env bash
# The MoE layer and the MoE families on one GPU, one device call per mode.
#
#   bench/gpu_suite.sh prepare            # here, once: .carry/ (flashinfer, msgspec, ...)
#   bench/gpu_moe_suite.sh kernels        # tests + bf16 check + layer speed vs the ceilings
#   bench/gpu_moe_suite.sh tune SHAPE     # block sizes for SHAPE (bench/gpu_moe.py SHAPES);
#                                         # the table comes back under $OUT/moe_configs
#   bench/gpu_moe_suite.sh offline PRESET # W1 + W400, dummy weights, then the HF baseline
#
# PRESET: qwen3-30b-a3b (61 GB bf16, an H100 fits it) or mixtral-8x7b (93 GB: H200 only).
# Logs and results.jsonl come back under $OUT, as with bench/gpu_suite.sh.
set -uo pipefail
MODE=${1:-kernels}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
CARRY=.carry
DEADLINE=${DEADLINE:-575}
OUT=${OUT:-/tmp/asgl_out}
LOGS=$OUT/logs
R=$OUT/results.jsonl
mkdir -p "$LOGS"

setup() {  # bench/gpu_suite.sh's carried packages, when present (flashinfer for offline)
  if [[ -f $CARRY/site.tar.xz ]]; then
    mkdir -p /tmp/asgl_site ~/.cache/flashinfer
    tar -xJf $CARRY/site.tar.xz -C /tmp/asgl_site
    [[ -f $CARRY/fi_cache.tar.xz ]] && tar -xJf $CARRY/fi_cache.tar.xz -C ~/.cache/flashinfer
    export PYTHONPATH=/tmp/asgl_site:$ROOT ASGL_FLASHINFER_PREBUILT=1 FLASHINFER_CUDA_ARCH_LIST=9.0a
  else
    export PYTHONPATH=$ROOT
  fi
  export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
}

step() {  # step NAME LIMIT CMD...: time-limited, logged, never stops the call
  local name=$1 limit=$2; shift 2
  local t=$SECONDS left=$((DEADLINE - SECONDS - 15))
  (( limit > left )) && limit=$left
  (( limit < 10 )) && { echo "=== $name skipped: out of time"; return; }
  echo "=== $name (limit ${limit}s)"
  timeout -k 5 "$limit" "$@" > "$LOGS/$name.log" 2>&1
  local rc=$?
  grep -E '^\[(check|bench|tune|offline|hf)\]| passed| failed' "$LOGS/$name.log"
  [[ $rc -ne 0 ]] && { echo "--- $name exited $rc; log tail:"; tail -15 "$LOGS/$name.log"; }
  echo "=== $name done in $((SECONDS - t))s (rc=$rc)"
}

setup
case $MODE in
  kernels)
    step moe_check 150 python3 bench/gpu_moe.py check --out "$R"
    step moe_bench 200 python3 bench/gpu_moe.py bench --out "$R" \
      --shape ${SHAPES:-mixtral-8x7b qwen3-30b-a3b deepseek-v2-lite}
    step moe_tests 200 python3 -m pytest -q -p no:cacheprovider tests/test_moe_kernels.py \
      tests/test_moe_layer.py "tests/test_moe_families.py::test_gpu_triton_experts_match_torch_experts"
    ;;
  tune)
    step "moe_tune_$2" 540 python3 bench/gpu_moe.py tune --shape "$2" --budget-s 480 \
      --out-dir "$OUT/moe_configs"
    ;;
  offline)
    M="--model-path $2 --load-format dummy --log-level info --attention-backend flashinfer"
    step "offline_$2" 330 python3 bench/offline.py $M --workload W1 W400 --out "$R"
    step "hf_$2" 220 python3 bench/hf_baseline.py --preset "$2" --workload W1 W400 \
      --max-prompts ${HF_PROMPTS:-128} --out "$R"
    ;;
  *) echo "usage: $0 kernels | tune SHAPE | offline PRESET"; exit 2 ;;
esac

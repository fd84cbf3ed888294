#!/usr/bin/env bash
# Issue 21 GPU checks and benchmarks (H100/H200), in priority order; results as JSON lines in
# ${R:-quant_results.jsonl}. Needs flashinfer (as bench/gpu_suite.sh sets up) and, for the
# torchao step, `pip install torchao` on the device (skipped when missing).
set -u
R=${R:-quant_results.jsonl}
M="--model-path llama-3.1-8b --load-format dummy --log-level info --attention-backend flashinfer"
step() { echo "=== $1"; shift; "$@" 2>&1 | grep -E "^\[|GPU memory plan|FP8 KV|loaded in|torchao|error|Error|FAIL|passed|failed" ; }
# 1. kernels against their torch references on fresh inputs (+ speed vs bf16 per shape)
step gemm python3 bench/gpu_fp8.py --out "$R"
step unit python3 -m pytest -q tests/test_quant_config.py tests/test_kv_fp8.py -p no:cacheprovider --tier all
# 2. bf16 and FP8 W8A8 at the 8B shape, W1 and W400, same machine, back to back
step bf16 python3 bench/offline.py $M --workload W1 W400 --out "$R" --tag bf16
step fp8 python3 bench/offline.py $M --quantization fp8 --workload W1 W400 --out "$R" --tag fp8-w8a8
# 3. FP8 KV: pool capacity (the 'GPU memory plan' line: tokens) and W1000, with bf16 KV beside it
step kv_bf16 python3 bench/offline.py $M --workload W1000 --out "$R" --tag kv-bf16
step kv_fp8 python3 bench/offline.py $M --kv-cache-dtype fp8_e4m3 --workload W1000 --out "$R" --tag kv-fp8-e4m3
step kv_fp8_triton python3 bench/offline.py $M --kv-cache-dtype fp8_e4m3 --attention-backend triton --workload W1 --out "$R" --tag kv-fp8-triton
# 4. FP8 KV agreement on SmolLM2 (GPU: bf16 reference cache), both GPU backends
step agree_fi python3 bench/kv_fp8_agreement.py --device cuda --attention-backend flashinfer
step agree_tr python3 bench/kv_fp8_agreement.py --device cuda --attention-backend triton
# 5. torchao int4wo-128 W1 against bf16 W1 (step 2)
if python3 -c "import torchao" 2>/dev/null; then
  step torchao python3 bench/offline.py $M --torchao-config int4wo-128 --workload W1 --out "$R" --tag torchao-int4wo-128
else
  echo "=== torchao skipped: not installed"
fi

#!/usr/bin/env bash
# The GPU fast path in one go (results under $OUT, or ./gpu_out): kernel-vs-reference checks,
# the kernel and CUDA tests, the layer benchmark with every baseline, and the end-to-end training
# throughput of the small GPT with our layer vs Switch top-2 (same harness, bf16 autocast).
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi -L | tee "$OUT/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"
if [ -z "${SKIP_CHECKS:-}" ]; then
  timeout 300 python3 tests/scripts/kernel_checks.py --device cuda --dtypes fp32,bf16 --quick 2>&1 | tee "$OUT/kernel_checks.log" | grep -v "^ok"
  timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_cuda.py 2>&1 | tail -5 | tee "$OUT/kernel_tests.log"
fi
if [ -z "${SKIP_BENCH:-}" ]; then
  # bf16: autocast over float32 weights; bf16-weights: bf16 parameters, as DeepSpeed's bf16 mode runs a module
  for dtype in ${DTYPES:-bf16-weights bf16}; do
    timeout "${BENCH_TIMEOUT:-420}" python3 benchmarks/layer_bench.py --device cuda --dtype "$dtype" \
        --configs "${CONFIGS:-paper}" --repeats 20 --layers "${LAYERS:-ours,ours_int4,switch,dense,deepspeed}" \
        --out "$OUT/bench.md" 2>&1 | grep -v "^|" | tail -30
  done
  cat "$OUT/bench.md"
fi
if [ -n "${PROFILE:-}" ]; then
  timeout 300 python3 benchmarks/profile_layer.py 2>&1 | tail -40 | tee "$OUT/profile.txt"
fi
if [ -n "${E2E:-}" ]; then
  for ffn in ours switch; do
    timeout 200 python3 -m trilemma_moe.train --device cuda --dtype bf16 --ffn "$ffn" --steps "${E2E_STEPS:-300}" \
        --d-model 768 --d-ff 3072 --layers 4 --heads 12 --seq-len 256 --batch-size 32 \
        --num-experts 32 --num-groups 8 --rank 16 --top-k 2 --burn-in 50 --recluster-interval 100 \
        --eval-every 0 --eval-batches 10 --no-progress --summary-json "$OUT/e2e_$ffn.json" > "$OUT/e2e_$ffn.log" 2>&1
    python3 -c "import json; d=json.load(open('$OUT/e2e_$ffn.json')); print('$ffn', 'tokens/s (second half)', round(d['tokens_per_s_second_half']), 'expert params', d['expert_params'], 'final loss', round(d['final_train_loss'], 3))"
  done
fi

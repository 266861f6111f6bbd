#!/usr/bin/env bash
# Everything this project checks on a GPU machine, in one go (results under $OUT, or ./gpu_out):
# the CUDA tests, the whole suite, the main job under the deepspeed launcher with bf16 + ZeRO-2 on
# one GPU, and the layer benchmark at the paper's dimensions.
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi -L | tee "$OUT/device.txt"
python3 -c "import torch, deepspeed; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__)" | tee -a "$OUT/device.txt"
python3 -m pytest -q tests/test_cuda.py 2>&1 | tee "$OUT/cuda_tests.log"
cat > /tmp/ds_bf16.json <<'JSON'
{"train_micro_batch_size_per_gpu": 32, "gradient_clipping": 1.0, "bf16": {"enabled": true},
 "optimizer": {"type": "AdamW", "params": {"lr": 2e-3, "torch_adam": true}},
 "zero_optimization": {"stage": 2},
 "trilemma_moe": {"num_experts": 32, "num_groups": 8, "rank": 16, "burn_in": 100, "recluster_interval": 50}}
JSON
DS="python3 -m deepspeed.launcher.runner"
timeout 300 $DS --num_gpus 1 --module trilemma_moe.train --deepspeed_config /tmp/ds_bf16.json --steps 200 \
    --d-model 256 --d-ff 1024 --layers 2 --seq-len 128 --no-progress --summary-json "$OUT/ds_bf16_summary.json" \
    > "$OUT/ds_bf16.log" 2>&1; tail -n 25 "$OUT/ds_bf16.log"
[ -n "${SKIP_BENCH:-}" ] || timeout 240 python3 benchmarks/layer_bench.py --device cuda --dtype bf16 --configs paper --repeats 20 \
    --out "$OUT/bench.md" 2>&1 | tail -20
python3 -m pytest -q tests -p no:cacheprovider --deselect tests/test_cuda.py 2>&1 | tail -15 | tee "$OUT/all_tests.log"

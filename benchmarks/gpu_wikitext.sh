#!/usr/bin/env bash
# WikiText-2, ours vs Switch top-2, same harness, same steps, one GPU. DATA points at a directory
# holding wiki.{train,valid,test}.tokens. Summaries and logs go to $OUT (or ./gpu_out).
set -uo pipefail
OUT=${OUT:-gpu_out}
DATA=${DATA:-../shared/data/wikitext-2}
STEPS=${STEPS:-2000}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
for ffn in ${FFNS:-ours switch}; do
  timeout "${RUN_TIMEOUT:-240}" python3 -m trilemma_moe.train --device cuda --data "$DATA" --ffn "$ffn" \
      --steps "$STEPS" --d-model 512 --d-ff 2048 --layers 4 --heads 8 --seq-len 128 --batch-size 32 \
      --num-experts 32 --num-groups 8 --rank 16 --top-k 2 --burn-in 200 --recluster-interval 100 \
      --lr 1e-3 --eval-every 500 --no-progress --logdir "$OUT/tb_$ffn" --summary-json "$OUT/wt2_$ffn.json" \
      > "$OUT/wt2_$ffn.log" 2>&1
  tail -n 22 "$OUT/wt2_$ffn.log"
done

#!/usr/bin/env bash
# Single node: N ranks of the main job under the `deepspeed` launcher.
#   NPROC=8 DS_CONFIG=ds_configs/zero2.json launch/train_deepspeed.sh --data /data/wikitext-103 --steps 20000
# On a CPU machine N ranks are N processes on gloo (set OMP_NUM_THREADS, DeepSpeed picks its CPU
# accelerator by itself); on GPUs one rank per GPU on NCCL.
set -euo pipefail
NPROC=${NPROC:-1}
DS_CONFIG=${DS_CONFIG:-ds_configs/zero2.json}
MASTER_PORT=${MASTER_PORT:-29500}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
DEEPSPEED=${DEEPSPEED:-deepspeed}   # the launcher command (python -m deepspeed.launcher.runner also works)
exec $DEEPSPEED --num_gpus "$NPROC" --master_port "$MASTER_PORT" --module trilemma_moe.train \
    --deepspeed_config "$DS_CONFIG" "$@"

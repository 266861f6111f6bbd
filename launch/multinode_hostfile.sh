#!/usr/bin/env bash
# Multi-node training from a hostfile, one `deepspeed` launcher per node and no ssh between them
# (what a scheduler's per-node step, e.g. `srun --ntasks-per-node=1`, runs). On every node:
#   HOSTFILE=hosts MASTER_ADDR=<node 0> NODE_RANK=<0..N-1> DS_CONFIG=ds_configs/zero2.json \
#       launch/multinode_hostfile.sh --ep-size 8 --data /data/wikitext-103
# hostfile: one line per node, "<hostname> slots=<ranks on that node>", in node-rank order.
# Expert-parallel groups are blocks of consecutive ranks, so --ep-size <= slots keeps the
# token all-to-all inside a node (see `trilemma-moe profile-comm` for the traffic either way).
# tests/test_launch_ep.py runs this with two "nodes" on localhost.
set -euo pipefail
: "${HOSTFILE:?set HOSTFILE}" "${NODE_RANK:?set NODE_RANK}" "${MASTER_ADDR:?set MASTER_ADDR}"
DS_CONFIG=${DS_CONFIG:-ds_configs/zero2.json}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
DEEPSPEED=${DEEPSPEED:-deepspeed}   # python -m deepspeed.launcher.runner also works
exec $DEEPSPEED --hostfile "$HOSTFILE" --no_ssh --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR" \
    --master_port "${MASTER_PORT:-29500}" --module trilemma_moe.train --deepspeed_config "$DS_CONFIG" "$@"

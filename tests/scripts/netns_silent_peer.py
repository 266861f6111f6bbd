"""Run by tests/test_netns.py, one rank per host: a peer that stops answering in the middle of a
DeepSpeed collective (the gradient reduction's group: DeepSpeed's clone of the world, which
``new_group`` gives torch's 30-minute default timeout).

    python netns_silent_peer.py TIMEOUT_S OUT_JSON     (under RANK/WORLD_SIZE/MASTER_* env)

Both ranks all-reduce once over that group, then rank 1 goes silent (sleeps, then leaves) while
rank 0 all-reduces again inside ``named_comm_failure``, as trilemma_moe.train wraps
``engine.backward``. Rank 0 writes how long it waited and the error it got.
"""
import json
import sys
import time

import torch

torch.set_num_threads(1)
import deepspeed  # noqa: E402
import torch.distributed as dist  # noqa: E402
from deepspeed.utils import groups  # noqa: E402

from trilemma_moe.parallel.comm import named_comm_failure, set_collective_timeout  # noqa: E402


def main():
    timeout, out = float(sys.argv[1]), sys.argv[2]
    deepspeed.init_distributed(dist_backend="gloo")
    group = groups._get_data_parallel_group()
    set_collective_timeout(timeout)
    t = torch.ones(8)
    dist.all_reduce(t, group=group)
    assert float(t[0]) == dist.get_world_size()
    if dist.get_rank() != 0:
        time.sleep(timeout + 2)
        return
    t0 = time.monotonic()
    result = {"error": None}
    try:
        with named_comm_failure("step 1: backward (DeepSpeed gradient reduction)", timeout):
            dist.all_reduce(t, group=group)
    except RuntimeError as exc:
        result["error"] = str(exc)
    result["waited_s"] = time.monotonic() - t0
    with open(out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
    import os
    os._exit(0)   # a rank whose peer is gone must not wait for it at teardown

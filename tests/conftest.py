import os

# Two cores, several processes (pytest, gloo ranks, helpers): OpenMP spin-waiting threads
# slow tiny CPU kernels by 100x when oversubscribed. One thread per process.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def dist_world_1():
    """A one-process gloo world, as deepspeed.initialize needs outside the launcher."""
    deepspeed = pytest.importorskip("deepspeed")
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=os.environ.get("TRILEMMA_TEST_PORT", "29533"))
    deepspeed.init_distributed(dist_backend="gloo")
    yield

import os

# Two cores, several processes (pytest, gloo ranks, helpers): OpenMP spin-waiting threads
# slow tiny CPU kernels by 100x when oversubscribed. One thread per process.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402

torch.set_num_threads(1)

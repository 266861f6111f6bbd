"""Peak training memory is what the process holds (``training/measure.py``): the peak resident set
size up to the end of training, per rank, which counts tensors a step never touches. Each check runs
in a fresh process, since ``ru_maxrss`` is a high-water mark over the process's whole life."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MIB = 1 << 20

# every rank holds (rank + 1) x 64 MiB that no step touches after its first write, like burn-in
# experts after the first clustering, and briefly 64 MiB more that is freed before training ends,
# like a step's activations; the numbers are gathered to every rank
SCRIPT = textwrap.dedent("""
    import json, os, sys
    import torch, torch.distributed as dist
    import torch.multiprocessing as mp
    from trilemma_moe.training.measure import PeakMemory

    def rank_main(rank, world, port, out):
        dist.init_process_group("gloo", rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}")
        memory = PeakMemory()
        memory.watch(torch.device("cpu"))
        idle = torch.ones((rank + 1) * 16 * 1024 * 1024)   # (rank + 1) x 64 MiB of float32, written once
        transient = torch.ones(16 * 1024 * 1024)
        del transient
        memory.training_done()
        del idle
        res = memory.result()
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump(res, f)
        dist.destroy_process_group()

    if __name__ == "__main__":
        world, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
        mp.spawn(rank_main, args=(world, port, out), nprocs=world)
""")


def test_every_ranks_peak_counts_what_no_step_touches(tmp_path):
    from test_expert_parallel import free_port
    script = tmp_path / "ranks.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(script), "2", str(free_port()), str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert results[0] == results[1]   # gathered: every rank reports every rank's numbers
    res = results[0]
    peaks, starts = res["peak_rss_bytes_per_rank"], res["rss_before_model_bytes_per_rank"]
    for rank in range(2):
        held = peaks[rank] - starts[rank]
        # both tensors, and not much beside them (the rest of the interpreter was there at the start)
        expect = (rank + 2) * 64 * MIB
        assert expect <= held < expect + 48 * MIB, (rank, held / MIB)
    assert res["peak_rss_bytes"] == res["peak_memory_bytes"] == max(peaks)
    assert "ru_maxrss" in res["peak_memory_method"]


def test_the_trainer_reports_the_processes_peak(tmp_path):
    out = tmp_path / "summary.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "trilemma_moe.train", "--steps", "3", "--burn-in", "1",
                           "--d-model", "16", "--d-ff", "32", "--layers", "1", "--heads", "2", "--seq-len", "8",
                           "--batch-size", "2", "--eval-batches", "1", "--eval-every", "0", "--no-progress",
                           "--measure-memory", "--summary-json", str(out)],
                          env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    s = json.loads(out.read_text())
    assert len(s["peak_rss_bytes_per_rank"]) == 1
    # the peak is at least what the process held before the model existed (an interpreter with torch)
    assert s["peak_memory_bytes"] == s["peak_rss_bytes"] >= s["rss_before_model_bytes_per_rank"][0] > 50 * MIB

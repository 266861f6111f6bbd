"""Device operations, host syncs and peak tensor memory of one layer forward+backward, measured
on any machine (the CPU included) by intercepting every ATen operation.

At the paper's size a GPU runs our whole layer in a few milliseconds, and eager PyTorch spends
roughly 5-15 us of CPU time per dispatched operation, so the count of operations sets a floor on
the layer's time that no kernel speed removes (the H100 profile of the first fused version showed
the GPU idle ~3 of every 11 ms). This counts, with a TorchDispatchMode, every ATen operation that
launches device work (views and allocations are free), the Triton launches of our fused path (each
kernel wrapper's fixed launch count; on the CPU the wrappers run their torch twins, whose own
operations are not counted), and the operations that force a host sync (``.item()``,
``.tolist()``, ``nonzero``): the fused path must have none.

Peak memory: the bytes of tensor storages alive at once, above what existed before the
forward (parameters, input), as ``torch.cuda.max_memory_allocated`` minus the start would read it
without the caching allocator's rounding; and that peak less the new gradients (input and
parameters), which is what ``layer_bench.py`` reports (there they replace the previous step's). The torch twins' internal temporaries are not counted
(the Triton kernels allocate nothing but their outputs), their outputs are.

    python benchmarks/op_profile.py                    # bf16 autocast, small dims (counts do not depend on sizes)
    python benchmarks/op_profile.py --dtype bf16-weights --by-source
    python benchmarks/op_profile.py --size paper       # peak memory at the paper's size (16,384 tokens)
    python benchmarks/op_profile.py --size paper-4k    # the same with 4,096 tokens (minutes less on a CPU)
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import traceback
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from layer_bench import DTYPES, _once, build_layers  # noqa: E402

from trilemma_moe.kernels import fused, reference  # noqa: E402

# Launches of each kernel wrapper in kernels/triton_moe.py (act_combine_bwd: rows and cols kernels).
TRITON_LAUNCHES = {"gmm_rows": 1, "gmm_wgrad": 1, "act_combine_fwd": 1, "act_combine_bwd": 2, "fake_quant": 1}
FREE = {"view", "_unsafe_view", "reshape", "t", "transpose", "permute", "expand", "unsqueeze", "squeeze", "slice",
        "select", "as_strided", "detach", "alias", "empty", "empty_like", "new_empty", "empty_strided", "split",
        "split_with_sizes", "unbind", "_reshape_alias", "lift_fresh", "view_as", "promote_types", "result_type",
        "is_same_size", "_has_compatible_shallow_copy_type", "sym_size", "sym_stride", "sym_numel", "dim", "size"}
SYNCS = {"_local_scalar_dense", "nonzero", "item", "unique", "_unique2", "masked_select", "bincount"}


class OpProfiler(TorchDispatchMode):
    def __init__(self, by_source: bool = False):
        super().__init__()
        self.ops = collections.Counter()
        self.sources = collections.Counter()
        self.syncs = collections.Counter()
        self.paused = 0
        self.by_source = by_source
        self.live = self.peak = 0
        self._storages = {}
        self._sizes = {}
        self.current, self.at_peak = "", ("", [])

    def track(self, out) -> None:
        """Count the storages of new output tensors until Python frees them."""
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if not isinstance(t, torch.Tensor):
                continue
            st = t.untyped_storage()
            key = st.data_ptr()
            if st.nbytes() == 0 or key in self._storages:
                continue
            self._storages[key] = weakref.ref(st, lambda _, key=key, n=st.nbytes(): self._free(key, n))
            self.live += st.nbytes()
            if self.live > self.peak:
                self.peak = self.live
                self.at_peak = (self.current, sorted(self._sizes.values(), reverse=True)[:6] + [st.nbytes()])
            self._sizes[key] = st.nbytes()

    # Tensor.tolist reads the data without dispatching an operation: count it by hand
    def __enter__(self):
        self._tolist = torch.Tensor.tolist
        profiler = self

        def tolist(t, *args, **kwargs):
            if not profiler.paused:
                profiler.syncs["tolist"] += 1
            return profiler._tolist(t, *args, **kwargs)
        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)

    def _free(self, key, nbytes) -> None:
        self._storages.pop(key, None)
        self._sizes.pop(key, None)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not self.paused and name not in FREE:
            self.ops[name] += 1
            if name in SYNCS:
                self.syncs[name] += 1
            if self.by_source:
                frames = [f for f in traceback.extract_stack()[:-2] if "trilemma_moe" in f.filename]
                self.sources[f"{os.path.basename(frames[-1].filename)}:{frames[-1].name}" if frames
                             else "autograd engine / baseline module"] += 1
        out = func(*args, **(kwargs or {}))
        if not self.paused:
            self.current = name
            self.track(out)
        return out


class _CountedKernels:
    """The fused path's kernel module: each call charges its Triton launches and runs the torch twin
    uncounted (on the CPU the twins loop over groups and sync, which the GPU kernels do not)."""

    def __init__(self, counter: OpProfiler):
        self.counter = counter

    def __getattr__(self, name):
        twin = getattr(reference, name)
        if name not in TRITON_LAUNCHES:
            return twin

        def call(*args, **kwargs):
            self.counter.paused += 1
            try:
                out = twin(*args, **kwargs)
            finally:
                self.counter.paused -= 1
                self.counter.ops[f"triton:{name}"] += TRITON_LAUNCHES[name]
            self.counter.current = f"triton:{name}"
            self.counter.track(out)
            return out
        return call


SIZES = {"small": (512, 64, 256, 32, 8, 16), "paper": (16384, 768, 3072, 32, 8, 16),   # tokens, d, d_ff, E, G, r
         "paper-4k": (4096, 768, 3072, 32, 8, 16)}


def profile(name: str, dtypes, by_source: bool, size: str = "small"):
    param_dtype, autocast = dtypes
    T, d, f, E, G, r = SIZES[size]
    # "switch" on its grouped GEMMs (torch._grouped_mm; the CPU runs it too), as on a GPU
    layer = build_layers([name], d, f, E, G, r, "cpu", switch_impl="grouped")[name].to(param_dtype)
    if name.startswith("ours") and name != "ours_torch":
        layer.fused = True
    x = torch.randn(T, d, generator=torch.Generator().manual_seed(0)).to(param_dtype).requires_grad_()
    _once(layer, x, autocast)              # warm: lazy state, first-call paths
    counter = OpProfiler(by_source)
    saved = fused.ops_for
    fused.ops_for = lambda *a, **k: _CountedKernels(counter)
    try:
        with counter:
            _once(layer, x, autocast)
    finally:
        fused.ops_for = saved
    # layer_bench's peak (torch.cuda.max_memory_allocated above the start) sees this step's
    # gradients replace the previous step's; here they are new allocations: report both
    counter.grad_bytes = sum(t.untyped_storage().nbytes() for t in [x.grad] + [p.grad for p in layer.parameters()]
                             if t is not None)
    return counter


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--size", choices=sorted(SIZES), default="small")
    ap.add_argument("--layers", default="dense,switch,deepspeed,ours_torch,ours")
    ap.add_argument("--by-source", action="store_true", help="also break our layer's count down by function")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, os.cpu_count() or 1) if args.size != "small" else 1)
    T, d, f, E, G, r = SIZES[args.size]
    print(f"one forward+backward, {args.dtype}, T={T} d={d} d_ff={f} E={E} G={G} r={r}: device operations, "
          "host syncs, peak tensor memory above the start")
    for name in args.layers.split(","):
        try:
            c = profile(name, DTYPES[args.dtype], args.by_source, args.size)
        except (ImportError, RuntimeError) as exc:
            print(f"{name:>11}: skipped ({type(exc).__name__}: {str(exc).splitlines()[0][:80]})")
            continue
        syncs = sum(c.syncs.values())
        print(f"{name:>11}: {sum(c.ops.values()):5d} ops  {syncs} syncs{' ' + repr(dict(c.syncs)) if syncs else ''}"
              f"  peak {c.peak / 2 ** 20:8.1f} MiB, {(c.peak - c.grad_bytes) / 2 ** 20:8.1f} MiB besides the new gradients")
        if args.by_source:
            op, sizes = c.at_peak
            print(f"{'':>13}peak at {op}; largest live storages then (MiB): "
                  f"{', '.join(f'{b / 2 ** 20:.1f}' for b in sizes)}")
        if args.by_source and name.startswith("ours"):
            for src, n in c.sources.most_common():
                print(f"{'':>13}{n:5d}  {src}")
            print(f"{'':>13}most frequent: {', '.join(f'{k} {v}' for k, v in c.ops.most_common(12))}")


if __name__ == "__main__":
    main()

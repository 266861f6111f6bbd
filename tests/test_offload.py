"""Idle-group offload: bit-exact results through NVMe (DeepSpeed aio) and CPU tiers, the
prefetch predictor's hits and misses, integrity errors, a full disk, and training under ZeRO
with the offload store in use between steps."""
import os
import subprocess
import warnings

import pytest
import torch

from trilemma_moe.config import TrilemmaMoEConfig
from trilemma_moe.core.layer import ClusteredMoE
from trilemma_moe.core.offload import CPUTier, GroupStore, OffloadIntegrityError, pack_group, unpack_group
from trilemma_moe.integrations import aio

D, F = 12, 20


@pytest.fixture(scope="module")
def aio_op():
    """DeepSpeed's async_io op, built on first use (minutes the first time). CI installs libaio-dev,
    so an op that cannot be built here fails the tests that need it instead of skipping them."""
    module, why = aio.load_aio()
    if module is None:
        pytest.fail(f"the NVMe tier needs DeepSpeed's async_io op: {why}", pytrace=False)
    return module


def _trained(bits=4, idle=2, lookahead=2, seed=0, dtype=torch.float64):
    cfg = TrilemmaMoEConfig(num_experts=8, num_groups=4, rank=3, top_k=2, burn_in=2, recluster_interval=100,
                            seed=seed, residual_bits=bits, offload_idle_steps=idle, prefetch_lookahead=lookahead)
    layer = ClusteredMoE(D, F, cfg).to(dtype)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    layer.attach_optimizer(opt)
    g = torch.Generator().manual_seed(seed)
    for _ in range(5):
        y, l_aux, _ = layer(torch.randn(32, D, generator=g, dtype=dtype))
        (y.square().mean() + l_aux).backward()
        opt.step()
        opt.zero_grad()
    assert layer.compressed
    return layer


def _skewed_batches(layer, n, seed=1):
    """Small batches that concentrate on a few groups at a time, so others go idle and come back."""
    g = torch.Generator().manual_seed(seed)
    protos = layer.router.group_proto.detach()
    out = []
    for i in range(n):
        grp = (i // 4) % layer.num_groups        # phases of 4 steps on one group
        x = torch.randn(3, D, generator=g, dtype=protos.dtype) * 0.1 + 12 * protos[grp] / protos[grp].norm() ** 2
        out.append(x)
    return out


def _eval(layer, batches):
    layer.eval()
    with torch.no_grad():
        return [layer(x)[0] for x in batches]


@pytest.mark.parametrize("kind", ["aio", "cpu"])
@pytest.mark.parametrize("bits", [4, 16])
def test_offload_round_trip_is_bit_exact(request, tmp_path, kind, bits):
    layer = _trained(bits)
    batches = _skewed_batches(layer, 24)
    layer.config.offload_idle_steps = None
    ref = _eval(layer, batches)
    layer.config.offload_idle_steps = 2
    layer.offload_tier = CPUTier() if kind == "cpu" else \
        aio.AioTier(str(tmp_path / "nvme"), {"block_size": 65536, "queue_depth": 4}, request.getfixturevalue("aio_op"))
    got = _eval(layer, batches)
    for a, b in zip(ref, got):
        assert torch.equal(a, b)
    st = layer.offload_stats()
    assert st["offloads"] > 0 and st["bytes_written"] > 0 and st["bytes_read"] > 0
    assert st["hits"] + st["misses"] > 0 and st["tier"] == ("nvme-aio" if kind == "aio" else "cpu")
    assert st["peak_resident_bytes"] <= layer.memory_report()["stored_experts"]
    # every group that came back holds exactly the stored form built from the masters
    store = layer._store
    store._drain(count_stall=False)
    for g, tensors in store.resident.items():
        fresh = store._group_tensors(g)
        assert tensors.keys() == fresh.keys() and all(torch.equal(tensors[k], fresh[k]) for k in fresh)
    if kind == "aio" and store.offloaded:
        g = next(iter(store.offloaded))
        assert os.path.getsize(layer.offload_tier.path((0, g))) == store.offloaded[g]


def test_store_is_rebuilt_after_training():
    layer = _trained(4)
    batches = _skewed_batches(layer, 12)
    first = _eval(layer, batches)
    layer.train()
    y, l_aux, _ = layer(torch.randn(16, D, dtype=torch.float64))
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    (y.square().mean() + l_aux).backward()
    opt.step()
    layer.config.offload_idle_steps = None
    ref = _eval(layer, batches)
    layer.config.offload_idle_steps = 2
    got = _eval(layer, batches)
    assert all(torch.equal(a, b) for a, b in zip(ref, got))
    assert not all(torch.equal(a, b) for a, b in zip(first, got))


def _store(idle=2, lookahead=1, ema=0.5, router_evidence=True):
    layer = _trained(4)
    return GroupStore(layer.experts, 4, CPUTier(), 0, idle, lookahead, ema, router_evidence)


def test_idle_groups_leave_and_a_needed_absent_group_is_a_miss():
    s = _store(idle=2)
    one_hot = torch.tensor([[1.0, 0, 0, 0]]).double()
    for _ in range(2):
        s.step([5, 0, 0, 0], one_hot)
    assert set(s.offloaded) == {1, 2, 3} and set(s.resident) == {0}
    assert s.stats["offloads"] == 3
    views = s.step([5, 0, 4, 0], one_hot)   # group 2 needed, absent: synchronous load
    assert s.stats["misses"] == 1 and s.stats["hits"] == 3 and s.stats["accesses"] == 4 and 2 in s.resident
    assert s.summary()["hit_rate"] == 0.75 and s.stats["prefetch_hits"] == 0
    assert views[0]["w1"][2] is not None and views[0]["w1"][1] is None


@pytest.mark.parametrize("router_evidence", [True, False])
def test_predictor_prefetches_a_group_the_router_warms_to(router_evidence):
    s = _store(idle=2, lookahead=2, ema=0.5, router_evidence=router_evidence)
    cold = torch.tensor([[1.0, 0, 0, 0]]).double()
    for _ in range(3):
        s.step([5, 0, 0, 0], cold)
    assert 3 in s.offloaded
    warm = torch.tensor([[0.6, 0, 0, 0.4]] * 4).double()   # group 3 gains router mass, not yet selected
    s.step([5, 0, 0, 0], warm)
    if router_evidence:
        assert s.stats["prefetches"] >= 1 and s.inflight.get(3) == "read"
    else:   # selections only: nothing announces group 3
        assert s.stats["prefetches"] == 0 and 3 not in s.inflight
    s.step([3, 0, 0, 2], warm)                               # now selected
    assert s.stats["prefetch_hits"] == int(router_evidence) and s.stats["misses"] == int(not router_evidence)


def test_pack_unpack_detects_corruption():
    t = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.uint8)}
    buf, meta = pack_group(t, layer=2, group=5)
    assert buf.numel() % 4096 == 0
    out = unpack_group(buf.clone(), meta, 2, 5, "here")
    assert all(torch.equal(out[k], t[k]) for k in t)
    bad = buf.clone()
    bad[100] ^= 1
    with pytest.raises(OffloadIntegrityError, match="group 5 of layer 2: checksum mismatch in here"):
        unpack_group(bad, meta, 2, 5, "here")
    with pytest.raises(OffloadIntegrityError, match="bad header"):
        unpack_group(buf, meta, 2, 6, "here")


def _offloaded_layer(tmp_path, aio_op):
    layer = _trained(4)
    layer.offload_tier = aio.AioTier(str(tmp_path / "nvme"), None, aio_op)
    batches = _skewed_batches(layer, 8)
    _eval(layer, batches[:3])              # phase on group 0: the others go out
    store = layer._store
    store._drain(count_stall=False)
    victim = next(g for g in store.offloaded if g != 0)
    return layer, store, victim, layer.offload_tier.path((0, victim))


def test_corrupt_missing_or_truncated_file_names_group_and_path(tmp_path, aio_op):
    layer, store, g, path = _offloaded_layer(tmp_path, aio_op)
    with open(path, "rb") as f:
        data = bytearray(f.read())
    data[200] ^= 0xFF
    with open(path, "wb") as f:
        f.write(bytes(data))
    with pytest.raises(OffloadIntegrityError, match=f"group {g} of layer 0: checksum mismatch in {path}"):
        store.step([1 if i == g else 0 for i in range(4)])
    assert os.path.exists(path) and g in store.offloaded and not store.inflight   # nothing lost or dangling
    layer, store, g, path = _offloaded_layer(tmp_path / "b", aio_op)
    os.unlink(path)
    with pytest.raises(FileNotFoundError, match=f"group {g} of layer 0: file {path} is missing"):
        store.step([1 if i == g else 0 for i in range(4)])
    layer, store, g, path = _offloaded_layer(tmp_path / "c", aio_op)
    os.truncate(path, 4096)
    with pytest.raises(RuntimeError, match=f"group {g} of layer 0: file {path} is truncated"):
        store.step([1 if i == g else 0 for i in range(4)])


def test_failed_write_keeps_the_group_in_cpu_memory_with_a_warning(tmp_path, aio_op):
    layer = _trained(4)
    batches = _skewed_batches(layer, 16)
    layer.config.offload_idle_steps = None
    ref = _eval(layer, batches)
    layer.config.offload_idle_steps = 2
    nvme = tmp_path / "nvme"
    nvme.mkdir()
    for g in range(4):   # every group file is a device that refuses writes
        os.symlink("/dev/full", nvme / f"layer0_group{g}.bin")
    layer.offload_tier = aio.AioTier(str(nvme), None, aio_op)
    with pytest.warns(UserWarning, match="keeping it in CPU memory"):
        got = _eval(layer, batches)
    assert all(torch.equal(a, b) for a, b in zip(ref, got))
    st = layer.offload_stats()
    assert st["write_failures"] > 0 and st["offloaded_bytes"] == 0 and st["resident_groups"] == 4


def test_full_disk_falls_back_to_cpu_memory(tmp_path, aio_op):
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        layer = _trained(4)
        batches = _skewed_batches(layer, 16)
        layer.config.offload_idle_steps = None
        ref = _eval(layer, batches)
        layer.config.offload_idle_steps = 2
        layer.offload_tier = aio.AioTier(str(mnt), None, aio_op)
        with pytest.warns(UserWarning, match="No space left|no space left"):
            got = _eval(layer, batches)
        assert all(torch.equal(a, b) for a, b in zip(ref, got))
        assert layer.offload_stats()["write_failures"] > 0
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_make_tier_without_a_directory_warns_and_uses_cpu():
    with pytest.warns(UserWarning, match="CPU memory"):
        assert isinstance(aio.make_tier(None), CPUTier)


def test_training_forwards_never_use_the_store_and_gradients_match():
    a, b = _trained(4, idle=1), _trained(4, idle=None)
    x = torch.randn(5, D, dtype=torch.float64)
    _eval(a, _skewed_batches(a, 6))          # a has offloaded groups now
    assert a._store.offloaded
    a.train(), b.train()
    ya, la, _ = a(x)
    yb, lb, _ = b(x)
    assert torch.equal(ya, yb)
    (ya.sum() + la).backward()
    (yb.sum() + lb).backward()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        if pa.grad is not None or pb.grad is not None:
            assert torch.equal(pa.grad, pb.grad), n


def test_zero2_training_with_offloaded_groups_between_steps(tmp_path, dist_world_1):
    """Evaluation forwards that offload groups, interleaved with ZeRO-2 steps: the training curve is
    the one without offload (the store never holds training state; gradients of every group reach
    the reducer)."""
    from test_checkpoint import _batches, _engine
    data = _batches(10)
    probe = [x[:1, :3] for x in _batches(6, seed=4)]
    curves = []
    for idle in (None, 1):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            e = _engine(2, residual_bits=4, offload_idle_steps=idle, num_groups=4)
        losses = []
        for x in data:
            loss = e(x)
            e.backward(loss)
            e.step()
            losses.append(float(loss.detach()))
            e.module.eval()
            with torch.no_grad():
                for p in probe:
                    e.module(p)
            e.module.train()
        curves.append(losses)
        if idle is not None:
            assert e.module.moe.offload_stats()["offloads"] > 0
    assert curves[0] == curves[1]


@pytest.mark.parametrize("bits", [4, 16])
def test_fused_path_serves_from_the_stacked_stored_form(bits):
    """Without offload the store holds its groups stacked (each group's tensors views into it, so no
    second copy), and after release_masters the fused path computes from it: INT4 factors decoded
    from the packed codes give exactly what the masters' fake-quant forward gave."""
    layer = _trained(bits, idle=None)
    layer.fused = True
    batches = _skewed_batches(layer, 8) + [torch.randn(40, D, dtype=torch.float64)]
    ref = _eval(layer, batches)
    layer.fused = False
    slot_path = _eval(layer, batches)
    layer.release_masters()
    store = layer._store
    assert all(t._base is not None for d in store.resident.values() for t in d.values())   # views, not copies
    layer.fused = True
    got = _eval(layer, batches)
    assert all(torch.equal(a, b) for a, b in zip(ref, got))
    for a, b in zip(slot_path, got):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert layer.memory_report()["residual_masters"] == 0


@pytest.mark.parametrize("idle", [None, 2])
def test_release_masters_serves_the_same_function_from_the_stored_form(idle):
    layer = _trained(4, idle=idle)
    batches = _skewed_batches(layer, 16)
    ref = _eval(layer, batches)
    before = layer.memory_report()
    layer.release_masters()
    got = _eval(layer, batches)
    assert all(torch.equal(a, b) for a, b in zip(ref, got))
    r = layer.memory_report()
    assert r["residual_masters"] == 0 and all(p.numel() == 0 for p in layer.experts.parameters())
    if idle is None:   # everything resident: exactly the stored form memory_report promised
        for k in ("bases", "residual_packed", "residual_scales", "residual_stored", "biases", "stored_experts"):
            assert r[k] == before[k], k
    else:
        assert layer.offload_stats()["offloads"] > 0
        assert r["store_resident"] + r["store_offloaded"] >= r["bases"] + r["residual_stored"] + r["biases"]
    layer.train()
    with pytest.raises(RuntimeError, match="inference only"):
        layer(torch.randn(4, D, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="released its master weights"):
        layer.state_dict()

"""The offload engine computes what plain PyTorch computes, within a device budget it accounts for."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

import slidetrain.partitioned.offload_engine as off
from slidetrain.bench.offload_equivalence import CASES, run_case
from slidetrain.partitioned.device_meter import DeviceMeter
from slidetrain.partitioned.geometry import PartitionError
from slidetrain.partitioned.offload_engine import (
    OffloadBatchNorm2d,
    OffloadEngine,
    OffloadResNet,
    choose_stages,
    estimate_device_bytes,
    saved_bytes,
)

torch.set_num_threads(1)
TRUNK = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")


pytestmark = pytest.mark.equivalence


@pytest.mark.parametrize("name", list(CASES))
def test_case_matches_plain_fp32(name):
    """fp32: as close to the float64 reference as plain fp32 is (slidetrain.bench.fidelity), on any CPU."""
    _, engine, report = run_case(name, torch.float32)
    report.check(name)
    assert engine.parts_run > 1  # the engine really partitioned
    if "spatial" in name:
        assert engine.spatial_parts_run > 0
    if "batch" in name:
        assert engine.spatial_parts_run == 0


@pytest.mark.parametrize("name", [n for n in CASES if not n.startswith("resnet18")] + ["resnet18_abmil_image_spatial"])
def test_case_is_exact_in_fp64(name):
    """In fp64 the engine agrees to rounding: the proof that it is the same computation."""
    result, _, _ = run_case(name, torch.float64)
    assert result.max_rel_diff < 1e-10, result


def test_batchnorm_running_statistics_after_steps_equal_torch():
    torch.manual_seed(0)
    ref = nn.BatchNorm2d(6, momentum=0.3)
    twin = copy.deepcopy(ref)
    engine = OffloadEngine("cpu", 4000)  # spatial partitions of each sample
    layer = OffloadBatchNorm2d(twin, engine)
    for step in range(4):
        x = torch.randn(3, 6, 17, 13) * (step + 1) + step
        ref(x)
        layer(x)
    assert engine.spatial_parts_run > 0
    assert int(twin.num_batches_tracked) == int(ref.num_batches_tracked) == 4
    torch.testing.assert_close(twin.running_mean, ref.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(twin.running_var, ref.running_var, rtol=1e-5, atol=1e-6)
    ref.eval(), twin.eval()
    x = torch.randn(2, 6, 17, 13)
    torch.testing.assert_close(layer(x), ref(x), rtol=1e-5, atol=1e-5)


def _resnet_pair(seed=0):
    torch.manual_seed(seed)
    model = torchvision.models.resnet18()
    trunk = nn.Sequential(*[getattr(model, n) for n in TRUNK])
    return trunk, copy.deepcopy(trunk)


def _metered_step(trunk: nn.Module, x: torch.Tensor, stages: int, budget: int):
    """One forward and backward of the offloaded trunk, watched by a DeviceMeter.

    Returns the engine, the meter and {phase: (ledger peak, measured peak)} per phase.
    """
    engine = OffloadEngine("cpu", budget)
    net = OffloadResNet(trunk, stages, engine)
    peaks = {}
    with DeviceMeter(engine) as meter:
        out = net(x)
        peaks["forward"] = engine.ledger.peak, meter.peak
        engine.ledger.reset_peak()
        meter.reset_peak()
        out.backward(torch.ones_like(out))
        peaks["backward"] = engine.ledger.peak, meter.peak
    return engine, meter, peaks


def check_ledger(meter: DeviceMeter, peaks: dict[str, tuple[int, int]], budget: int) -> None:
    assert meter.max_unaccounted == 0, (
        f"{meter.max_unaccounted} bytes alive on the device beyond the ledger, before {meter.max_unaccounted_at}"
    )
    for phase, (ledger, measured) in peaks.items():
        assert ledger >= measured, f"{phase}: the ledger's peak {ledger} is below the measured {measured}"
        assert 0 < measured <= budget, f"{phase}: measured {measured} bytes on the device, budget {budget}"
        assert ledger <= budget, f"{phase}: the ledger's peak {ledger} is over the budget {budget}"


def test_ledger_covers_every_device_tensor_and_the_measure_stays_under_the_budget():
    """Measured (a dispatch mode counting the storages the engine creates) <= ledger <= budget."""
    trunk, _ = _resnet_pair()
    x = torch.randn(1, 3, 192, 160)
    budget = 2 * 2**20
    plain_saved, _ = saved_bytes(copy.deepcopy(trunk), x.clone().requires_grad_(True))
    assert plain_saved > 20 * budget  # plain training holds far more on its device
    engine, meter, peaks = _metered_step(trunk, x, 2, budget)
    assert engine.spatial_parts_run > 0  # the stem and layer1 were cut inside the map
    check_ledger(meter, peaks, budget)
    assert engine.ledger.current == 0 and meter.live == 0  # nothing of the engine's left on the device
    # what the engine handed over as model state is a parameter's .grad (or already freed)
    grads = {p.grad.untyped_storage()._cdata for p in trunk.parameters() if p.grad is not None}
    handed = meter.handed_over_alive()
    assert handed and all(s._cdata in grads for s in handed)


def test_a_device_copy_left_off_the_ledger_would_fail(monkeypatch):
    """An engine that keeps an uncounted staging copy beside every transfer fails the check."""
    real = OffloadEngine.copy_in

    def leaky_copy_in(self, src, dtype, held):
        out = real(self, src, dtype, held)
        out.leaked_staging = src.to(dtype, copy=True)  # lives as long as out, on no ledger
        return out

    monkeypatch.setattr(OffloadEngine, "copy_in", leaky_copy_in)
    trunk, _ = _resnet_pair()
    _, meter, peaks = _metered_step(trunk, torch.randn(1, 3, 192, 160), 2, 2 * 2**20)
    with pytest.raises(AssertionError, match="beyond the ledger"):
        check_ledger(meter, peaks, 2 * 2**20)
    meter.max_unaccounted = 0  # the peak-to-peak comparison alone catches this one too
    with pytest.raises(AssertionError, match="ledger's peak .* is below the measured"):
        check_ledger(meter, peaks, 2 * 2**20)


def test_stage_policy_offloads_more_stages_for_a_smaller_budget():
    trunk, _ = _resnet_pair()
    shape = (1, 3, 512, 512)
    plain = estimate_device_bytes(trunk, shape, None)
    transfer = 8 * 2**20
    by_stages = [estimate_device_bytes(trunk, shape, k, transfer) for k in range(5)]
    assert by_stages == sorted(by_stages, reverse=True)  # more offloaded, less on the device
    assert plain > by_stages[0]
    assert choose_stages(trunk, shape, plain, transfer) == 0
    assert choose_stages(trunk, shape, by_stages[2] + 1, transfer) == 2
    assert choose_stages(trunk, shape, by_stages[4] - 1, transfer) is None


def test_too_small_a_transfer_budget_is_a_clear_error():
    conv = nn.Conv2d(3, 8, 3, padding=1)
    layer = off.OffloadConv2d(conv, OffloadEngine("cpu", 64))
    with pytest.raises(PartitionError, match="max_transfer_bytes"):
        layer(torch.randn(1, 3, 9, 9))
    with pytest.raises(PartitionError, match="stages"):
        OffloadResNet(torchvision.models.resnet18(), 5, OffloadEngine())
    with pytest.raises(PartitionError, match="BasicBlock"):
        OffloadResNet(torchvision.models.resnet50(), 1, OffloadEngine())


# --- the tests catch broken engines --------------------------------------------------------------


def test_single_pass_per_partition_statistics_would_fail(monkeypatch):
    """BN statistics of one partition instead of all of them: the equivalence case must fail."""
    real = off.welford_stats

    def first_partition_only(engine, x):
        rows = max(1, x.shape[-2] // 4)
        mean, m2, count = real(OffloadEngine("cpu", 10**12), x[:1, :, :rows])
        return mean, m2 * (x.numel() // x.shape[1]) / count, x.numel() // x.shape[1]

    monkeypatch.setattr(off, "welford_stats", first_partition_only)
    _, _, report = run_case("bn_train_spatial_3steps", torch.float32)
    with pytest.raises(AssertionError, match="from the float64 reference"):
        report.check()


def test_a_halo_one_pixel_short_would_fail(monkeypatch):
    real = off.plan_parts

    def short_halo(*args, **kwargs):
        parts = real(*args, **kwargs)
        if args[0] is None:  # pointwise layers need no halo
            return parts
        return [off.Part(p.batch, p.out, ((p.inp[0][0] + (p.inp[0][0] > 0), p.inp[0][1]), p.inp[1])) for p in parts]

    monkeypatch.setattr(off, "plan_parts", short_halo)
    _, _, report = run_case("conv3x3_s1_spatial_odd", torch.float32)
    with pytest.raises(AssertionError, match="from the float64 reference"):
        report.check()


def test_a_dropped_gradient_would_fail_even_in_a_deep_network(monkeypatch):
    """The deep cases' allowance for flipped ReLU branches (JUMP) still catches a lost gradient."""
    real = off.OffloadConv2d.forward
    hit = []

    def no_weight_grad(self, x):
        y = real(self, x)
        if not hit:  # the first offloaded convolution's weight gradient is lost
            hit.append(self)
            self.conv.weight.register_hook(torch.zeros_like)
        return y

    monkeypatch.setattr(off.OffloadConv2d, "forward", no_weight_grad)
    _, _, report = run_case("resnet18_abmil_image_spatial", torch.float32)
    with pytest.raises(AssertionError, match="from the float64 reference"):
        report.check()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_memory_stays_under_budget():  # pragma: no cover - GPU only
    trunk, _ = _resnet_pair()
    trunk = trunk.cuda()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    engine = OffloadEngine("cuda", 64 * 2**20)
    torch.cuda.reset_peak_memory_stats()
    out = OffloadResNet(trunk, 4, engine)(torch.randn(1, 3, 2048, 2048))
    out.float().sum().backward()
    torch.cuda.synchronize()
    params = sum(p.numel() * 4 for p in trunk.parameters())
    assert torch.cuda.max_memory_allocated() - base <= engine.max_transfer_bytes + 3 * params + 64 * 2**20


def test_sweep_runs_baselines_side_by_side_and_offload_fits_where_plain_does_not(tmp_path):
    import pandas as pd

    from slidetrain.bench.offload_sweep import SweepConfig, run_sweep, summarise
    from slidetrain.paper.offload_figure import offload_figure

    rows = run_sweep(SweepConfig(sides=[128, 256], budget_bytes=230 * 2**20, warmup=1, repeats=2), log=lambda m: None)
    frame = pd.DataFrame(rows)
    assert set(frame.config[frame.image_side == 128]) >= {"plain", "save_on_cpu"}
    assert "plain" not in set(frame.config[frame.image_side == 256])  # plain no longer fits
    assert frame.config[frame.image_side == 256].str.startswith("offload").any()
    summary = summarise(rows, [128, 256])
    assert summary["largest_side_plain"] == 128 and summary["largest_side_offload"] == 256
    # on CPU offload fits by construction: the claim names 256 as the largest side swept, not a limit
    assert summary["largest_side_swept"] == 256
    assert "offload: the largest side swept (256 px)" in summary["claim"]
    assert frame.device.str.contains("host = device; device bytes as accounted").all()
    frame.to_csv(tmp_path / "sweep.csv", index=False)
    offload_figure(tmp_path / "sweep.csv", tmp_path / "fig.png")
    assert (tmp_path / "fig.png").stat().st_size > 1000

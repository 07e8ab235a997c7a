"""Big-Layers Figure 2: seconds per training iteration against image side, under a device budget.

One process, side by side, for every image side:

- `plain`: ResNet18 wholly on the device (the image moves there each iteration);
- `save_on_cpu`: the same under `torch.autograd.graph.save_on_cpu` (PyTorch's own offload of
  every tensor autograd saves; pinned on CUDA);
- `offload_k`: the engine with the stem and the first k stages offloaded (k = 0..4), trying
  k = 0, 1, ... until one fits the budget (the paper's incremental-stage protocol).

An iteration is forward + backward + AdamW step (lr 1e-5, weight decay 1e-4), batch 1, AMP
(float16 autocast + GradScaler) on CUDA; 5 warm-up and 10 measured iterations by default.

Device memory, and so "fits":
- CUDA: `torch.cuda.max_memory_allocated` over the iterations, with the budget enforced by
  `torch.cuda.set_per_process_memory_fraction`; a configuration fits if it raises no OOM.
- CPU (device = host): an accounting, the same for all configurations. Model state is
  parameters + gradients + AdamW's two moments (4 x parameter bytes). Activations: for `plain`,
  the bytes of the distinct storages autograd saves (counted with saved_tensors_hooks, a meta
  run of the same network and shape) plus the backward transient (2 x the largest
  activation: a layer's output and input gradients); for `save_on_cpu`, nothing saved on the
  device but 3 x the largest activation (a layer's input and output while the forward is at
  it, or an unpacked input with the two gradients in the backward); for `offload_k`, the
  larger of model state + the engine's ledger peak (its own account of every tensor it
  allocates on the device, not a measurement) and model state + the on-device rest's saved
  bytes + transient. A configuration fits if that is <= the budget.
  The accounting of `save_on_cpu` is a lower bound (it ignores cuDNN workspaces and the
  allocator), i.e. favourable to the baseline.

What the CPU rows can and cannot say: the host is the device, so nothing is measured against
a real limit; "fits" compares accounted device bytes with the budget. The engine's ledger is
checked against an independent count of the tensors it allocates (tests/test_offload.py,
`partitioned.device_meter`), but `offload_k`'s transfer budget is the budget less the
on-device rest (`transfer_budget`), so on CPU an offload configuration fits by construction
whenever the engine can plan its layers at all: its largest side is the largest side swept
(`summarise` says so), not a limit found. Only the CUDA run (max_memory_allocated under
set_per_process_memory_fraction, the GPU script) tests the budget against real memory.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from slidetrain.bench.memory import is_alloc_failure, with_index
from slidetrain.partitioned.geometry import PartitionError
from slidetrain.partitioned.offload_engine import (
    STAGES,
    OffloadEngine,
    OffloadResNet,
    estimate_device_bytes,
)

TRUNK = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
GB = 1e9


@dataclass
class SweepConfig:
    sides: Sequence[int]
    budget_bytes: int
    warmup: int = 5
    repeats: int = 10
    max_transfer_bytes: int = 256 * 2**20  # cap of one partition's working set
    min_transfer_bytes: int = 4 * 2**20  # an offload config needs at least this left over
    baselines: bool = True  # plain and save_on_cpu side by side
    seed: int = 0


class Net(nn.Module):
    """ResNet18 (torchvision) with a 2-class head, its trunk optionally offloaded."""

    def __init__(self, seed: int):
        super().__init__()
        import torchvision

        torch.manual_seed(seed)
        self.model = torchvision.models.resnet18(num_classes=2)
        self.trunk = nn.Sequential(*[getattr(self.model, n) for n in TRUNK])
        self.offloaded: nn.Module | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (1, 3, S, S) -> (1, 2)
        fmap = self.offloaded(x) if self.offloaded is not None else self.trunk(x)
        return self.model.fc(self.model.avgpool(fmap).flatten(1))


def _model_state_bytes(net: Net) -> int:
    return 4 * sum(p.numel() * p.element_size() for p in net.parameters())


def cpu_device_bytes(net: Net, side: int, config: str, ledger_peak: int = 0) -> int:
    """The CPU accounting of the module docstring (bytes)."""
    shape = (1, 3, side, side)
    if config == "plain":
        return estimate_device_bytes(net.trunk, shape, None)
    if config == "save_on_cpu":
        largest = 64 * (side // 2) ** 2 * 4  # the stem's conv output: ResNet18's largest map
        return _model_state_bytes(net) + 3 * largest
    stages = int(config.split("_")[1])
    return max(estimate_device_bytes(net.trunk, shape, stages, 0), _model_state_bytes(net) + ledger_peak)


def transfer_budget(net: Net, side: int, stages: int, cfg: SweepConfig, elem_bytes: int) -> int:
    """What a partition may hold: the budget less model state and the on-device rest (capped)."""
    rest = estimate_device_bytes(net.trunk, (1, 3, side, side), stages, 0, elem_bytes)
    return min(cfg.max_transfer_bytes, cfg.budget_bytes - rest)


@contextlib.contextmanager
def _maybe_save_on_cpu(config: str, device: torch.device) -> Iterator[None]:
    if config == "save_on_cpu":
        with torch.autograd.graph.save_on_cpu(pin_memory=device.type == "cuda"):
            yield
    else:
        yield


def time_config(
    net: Net, config: str, side: int, device: torch.device, cfg: SweepConfig, engine: OffloadEngine | None
) -> tuple[list[float], int]:
    """Seconds of each measured iteration and the peak device bytes (CUDA: measured)."""
    amp = device.type == "cuda"
    opt = torch.optim.AdamW(net.parameters(), lr=1e-5, weight_decay=1e-4)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    gen = torch.Generator().manual_seed(cfg.seed + side)
    image = torch.randn((1, 3, side, side), generator=gen)  # the slide crop, in host RAM
    if amp:
        image = image.pin_memory()
    target = torch.tensor([1], device=device)
    times = []
    if amp:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    for it in range(cfg.warmup + cfg.repeats):
        start = time.perf_counter()
        x = image if engine is not None else image.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp), _maybe_save_on_cpu(config, device):
            loss = F.cross_entropy(net(x).float(), target)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        if amp:
            torch.cuda.synchronize(device)
        if it >= cfg.warmup:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) if amp else 0
    return times, peak


def _row(side, config, times, peak, device_name, budget, note=""):
    return {
        "image_side": side,
        "config": config,
        "seconds_mean": statistics.fmean(times),
        "seconds_std": statistics.stdev(times) if len(times) > 1 else 0.0,
        "peak_device_gb": peak / GB,
        "device": device_name,
        "budget_gb": budget / GB,
        "note": note,
    }


def _error_note(err: BaseException) -> str:
    first = str(err).splitlines()[0] if str(err) else ""
    return f"error: {type(err).__name__}: {first[:300]}"


@contextlib.contextmanager
def memory_fraction(device: torch.device, budget_bytes: int) -> Iterator[None]:
    """The device's budget enforced by the caching allocator, and lifted again however the block ends:
    left set, it would shrink every later section of the GPU script."""
    device = with_index(device)  # the call rejects a device without an index
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, budget_bytes / total), device)
    try:
        yield
    finally:
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(1.0, device)


def run_sweep(
    cfg: SweepConfig, device: torch.device | str = "cpu", log=print, deadline_s: float | None = None
) -> list[dict]:
    """Rows of the sweep (only configurations that fit the budget); see the module docstring."""
    return list(iter_sweep(cfg, device, log, deadline_s))


def iter_sweep(
    cfg: SweepConfig,
    device: torch.device | str = "cpu",
    log=print,
    deadline_s: float | None = None,
    record_errors: bool = False,
) -> Iterator[dict]:
    """`run_sweep`'s rows one at a time, as each is measured (the GPU script writes each at once).

    record_errors: an error other than running out of memory becomes a row (`note` "error: ...") and
    the sweep goes on with the next configuration, instead of raising (the GPU script's one chance).
    """
    device = with_index(device)
    with memory_fraction(device, cfg.budget_bytes) if device.type == "cuda" else contextlib.nullcontext():
        yield from _sweep(cfg, device, log, deadline_s, record_errors)


def _sweep(
    cfg: SweepConfig, device: torch.device, log, deadline_s: float | None, record_errors: bool
) -> Iterator[dict]:
    cuda = device.type == "cuda"
    started = time.perf_counter()
    if cuda:
        name = f"{torch.cuda.get_device_name(device)} (budget {cfg.budget_bytes / GB:.1f} GB)"
    else:
        name = f"cpu (host = device; device bytes as accounted, budget {cfg.budget_bytes / GB:.2f} GB)"
    net = Net(cfg.seed).to(device)
    elem = 2 if cuda else 4

    def attempt(config: str, side: int, engine: OffloadEngine | None) -> dict | None:
        if not cuda:  # the accounting decides before spending time on a run that cannot fit
            if engine is None and cpu_device_bytes(net, side, config) > cfg.budget_bytes:
                return None
        try:
            times, peak = time_config(net, config, side, device, cfg, engine)
        except PartitionError as err:  # the transfer budget cannot hold one of the engine's layers
            log(f"side {side} {config}: {err}")
            return None
        except Exception as err:
            if cuda and is_alloc_failure(err):
                torch.cuda.empty_cache()
                return None
            if not record_errors:
                raise
            if cuda:
                torch.cuda.empty_cache()
            return {
                "image_side": side,
                "config": config,
                "device": name,
                "budget_gb": cfg.budget_bytes / GB,
                "note": _error_note(err),
            }
        finally:
            net.offloaded = None
        if not cuda:
            peak = cpu_device_bytes(net, side, config, engine.ledger.peak if engine else 0)
            if peak > cfg.budget_bytes:
                return None
        return _row(side, config, times, peak, name, cfg.budget_bytes)

    def outcome(row: dict | None) -> str:
        return (
            "does not fit"
            if row is None
            else row["note"]
            if "seconds_mean" not in row
            else f"{row['seconds_mean']:.3f} s"
        )

    for side in cfg.sides:
        if deadline_s is not None and time.perf_counter() - started > deadline_s:
            log(f"side {side}: time box reached, stopping")
            break
        configs = ["plain", "save_on_cpu"] if cfg.baselines else []
        for config in configs:
            row = attempt(config, side, None)
            log(f"side {side} {config}: {outcome(row)}")
            if row:
                yield row
        for stages in range(len(STAGES) + 1):
            transfer = transfer_budget(net, side, stages, cfg, elem)
            if transfer < cfg.min_transfer_bytes:
                continue
            engine = OffloadEngine(device, transfer)
            net.offloaded = OffloadResNet(net.trunk, stages, engine)
            row = attempt(f"offload_{stages}", side, engine)
            log(f"side {side} offload_{stages} (transfer {transfer / 2**20:.0f} MiB): {outcome(row)}")
            if row:
                if "seconds_mean" in row:
                    row["note"] = f"transfer {transfer / 2**20:.0f} MiB"
                yield row
                break


def summarise(rows: list[dict], sides_swept: Sequence[int] | None = None) -> dict:
    """Largest side each kind trains under the budget, the largest side swept, time ratios where
    both fit, and `claim`: the largest sides in words, naming a kind that reached the largest side
    swept as limited by the sweep (on CPU, offload always is: see the module docstring)."""

    def kind(c: str) -> str:
        return "offload" if c.startswith("offload") else c

    largest: dict[str, int] = {}
    by: dict[tuple[int, str], float] = {}
    for r in rows:
        if "seconds_mean" not in r:  # an error row (record_errors)
            continue
        k = kind(r["config"])
        largest[k] = max(largest.get(k, 0), int(r["image_side"]))
        by[(int(r["image_side"]), k)] = float(r["seconds_mean"])
    swept = max([int(s) for s in sides_swept or ()] + [int(r["image_side"]) for r in rows], default=0)
    out: dict = {f"largest_side_{k}": v for k, v in largest.items()}
    out["largest_side_swept"] = swept
    out["claim"] = "; ".join(
        f"{k}: the largest side swept ({v} px), its limit not reached" if v == swept else f"{k}: {v} px"
        for k, v in sorted(largest.items())
    )
    for base in ("plain", "save_on_cpu"):
        ratios = [by[(s, "offload")] / by[(s, base)] for (s, k) in by if k == base and (s, "offload") in by]
        if ratios:
            out[f"offload_over_{base}_max"] = max(ratios)
    return out


def write_sweep(cfg: SweepConfig, device: str, out: str) -> list[dict]:
    """Run the sweep and write its CSV (atomically), with the summary printed."""
    import pandas as pd

    from slidetrain.errors import SlidetrainError
    from slidetrain.io import atomic_path

    rows = run_sweep(cfg, device)
    if not rows:
        raise SlidetrainError(
            f"offload sweep: no configuration fits {cfg.budget_bytes / GB:.2f} GB at sides {list(cfg.sides)}"
        )
    with atomic_path(out) as tmp:
        pd.DataFrame(rows).to_csv(tmp, index=False, float_format="%.5g")
    print(summarise(rows, cfg.sides))
    return rows

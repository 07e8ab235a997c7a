"""Campanella et al.'s gradient equivalence (Figure 3) and the distributed executor's scaling.

The same case runs twice from the same seed: once in one process with plain autograd on the whole
bag (`single`), once under torchrun with the aggregator on rank 0 and the bag split over N encoder
ranks (`parallel`). Both record, per optimisation step, the loss and the tracked parameters (after
the step) and gradients (before it); `compare` turns the pair into normalized L1 rows::

    slidetrain distributed-single   --spec '{"case": "toy"}' --out single.pt
    torchrun --standalone --nproc-per-node 5 --no-python \\
        slidetrain distributed-parallel --spec '{"case": "toy"}' --out parallel.pt
    slidetrain distributed-equivalence --pair toy single.pt parallel.pt --csv distributed_equivalence.csv \\
        --figure fig.png

Cases: `toy` (the paper's: MLP 2048-2048-2048 encoder, aggregator Linear(2048,2048)-ReLU-
Linear(2048,2)-ReLU-mean over tiles, an 800 x 2048 input) and `resnet` (a ResNet encoder + GMA
without dropout or augmentation, synchronised BatchNorm, SGD with momentum over several steps).
Every bag is a seeded function of (seed, step), so a resumed run sees the bags it would have seen.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slidetrain.errors import ConfigError
from slidetrain.io import atomic_path
from slidetrain.models.base import MILOutput

log = logging.getLogger(__name__)


@dataclass
class CaseSpec:
    case: str = "toy"  # toy | resnet
    steps: int = 3
    seed: int = 0
    lr: float = 0.01
    momentum: float = 0.0
    # toy
    dim: int = 2048
    tiles: int = 800  # the whole bag; split over the encoder ranks
    # resnet
    backbone: str = "resnet18"
    tile_px: int = 64
    sync_bn: bool = True
    amp: bool = False
    predict_tiles: int = 0  # > 0: after training, score one bag of this many tiles (uneven shares)
    track_all: bool = False  # record every parameter (tests) instead of the paper's three layers
    record: bool = True  # False: timings only (the scaling runs), no tensors stored
    timing_warmup: int = 0  # steps left out of the seconds-per-step median
    device: str = "cpu"
    dtype: str = "float32"  # float64: shows that what remains at float32 is rounding, not the method

    def __post_init__(self) -> None:
        if self.case not in ("toy", "resnet"):
            raise ConfigError(f"distributed case: expected toy | resnet, got {self.case!r}")
        if self.dtype not in ("float32", "float64"):
            raise ConfigError(f"distributed case: dtype expected float32 | float64, got {self.dtype!r}")
        if self.steps < 1 or self.tiles < 1:
            raise ConfigError("distributed case: steps and tiles must be >= 1")


def spec_from_dict(d: dict | None) -> CaseSpec:
    from slidetrain.models.base import config_from_dict

    return config_from_dict(CaseSpec, d, where="distributed case spec")


class ToyAggregator(nn.Module):
    """Linear(D, D)-ReLU-Linear(D, 2)-ReLU, mean over tiles: (K, D) -> logits (2,)."""

    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, 2), nn.ReLU())

    def forward(self, bag: Tensor) -> MILOutput:  # bag: (K, D)
        return MILOutput(logits=self.net(bag).mean(0))  # (2,)


def build_models(spec: CaseSpec) -> tuple[nn.Module, nn.Module]:
    """(encoder, aggregator), identical on every process for one seed, in spec.dtype (as every tensor).

    Drawn in float32 and then cast, so that a float64 run starts from the float32 run's numbers
    and is its exact reference (fp32_noise); then torch's default dtype is set to spec.dtype.
    """
    torch.set_default_dtype(torch.float32)
    torch.manual_seed(spec.seed)
    if spec.case == "toy":
        encoder = nn.Sequential(nn.Linear(spec.dim, spec.dim), nn.ReLU(), nn.Linear(spec.dim, spec.dim))
        aggregator = ToyAggregator(spec.dim)
    else:
        from slidetrain.models.encoders import build_encoder, encoder_dim
        from slidetrain.models.gma import GMA, GMAConfig

        encoder = build_encoder(spec.backbone, "none", spec.seed).train()
        torch.manual_seed(spec.seed + 1)
        aggregator = GMA(encoder_dim(spec.backbone), 2, GMAConfig(dropout=0.0))
    dtype = getattr(torch, spec.dtype)
    torch.set_default_dtype(dtype)
    return encoder.to(dtype), aggregator.to(dtype)


def tracked_names(spec: CaseSpec, encoder: nn.Module, aggregator: nn.Module) -> dict[str, tuple[str, str]]:
    """Display name -> (side, parameter name). The paper's three layers, or everything (tests)."""
    if not spec.record:
        return {}
    if spec.track_all:
        names = {f"encoder {n}": ("encoder", n) for n, _ in encoder.named_parameters()}
        names.update({f"aggregator {n}": ("aggregator", n) for n, _ in aggregator.named_parameters()})
        return names
    if spec.case == "toy":
        return {
            "encoder layer 1": ("encoder", "0.weight"),
            "encoder layer 2": ("encoder", "2.weight"),
            "classifier": ("aggregator", "net.2.weight"),
        }
    last = len(encoder.trunk) - 1  # the last residual stage; its last block's first conv (paper's "Conv 51")
    last_block = len(encoder.trunk[last]) - 1
    return {
        "encoder conv1": ("encoder", "trunk.0.weight"),
        "encoder last block conv1": ("encoder", f"trunk.{last}.{last_block}.conv1.weight"),
        "classifier": ("aggregator", "classifier.weight"),
    }


def bag(spec: CaseSpec, step: int, n_tiles: int | None = None, salt: int = 0) -> tuple[Tensor, Tensor]:
    """The step's whole bag and label, a function of (seed, step) only."""
    g = torch.Generator().manual_seed(10_000 * spec.seed + step + 7_919 * salt)
    k = n_tiles or spec.tiles
    shape = (k, spec.dim) if spec.case == "toy" else (k, 3, spec.tile_px, spec.tile_px)  # (K, D) or (K, 3, P, P)
    x = torch.randn(shape, generator=g, dtype=torch.float32)  # float32 draws in every dtype (see build_models)
    return x.to(torch.get_default_dtype()), torch.tensor(step % 2)


def loss_fn(out: MILOutput, label: Tensor) -> Tensor:
    logits = out.logits.float() if out.logits.dtype in (torch.float16, torch.bfloat16) else out.logits
    return F.cross_entropy(logits[None], label[None])


def make_optimizer(spec: CaseSpec):
    return lambda module: torch.optim.SGD(module.parameters(), lr=spec.lr, momentum=spec.momentum)


def _snapshot(module: nn.Module, names: dict[str, str], grads: bool) -> dict[str, Tensor]:
    params = dict(module.named_parameters())
    out = {}
    for display, name in names.items():
        p = params[name.removeprefix("module.")]
        t = p.grad if grads else p
        if t is None:  # kept as missing: a gradient on one side only must fail the comparison
            out[display] = None
            continue
        t = t.detach().cpu().clone()
        out[display] = t.float() if t.dtype in (torch.float16, torch.bfloat16) else t
    return out


def _side_names(tracked: dict[str, tuple[str, str]], side: str) -> dict[str, str]:
    return {d: n for d, (s, n) in tracked.items() if s == side}


# -- single process: plain autograd on the whole bag ---------------------------------------------
def run_single(spec: CaseSpec) -> dict:
    """The case in this process; torch's default dtype (set to spec.dtype) is restored afterwards."""
    previous = torch.get_default_dtype()
    try:
        return _run_single(spec)
    finally:
        torch.set_default_dtype(previous)


def _run_single(spec: CaseSpec) -> dict:
    from slidetrain.train.tilebag.executors import PlainExecutor, StepContext

    dev = torch.device(spec.device)
    encoder, aggregator = build_models(spec)
    tracked = tracked_names(spec, encoder, aggregator)
    encoder, aggregator = encoder.to(dev), aggregator.to(dev)
    opt_e, opt_a = make_optimizer(spec)(encoder), make_optimizer(spec)(aggregator)
    amp_dtype = torch.float16 if dev.type == "cuda" else torch.bfloat16
    scaler = torch.amp.GradScaler(dev.type) if spec.amp and dev.type == "cuda" else None
    records, seconds = [], []
    executor = PlainExecutor()  # the tile-bag trainer's reference executor
    ctx = StepContext(
        scaler=scaler, device=dev, autocast=lambda: torch.autocast(dev.type, dtype=amp_dtype, enabled=spec.amp)
    )
    for step in range(1, spec.steps + 1):
        x, y = bag(spec, step)
        t0 = time.perf_counter()
        loss = executor.step(x, encoder, aggregator, y, loss_fn, ctx).loss
        if scaler is not None:
            scaler.unscale_(opt_e)
            scaler.unscale_(opt_a)
        rec = {
            "step": step,
            "loss": loss,
            "grads": {
                **_snapshot(encoder, _side_names(tracked, "encoder"), True),
                **_snapshot(aggregator, _side_names(tracked, "aggregator"), True),
            },
        }
        for opt in (opt_e, opt_a):
            (scaler.step(opt) if scaler is not None else opt.step())
            opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.update()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        seconds.append(time.perf_counter() - t0)
        rec["params"] = {
            **_snapshot(encoder, _side_names(tracked, "encoder"), False),
            **_snapshot(aggregator, _side_names(tracked, "aggregator"), False),
        }
        records.append(rec)
    result = {"spec": asdict(spec), "mode": "single", "records": records, "seconds": seconds[spec.timing_warmup :]}
    if spec.predict_tiles:
        encoder.eval()
        with torch.no_grad():
            x, _ = bag(spec, 0, spec.predict_tiles, salt=1)
            result["predict_logits"] = aggregator(encoder(x.to(dev)).float()).logits.float().cpu()
    return result


# -- parallel: one process per rank under torchrun -----------------------------------------------
@dataclass
class ParallelOptions:
    backend: str = "auto"
    timeout_s: float = 300.0
    checkpoint: Path | None = None
    checkpoint_every: int = 1
    #: called as step_hook(rank, step) on every rank before each step (tests kill or hang a rank there)
    step_hook: Callable[[int, int], None] | None = None
    #: the pseudo-loss factor; None = the number of encoder ranks (correct; tests break it on purpose)
    pseudo_loss_factor: float | None = None


def run_parallel(spec: CaseSpec, opts: ParallelOptions) -> dict | None:
    """Run under torchrun; returns the merged records on rank 0 (None on the other ranks)."""
    # one piece: one rank's life inside one process group, between init_distributed and the shutdown in
    # its `finally`; every step's collectives must run in the same order on every rank, which reads
    # best as one loop in one place.
    import torch.distributed as dist

    from slidetrain.train.tilebag.distributed_executor import (
        DistributedEngine,
        init_distributed,
        shutdown,
        split_bag,
    )

    topo = init_distributed(opts.backend, opts.timeout_s, spec.device)
    try:
        encoder, aggregator = build_models(spec)
        tracked = tracked_names(spec, encoder, aggregator)
        engine = DistributedEngine(
            topo,
            encoder,
            aggregator,
            loss_fn,
            make_optimizer(spec),
            amp=spec.amp,
            sync_bn=spec.sync_bn and spec.case == "resnet",
            _pseudo_loss_factor=opts.pseudo_loss_factor,
        )
        side = "aggregator" if topo.is_aggregator else "encoder"
        names = _side_names(tracked, side)
        records, seconds, comm = [], [], []
        start = 1
        if opts.checkpoint is not None:
            state = engine.load_checkpoint(opts.checkpoint)
            if state is not None:
                start = state["step"] + 1
                records, seconds, comm = state["extra"]["records"], state["extra"]["seconds"], state["extra"]["comm"]
                log.info("rank %d: resuming from %s after step %d", topo.rank, opts.checkpoint, state["step"])
        share = split_bag(spec.tiles, topo.n_encoders)
        for step in range(start, spec.steps + 1):
            if opts.step_hook is not None:
                opts.step_hook(topo.rank, step)
            x, y = bag(spec, step)
            tiles = None if topo.is_aggregator else x[share[topo.rank - 1]]  # (k_r, ...)
            comm0 = engine.comm.seconds
            t0 = time.perf_counter()
            loss = engine.forward_backward(tiles, y, step)
            rec = {"step": step, "loss": loss}
            if names:
                rec["grads"] = _snapshot(engine.model, names, True)
            engine.optimizer_step()
            if topo.device.type == "cuda":
                torch.cuda.synchronize(topo.device)
            seconds.append(time.perf_counter() - t0)
            comm.append(engine.comm.seconds - comm0)
            if names:
                rec["params"] = _snapshot(engine.model, names, False)
            records.append(rec)
            if opts.checkpoint is not None and step % opts.checkpoint_every == 0:
                engine.save_checkpoint(opts.checkpoint, step, {"records": records, "seconds": seconds, "comm": comm})
        predict = None
        if spec.predict_tiles:
            x, _ = bag(spec, 0, spec.predict_tiles, salt=1)
            shares = split_bag(spec.predict_tiles, topo.n_encoders)
            out = engine.predict(None if topo.is_aggregator else x[shares[topo.rank - 1]])
            predict = None if out is None else out.logits.float().cpu()
        mine = {"rank": topo.rank, "records": records, "seconds": seconds, "comm": comm}
        everyone = [None] * topo.world_size if topo.is_aggregator else None
        with engine.comm.guard("records gather"):
            dist.gather_object(mine, everyone, dst=0)
        if not topo.is_aggregator:
            return None
        merged = []
        for i, rec in enumerate(everyone[0]["records"]):
            enc = everyone[1]["records"][i]
            merged.append(
                {
                    "step": rec["step"],
                    "loss": rec["loss"],
                    "grads": {**enc.get("grads", {}), **rec.get("grads", {})},
                    "params": {**enc.get("params", {}), **rec.get("params", {})},
                }
            )
        w = spec.timing_warmup
        result = {
            "spec": asdict(spec),
            "mode": "parallel",
            "records": merged,
            "backend": topo.backend,
            "n_encoder_ranks": topo.n_encoders,
            "device": str(topo.device),
            "seconds": seconds[w:],
            "comm_seconds": comm[w:],
        }
        if predict is not None:
            result["predict_logits"] = predict
        return result
    finally:
        shutdown()


def save_result(result: dict, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(result, tmp)


# -- comparison, table and figure ------------------------------------------------------------------
def normalized_l1(a: Tensor, ref: Tensor) -> float:
    """||a - ref||_1 / ||ref||_1 (0 when both are zero)."""
    denom = ref.abs().sum().item()
    diff = (a.double() - ref.double()).abs().sum().item()
    return diff / denom if denom > 0 else diff


def _nl1(model: str, step: int, name: str, a: Tensor | None, ref: Tensor | None) -> float | None:
    if (a is None) != (ref is None):
        raise AssertionError(f"{model} step {step}: {name} present on one side only")
    return None if ref is None else normalized_l1(a, ref)


def compare(model: str, single: dict, parallel: dict, reference: dict | None = None) -> list[dict]:
    """Per step and tracked tensor: normalized L1 of parallel vs single; with a float64 `reference`
    (the single run in float64), also single's own distance from it (`fp32_noise`: rounding of
    plain fp32 on this CPU) and parallel's (`parallel_vs_fp64`)."""
    rows = []
    runs = [single, parallel] + ([reference] if reference is not None else [])
    if len({len(r["records"]) for r in runs}) != 1:
        raise ConfigError(f"{model}: steps differ (single, parallel, reference): {[len(r['records']) for r in runs]}")
    for i, (s, p) in enumerate(zip(single["records"], parallel["records"], strict=True)):
        r = reference["records"][i] if reference is not None else None
        step = s["step"]
        for kind in ("params", "grads"):
            for name, ref in s[kind].items():
                label = f"{name} {kind[:-1] if kind == 'params' else 'grad'}"
                if name not in p[kind]:
                    raise AssertionError(f"{model} step {step}: {label} missing from the parallel run")
                row = {
                    "model": model,
                    "step": step,
                    "tensor": label,
                    "normalized_l1": _nl1(model, step, label, p[kind][name], ref),
                    "abs_difference": "",
                }
                if r is not None:
                    row["fp32_noise"] = _nl1(model, step, label, ref, r[kind][name])
                    row["parallel_vs_fp64"] = _nl1(model, step, label, p[kind][name], r[kind][name])
                rows.append(row)
        row = {
            "model": model,
            "step": step,
            "tensor": "loss",
            "normalized_l1": abs(p["loss"] - s["loss"]) / max(abs(s["loss"]), 1e-12),
            "abs_difference": abs(p["loss"] - s["loss"]),
        }
        if r is not None:
            row["fp32_noise"] = abs(s["loss"] - r["loss"]) / max(abs(r["loss"]), 1e-12)
            row["parallel_vs_fp64"] = abs(p["loss"] - r["loss"]) / max(abs(r["loss"]), 1e-12)
        rows.append(row)
    return rows


def equivalence_figure(rows: list[dict], path: Path, out_data: Path | None = None) -> None:
    """Figure 3's three panels (parameters, loss, gradients) per model; the plotted points (after the
    floor) go to `out_data` (default: the PNG's path with .csv), panel "{model}: {param|loss|grad}"."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    from slidetrain.paper.figure_data import FigureData, data_path_for

    data = FigureData()
    floor = 1e-17  # exact zeros are drawn on the floor of the log axis
    df = pd.DataFrame(rows)
    models = list(dict.fromkeys(df["model"]))
    fig, axes = plt.subplots(len(models), 3, figsize=(13, 3.4 * len(models)), squeeze=False)
    for i, model in enumerate(models):
        d = df[df["model"] == model]
        panels = [
            ("param", "normalized L1 of parameters"),
            ("loss", "|loss difference|"),
            ("grad", "normalized L1 of gradients"),
        ]
        for j, (kind, title) in enumerate(panels):
            ax = axes[i][j]
            if kind == "loss":
                sel = d[d["tensor"] == "loss"]
                ax.plot(sel["step"], sel["abs_difference"].astype(float).clip(lower=floor), marker="o", color="k")
                data.add(f"{model}: loss", "loss", sel["step"], sel["abs_difference"].astype(float).clip(lower=floor))
            else:
                sel = d[d["tensor"].str.endswith(f" {kind}")]
                for name, g in sel.groupby("tensor", sort=False):
                    ax.plot(
                        g["step"],
                        g["normalized_l1"].astype(float).clip(lower=floor),
                        marker="o",
                        label=name.removesuffix(f" {kind}"),
                    )
                    data.add(
                        f"{model}: {kind}",
                        name.removesuffix(f" {kind}"),
                        g["step"],
                        g["normalized_l1"].astype(float).clip(lower=floor),
                    )
                if "fp32_noise" in sel and sel["fp32_noise"].notna().any():  # the reference's own rounding
                    noise = sel.groupby("step")["fp32_noise"].max().clip(lower=floor)
                    ax.plot(
                        noise.index, noise.to_numpy(), ls="--", color="grey", label="plain fp32 vs float64 (largest)"
                    )
                    data.add(f"{model}: {kind}", "plain fp32 vs float64 (largest)", noise.index, noise.to_numpy())
                ax.legend(fontsize=7)
            ax.set_yscale("log")
            ax.set_ylim(bottom=floor / 3)
            ax.set_xlabel("optimisation step")
            ax.set_title(f"{model}: {title} (0 drawn at {floor:g})", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    data.write(out_data or data_path_for(path))


def write_equivalence(
    pairs: list[tuple[str, Path, Path]],
    csv_path: Path,
    figure: Path,
    references: dict[str, Path] | None = None,
    figure_data: Path | None = None,
) -> list[dict]:
    """The equivalence table and Figure 3; `references` maps a float32 case to its single run in float64."""
    import pandas as pd

    rows = []
    for model, single, parallel in pairs:
        ref = (references or {}).get(model)
        rows += compare(
            model,
            torch.load(single, weights_only=False),
            torch.load(parallel, weights_only=False),
            torch.load(ref, weights_only=False) if ref is not None else None,
        )
    with atomic_path(csv_path) as tmp:
        pd.DataFrame(rows).to_csv(tmp, index=False)
    equivalence_figure(rows, figure, figure_data)
    return rows


def scaling_rows(parallel: list[Path], plain: list[Path]) -> list[dict]:
    """One row per N: distributed seconds per step beside `plain` at the same tiles, timed in one job."""
    rows = []
    for par_path, plain_path in zip(parallel, plain, strict=True):
        r, base = torch.load(par_path, weights_only=False), torch.load(plain_path, weights_only=False)
        if r["spec"]["tiles"] != base["spec"]["tiles"]:
            raise ConfigError(
                f"{par_path} and {plain_path}: different bags ({r['spec']['tiles']} vs {base['spec']['tiles']} tiles)"
            )
        n = r["n_encoder_ranks"]
        s, s_plain = statistics.median(r["seconds"]), statistics.median(base["seconds"])
        rows.append(
            {
                "n_encoder_ranks": n,
                "k_per_rank": r["spec"]["tiles"] // n,
                "seconds_per_step": s,
                "comm_seconds": statistics.median(r["comm_seconds"]),
                "device": f"{r['device']} ({r['backend']}; {n + 1} processes sharing {os.cpu_count()} cores)",
                "plain_tiles": base["spec"]["tiles"],
                "plain_seconds_per_step": s_plain,
                "ratio_vs_plain": s / s_plain,
            }
        )
    return rows


# -- the GPU script's section -----------------------------------------------------------------------
def collective_timeout_s(launch_timeout_s: float) -> float:
    """The ranks' collective timeout for a launch that may take `launch_timeout_s`.

    Below a third of it: the encoders' DDP group waits twice as long as the rest, and a rank that
    times out must still name the dead rank (monitored barrier) and exit before the launch is killed.
    """
    return float(min(120.0, max(10.0, (launch_timeout_s - 15.0) / 3)))


def _launch(spec: CaseSpec, nproc: int, out: Path, timeout_s: float) -> dict:
    """torchrun as a subprocess (the GPU machine has no Snakemake); returns rank 0's result.

    torchrun starts in its own session and is stopped with everything it started when the launch
    times out or the section is stopped (no rank outlives its launch holding the GPU); the ranks'
    collectives time out well before the launch does (`collective_timeout_s`).
    """
    import subprocess
    import sys

    from slidetrain.bench.section_runner import stop_process_tree

    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "slidetrain.cli",
        "distributed-parallel",
        "--spec",
        json.dumps(asdict(spec)),
        "--out",
        str(out),
        "--timeout-s",
        f"{collective_timeout_s(timeout_s):g}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log_path = out.with_suffix(".log")
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout_s)
        except BaseException:  # the launch's timeout, the section's cap, an interrupt
            stop_process_tree(proc)
            raise
    if code != 0:
        raise RuntimeError(f"torchrun (nproc {nproc}) exited {code}: {log_path.read_text()[-1500:]}")
    return torch.load(out, weights_only=False)


def _part(part: str, make_rows) -> list[dict]:
    """One part's rows, or one row with its status when it is skipped or fails: the other parts
    still run, and the rows measured before stay (the section is the GPU script's one chance)."""
    from slidetrain.bench.section_runner import SectionSkipped, error_text

    try:
        return make_rows()
    except SectionSkipped as err:
        return [{"part": part, "status": "skipped", "error": str(err)}]
    except Exception as err:  # noqa: BLE001 - recorded as a row
        log.exception("distributed equivalence %s failed", part)
        return [{"part": part, "status": "failed", "error": error_text(err)}]


def gpu_section(ctx) -> Iterator[dict]:
    """Equivalence (single vs parallel) and a short parallel-vs-single timing, fp32 and AMP ("half").

    On one GPU every rank shares it, so the backend is gloo (NCCL refuses two ranks on one device);
    with one GPU per rank it is NCCL. --tiny: the toy at small sizes on CPU. Each part's rows are
    yielded as the part ends; a part that fails or is skipped (a missing API, too little of the cap
    left) is a row with its status.
    """
    # one piece: a section is one generator that yields each row as it is measured, so the section cap
    # stops it between rows with the rows so far written (bench/section_runner.py); its parts share the
    # device, budget and deadline set at its top.
    from slidetrain.bench.preflight import api_ok
    from slidetrain.bench.section_runner import SectionSkipped

    device = str(ctx.device)  # with its index: every rank and the single run use that GPU
    if ctx.tiny:
        equiv = CaseSpec(case="toy", dim=32, tiles=12, steps=2, momentum=0.9, device=device)
        timing = CaseSpec(case="toy", dim=32, tiles=12, steps=3, timing_warmup=1, record=False, device=device)
    else:
        equiv = CaseSpec(
            case="resnet",
            backbone="resnet50",
            tile_px=224,
            tiles=64,
            steps=4,
            lr=1e-3,
            momentum=0.9,
            sync_bn=True,
            device=device,
        )
        timing = CaseSpec(
            case="resnet",
            backbone="resnet50",
            tile_px=224,
            tiles=128,
            steps=6,
            timing_warmup=2,
            sync_bn=False,
            record=False,
            device=device,
        )
    n_equiv = 2
    started = time.perf_counter()

    def launch(spec: CaseSpec, nproc: int, name: str) -> dict:
        for api in ("torchrun", "gloo"):
            ok, why = api_ok(ctx.preflight, api)
            if not ok:
                raise SectionSkipped(f"{api}: {why}")
        timeout = ctx.left_s() - 10  # leave the section time to record the part
        if timeout < 30:
            raise SectionSkipped(f"{ctx.left_s():.0f} s of the section's cap left; a launch needs 40")
        return _launch(spec, nproc, ctx.tmp_dir / f"{name}.pt", timeout)

    def equivalence() -> list[dict]:
        if equiv.case == "resnet" and equiv.sync_bn:
            ok, why = api_ok(ctx.preflight, "differentiable_all_reduce")
            if not ok:
                raise SectionSkipped(why)
        single = run_single(equiv)
        parallel = launch(equiv, n_equiv + 1, "equiv")
        model = f"{equiv.case}:{equiv.backbone if equiv.case == 'resnet' else equiv.dim}"
        return [
            {"part": "equivalence", "backend": parallel["backend"], "n_encoder_ranks": n_equiv, **r}
            for r in compare(model, single, parallel)
        ]

    def timing_row(amp: bool) -> list[dict]:
        spec = CaseSpec(**{**asdict(timing), "amp": amp})
        base = run_single(spec)
        par = launch(spec, 2, f"timing_amp{int(amp)}")
        s_single, s_par = statistics.median(base["seconds"]), statistics.median(par["seconds"])
        return [
            {
                "part": "timing",
                "backend": par["backend"],
                "n_encoder_ranks": 1,
                "model": spec.case,
                "tensor": f"tiles={spec.tiles} amp={amp}",
                "single_seconds_per_step": s_single,
                "parallel_seconds_per_step": s_par,
                "comm_seconds": statistics.median(par["comm_seconds"]),
                "overhead_vs_single": s_par / s_single,
            }
        ]

    yield from _part("equivalence", equivalence)
    for amp in (False,) if ctx.tiny else (False, True):  # the rehearsal keeps to two launches
        yield from _part(f"timing amp={amp}", lambda amp=amp: timing_row(amp))
    yield {"part": "total", "seconds": time.perf_counter() - started}

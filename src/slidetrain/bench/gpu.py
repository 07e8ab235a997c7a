"""The project's one GPU script: every GPU benchmark, in one process, within a time box.

Run on a bare CUDA machine that has PyTorch but neither Snakemake nor OpenSlide
(`bench/gpu.sh` puts carried wheels on the path and calls this module)::

    PYTHONPATH=src python -m slidetrain.bench.gpu --out OUT_DIR            # the real run
    PYTHONPATH=src python -m slidetrain.bench.gpu --out OUT_DIR --tiny     # CPU rehearsal (tests)

Each section is a function `(ctx: GpuContext) -> list[dict]` registered in SECTIONS; its rows
go to `OUT_DIR/<section>.csv` and a line to `OUT_DIR/summary.json` (seconds, status, error).
A section that fails or overruns its share of the budget is recorded as such and the next one
runs: one broken benchmark must not cost the others their device time. Sections import what they
need inside the function, so that this module imports without OpenSlide, h5py or Snakemake.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import torch


@dataclass
class GpuContext:
    """What a section gets: where to write, which device, whether this is the CPU rehearsal."""

    out_dir: Path
    device: torch.device
    tiny: bool
    #: seconds this section may take (it should size itself to fit; the runner records overruns)
    budget_s: float
    notes: dict = field(default_factory=dict)


def device_section(ctx: GpuContext) -> list[dict]:
    """The device, its memory and the software versions: the header of every recorded figure."""
    row = {
        "date_utc": datetime.now(UTC).strftime("%Y-%m-%d %H:%M"),
        "device": str(ctx.device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "host": platform.node(),
    }
    if ctx.device.type == "cuda":
        props = torch.cuda.get_device_properties(ctx.device)
        row.update(name=props.name, memory_gib=round(props.total_memory / 2**30, 1),
                   cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    else:
        row.update(name=platform.processor() or "cpu", memory_gib=None, cuda=None, cudnn=None)
    return [row]


def offload_sweep_section(ctx: GpuContext) -> list[dict]:
    """Big-Layers Figure 2 at the paper's sides (7,680 px up, step 256) on a 24 GB budget, AMP.

    plain and save_on_cpu side by side, then the fewest offloaded stages that fit; as many sides
    as the share allows (1 warm-up + 3 measured iterations each, not the paper's 5 + 10).
    --tiny: a CPU rehearsal at toy sides under the CPU accounting.
    """
    from slidetrain.bench.offload_sweep import SweepConfig, run_sweep

    if ctx.tiny:
        cfg = SweepConfig(sides=[64], budget_bytes=230 * 2**20, warmup=1, repeats=2)
    else:
        total = torch.cuda.get_device_properties(ctx.device).total_memory
        cfg = SweepConfig(sides=list(range(7680, 13824 + 1, 256 * 5)), budget_bytes=min(24 * 10**9, total),
                          warmup=1, repeats=3, max_transfer_bytes=2 * 2**30)
    rows = run_sweep(cfg, ctx.device, log=lambda m: print(m, flush=True), deadline_s=0.6 * ctx.budget_s)
    for row in rows:
        row["warmup"], row["repeats"] = cfg.warmup, cfg.repeats
    return rows


def e2e_distributed_section(ctx: GpuContext) -> list[dict]:
    """Campanella et al.'s executor: single vs torchrun gradients, and parallel vs single seconds."""
    from slidetrain.bench.e2e_distributed import gpu_section

    return gpu_section(ctx)
def tilebag_section(ctx: GpuContext) -> list[dict]:
    """Campanella et al.: max tiles per forward + backward for ResNet50 at 224 px (fp32, AMP), then a few
    plain-executor training steps (ResNet50 + GMA, one slide per step) per K on in-memory tiles.

    --tiny: ResNet18 at 64 px on the CPU (peak RSS of a fresh process per probe, 2 GiB, N <= 4).
    """
    import time as _time

    from slidetrain.bench.max_tiles import cuda_fits, fits, search_max
    from slidetrain.models import build_model, method_config
    from slidetrain.models.encoders import build_encoder, encoder_dim
    from slidetrain.train.tilebag.executors import PlainExecutor, StepContext

    cuda = ctx.device.type == "cuda"
    encoder_name, tile_px = ("resnet50", 224) if not ctx.tiny else ("resnet18", 64)
    budget = torch.cuda.get_device_properties(ctx.device).total_memory if cuda else 2 * 2**30
    limit = 16384 if not ctx.tiny else 4
    rows = []
    for precision in ("fp32", "amp"):
        probes = []

        def fit(n: int, precision=precision, probes=probes) -> bool:
            ok, peak = (cuda_fits if cuda else fits)(encoder_name, precision, n, tile_px, str(ctx.device), budget)
            probes.append((n, ok, peak))
            return ok

        t0 = _time.perf_counter()
        best = search_max(fit, start=64 if not ctx.tiny else 1, limit=limit)
        peak_at_best = max((p for n, ok, p in probes if ok and n == best), default=None)
        rows.append({"kind": "max_tiles", "encoder": encoder_name, "precision": precision, "tile_px": tile_px,
                     "max_tiles": best, "device_memory_gib": round(budget / 2**30, 1),
                     "tiles_per_gib": round(best / (budget / 2**30), 2), "peak_gib_at_max": peak_at_best,
                     "probes": len(probes), "seconds": round(_time.perf_counter() - t0, 1),
                     # the paper's ResNet50 on an 80 GB H100: 840 (fp32) / 1,848 (AMP) tiles
                     "paper_tiles_per_gb": {"fp32": 840 / 80, "amp": 1848 / 80}[precision]})
        if cuda:
            torch.cuda.empty_cache()
    # a few sweep steps: time per training step at several K (AMP on CUDA as the paper trains)
    encoder = build_encoder(encoder_name).to(ctx.device).train()
    aggregator = build_model("gma", encoder_dim(encoder_name), 2, method_config("gma", {})).to(ctx.device).train()
    params = [*encoder.parameters(), *aggregator.parameters()]
    optimizer = torch.optim.SGD(params, lr=5e-4, momentum=0.9, nesterov=True)
    scaler = torch.amp.GradScaler("cuda") if cuda else None
    step_ctx = StepContext(scaler=scaler, device=ctx.device,
                           autocast=(lambda: torch.autocast("cuda", dtype=torch.float16)) if cuda
                           else (lambda: torch.autocast("cpu", dtype=torch.bfloat16)))
    executor = PlainExecutor()
    for k in ((50, 100, 350, 700) if not ctx.tiny else (2, 4)):
        tiles = torch.randn(k, 3, tile_px, tile_px, device=ctx.device)  # (K, 3, P, P)
        times = []
        for step in range(4 if not ctx.tiny else 2):
            if cuda:
                torch.cuda.synchronize(ctx.device)
            t0 = _time.perf_counter()
            result = executor.step(tiles, encoder, aggregator, torch.tensor(step % 2), aggregator.loss, step_ctx)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize(ctx.device)
            times.append(_time.perf_counter() - t0)
        step_s = sorted(times[1:] or times)[len(times[1:] or times) // 2]  # median after the first (warm-up)
        rows.append({"kind": "sweep_step", "encoder": encoder_name, "precision": "amp", "tile_px": tile_px,
                     "k": k, "step_s": round(step_s, 4), "tiles_per_s": round(k / step_s, 1),
                     "loss": round(result.loss, 4)})
        del tiles
    return rows


def local_learning_section(ctx: GpuContext) -> list[dict]:
    """Zhang et al.'s Tables 2 and 3 on the device: training memory of one slide at the paper's 8698x7496
    (5x) for e2e, local_k4, local_k8 and local_k8 with `checkpointing: tiles`, as max_memory_allocated
    increments (slidetrain.bench.local_memory, the rule bench_train_memory's measurement), then whole-image
    inference seconds of local_k4 on that image beside ResNet34 tile embedding at 224 px per megapixel
    (Table 3's model part; reading slides needs OpenSlide, which this machine lacks).

    --tiny: 384x320 on the CPU (peak RSS of a fresh process per measurement; e2e and the checkpointed K=8).
    """
    import time as _time

    from slidetrain.bench.local_memory import measure_train_memory
    from slidetrain.models.encoders import build_encoder
    from slidetrain.train.wholeimage.registry import build_learner

    width, height = (8698, 7496) if not ctx.tiny else (384, 320)
    cases = [("e2e", {}), ("local_k4", {}), ("local_k8", {}),
             ("local_k8", {"checkpointing": "tiles"})]  # the default checkpoint_tile_px (64)
    if ctx.tiny:  # a fresh process per CPU measurement: rehearse both kinds of learner, not all four
        cases = [cases[0], cases[-1]]
    rows: list[dict] = []
    deadline = _time.perf_counter() + 0.8 * ctx.budget_s
    for method, params in cases:
        if _time.perf_counter() > deadline:
            rows.append({"kind": "train_memory", "method": method, "params": json.dumps(params),
                         "status": "skipped: out of the section's time"})
            continue
        report = measure_train_memory(method, height, width, str(ctx.device), {"weights": "none", **params},
                                      threads=None if ctx.device.type == "cuda" else 1)
        rows.append({"kind": "train_memory", "method": method, "params": json.dumps(params),
                     "image_size": f"{width}x{height}", "increment_gib": round(report.increment_bytes / 2**30, 3),
                     "seconds": round(report.wall_s, 2), "probe": report.method, "status": "ok"})
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
    e2e = next((r["increment_gib"] for r in rows if r["method"] == "e2e" and r["status"] == "ok"), None)
    for row in rows:  # the paper at 8698x7496 (V100): K=4 29.9%, K=8 20.7% of E2E
        if e2e and row["status"] == "ok":
            row["share_of_e2e"] = round(row["increment_gib"] / e2e, 4)
    # Table 3's model part: whole-image prediction vs tile embedding, seconds per megapixel
    learner = build_learner("local_k4", 2, {"weights": "none"}, device=ctx.device)
    image = torch.randn(3, height, width, device=ctx.device)
    encoder = build_encoder("resnet34", "none", 0).to(ctx.device).eval()
    tile_px = 224 if not ctx.tiny else 64
    tiles = torch.randn(64, 3, tile_px, tile_px, device=ctx.device)

    def seconds(fn, repeats: int = 3) -> float:
        fn()  # warm-up (cuDNN autotuning, allocations)
        times = []
        for _ in range(repeats):
            if ctx.device.type == "cuda":
                torch.cuda.synchronize(ctx.device)
            t0 = _time.perf_counter()
            fn()
            if ctx.device.type == "cuda":
                torch.cuda.synchronize(ctx.device)
            times.append(_time.perf_counter() - t0)
        return min(times)

    with torch.no_grad():
        whole_s = seconds(lambda: learner.predict(image))
        tiles_s = seconds(lambda: encoder(tiles))
    mpx_whole, mpx_tiles = width * height / 1e6, tiles.shape[0] * tile_px**2 / 1e6
    rows.append({"kind": "inference", "method": "local_k4", "image_size": f"{width}x{height}",
                 "seconds": round(whole_s, 4), "mpx_per_s": round(mpx_whole / whole_s, 2), "status": "ok"})
    rows.append({"kind": "inference", "method": "resnet34_tiles", "image_size": f"64x{tile_px}px",
                 "seconds": round(tiles_s, 4), "mpx_per_s": round(mpx_tiles / tiles_s, 2),
                 "tiles_per_s": round(tiles.shape[0] / tiles_s, 1), "status": "ok"})
    return rows


#: (name, function, share of the total time budget). Benchmarks register here, in running order.
def features_throughput_section(ctx: GpuContext) -> list[dict]:
    """Feature extraction of ResNet34 at 224 px, end to end vs model only (slidetrain.bench.features_gpu)."""
    from slidetrain.bench.features_gpu import features_throughput_section as run

    return run(ctx)


SECTIONS: list[tuple[str, Callable[[GpuContext], list[dict]], float]] = [
    ("device", device_section, 0.01),
    ("offload_sweep", offload_sweep_section, 0.21),
    ("e2e_distributed", e2e_distributed_section, 0.3),
    ("tilebag", tilebag_section, 0.25),
    ("features_throughput", features_throughput_section, 0.12),
    ("local_learning", local_learning_section, 0.1),
]


def write_rows(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def run_all(out_dir: Path, tiny: bool, budget_s: float, only: list[str] | None = None) -> list[dict]:
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() and not tiny else "cpu")
    summary = []
    for name, fn, share in SECTIONS:
        if only and name not in only:
            continue
        ctx = GpuContext(out_dir=out_dir, device=device, tiny=tiny, budget_s=budget_s * share)
        start = time.perf_counter()
        entry = {"section": name, "budget_s": round(ctx.budget_s, 1)}
        try:
            rows = fn(ctx)
            write_rows(out_dir / f"{name}.csv", rows)
            entry.update(status="ok", rows=len(rows))
        except Exception as exc:  # noqa: BLE001 - recorded, and the next section still runs
            entry.update(status="failed", error=f"{type(exc).__name__}: {exc}",
                         traceback=traceback.format_exc(limit=8))
        entry["seconds"] = round(time.perf_counter() - start, 2)
        if entry["seconds"] > ctx.budget_s and entry["status"] == "ok":
            entry["status"] = "overran"
        if device.type == "cuda":
            torch.cuda.empty_cache()
        summary.append(entry)
        print(json.dumps({k: v for k, v in entry.items() if k != "traceback"}), flush=True)
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tiny", action="store_true", help="CPU rehearsal at toy sizes (what the tests run)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="total seconds for all sections")
    parser.add_argument("--only", nargs="*", help="run only these sections")
    args = parser.parse_args(argv)
    summary = run_all(args.out, args.tiny, args.budget_s, args.only)
    return 0 if all(e["status"] != "failed" for e in summary) else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""The project's one GPU script: every GPU benchmark, in one process, within a time box.

Run on a bare CUDA machine that has PyTorch but neither Snakemake nor OpenSlide (`bench/gpu.sh`
puts carried wheels on the path, sets the outer time limit and calls this module; docs/gpu.md is
the procedure)::

    bash bench/gpu.sh OUT_DIR                              # the real run, about 6 minutes
    bash bench/gpu.sh OUT_DIR --only distributed_equivalence       # one section again
    bash bench/gpu.sh OUT_DIR --tiny                       # CPU rehearsal (tests/test_gpu_script.py)

First a preflight (~10 s: versions, device, the APIs each section needs in the installed torch, free
space), then each section of SECTIONS under a hard cap (its share of --budget-s). A section is a
function `(ctx: GpuContext) -> Iterable[dict]` that yields its rows as it measures them; each row
is in `OUT_DIR/<section>.csv` before the next is measured, and summary.json records the preflight
and every section's status (running, ok, capped, skipped, failed with its error) as the run goes.
One broken or slow benchmark must not cost the others their device time, nor its own rows.
Intermediates (checkpoints, features) go to a temporary directory deleted at the end: the output
folder holds at most 8 files of at most 16 MiB (what the device tool brings back), which
`check_output` verifies at the end. Sections import what they need inside the function, so that
this module imports without OpenSlide, h5py or Snakemake.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import torch

from slidetrain.bench.preflight import api_ok, preflight
from slidetrain.bench.section_runner import (
    RowTable,
    SectionCapped,
    SectionSkipped,
    Summary,
    check_output,
    error_text,
    hard_cap,
    raise_on_sigterm,
    run_section,
)

#: seconds all sections may take together (their caps are shares of it); bench/gpu.sh passes it
#: and sets its outer `timeout` from it. The CPU rehearsal runs on loaded CI cores: more room.
DEFAULT_BUDGET_S = 300.0
TINY_BUDGET_S = 1800.0
PREFLIGHT_CAP_S = 30.0


@dataclass
class GpuContext:
    """What a section gets: where to write, which device, whether this is the CPU rehearsal."""

    out_dir: Path
    #: intermediates (checkpoints, features): deleted when the section ends, never in out_dir
    tmp_dir: Path
    #: one device for every section; on CUDA with an explicit index (see resolve_device)
    device: torch.device
    tiny: bool
    #: the section's hard cap in seconds: it is stopped there (it may also stop starting new work
    #: earlier, to end cleanly)
    cap_s: float
    #: the preflight's findings (api_ok reads them); None where a test runs a section alone
    preflight: dict | None = None
    started: float = field(default_factory=time.perf_counter)

    def left_s(self) -> float:
        return self.cap_s - (time.perf_counter() - self.started)


def resolve_device(tiny: bool) -> torch.device:
    """The one device every section uses: CUDA with an explicit index, or the CPU (--tiny, or no GPU).

    A bare torch.device("cuda") is rejected by set_per_process_memory_fraction and read as "the
    current device" by other calls; the index makes every call name the same GPU.
    """
    if tiny or not torch.cuda.is_available():
        return torch.device("cpu")
    device = torch.device("cuda", torch.cuda.current_device())
    torch.cuda.set_device(device)
    return device


def offload_sweep_section(ctx: GpuContext) -> Iterator[dict]:
    """Big-Layers Figure 2 at the paper's sides (7,680 px up, step 256) on a 24 GB budget, AMP.

    plain and save_on_cpu side by side, then the fewest offloaded stages that fit; as many sides
    as the cap allows (1 warm-up + 3 measured iterations each, not the paper's 5 + 10). An error
    other than running out of memory is a row, and the sweep goes on.
    --tiny: a CPU rehearsal at toy sides under the CPU accounting.
    """
    from slidetrain.bench.offload_sweep import SweepConfig, iter_sweep

    ok, why = api_ok(ctx.preflight, "memory_fraction")
    if ctx.device.type == "cuda" and not ok:
        raise SectionSkipped(f"the 24 GB budget is enforced with set_per_process_memory_fraction: {why}")
    if ctx.tiny:
        cfg = SweepConfig(sides=[64], budget_bytes=230 * 2**20, warmup=1, repeats=2)
    else:
        total = torch.cuda.get_device_properties(ctx.device).total_memory
        cfg = SweepConfig(
            sides=list(range(7680, 13824 + 1, 256 * 5)),
            budget_bytes=min(24 * 10**9, total),
            warmup=1,
            repeats=3,
            max_transfer_bytes=2 * 2**30,
        )
    for row in iter_sweep(
        cfg, ctx.device, log=lambda m: print(m, flush=True), deadline_s=0.6 * ctx.cap_s, record_errors=True
    ):
        row["warmup"], row["repeats"] = cfg.warmup, cfg.repeats
        yield row


def distributed_equivalence_section(ctx: GpuContext) -> Iterable[dict]:
    """Campanella et al.'s executor: single vs torchrun gradients, and parallel vs single seconds."""
    from slidetrain.bench.distributed_equivalence import gpu_section

    return gpu_section(ctx)


def paper_tiles_per_gb(encoder_name: str = "resnet50") -> dict[str, float]:
    """Campanella et al.'s maximum tiles per GB of their GPU, by our precision names (paper/data/
    tilebag_memory.csv, the one source of those counts): ResNet50's for every ResNet (the tiny run's
    ResNet18 stands in for it), NaN for an encoder the paper did not measure (UNI's ViT-L)."""
    from slidetrain.paper.reference import paper_tiles_per_gb as per_gb

    paper_name = "resnet50" if encoder_name.startswith("resnet") else encoder_name
    return {precision: per_gb(paper_name, precision) for precision in ("fp32", "amp")}


def paper_image_size() -> tuple[int, int]:
    """(width, height) of the smallest image of Zhang et al.'s Table 2 (paper/data/local_table2.csv)."""
    from slidetrain.bench.local_memory import parse_size
    from slidetrain.paper.reference import paper_table

    return min((parse_size(s) for s in paper_table("local_table2").image_size), key=lambda wh: wh[0] * wh[1])


def max_tiles_rows(ctx: GpuContext, encoder_name: str, tile_px: int, limit: int) -> Iterator[dict]:
    """One row per precision (fp32, AMP): the most tiles one forward + backward of `encoder_name` holds.

    On CUDA the search stops within 1/64 of the answer for the ResNets, 1/16 for the foundation models
    (a ViT-L probe takes seconds); a probe that fails to allocate (OOM, cuDNN or cuBLAS workspace) is a
    miss. On the CPU: peak RSS of a fresh process per probe against 2 GiB. Paper rate: NaN for an
    encoder Campanella et al. did not measure.
    """
    from slidetrain.bench.max_tiles import cuda_fits, fits, search_max
    from slidetrain.models.foundation import FOUNDATION_NAMES

    cuda = ctx.device.type == "cuda"
    budget = torch.cuda.get_device_properties(ctx.device).total_memory if cuda else 2 * 2**30
    resolution = (1 / 16 if encoder_name in FOUNDATION_NAMES else 1 / 64) if cuda else 0.0
    paper = paper_tiles_per_gb(encoder_name)
    for precision in ("fp32", "amp"):
        probes = []

        def fit(n: int, precision=precision, probes=probes) -> bool:
            ok, peak = (cuda_fits if cuda else fits)(encoder_name, precision, n, tile_px, str(ctx.device), budget)
            probes.append((n, ok, peak))
            return ok

        t0 = time.perf_counter()
        best = search_max(fit, start=64 if not ctx.tiny else 1, limit=limit, resolution=resolution)
        peak_at_best = max((p for n, ok, p in probes if ok and n == best), default=None)
        yield {
            "kind": "max_tiles",
            "encoder": encoder_name,
            "precision": precision,
            "tile_px": tile_px,
            "max_tiles": best,
            "resolution": resolution,
            "device_memory_gib": round(budget / 2**30, 1),
            "tiles_per_gib": round(best / (budget / 2**30), 2),
            "peak_gib_at_max": peak_at_best,
            "probes": len(probes),
            "seconds": round(time.perf_counter() - t0, 1),
            "paper_tiles_per_gb": paper[precision],
        }
        if cuda:
            torch.cuda.empty_cache()


def tilebag_section(ctx: GpuContext) -> Iterator[dict]:
    """Campanella et al.: max tiles per forward + backward for ResNet50 at 224 px (fp32, AMP), then a few
    plain-executor training steps (ResNet50 + GMA, one slide per step) per K on in-memory tiles, then
    (issue 27) max tiles per step when UNI's ViT-L/16 (`uni`, random init) is trained end to end (fp32, AMP).

    On CUDA the search stops within 1/64 of the answer (1/16 for the ViT-L; time box); a probe that fails
    to allocate (OOM, cuDNN or cuBLAS workspace) is a miss.
    --tiny: ResNet18 at 64 px on the CPU (peak RSS of a fresh process per probe, 2 GiB, N <= 4), and the
    test ViT (`vit_tiny_test`) at 32 px, N <= 2.
    """
    # one piece: a section is one generator that yields each row as it is measured, so the section cap
    # stops it between rows with the rows so far written (bench/section_runner.py); its parts share the
    # device, budget and deadline set at its top.
    from slidetrain.models import build_model, method_config
    from slidetrain.models.encoders import build_encoder, encoder_dim
    from slidetrain.train.tilebag.executors import PlainExecutor, StepContext

    cuda = ctx.device.type == "cuda"
    encoder_name, tile_px = ("resnet50", 224) if not ctx.tiny else ("resnet18", 64)
    yield from max_tiles_rows(ctx, encoder_name, tile_px, limit=16384 if not ctx.tiny else 4)
    # a few sweep steps: time per training step at several K (AMP on CUDA as the paper trains)
    encoder = build_encoder(encoder_name).to(ctx.device).train()
    aggregator = build_model("gma", encoder_dim(encoder_name), 2, method_config("gma", {})).to(ctx.device).train()
    params = [*encoder.parameters(), *aggregator.parameters()]
    optimizer = torch.optim.SGD(params, lr=5e-4, momentum=0.9, nesterov=True)
    scaler = torch.amp.GradScaler("cuda") if cuda else None
    step_ctx = StepContext(
        scaler=scaler,
        device=ctx.device,
        autocast=(lambda: torch.autocast("cuda", dtype=torch.float16))
        if cuda
        else (lambda: torch.autocast("cpu", dtype=torch.bfloat16)),
    )
    executor = PlainExecutor()
    for k in (50, 100, 350, 700) if not ctx.tiny else (2, 4):
        tiles = torch.randn(k, 3, tile_px, tile_px, device=ctx.device)  # (K, 3, P, P)
        times = []
        for step in range(4 if not ctx.tiny else 2):
            if cuda:
                torch.cuda.synchronize(ctx.device)
            t0 = time.perf_counter()
            result = executor.step(tiles, encoder, aggregator, torch.tensor(step % 2), aggregator.loss, step_ctx)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize(ctx.device)
            times.append(time.perf_counter() - t0)
        step_s = sorted(times[1:] or times)[len(times[1:] or times) // 2]  # median after the first (warm-up)
        yield {
            "kind": "sweep_step",
            "encoder": encoder_name,
            "precision": "amp",
            "tile_px": tile_px,
            "k": k,
            "step_s": round(step_s, 4),
            "tiles_per_s": round(k / step_s, 1),
            "loss": round(result.loss, 4),
        }
        del tiles
    # issue 27: UNI's ViT-L/16 trained end to end (random init), last so that a cap keeps the rows above
    del encoder, aggregator, params, optimizer
    if cuda:
        torch.cuda.empty_cache()
    vit, vit_px = ("uni", 224) if not ctx.tiny else ("vit_tiny_test", 32)
    yield from max_tiles_rows(ctx, vit, vit_px, limit=16384 if not ctx.tiny else 2)


def local_learning_section(ctx: GpuContext) -> Iterator[dict]:
    """Zhang et al.'s Tables 2 and 3 on the device: training memory of one slide at the paper's smallest
    Table 2 image (5x) for image_e2e, local_k4, local_k8, and image_e2e and local_k8 with `checkpointing: tiles`
    (each share divides by image_e2e under the same params: like for like), as max_memory_allocated
    increments (slidetrain.bench.local_memory, the rule bench_train_memory's measurement), then whole-image
    inference seconds of local_k4 on that image beside ResNet34 tile embedding at 224 px per megapixel
    (Table 3's model part; reading slides needs OpenSlide, which this machine lacks).

    --tiny: 384x320 on the CPU (peak RSS of a fresh process per measurement; image_e2e, plain and checkpointed,
    and the checkpointed K=8).
    """
    # one piece: a section is one generator that yields each row as it is measured, so the section cap
    # stops it between rows with the rows so far written (bench/section_runner.py); its parts share the
    # device, budget and deadline set at its top.
    from slidetrain.bench.local_memory import measure_train_memory
    from slidetrain.models.encoders import build_encoder
    from slidetrain.train.wholeimage.registry import build_learner

    width, height = paper_image_size() if not ctx.tiny else (384, 320)
    checkpointed = {"checkpointing": "tiles"}  # the default checkpoint_tile_px (64)
    cases = [
        ("image_e2e", {}),
        ("local_k4", {}),
        ("local_k8", {}),
        ("image_e2e", checkpointed),
        ("local_k8", checkpointed),
    ]
    if ctx.tiny:  # a fresh process per CPU measurement: rehearse both kinds of learner, not all five
        cases = [cases[0], cases[-2], cases[-1]]
    deadline = time.perf_counter() + 0.7 * ctx.cap_s  # leave the inference part its time
    image_e2e: dict[str, float] = {}  # json.dumps(params) -> image_e2e's GiB under those params
    for method, params in cases:
        if time.perf_counter() > deadline:
            yield {
                "kind": "train_memory",
                "method": method,
                "params": json.dumps(params),
                "status": "skipped: out of the section's time",
            }
            continue
        report = measure_train_memory(
            method,
            height,
            width,
            str(ctx.device),
            {"weights": "none", **params},
            threads=None if ctx.device.type == "cuda" else 1,
        )
        gib = round(report.increment_bytes / 2**30, 3)
        key = json.dumps(params)
        if method == "image_e2e":  # measured before the local rows of the same params: their denominator
            image_e2e[key] = gib
        # the paper's shares of E2E at this size: local_table2.csv (V100; neither checkpointed)
        same, plain = image_e2e.get(key), image_e2e.get(json.dumps({}))
        yield {
            "kind": "train_memory",
            "method": method,
            "params": key,
            "image_size": f"{width}x{height}",
            "increment_gib": gib,
            "seconds": round(report.wall_s, 2),
            "probe": report.method,
            "status": "ok",
            "share_of_image_e2e": round(gib / same, 4) if same else None,  # image_e2e, same params
            # checkpointed rows over plain image_e2e: not like for like, named so
            "share_of_plain_image_e2e": round(gib / plain, 4) if plain and params else None,
        }
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
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
            t0 = time.perf_counter()
            fn()
            if ctx.device.type == "cuda":
                torch.cuda.synchronize(ctx.device)
            times.append(time.perf_counter() - t0)
        return min(times)

    with torch.no_grad():
        whole_s = seconds(lambda: learner.predict(image))
    mpx_whole = width * height / 1e6
    yield {
        "kind": "inference",
        "method": "local_k4",
        "image_size": f"{width}x{height}",
        "seconds": round(whole_s, 4),
        "mpx_per_s": round(mpx_whole / whole_s, 2),
        "status": "ok",
    }
    with torch.no_grad():
        tiles_s = seconds(lambda: encoder(tiles))
    mpx_tiles = tiles.shape[0] * tile_px**2 / 1e6
    yield {
        "kind": "inference",
        "method": "resnet34_tiles",
        "image_size": f"64x{tile_px}px",
        "seconds": round(tiles_s, 4),
        "mpx_per_s": round(mpx_tiles / tiles_s, 2),
        "tiles_per_s": round(tiles.shape[0] / tiles_s, 1),
        "status": "ok",
    }


def features_throughput_section(ctx: GpuContext) -> Iterable[dict]:
    """Feature extraction of ResNet34 at 224 px, end to end vs model only (slidetrain.bench.features_gpu)."""
    from slidetrain.bench.features_gpu import features_throughput_section as run

    return run(ctx)


@dataclass(frozen=True)
class Section:
    name: str
    run: Callable[[GpuContext], Iterable[dict]]
    #: its cap, as a share of the budget (the shares add up to 1)
    share: float
    #: what it imports: the preflight imports them all, so a missing package shows in seconds
    modules: tuple[str, ...] = ()


#: the sections, in running order. Each adds one CSV to the output: keep the total (with
#: summary.json and log.txt) within MAX_FILES, by merging small tables into one (tests check).
SECTIONS: list[Section] = [
    Section(
        "offload_sweep",
        offload_sweep_section,
        0.18,
        ("torchvision", "slidetrain.bench.offload_sweep", "slidetrain.partitioned.offload_engine"),
    ),
    Section(
        "distributed_equivalence",
        distributed_equivalence_section,
        0.26,
        (
            "slidetrain.bench.distributed_equivalence",
            "slidetrain.train.tilebag.distributed_executor",
            "slidetrain.cli",
            "torch.distributed.run",
        ),
    ),
    Section(
        "tilebag",
        tilebag_section,
        0.26,
        (
            "slidetrain.bench.max_tiles",
            "slidetrain.train.tilebag.executors",
            "slidetrain.paper.reference",
            "timm",
            "slidetrain.models.foundation",
        ),
    ),
    Section(
        "features_throughput",
        features_throughput_section,
        0.18,
        ("PIL", "slidetrain.bench.features_gpu", "slidetrain.wsi.encode", "timm", "slidetrain.models.foundation"),
    ),
    Section(
        "local_learning",
        local_learning_section,
        0.12,
        ("slidetrain.bench.local_memory", "slidetrain.train.wholeimage.registry"),
    ),
]


def section_rows(name: str, rows: Iterable[dict]) -> Iterable[dict]:
    """The rows of section `name` as `run_all` records them: unchanged.

    An extension point, looked up at call time: the tests replace it (tests/_entry.py) to make a
    section fail or overrun its cap after some rows, through the real command line."""
    return rows


def _run_preflight(summary: Summary, device: torch.device, tmp_dir: Path) -> None:
    modules = sorted({m for s in SECTIONS for m in s.modules})
    try:
        with hard_cap(PREFLIGHT_CAP_S, "preflight"):
            summary.data["preflight"] = preflight(device, modules, tmp_dir)
    except (SectionCapped, Exception) as err:  # noqa: BLE001 - the sections run without it (defaults)
        summary.data["preflight"] = {"error": error_text(err)}
    summary.write()
    print(json.dumps({"preflight": summary.data["preflight"]}), flush=True)


def run_all(out_dir: Path, tiny: bool, budget_s: float | None = None, only: list[str] | None = None) -> dict:
    """Preflight, then every section (or those in `only`) under its cap; returns summary.json's content."""
    budget_s = budget_s or (TINY_BUDGET_S if tiny else DEFAULT_BUDGET_S)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(tiny)
    summary = Summary(
        out_dir / "summary.json",
        {
            "started_utc": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S"),
            "tiny": tiny,
            "budget_s": budget_s,
            "only": only,
            "device": str(device),
        },
    )
    tmp_root = Path(tempfile.mkdtemp(prefix="slidetrain-gpu-"))  # intermediates: never in out_dir
    try:
        _run_preflight(summary, device, tmp_root)
        for section in SECTIONS:
            if only and section.name not in only:
                continue
            cap = budget_s * section.share
            ctx = GpuContext(
                out_dir=out_dir,
                tmp_dir=tmp_root / section.name,
                device=device,
                tiny=tiny,
                cap_s=cap,
                preflight=summary.data["preflight"],
            )
            ctx.tmp_dir.mkdir()

            def rows_of(section=section, ctx=ctx) -> Iterator[dict]:
                ctx.started = time.perf_counter()
                return section_rows(section.name, section.run(ctx))

            entry = run_section(section.name, rows_of, cap, RowTable(out_dir / f"{section.name}.csv"), summary, device)
            shutil.rmtree(ctx.tmp_dir, ignore_errors=True)  # free the disk (checkpoints) as we go
            print(json.dumps({k: v for k, v in entry.items() if k != "traceback"}), flush=True)
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
        summary.data["finished_utc"] = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S")
        summary.data["output_check"] = check_output(out_dir)
        summary.write()
        print(json.dumps({"output_check": summary.data["output_check"]}), flush=True)
    return summary.data


def main(argv: list[str] | None = None) -> int:
    """Exit status 1 when a section failed or the output folder breaks the limits (capped or skipped
    sections are recorded in summary.json, and are no failure of the script)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tiny", action="store_true", help="CPU rehearsal at toy sizes (what the tests run)")
    parser.add_argument(
        "--budget-s",
        type=float,
        help=f"seconds for all sections together (default {DEFAULT_BUDGET_S:g}; "
        f"--tiny {TINY_BUDGET_S:g}); each section's cap is its share",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        choices=[s.name for s in SECTIONS],
        metavar="SECTION",
        help=f"run only these sections, with their usual caps ({', '.join(s.name for s in SECTIONS)})",
    )
    args = parser.parse_args(argv)
    raise_on_sigterm()  # the outer timeout's SIGTERM still lets the summary and output check be written
    summary = run_all(args.out, args.tiny, args.budget_s, args.only)
    failed = [e["section"] for e in summary["sections"] if e["status"] == "failed"]
    return 0 if not failed and summary["output_check"]["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())

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


#: (name, function, share of the total time budget). Benchmarks register here, in running order.
def features_throughput_section(ctx: GpuContext) -> list[dict]:
    """Feature extraction of ResNet34 at 224 px, end to end vs model only (slidetrain.bench.features_gpu)."""
    from slidetrain.bench.features_gpu import features_throughput_section as run

    return run(ctx)


SECTIONS: list[tuple[str, Callable[[GpuContext], list[dict]], float]] = [
    ("device", device_section, 0.01),
    ("features_throughput", features_throughput_section, 0.12),
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

"""docs/benchmarks.md: every result table rendered from results/, each with the command behind it.

    slidetrain docs-benchmarks --results-dir results --out docs/benchmarks.md

(the `docs` target runs it: `snakemake --cores all docs --forcerun docs_benchmarks`). Each table is
rendered from its CSV and stamped with what produced it: the Snakemake command, the date the CSV was
written, the commit, the CPU model, the thread count and the GPU (if any) of the machine that
renders the page, which is the machine that built the results when the `docs` target builds them. A
known result that does not exist yet is listed with the command that makes it; CSVs under
results/tables/ and results/bench/ that the catalogue does not know are rendered too."""

from __future__ import annotations

import csv
import datetime as dt
import os
import platform
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from slidetrain.io import atomic_path


@dataclass(frozen=True)
class Result:
    path: str  # relative to the working directory, as the workflow writes it
    title: str
    about: str  # one sentence: what the table shows
    target: str = ""  # the Snakemake target that builds it when it is not the path itself
    cost: str = ""  # what building it needs beyond the default job, for the missing list

    @property
    def command(self) -> str:
        return f"snakemake --cores all {self.target or self.path}"


#: Results the page knows, in page order. `DEFAULT_BUILD` (config `docs.build`) are built by `docs`.
CATALOGUE: tuple[Result, ...] = (
    Result(
        "results/tables/table1.csv",
        "Table 1: slide classification (local-learning paper)",
        "Accuracy and AUROC, mean and std over every (split, seed) run, the paper's values beside.",
    ),
    Result(
        "results/bench/preprocess.csv",
        "Preprocessing seconds per slide",
        "Tissue mask, tiling, whole-slide image, QC picture and features, per slide; a large slide's "
        "masking and tiling.",
    ),
    Result(
        "results/bench/features_throughput.csv",
        "Feature extraction throughput",
        "Tiles/s of one shard end to end (read, decode, encode, write) against the encoder alone on the "
        "same tiles in memory, per reader-process count, with the slide files cold (evicted from the page "
        "cache) and warm.",
    ),
    Result(
        "results/bench/read_speed.csv",
        "Slide reading: OpenSlide against the tifffile reader",
        "Mpx/s reading the 5x tissue box, both readers side by side in one process, each with its thread "
        "count; OpenSlide also on tifffile's number of threads.",
    ),
    Result(
        "results/tables/table3.csv",
        "Table 3: inference seconds (local-learning paper)",
        "Seconds per slide, tile pipeline (tiling, features, gated ABMIL) against whole-slide inference "
        "(reading, local_k4).",
    ),
    Result(
        "results/bench/offload_equivalence.csv",
        "Offload engine against plain PyTorch",
        "Largest difference of outputs, gradients and BatchNorm statistics, fp32 and fp64.",
    ),
    Result(
        "results/bench/offload_sweep.csv",
        "Big-Layers Figure 2: seconds per iteration against image side",
        "plain, save_on_cpu and offload under one device budget (results/figures/offload_figure2.png).",
    ),
    Result(
        "results/bench/distributed_equivalence.csv",
        "Distributed executor: gradient equivalence (Campanella Fig. 3)",
        "Normalised L1 of parameters, gradients and loss, single process against torchrun ranks.",
    ),
    Result(
        "results/bench/distributed_scaling.csv",
        "Distributed executor: seconds per step against encoder ranks",
        "N encoder ranks at a fixed k per rank, `plain` at N x k tiles timed in the same job.",
    ),
    Result(
        "results/bench/tilebag_step.csv",
        "Tile-bag step: on-the-fly reading against bags in memory",
        "Seconds per training step, on-the-fly reading cold (slide files evicted from the page cache) and "
        "warm; tiles read/s beside tiles encoded/s.",
    ),
    Result(
        "results/tables/table4.csv",
        "Table 4: RFR ablation (local-learning paper)",
        "K=4/8 with and without Random Feature Reconstruction.",
        cost="four whole-image trainings",
    ),
    Result(
        "results/tables/table2.csv",
        "Table 2: training memory (local-learning paper)",
        "Peak memory of one training slide and step, image_e2e against local_k4/local_k8 per image size; "
        "variant rows (activation checkpointing) are divided by image_e2e under the same variant.",
        cost="a fresh process per measurement; the rule asks for 21,000 MB of RAM",
    ),
    Result(
        "results/bench/mil_throughput.csv",
        "MIL training throughput",
        "One training epoch per MIL method over synthetic feature bags (`bench.mil_*`); MIL-RNN's epoch is "
        "its stage 1 (the top-1 tile classifier), not the RNN.",
        cost="4 GB of synthetic bags; TransMIL's epoch dominates",
    ),
    Result(
        "results/bench/heatmaps.csv",
        "Per-slide heatmaps: seconds and peak memory",
        "Wall and CPU seconds and peak RSS of one attention heatmap per slide, each in a fresh process: the "
        "test slides of the first heatmap run of Table 1's first dataset, and one large synthetic slide "
        "(bench.large_slide_px) with stand-in per-tile values; goal under 2 s and 1 GB per slide.",
        cost="a Table 1 attention run, the large synthetic slide drawn and masked",
    ),
    Result(
        "results/bench/encoders_cpu.csv",
        "Tile encoders on the CPU: forward tiles/s and peak memory at random init",
        "Every registered ResNet and foundation model (`bench.encoders_cpu`), one process each, forward of a "
        "batch of 224-px tiles (resized to the model's input size), tiles/s and the process' peak RSS in GB.",
        cost="about 10 minutes on 2 cores; the ViT-g models need about 6.5 GB of free RAM",
    ),
    Result(
        "results/tables/tilebag_table1.csv",
        "Campanella et al. Table 1: AUROC against K and strategy",
        "Tile-bag K sweep (single), parallel and half strategies, frozen-feature MIL rows.",
        target="tilebag",
        cost="the `tilebag` target: 18 tile-bag trainings at the default config",
    ),
    Result(
        "results/bench/tilebag_max_tiles.csv",
        "Campanella et al. Figure 1: most tiles per step",
        "Most tiles per forward + backward within the memory budget, per encoder and precision.",
        target="tilebag",
        cost="part of the `tilebag` target: a fresh process per probe",
    ),
    Result(
        "results/tables/offload_table1.csv",
        "Big-Layers Table 1: QWK",
        "Frozen against trained (offload) encoder, with and without augmentation, internal and external test sets.",
        target="offload",
        cost="the `offload` target: 24 tile-bag trainings",
    ),
    Result(
        "results/tables/offload_table2.csv",
        "Big-Layers Table 2: accuracy",
        "As Table 1 on the binary task.",
        target="offload",
        cost="part of the `offload` target",
    ),
)

DEFAULT_BUILD = tuple(r.path for r in CATALOGUE[:10])


def docs_inputs(build: list[str] | None, root: Path = Path(".")) -> list[str]:
    """The `docs` target's inputs: the results to build (config docs.build), then every other known
    result that already exists, so that a table built later makes the page stale."""
    build = list(DEFAULT_BUILD if build is None else build)
    return build + [r.path for r in CATALOGUE if r.path not in build and (root / r.path).is_file()]


@dataclass(frozen=True)
class Stamp:
    commit: str
    cpu: str
    threads: int
    gpu: str


def _run(cmd: list[str], cwd: Path | None = None) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=cwd, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def git_commit(repo: Path | None = None) -> str:
    """HEAD's hash, marked `+changes` when tracked files outside docs/ differ from it."""
    commit = _run(["git", "rev-parse", "HEAD"], repo)
    if not commit:
        return "unknown (not a git checkout)"
    dirty = _run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!docs"], repo)
    return commit + (" +changes" if dirty else "")


def cpu_model() -> str:
    for line in _run(["lscpu"]).splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def thread_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def gpu_model() -> str:
    if not shutil.which("nvidia-smi"):
        return "none"
    names = _run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"]).splitlines()
    return ", ".join(n.strip() for n in names if n.strip()) or "none"


def machine_stamp(repo: Path | None = None) -> Stamp:
    return Stamp(commit=git_commit(repo), cpu=cpu_model(), threads=thread_count(), gpu=gpu_model())


def _fmt(value: str) -> str:
    try:
        number = float(value)
    except ValueError:
        return value.replace("|", "\\|")
    if re.fullmatch(r"-?\d+", value.strip()):
        return value.strip()
    if number == 0 or 1e-3 <= abs(number) < 1e6:
        return f"{number:.4g}"
    return f"{number:.2e}"


def markdown_table(csv_path: Path, max_rows: int = 200) -> str:
    with open(csv_path, newline="") as fh:
        rows = list(csv.reader(fh))
    if not rows:
        return "(empty file)"
    header, body = rows[0], rows[1:]
    lines = ["| " + " | ".join(h.replace("|", "\\|") for h in header) + " |", "|" + "---|" * len(header)]
    for row in body[:max_rows]:
        lines.append("| " + " | ".join(_fmt(v) for v in row) + " |")
    if len(body) > max_rows:
        lines.append(f"\n({len(body) - max_rows} more rows in `{csv_path.name}`)")
    return "\n".join(lines)


def stamp_line(result: Result, csv_path: Path, stamp: Stamp) -> str:
    written = dt.datetime.fromtimestamp(csv_path.stat().st_mtime, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (
        f"Command: `{result.command}` · written {written} · commit `{stamp.commit}` · "
        f"CPU: {stamp.cpu} · threads: {stamp.threads} · GPU: {stamp.gpu}"
    )


def render(root: Path, stamp: Stamp, catalogue: tuple[Result, ...] = CATALOGUE) -> str:
    """The page for the results under `root` (a working directory holding results/)."""
    known = {r.path for r in catalogue}
    extra = sorted(
        str(p.relative_to(root))
        for sub in ("results/tables", "results/bench")
        for p in (root / sub).glob("*.csv")
        if str(p.relative_to(root)) not in known
    )
    present = [r for r in catalogue if (root / r.path).is_file()]
    present += [Result(p, p, "A result the catalogue of slidetrain.docs.benchmarks does not describe.") for p in extra]
    missing = [r for r in catalogue if not (root / r.path).is_file()]
    out = [
        "# Benchmarks and tables",
        "",
        "<!-- Written by `snakemake --cores all docs --forcerun docs_benchmarks` (slidetrain docs-benchmarks); "
        "do not edit by hand. -->",
        "",
        "Every number on this page is read from a result file that a workflow target writes. Under each "
        "table: the command that produces it (with the default config unless a `--configfile` was added), "
        "when its CSV was written, and the commit, CPU model, thread count and GPU of the machine that "
        "rendered the page. `snakemake --cores all docs --forcerun docs_benchmarks` builds the results "
        "listed in the config's "
        "`docs.build` (the main job and the benchmarks that take minutes on a CPU) and renders every "
        "other known result that exists; `--configfile config/docs_full.yaml` builds all of them. "
        "Synthetic data at CPU scale: the values show that each pipeline runs and how its parts compare, "
        "not the papers' levels ([methods.md](methods.md)).",
        "",
    ]
    if not present:
        out += ["No results exist yet in this working directory.", ""]
    for r in present:
        out += [
            f"## {r.title}",
            "",
            f"`{r.path}`: {r.about}",
            "",
            stamp_line(r, root / r.path, stamp),
            "",
            markdown_table(root / r.path),
            "",
        ]
    if missing:
        out += ["## Not built yet", "", "| result | command | needs |", "|---|---|---|"]
        for r in missing:
            out.append(f"| `{r.path}` ({r.title}) | `{r.command}` | {r.cost or 'minutes on a CPU'} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def write_page(root: Path, out: Path, stamp: Stamp | None = None) -> None:
    stamp = stamp or machine_stamp(root)
    with atomic_path(out) as tmp:
        Path(tmp).write_text(render(root, stamp))

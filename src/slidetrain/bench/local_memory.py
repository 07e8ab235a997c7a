"""Table 2 of Zhang et al. (MICCAI 2022): peak training memory of E2E vs local learning (K=4, 8).

One measurement = one training slide of one method at one image size, in
its own process (CPU) or on its own device (CUDA), written as one JSON; the
workflow runs one job per (size, method, variant) and `table2` gathers them.
A variant (e.g. activation checkpointing) is measured for image_e2e too, and
each row's ratio divides by image_e2e under the row's own variant::

    slidetrain bench-train-memory --method local_k4 --size 8698x7496 --device cuda --out m.json
    slidetrain table2 --measurements results/bench/local_memory/*.json \\
        --out table2.csv --markdown table2.md

What is measured: `train_one_slide` builds the learner (`build_learner(method,
n_classes=2)`), draws a seeded random (3, H, W) image, runs one
`train_slide` (forward + backward of every module) and one `step` (the
AdamW step, which allocates the optimiser's two moment buffers), all inside
`bench.memory.peak_memory`. Random pixels and random-init weights are fine:
activations and their gradients have the same sizes whatever the numbers.

Which number the table reports: the INCREMENT (peak minus the baseline just
before the call), because that is what the paper's number is on a GPU.
`torch.cuda.max_memory_allocated` counts the bytes of live tensors (model,
gradients, optimiser states, the image, activations) and not the CUDA
context or the libraries; on CUDA the probe's baseline is whatever this
process had allocated before the call, so increment = the call's own
tensors. On CPU the child's baseline is its RSS after importing torch and
slidetrain (hundreds of MiB of code and libraries, the CPU counterpart of
the CUDA context); since the learner is built INSIDE the measured call, the
increment still holds the model, gradients, optimiser states, image and
activations, as the paper's number does, while the absolute peak would add
the same library constant to every method and push every ratio towards 1.
The absolute peak and the baseline are kept in the JSON for whoever wants
them. Everything the call would import lazily is imported here, at module
level, so that it lands in the baseline (the child unpickles this module
before the baseline is taken).

Sizes are "WxH" strings (width x height), as the paper writes them
(8698x7496, 12223x10057, 23849x10257: the largest, 23849 wide, is the
widest slide of TCGA-RCC at 5x). `measure_train_memory` takes (height,
width), torch's order.
"""

from __future__ import annotations

import importlib
import json
import platform
import re
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from slidetrain.bench.memory import MemoryReport, peak_memory
from slidetrain.errors import ConfigError
from slidetrain.io import write_json
from slidetrain.paper.tables import paper_table, write_table
from slidetrain.train.wholeimage.registry import LEARNER_MODULES, build_learner

# Learners registered by other modules (StreamingCNN) are imported now, not inside
# the measured call: their import would otherwise count as the method's memory.
for _name in LEARNER_MODULES:
    importlib.import_module(_name)

#: the methods of the paper's Table 2, in its row order
METHODS: tuple[str, ...] = ("image_e2e", "local_k4", "local_k8")
#: pipeline method key -> row name in paper/data/local_table2.csv
PAPER_METHOD_NAMES = {"image_e2e": "E2E", "local_k4": "Local K=4", "local_k8": "Local K=8"}
TABLE2_COLUMNS = [
    "image_size",
    "method",
    "variant",
    "peak_memory_gb",
    "ratio_to_image_e2e",
    "ratio_denominator",
    "device",
    "paper_memory_gb",
    "paper_ratio_to_image_e2e",
    "seconds_per_slide",
    "variant_ratio_to_plain_image_e2e",
]
GIB = 2**30

_SIZE = re.compile(r"^\s*(\d+)\s*[xX×]\s*(\d+)\s*$")


def parse_size(text: str) -> tuple[int, int]:
    """The paper's "WxH" ("8698x7496") -> (width, height); ConfigError for anything else."""
    m = _SIZE.match(str(text))
    if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        raise ConfigError(f"image size {text!r}: expected WIDTHxHEIGHT in pixels, e.g. 8698x7496")
    return int(m.group(1)), int(m.group(2))


def format_size(width: int, height: int) -> str:
    return f"{int(width)}x{int(height)}"


def train_one_slide(
    method: str,
    height: int,
    width: int,
    device: str = "cpu",
    params: dict | None = None,
    seed: int = 0,
    threads: int | None = None,
) -> None:
    """Build `method`'s learner, train it on one random (3, height, width) slide, take one step.

    Module level (the CPU probe pickles it into a fresh process). Returns nothing:
    the probe measures, it does not ship results back.
    """
    if threads:
        torch.set_num_threads(int(threads))
    torch.manual_seed(seed)
    learner = build_learner(method, n_classes=2, params=params, device=device)
    generator = torch.Generator().manual_seed(seed)
    # (3, H, W), like a normalised slide, on the device (the paper's input). It is passed as a
    # temporary, as the training loop passes it, so that a learner that no longer needs it after a
    # frozen stem can free it (`train_slide`).
    learner.train_slide(torch.randn(3, height, width, generator=generator).to(device), 1)
    learner.step()


def measure_train_memory(
    method: str,
    height: int,
    width: int,
    device: str = "cpu",
    params: dict | None = None,
    seed: int = 0,
    threads: int | None = None,
    timeout_s: float | None = None,
) -> MemoryReport:
    """Peak memory of one training slide + step of `method` at (height, width) on `device`.

    CPU: a fresh spawned process (peak RSS); CUDA: max_memory_allocated in this
    process. See the module docstring for what the increment holds.
    """
    if height < 1 or width < 1:
        raise ConfigError(f"image size: expected positive height and width, got {height}x{width} (HxW)")
    return peak_memory(
        train_one_slide,
        method,
        int(height),
        int(width),
        str(device),
        params,
        int(seed),
        threads,
        device=device,
        timeout_s=timeout_s,
    )


def measurement_record(
    method: str,
    width: int,
    height: int,
    report: MemoryReport,
    *,
    params: dict | None,
    seed: int,
    threads: int | None,
    variant: str = "",
) -> dict:
    """The JSON one measurement writes."""
    return {
        "method": method,
        "variant": variant,  # a named set of params (e.g. checkpointing), "" for the method as is
        "image_size": format_size(width, height),
        "width": int(width),
        "height": int(height),
        "device": report.device,
        "probe_method": report.method,
        "peak_bytes": int(report.peak_bytes),
        "baseline_bytes": int(report.baseline_bytes),
        "increment_bytes": int(report.increment_bytes),
        "wall_s": float(report.wall_s),
        "params": params or {},
        "seed": int(seed),
        "threads": int(threads) if threads else torch.get_num_threads(),
        "torch": torch.__version__,
        "host": platform.node(),
    }


def bench_train_memory(
    method: str,
    size: str,
    device: str,
    out_json: str | Path,
    *,
    params: dict | None = None,
    seed: int = 0,
    threads: int | None = None,
    timeout_s: float | None = None,
    variant: str = "",
) -> dict:
    """`slidetrain bench-train-memory`: measure one (method, "WxH" size) and write its JSON."""
    width, height = parse_size(size)
    report = measure_train_memory(method, height, width, device, params, seed, threads, timeout_s)
    record = measurement_record(
        method, width, height, report, params=params, seed=seed, threads=threads, variant=variant
    )
    write_json(out_json, record)
    return record


# --------------------------------------------------------------------------- the table


def read_measurements(paths: list[str | Path]) -> pd.DataFrame:
    rows = []
    for path in paths:
        data = json.loads(Path(path).read_text())
        missing = {"method", "image_size", "device", "increment_bytes"} - set(data)
        if missing:
            raise ConfigError(f"{path}: not a bench-train-memory JSON (missing {sorted(missing)})")
        width, height = parse_size(data["image_size"])
        rows.append(
            {
                **data,
                "image_size": format_size(width, height),
                "_pixels": width * height,
                "_path": str(path),
            }
        )
    return pd.DataFrame(rows)


def _denominator(variant: str) -> str:
    """The name of the row a ratio divides by: image_e2e under the same variant."""
    return f"image_e2e.{variant}" if variant else "image_e2e"


def table2(measurement_jsons: list[str | Path]) -> pd.DataFrame:
    """Table 2 from bench-train-memory JSONs: one row per (image size, method, variant, device).

    The headline rows come first: no variant, the paper's memory profile, beside
    the paper's GB and ratios. Variant rows (e.g. activation checkpointing)
    follow, image_e2e included.

    peak_memory_gb: the call's increment in GiB (2^30 bytes; see the module
    docstring). ratio_to_image_e2e: divided by image_e2e's at the same size
    and device AND under the same variant (named in ratio_denominator; NaN
    without that measurement), so checkpointed local learning is compared with
    checkpointed E2E, never with plain E2E. paper_memory_gb and
    paper_ratio_to_image_e2e: the paper's numbers when the size is one of the
    paper's and the method one of its rows, on no-variant rows only (the
    paper measured without checkpointing, on GPUs; its 23849x10257 E2E on
    CPU). variant_ratio_to_plain_image_e2e: variant rows only, the row over
    plain (no-variant) image_e2e: NOT like for like (it mixes the variant's
    saving with the method's), kept for whoever asks what checkpointed local
    learning saves against the paper's E2E.
    """
    m = read_measurements(measurement_jsons)
    if m.empty:
        return pd.DataFrame(columns=TABLE2_COLUMNS)
    m["variant"] = m["variant"].fillna("") if "variant" in m else ""
    # wall seconds of the measured call: building the learner + one slide + one step
    m["seconds_per_slide"] = m["wall_s"] if "wall_s" in m else np.nan
    dup = m[m.duplicated(["image_size", "method", "device", "variant"], keep=False)]
    if not dup.empty:
        raise ConfigError(
            "table2: more than one measurement of the same (image_size, method, device, variant): "
            + ", ".join(sorted(dup._path))
        )
    m["peak_memory_gb"] = m.increment_bytes / GIB
    e2e = m[m.method == "image_e2e"].set_index(["image_size", "device", "variant"]).peak_memory_gb
    same_variant = pd.MultiIndex.from_frame(m[["image_size", "device", "variant"]])
    m["ratio_to_image_e2e"] = m.peak_memory_gb.to_numpy() / e2e.reindex(same_variant).to_numpy()
    m["ratio_denominator"] = m.variant.map(_denominator)
    plain = pd.MultiIndex.from_arrays([m.image_size, m.device, [""] * len(m)])
    to_plain = m.peak_memory_gb.to_numpy() / e2e.reindex(plain).to_numpy()
    m["variant_ratio_to_plain_image_e2e"] = np.where(m.variant != "", to_plain, np.nan)
    paper = paper_table("local_table2")
    paper_gb = {(r.image_size, r.method): float(r.memory_gb) for r in paper.itertuples()}

    def paper_value(size: str, method: str, variant: str) -> float:
        return np.nan if variant else paper_gb.get((size, PAPER_METHOD_NAMES.get(method, "")), np.nan)

    rows = list(zip(m.image_size, m.method, m.variant, strict=True))
    m["paper_memory_gb"] = [paper_value(*row) for row in rows]
    m["paper_ratio_to_image_e2e"] = [
        paper_value(size, method, variant) / paper_value(size, "image_e2e", variant) for size, method, variant in rows
    ]
    order = {name: i for i, name in enumerate(METHODS)}
    m["_order"] = m.method.map(lambda name: order.get(name, len(order)))
    m["_headline"] = m.variant != ""  # False (the paper's profile) sorts first
    m = m.sort_values(["_headline", "variant", "_pixels", "image_size", "device", "_order", "method"])
    return m[TABLE2_COLUMNS].reset_index(drop=True)


def write_table2(
    measurement_jsons: list[str | Path],
    out_csv: str | Path,
    out_md: str | Path | None = None,
    out_html: str | Path | None = None,
) -> pd.DataFrame:
    """`slidetrain table2`: the CSV (and Markdown and HTML copies) of `table2`."""
    table = table2(measurement_jsons)
    write_table(
        table,
        out_csv,
        out_md,
        out_html,
        "Table 2: peak training memory of one slide, E2E vs local learning",
        float_format="%.4f",
    )
    return table


__all__ = [
    "METHODS",
    "TABLE2_COLUMNS",
    "bench_train_memory",
    "format_size",
    "measure_train_memory",
    "parse_size",
    "table2",
    "train_one_slide",
    "write_table2",
]

"""Where a dataset's slides are, and the inputs that guarantee they exist before a job reads them."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from slidetrain.data.download import is_remote, remote_ext
from slidetrain.data.sheet import SYNTHETIC, local_path
from slidetrain.errors import SheetError
from slidetrain.workflow.plan import Plan


def slide_file(plan: Plan, dataset: str, slide: str) -> str:
    """Where a slide lives: drawn by the pipeline (synthetic), downloaded (remote) or the sheet's path."""
    try:
        source = plan.sheets[dataset].at[slide, "source"]
    except KeyError:
        raise SheetError(f"slide {slide!r} is not in the sheet of dataset {dataset!r}") from None
    if source == SYNTHETIC:
        return f"resources/{dataset}/slides/{slide}.tiff"
    if is_remote(source):  # fetched by rule download_slide (workflow/rules/download.smk)
        return f"resources/{dataset}/slides/{slide}.{remote_ext(source)}"
    return str(local_path(source, Path(plan.dataset_cfg(dataset)["sheet"]).parent))


def is_synthetic(plan: Plan, dataset: str) -> bool:
    """Whether every slide of `dataset` is drawn by the pipeline."""
    return bool((plan.sheets[dataset].source == SYNTHETIC).all())


def synthetic_slides(plan: Plan, dataset: str, slides: Iterable[str]) -> list[str]:
    """Those of `slides` that the pipeline draws (in their order)."""
    sources = plan.sheets[dataset].source
    return [s for s in slides if sources.at[s] == SYNTHETIC]


def remote_datasets(plan: Plan) -> list[str]:
    """Datasets with at least one slide to download."""
    return sorted(d for d, sheet in plan.sheets.items() if sheet.source.map(is_remote).any())


def slides_ready(plan: Plan, dataset: str, slides: Iterable[str] | None = None) -> list[str]:
    """Inputs that guarantee the slide files exist: drawn slides through their shards' synthesis
    manifests (the per-slide .tiff is not a rule output), other slides as the files themselves."""
    slides = plan.slide_ids(dataset) if slides is None else slides
    sources = plan.sheets[dataset].source
    shard_of = {m: sh for sh, members in plan.shards[dataset].items() for m in members}
    files, shards = [], set()
    for slide in slides:
        if sources.at[slide] == SYNTHETIC:
            shards.add(shard_of[slide])
        else:
            files.append(slide_file(plan, dataset, slide))
    return files + [f"results/{dataset}/shards/synthesize/{sh}.tsv" for sh in sorted(shards)]

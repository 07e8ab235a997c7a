"""`slidetrain` command line: one subcommand per pipeline step, so every rule can be run by hand.

Imports are inside the subcommands: `slidetrain --help` and the light steps
must not pay for importing torch.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from slidetrain.errors import SlidetrainError


def _json_arg(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"expected JSON, got {text!r}: {err}") from err


def cmd_make_sheet(a: argparse.Namespace) -> None:
    from slidetrain.io import atomic_path
    from slidetrain.wsi.synthetic import synthetic_sheet

    sheet = synthetic_sheet(a.n_slides, a.seed)
    with atomic_path(a.out) as tmp:
        sheet.to_csv(tmp, sep="\t", index=False)


def cmd_synthesize(a: argparse.Namespace) -> None:
    from slidetrain.wsi.synthetic import synthetic_spec, write_synthetic_slide

    spec = synthetic_spec(a.slide_id, a.label, a.seed, tuple(a.size_range_px))
    if a.size_px:  # an exact size, e.g. the 40,960 x 30,720 benchmark slide
        import dataclasses

        spec = dataclasses.replace(spec, width_px=a.size_px[0], height_px=a.size_px[1])
    write_synthetic_slide(a.out, spec, truth_path=a.truth)


def cmd_preprocess(a: argparse.Namespace) -> None:
    from slidetrain.wsi.exclusion import preprocess_or_exclude

    outputs = {
        "mask_png": a.mask, "qc_path": a.qc, "tiles_h5": a.tiles, "image_path": a.image,
        "image_meta_json": a.image_meta, "timings_json": a.timings,
    }
    preprocess_or_exclude(
        a.slide, a.slide_id, outputs=outputs, params=a.params, on_bad_slide=a.on_bad_slide, status_json=a.status
    )


def cmd_features(a: argparse.Namespace) -> None:
    from slidetrain.wsi.features import FeatureJob, extract_features

    jobs = []
    for item in a.slides:
        slide_id, _, path = item.partition("=")
        jobs.append(FeatureJob(slide_id, Path(path), Path(a.tiles_dir) / f"{slide_id}.h5", Path(a.out_dir) / f"{slide_id}.h5"))
    extract_features(
        jobs, a.encoder, a.weights, batch_size=a.batch_size, device=a.device, threads=a.threads,
        seed=a.seed, mpp_fallback=a.mpp_fallback, workers=a.workers, amp=a.amp, shard=a.shard, manifest=a.manifest,
    )


def cmd_synthesize_shard(a: argparse.Namespace) -> None:
    from slidetrain.wsi.shard import parse_pairs, synthesize_shard

    synthesize_shard(
        a.shard, parse_pairs(a.slides, "label"), a.out_dir, a.seed, tuple(a.size_range_px), manifest=a.manifest,
        stain_scale=tuple(a.stain_scale),
    )


def cmd_preprocess_shard(a: argparse.Namespace) -> None:
    from slidetrain.wsi.shard import parse_pairs, preprocess_shard

    preprocess_shard(
        a.shard, parse_pairs(a.slides, "path"), a.out_root, a.params, a.on_bad_slide, manifest=a.manifest
    )


def cmd_bench_features(a: argparse.Namespace) -> None:
    from slidetrain.bench.features_throughput import bench_features_throughput
    from slidetrain.wsi.shard import parse_pairs

    bench_features_throughput(
        parse_pairs(a.slides, "path"), Path(a.tiles_dir), a.encoder, a.out, batch_size=a.batch_size,
        workers=a.workers, device=a.device, threads=a.threads, mpp_fallback=a.mpp_fallback,
    )


def cmd_split(a: argparse.Namespace) -> None:
    from slidetrain.data.sheet import read_sheet
    from slidetrain.data.splits import make_split, read_official_split, write_split
    from slidetrain.wsi.exclusion import excluded_slides

    sheet = read_sheet(a.sheet, a.classes, check_files=False)
    excluded = excluded_slides(a.status) if a.status else {}
    sheet = sheet[~sheet.slide_id.isin(excluded)].reset_index(drop=True)
    if a.label_map:  # a derived dataset: same slides, mapped labels (stratified on the new labels)
        from slidetrain.data.sheet import relabel

        sheet = relabel(sheet, a.label_map)
    if a.official:
        split = read_official_split(a.official, sheet, allow_subset=a.official_subset)
    elif a.counts:  # the local-learning paper's slide counts (slidetrain.data.splits.PAPER_SPLIT_COUNTS)
        from slidetrain.data.splits import make_split_counts

        test = sheet.slide_id[sheet["official_part"].str.lower() == "test"] if a.fixed_test else None
        split = make_split_counts(sheet, seed=a.seed, counts=a.counts, test_slides=test)
        logging.info("split counts %s (asked %s)", split.part.value_counts().to_dict(), a.counts)
    else:
        split = make_split(sheet, seed=a.seed, fractions=tuple(a.fractions))
    write_split(split, a.out)


def cmd_train_mil(a: argparse.Namespace) -> None:
    from slidetrain.train.mil import fit_mil

    fit_mil(a.method, a.params, Path(a.split), Path(a.features), a.classes, Path(a.out), a.seed, a.threads)


def cmd_evaluate_mil(a: argparse.Namespace) -> None:
    from slidetrain.train.mil import evaluate_mil

    evaluate_mil(
        Path(a.model), Path(a.split), Path(a.features), a.classes, Path(a.predictions), Path(a.metrics),
        attention_h5=Path(a.attention) if a.attention else None, ordinal=a.ordinal,
        n_bootstrap=a.n_bootstrap, seed=a.seed,
    )


def cmd_train_image(a: argparse.Namespace) -> None:
    from slidetrain.train.wholeimage.loop import fit_whole_image

    fit_whole_image(
        a.method, a.params, Path(a.split), Path(a.images), a.classes, Path(a.out), a.seed, a.threads, a.device
    )


def cmd_evaluate_image(a: argparse.Namespace) -> None:
    from slidetrain.train.wholeimage.loop import evaluate_whole_image

    evaluate_whole_image(
        Path(a.model), Path(a.split), Path(a.images), a.classes, Path(a.predictions), Path(a.metrics),
        ordinal=a.ordinal, n_bootstrap=a.n_bootstrap, seed=a.seed, device=a.device,
    )


def cmd_table1(a: argparse.Namespace) -> None:
    from slidetrain.paper.tables import table1

    paper_names = dict(item.split("=", 1) for item in a.paper_names)
    not_applicable = [tuple(item.split(":", 1)) for item in a.not_applicable]
    table1(a.metrics, a.out_csv, a.out_md, paper_names, not_applicable, a.method_order, out_html=a.out_html)


def cmd_table4(a: argparse.Namespace) -> None:
    from slidetrain.paper.tables import table4

    table4(a.metrics, a.out_csv, a.out_md, dict(item.split("=", 1) for item in a.paper_names), out_html=a.out_html)


def cmd_qc_table(a: argparse.Namespace) -> None:
    from slidetrain.wsi.exclusion import write_exclusion_table

    write_exclusion_table(a.status, a.out)


def cmd_qc_status(a: argparse.Namespace) -> None:
    from slidetrain.wsi.exclusion import write_status_table, write_status_table_from_manifests

    if a.manifests:
        write_status_table_from_manifests(a.manifests, a.out)
    else:
        write_status_table(a.status, a.out)


def cmd_feature_index(a: argparse.Namespace) -> None:
    from slidetrain.wsi.features import write_feature_index

    files = list(a.features)
    if a.manifests:  # one argument per shard: the manifests list every slide's feature file
        from slidetrain.data.shards import manifest_column

        files += manifest_column(a.manifests, "features")
    write_feature_index(files, a.out)


def cmd_bench_preprocess(a: argparse.Namespace) -> None:
    from slidetrain.bench.preprocess import preprocess_table

    timings, features = list(a.timings or []), list(a.features or [])
    if a.manifests:  # shard manifests name every slide's files (one argument per shard, not per slide)
        from slidetrain.data.shards import read_manifest

        for path in a.manifests:
            for row in read_manifest(path):
                timings += [row["timings"]] if "timings" in row else []
                features += [row["features"]] if "features" in row else []
    preprocess_table(timings, features, a.out)


def cmd_bench_bags(a: argparse.Namespace) -> None:
    from slidetrain.bench.mil_throughput import make_bench_bags

    make_bench_bags(Path(a.out_dir), Path(a.split), a.n_bags, a.n_instances, a.dim, a.seed)


def cmd_bench_mil(a: argparse.Namespace) -> None:
    from slidetrain.bench.mil_throughput import throughput_table

    throughput_table([Path(p) for p in a.runs], [Path(p) for p in a.benchmarks], Path(a.out))


def cmd_attention_figure(a: argparse.Namespace) -> None:
    from slidetrain.paper.figures import attention_figure

    attention_figure(
        a.dataset, Path(a.table1), Path(a.runs_dir), Path(a.images_dir), Path(a.tiles_dir),
        Path(a.truth_dir) if a.truth_dir else None, a.classes, a.methods, Path(a.out), a.split, a.seed,
    )


def cmd_bench_train_memory(a: argparse.Namespace) -> None:
    from slidetrain.bench.local_memory import bench_train_memory

    bench_train_memory(
        a.method, a.size, a.device, a.out, params=a.params, seed=a.seed, threads=a.threads, timeout_s=a.timeout_s,
        variant=a.variant,
    )


def cmd_table2(a: argparse.Namespace) -> None:
    from slidetrain.bench.local_memory import write_table2

    write_table2(a.measurements, a.out, a.markdown, out_html=a.out_html)


def cmd_bench_inference(a: argparse.Namespace) -> None:
    from slidetrain.bench.inference_speed import bench_inference

    bench_inference(
        a.slides, a.out, a.markdown, device=a.device, threads=a.threads, warmup=a.warmup, repeats=a.repeats,
        batch_size=a.batch_size, tile_px=a.tile_px, min_tissue_fraction=a.min_tissue_fraction, seed=a.seed,
        mask_preset=a.mask_preset, mpp_fallback=a.mpp_fallback, reader=a.reader, out_html=a.out_html,
    )


def cmd_bench_read(a: argparse.Namespace) -> None:
    from slidetrain.bench.read_speed import bench_read

    bench_read(a.slides, a.out, threads=a.threads, repeats=a.repeats, mpp_fallback=a.mpp_fallback)


def _add_bench_read_parser(sub) -> None:
    s = sub.add_parser("bench-read", help="5x tissue-box reading speed: OpenSlide vs tifffile, side by side")
    s.add_argument("--slides", nargs="+", required=True, help="slide files")
    s.add_argument("--threads", type=int, default=2, help="tifffile decoding threads")
    s.add_argument("--repeats", type=int, default=3, help="timed reads per slide and reader")
    s.add_argument("--mpp-fallback", type=float)
    s.add_argument("--out", required=True, help="CSV")
    s.set_defaults(func=cmd_bench_read)


def _add_bench_local_parsers(sub) -> None:
    """Table 2 (training memory) and Table 3 (inference speed) of the local-learning paper."""
    s = sub.add_parser("bench-train-memory", help="peak memory of one training slide + step of a whole-image method")
    s.add_argument("--method", required=True, help="image_e2e | local_k4 | local_k8 (any whole-image learner)")
    s.add_argument("--size", required=True, help="image WIDTHxHEIGHT in px, as the paper writes it (8698x7496)")
    s.add_argument("--device", default="cpu", help="cpu (fresh process, peak RSS) or cuda[:i] (max allocated)")
    s.add_argument("--params", type=_json_arg, default={}, help="JSON: learner config overrides")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--threads", type=int, help="torch threads in the measured process (default: torch's)")
    s.add_argument("--timeout-s", type=float, help="CPU: give up after this many seconds")
    s.add_argument("--out", required=True, help="measurement JSON")
    s.add_argument("--variant", default="", help="name of the params' setting, shown in Table 2 (e.g. checkpoint_tiles)")
    s.set_defaults(func=cmd_bench_train_memory)

    s = sub.add_parser("table2", help="Table 2 (training memory vs E2E) from bench-train-memory JSONs")
    s.add_argument("--measurements", nargs="+", required=True)
    s.add_argument("--out", required=True, help="CSV")
    s.add_argument("--markdown", help="Markdown copy")
    s.add_argument("--out-html", help="HTML copy (Snakemake's report)")
    s.set_defaults(func=cmd_table2)

    s = sub.add_parser("bench-inference", help="Table 3: tile pipeline (gated ABMIL) vs whole-slide inference")
    s.add_argument("--slides", nargs="+", required=True, help="slide files (OpenSlide formats)")
    s.add_argument("--device", default="cpu")
    s.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    s.add_argument("--warmup", type=int, default=1, help="untimed runs of each pipeline per slide")
    s.add_argument("--repeats", type=int, default=1, help="timed runs per slide (stage seconds are their mean)")
    s.add_argument("--batch-size", type=int, default=64, help="tiles per encoder batch")
    s.add_argument("--tile-px", type=int, default=224, help="tile side at 5x")
    s.add_argument("--min-tissue-fraction", type=float, default=0.5, help="keep tiles with this much tissue")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--mask-preset", default="default")
    s.add_argument("--mpp-fallback", type=float)
    s.add_argument("--out", required=True, help="CSV")
    s.add_argument("--markdown", help="Markdown copy")
    s.add_argument("--reader", default="auto", help="slide reader of both pipelines: auto | openslide")
    s.add_argument("--out-html", help="HTML copy (Snakemake's report)")
    s.set_defaults(func=cmd_bench_inference)
    _add_bench_read_parser(sub)


def cmd_bench_offload_equivalence(a: argparse.Namespace) -> None:
    from slidetrain.bench.offload_equivalence import write_equivalence_csv

    for r in write_equivalence_csv(a.out):
        print(f"{r.case}: max_abs_diff={r.max_abs_diff:.2e} max_rel_diff={r.max_rel_diff:.2e}")


def cmd_bench_offload_sweep(a: argparse.Namespace) -> None:
    from slidetrain.bench.offload_sweep import SweepConfig, write_sweep

    torch_threads(a.threads)
    cfg = SweepConfig(sides=a.sides, budget_bytes=int(a.budget_mb * 2**20), warmup=a.warmup,
                      repeats=a.repeats, max_transfer_bytes=int(a.max_transfer_mb * 2**20), seed=a.seed)
    write_sweep(cfg, a.device, a.out)


def cmd_offload_figure(a: argparse.Namespace) -> None:
    from slidetrain.paper.offload_figure import offload_figure

    offload_figure(Path(a.sweep), Path(a.out))


def torch_threads(n: int | None) -> None:
    if n:
        import torch

        torch.set_num_threads(n)


def _add_offload_parsers(sub) -> None:
    """Big-Layers (issue 13): engine equivalence, Figure 2's sweep and the figure."""
    s = sub.add_parser("bench-offload-equivalence", help="offload engine vs plain PyTorch, every gradient")
    s.add_argument("--out", required=True, help="CSV: case, max_abs_diff, max_rel_diff")
    s.set_defaults(func=cmd_bench_offload_equivalence)

    s = sub.add_parser("bench-offload-sweep", help="Big-Layers Figure 2: seconds per iteration vs image side")
    s.add_argument("--sides", type=int, nargs="+", required=True, help="image sides (px), in order")
    s.add_argument("--budget-mb", type=float, required=True, help="device budget (MiB; CUDA: memory fraction)")
    s.add_argument("--device", default="cpu")
    s.add_argument("--warmup", type=int, default=5)
    s.add_argument("--repeats", type=int, default=10)
    s.add_argument("--max-transfer-mb", type=float, default=256.0, help="cap of one partition's working set")
    s.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", required=True, help="CSV")
    s.set_defaults(func=cmd_bench_offload_sweep)

    s = sub.add_parser("offload-figure", help="Big-Layers Figure 2 from the sweep CSV")
    s.add_argument("--sweep", required=True)
    s.add_argument("--out", required=True, help="PNG")
    s.set_defaults(func=cmd_offload_figure)

    from slidetrain.paper.offload_tables import add_parser as add_offload_table_parser

    add_offload_table_parser(sub)
def _tilebag_data(a: argparse.Namespace) -> dict:
    return {"split_csv": Path(a.split), "sheet_csv": Path(a.sheet), "slides_dir": Path(a.slides_dir),
            "tiles_dir": Path(a.tiles_dir), "class_names": a.classes}


def cmd_train_tilebag(a: argparse.Namespace) -> None:
    from slidetrain.train.tilebag import fit_tilebag

    sampling = {"tile_px": a.tile_px, "target_magnification": a.target_magnification, "mpp_fallback": a.mpp_fallback}
    fit_tilebag(a.params, sampling=sampling, out_dir=Path(a.out), seed=a.seed, ordinal=a.ordinal,
                threads=a.threads, backend=a.backend, timeout_s=a.timeout_s, **_tilebag_data(a))


def cmd_evaluate_tilebag(a: argparse.Namespace) -> None:
    from slidetrain.train.tilebag import evaluate_tilebag

    evaluate_tilebag(Path(a.model), predictions_csv=Path(a.predictions), metrics_json=Path(a.metrics),
                     attention_h5=Path(a.attention) if a.attention else None, ordinal=a.ordinal,
                     n_bootstrap=a.n_bootstrap, seed=a.seed, threads=a.threads, **_tilebag_data(a),
                     eval_overrides={k: v for k, v in (("eval_tiles", a.eval_tiles), ("eval_k", a.eval_k),
                                                       ("eval_repeats", a.eval_repeats)) if v is not None})


def cmd_evaluate_tilebag_sets(a: argparse.Namespace) -> None:
    from slidetrain.train.tilebag import evaluate_tilebag_sets

    evaluate_tilebag_sets(Path(a.model), a.tests, a.modes, Path(a.out_dir), n_bootstrap=a.n_bootstrap, seed=a.seed,
                          threads=a.threads)


def cmd_tilebag_table1(a: argparse.Namespace) -> None:
    from slidetrain.paper.tilebag_tables import tilebag_table1

    paper_k = {int(k): int(v) for k, _, v in (x.partition("=") for x in a.paper_k or [])}
    tilebag_table1(a.metrics, a.out, paper_k=paper_k, markdown=a.markdown)


def cmd_tilebag_figure4(a: argparse.Namespace) -> None:
    from slidetrain.paper.tilebag_tables import tilebag_figure4

    tilebag_figure4(a.histories, a.out)


def cmd_bench_max_tiles(a: argparse.Namespace) -> None:
    from slidetrain.bench.max_tiles import max_tiles_table

    max_tiles_table(a.encoders, a.precisions, a.tile_px, a.device, a.memory_budget_gb, a.out,
                    start=a.start, limit=a.limit, threads=a.threads)


def cmd_tilebag_figure1(a: argparse.Namespace) -> None:
    from slidetrain.paper.tilebag_tables import tilebag_figure1

    tilebag_figure1(a.tables, a.out_table, a.out)


def cmd_bench_tilebag_step(a: argparse.Namespace) -> None:
    from slidetrain.bench.tilebag_step import tilebag_step_table

    tilebag_step_table(a.params, a.slides, a.tiles_dir, a.tile_px, a.target_magnification, a.out,
                       steps=a.steps, workers=a.workers, threads=a.threads, seed=a.seed)


def _add_tilebag_parsers(sub) -> None:
    """Tile-bag end-to-end training (train/tilebag/) and the Campanella et al. tables, figures, benchmarks."""

    def data_args(s) -> None:
        s.add_argument("--split", required=True)
        s.add_argument("--sheet", required=True, help="slide sheet (slide ids and sources)")
        s.add_argument("--slides-dir", required=True, help="where synthetic slides were drawn")
        s.add_argument("--tiles-dir", required=True, help="tile coordinate h5 files, one per slide")
        s.add_argument("--classes", nargs="+", required=True)
        s.add_argument("--ordinal", action="store_true")
        s.add_argument("--seed", type=int, default=0)
        s.add_argument("--threads", type=int, default=1)

    s = sub.add_parser("train-tilebag", help="train encoder + aggregator end to end on K tiles per slide")
    s.add_argument("--params", type=_json_arg, default={})
    s.add_argument("--tile-px", type=int, required=True, help="tile side at the target magnification")
    s.add_argument("--target-magnification", type=float, required=True)
    s.add_argument("--mpp-fallback", type=float)
    s.add_argument("--out", required=True)
    # executor: distributed (under torchrun; one torch thread per rank by --threads)
    s.add_argument("--backend", default="auto", choices=["auto", "gloo", "nccl"])
    s.add_argument("--timeout-s", type=float, default=300.0, help="collective timeout (distributed)")
    data_args(s)
    s.set_defaults(func=cmd_train_tilebag)

    s = sub.add_parser("evaluate-tilebag", help="score a trained tile-bag model on the test part")
    s.add_argument("--model", required=True)
    s.add_argument("--predictions", required=True)
    s.add_argument("--metrics", required=True)
    s.add_argument("--attention")
    s.add_argument("--n-bootstrap", type=int, default=1000)
    s.add_argument("--eval-tiles", choices=["all", "sampled"], help="override the model's test-time tiles")
    s.add_argument("--eval-k", type=int, help="sampled: tiles per repeat (override)")
    s.add_argument("--eval-repeats", type=int, help="sampled: repeats (override)")
    data_args(s)
    s.set_defaults(func=cmd_evaluate_tilebag)

    s = sub.add_parser("evaluate-tilebag-sets", help="score one tile-bag model on several test sets x protocols")
    s.add_argument("--model", required=True)
    s.add_argument("--tests", type=_json_arg, required=True,
                   help="JSON list of {name, split, sheet, slides_dir, tiles_dir, classes, ordinal}")
    s.add_argument("--modes", type=_json_arg, required=True, help="JSON {mode: eval overrides}")
    s.add_argument("--out-dir", required=True, help="test_{name}_{mode}/ go below")
    s.add_argument("--n-bootstrap", type=int, default=1000)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--threads", type=int, default=1)
    s.set_defaults(func=cmd_evaluate_tilebag_sets)

    s = sub.add_parser("tilebag-table1", help="Campanella et al. Table 1: K sweep and frozen-feature rows")
    s.add_argument("--metrics", nargs="+", required=True, help="metrics.json of every run (path names the run)")
    s.add_argument("--paper-k", nargs="*", help="K=PAPER_K: the paper's K whose values a scaled K sits beside")
    s.add_argument("--out", required=True)
    s.add_argument("--markdown")
    s.set_defaults(func=cmd_tilebag_table1)

    s = sub.add_parser("tilebag-figure4", help="Campanella et al. Figure 4: loss and AUC against K")
    s.add_argument("--histories", nargs="+", required=True, help="history.csv of every tile-bag run")
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_tilebag_figure4)

    s = sub.add_parser("bench-max-tiles", help="most tiles per forward+backward within a memory budget")
    s.add_argument("--encoders", nargs="+", required=True)
    s.add_argument("--precisions", nargs="+", default=["fp32", "amp"])
    s.add_argument("--tile-px", type=int, default=224)
    s.add_argument("--device", default="cpu")
    s.add_argument("--memory-budget-gb", type=float, help="CPU: peak RSS budget; CUDA: default device memory")
    s.add_argument("--start", type=int, default=1)
    s.add_argument("--limit", type=int, default=65536)
    s.add_argument("--threads", type=int, default=1)
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_bench_max_tiles)

    s = sub.add_parser("tilebag-figure1", help="Campanella et al. Figure 1: max tiles per encoder and precision")
    s.add_argument("--tables", nargs="+", required=True, help="bench-max-tiles CSVs (one per encoder)")
    s.add_argument("--out-table", required=True, help="the merged CSV")
    s.add_argument("--out", required=True, help="the figure (PNG)")
    s.set_defaults(func=cmd_tilebag_figure1)

    s = sub.add_parser("bench-tilebag-step", help="step time with on-the-fly reading vs tiles in memory")
    s.add_argument("--params", type=_json_arg, default={})
    s.add_argument("--slides", nargs="+", required=True, help="SLIDE_ID=PATH")
    s.add_argument("--tiles-dir", required=True)
    s.add_argument("--tile-px", type=int, required=True)
    s.add_argument("--target-magnification", type=float, required=True)
    s.add_argument("--steps", type=int, default=20)
    s.add_argument("--workers", type=int, default=1)
    s.add_argument("--threads", type=int, default=1)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_bench_tilebag_step)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="slidetrain", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("make-sheet", help="write the synthetic dataset's slide sheet")
    s.add_argument("--n-slides", type=int, required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_make_sheet)

    s = sub.add_parser("synthesize", help="draw one synthetic slide (pyramidal TIFF + truth masks)")
    s.add_argument("--slide-id", required=True)
    s.add_argument("--label", required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--size-range-px", type=int, nargs=2, default=(3000, 6000))
    s.add_argument("--size-px", type=int, nargs=2, help="exact level-0 width and height (overrides the range)")
    s.add_argument("--out", required=True)
    s.add_argument("--truth")
    s.set_defaults(func=cmd_synthesize)

    s = sub.add_parser("preprocess", help="mask tissue, tile, write QC picture and the whole-slide image")
    s.add_argument("--slide", required=True)
    s.add_argument("--slide-id", required=True)
    s.add_argument("--mask", required=True, help="tissue mask PNG (0/255 at the segmentation level)")
    s.add_argument("--qc", required=True, help="QC picture (thumbnail, mask outline, kept tiles)")
    s.add_argument("--tiles", required=True, help="tile coordinates h5 (CLAM/TRIDENT layout)")
    s.add_argument("--image", required=True, help="whole-slide image JPEG at the image magnification")
    s.add_argument("--image-meta", required=True, help="its JSON (level-0 box, downsample)")
    s.add_argument("--timings", required=True, help="per-stage seconds JSON")
    s.add_argument("--params", type=_json_arg, default={}, help="JSON: preprocess parameters")
    s.add_argument("--on-bad-slide", choices=["error", "exclude"], default="error")
    s.add_argument("--status", required=True, help="status JSON (ok or excluded with the reason)")
    s.set_defaults(func=cmd_preprocess)

    s = sub.add_parser("features", help="extract frozen tile features for slides (encoder loaded once)")
    s.add_argument("--slides", nargs="+", required=True, help="slide_id=path pairs")
    s.add_argument("--tiles-dir", required=True)
    s.add_argument("--out-dir", required=True)
    s.add_argument("--encoder", required=True)
    s.add_argument("--weights", default="none")
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--device", default="cpu")
    s.add_argument("--threads", type=int, default=1)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--mpp-fallback", type=float)
    s.add_argument("--workers", type=int, default=0, help="reader processes ahead of the encoder (0: none)")
    s.add_argument("--amp", action="store_true", help="CUDA: float16 autocast")
    s.add_argument("--shard", default="-", help="shard name, for progress and errors")
    s.add_argument("--manifest", help="write the shard manifest (slide_id, status, reason, features)")
    s.set_defaults(func=cmd_features)

    s = sub.add_parser("synthesize-shard", help="draw a shard of synthetic slides (skips finished ones)")
    s.add_argument("--shard", required=True)
    s.add_argument("--slides", nargs="+", required=True, help="slide_id=label pairs")
    s.add_argument("--out-dir", required=True, help="resources/{dataset}/slides")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--size-range-px", type=int, nargs=2, default=(3000, 6000))
    s.add_argument("--stain-scale", type=float, nargs=2, default=(1.0, 1.0),
                   help="hematoxylin, eosin factors on every slide's stain (an external cohort's shift)")
    s.add_argument("--manifest", required=True)
    s.set_defaults(func=cmd_synthesize_shard)

    s = sub.add_parser("preprocess-shard", help="preprocess a shard of slides (skips finished ones)")
    s.add_argument("--shard", required=True)
    s.add_argument("--slides", nargs="+", required=True, help="slide_id=path pairs")
    s.add_argument("--out-root", required=True, help="results/{dataset}: masks/, tiles/, images/, ... go below")
    s.add_argument("--params", type=_json_arg, default={}, help="JSON: preprocess parameters")
    s.add_argument("--on-bad-slide", choices=["error", "exclude"], default="error")
    s.add_argument("--manifest", required=True)
    s.set_defaults(func=cmd_preprocess_shard)

    s = sub.add_parser("bench-features", help="feature extraction tiles/s: a shard end to end vs the model alone")
    s.add_argument("--slides", nargs="+", required=True, help="slide_id=path pairs (already tiled)")
    s.add_argument("--tiles-dir", required=True)
    s.add_argument("--encoder", required=True)
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--workers", type=int, nargs="+", default=[0, 1], help="reader processes to try")
    s.add_argument("--device", default="cpu")
    s.add_argument("--threads", type=int, default=1)
    s.add_argument("--mpp-fallback", type=float)
    s.add_argument("--out", required=True, help="CSV")
    s.set_defaults(func=cmd_bench_features)

    s = sub.add_parser("split", help="write a seeded, patient-grouped, stratified split (or validate an official one)")
    s.add_argument("--sheet", required=True)
    s.add_argument("--classes", nargs="+", required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--fractions", type=float, nargs=3, default=(0.6, 0.15, 0.25))
    s.add_argument("--official")
    s.add_argument("--official-subset", action="store_true", help="the official split may leave sheet slides out")
    s.add_argument("--counts", type=int, nargs=3, help="slides per part (train val test) instead of fractions")
    s.add_argument("--fixed-test", action="store_true", help="with --counts: the sheet's official_part=test slides are the test part")
    s.add_argument("--status", help="the dataset's QC status table; excluded slides are left out")
    s.add_argument("--label-map", type=_json_arg, help="JSON {label: new label}: a derived dataset's labels")
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_split)

    s = sub.add_parser("train-mil", help="train a MIL aggregator on frozen features")
    s.add_argument("--method", required=True)
    s.add_argument("--params", type=_json_arg, default={})
    s.add_argument("--split", required=True)
    s.add_argument("--features", required=True)
    s.add_argument("--classes", nargs="+", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--threads", type=int, default=1)
    s.set_defaults(func=cmd_train_mil)

    s = sub.add_parser("evaluate-mil", help="score a trained aggregator on the test part")
    s.add_argument("--model", required=True)
    s.add_argument("--split", required=True)
    s.add_argument("--features", required=True)
    s.add_argument("--classes", nargs="+", required=True)
    s.add_argument("--predictions", required=True)
    s.add_argument("--metrics", required=True)
    s.add_argument("--attention")
    s.add_argument("--ordinal", action="store_true")
    s.add_argument("--n-bootstrap", type=int, default=1000)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_evaluate_mil)

    s = sub.add_parser("train-image", help="train a whole-image learner (local_k4, image_e2e, streamingcnn, ...)")
    s.add_argument("--method", required=True)
    s.add_argument("--params", type=_json_arg, default={})
    s.add_argument("--split", required=True)
    s.add_argument("--images", required=True, help="folder of {slide_id}.jpg whole-slide images")
    s.add_argument("--classes", nargs="+", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--threads", type=int, default=1)
    s.add_argument("--device", default="cpu")
    s.set_defaults(func=cmd_train_image)

    s = sub.add_parser("evaluate-image", help="score a trained whole-image learner on the test part")
    s.add_argument("--model", required=True)
    s.add_argument("--split", required=True)
    s.add_argument("--images", required=True)
    s.add_argument("--classes", nargs="+", required=True)
    s.add_argument("--predictions", required=True)
    s.add_argument("--metrics", required=True)
    s.add_argument("--ordinal", action="store_true")
    s.add_argument("--n-bootstrap", type=int, default=1000)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default="cpu")
    s.set_defaults(func=cmd_evaluate_image)

    s = sub.add_parser("table1", help="Table 1 from run metrics")
    s.add_argument("--metrics", nargs="+", required=True, help="metrics.json files under results/{dataset}/runs/{method}/{split}/{seed}/")
    s.add_argument("--out-csv", required=True)
    s.add_argument("--out-md", required=True)
    s.add_argument("--paper-names", nargs="*", default=[], help="dataset=name in the paper's table")
    s.add_argument("--not-applicable", nargs="*", default=[], help="method:dataset pairs shown as '/'")
    s.add_argument("--method-order", nargs="*", default=[])
    s.add_argument("--out-html", help="HTML copy (Snakemake's report)")
    s.set_defaults(func=cmd_table1)

    s = sub.add_parser("table4", help="Table 4 (RFR ablation) from local-learning run metrics")
    s.add_argument("--metrics", nargs="+", required=True, help="metrics.json of local_k4/_k8(_norfr) runs")
    s.add_argument("--out-csv", required=True)
    s.add_argument("--out-md", required=True)
    s.add_argument("--paper-names", nargs="*", default=[], help="dataset=name in the paper's table")
    s.add_argument("--out-html", help="HTML copy (Snakemake's report)")
    s.set_defaults(func=cmd_table4)

    s = sub.add_parser("qc-status", help="one dataset's per-slide QC statuses as one table")
    s.add_argument("--status", nargs="*", default=[], help="per-slide status JSONs")
    s.add_argument("--manifests", nargs="*", default=[], help="or: the dataset's preprocess shard manifests")
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_qc_status)

    s = sub.add_parser("feature-index", help="index of a dataset's feature files (checks each is complete)")
    s.add_argument("--features", nargs="*", default=[])
    s.add_argument("--manifests", nargs="*", default=[], help="features shard manifests (their features column)")
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_feature_index)

    s = sub.add_parser("qc-table", help="collect excluded slides and their reasons over datasets")
    s.add_argument("--status", nargs="+", required=True, help="per-dataset status tables")
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_qc_table)

    s = sub.add_parser("bench-preprocess", help="per-slide preprocessing seconds")
    s.add_argument("--timings", nargs="*", default=[])
    s.add_argument("--features", nargs="*", default=[])
    s.add_argument("--manifests", nargs="*", default=[], help="shard manifests (their timings/features columns)")
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_bench_preprocess)

    s = sub.add_parser("bench-bags", help="write synthetic feature bags for the MIL throughput benchmark")
    s.add_argument("--out-dir", required=True)
    s.add_argument("--split", required=True)
    s.add_argument("--n-bags", type=int, default=1000)
    s.add_argument("--n-instances", type=int, default=2000)
    s.add_argument("--dim", type=int, default=512)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_bench_bags)

    s = sub.add_parser("bench-mil", help="collect MIL training-epoch seconds per method")
    s.add_argument("--runs", nargs="+", required=True)
    s.add_argument("--benchmarks", nargs="+", required=True)
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_bench_mil)

    s = sub.add_parser("attention-figure", help="heatmaps of the best attention method on test slides")
    s.add_argument("--dataset", required=True)
    s.add_argument("--table1", required=True)
    s.add_argument("--runs-dir", required=True)
    s.add_argument("--images-dir", required=True)
    s.add_argument("--tiles-dir", required=True)
    s.add_argument("--truth-dir")
    s.add_argument("--classes", nargs="+", required=True)
    s.add_argument("--methods", nargs="+", required=True, help="attention methods to choose from")
    s.add_argument("--split", default="mccv0")
    s.add_argument("--seed", default="0")
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_attention_figure)
    _add_bench_local_parsers(sub)
    _add_offload_parsers(sub)
    _add_distributed_benchmark_parsers(sub)
    _add_tilebag_parsers(sub)
    _add_data_parsers(sub)
    _add_report_parsers(sub)
    _add_docs_parsers(sub)
    return p


def cmd_qc_pictures(a: argparse.Namespace) -> None:
    from slidetrain.report_html import write_excluded_pictures

    write_excluded_pictures(a.status, a.pictures_dir, a.out, a.dataset)


def _add_report_parsers(sub) -> None:
    s = sub.add_parser("qc-pictures", help="one HTML page of the QC pictures of a dataset's excluded slides")
    s.add_argument("--status", required=True, help="results/{dataset}/qc/status.csv")
    s.add_argument("--pictures-dir", required=True, help="folder of the {slide}.qc.jpg pictures")
    s.add_argument("--dataset", required=True)
    s.add_argument("--out", required=True, help="HTML")
    s.set_defaults(func=cmd_qc_pictures)


def cmd_distributed_single(a: argparse.Namespace) -> None:
    import torch

    from slidetrain.bench.distributed_equivalence import run_single, save_result, spec_from_dict

    torch.set_num_threads(a.threads)  # 1 = what each torchrun rank gets (OMP_NUM_THREADS=1)
    save_result(run_single(spec_from_dict(a.spec)), Path(a.out))


def cmd_distributed_parallel(a: argparse.Namespace) -> None:
    from slidetrain.bench.distributed_equivalence import (
        ParallelOptions,
        run_parallel,
        save_result,
        spec_from_dict,
    )

    opts = ParallelOptions(backend=a.backend, timeout_s=a.timeout_s,
                           checkpoint=Path(a.checkpoint) if a.checkpoint else None,
                           checkpoint_every=a.checkpoint_every)
    import torch

    torch.set_num_threads(a.threads)  # per rank; a job's OMP_NUM_THREADS would oversubscribe the cores
    result = run_parallel(spec_from_dict(a.spec), opts)
    if result is not None:  # rank 0
        save_result(result, Path(a.out))


def cmd_distributed_equivalence(a: argparse.Namespace) -> None:
    from slidetrain.bench.distributed_equivalence import write_equivalence

    pairs = [(m, Path(s), Path(p)) for m, s, p in a.pair]
    write_equivalence(pairs, Path(a.csv), Path(a.figure), {m: Path(r) for m, r in a.reference or []})


def cmd_distributed_scaling(a: argparse.Namespace) -> None:
    import pandas as pd

    from slidetrain.bench.distributed_equivalence import scaling_rows
    from slidetrain.io import atomic_path

    with atomic_path(a.out) as tmp:
        pd.DataFrame(scaling_rows([Path(p) for p in a.parallel], [Path(p) for p in a.plain])).to_csv(tmp, index=False)


def _add_distributed_benchmark_parsers(sub) -> None:
    s = sub.add_parser("distributed-single", help="equivalence case in one process (plain autograd, whole bag)")
    s.add_argument("--spec", type=_json_arg, default={}, help="CaseSpec keys as JSON")
    s.add_argument("--out", required=True)
    s.add_argument("--threads", type=int, default=1)
    s.set_defaults(func=cmd_distributed_single)
    s = sub.add_parser("distributed-parallel", help="equivalence case under torchrun (rank 0 aggregator, DDP encoders)")
    s.add_argument("--spec", type=_json_arg, default={}, help="CaseSpec keys as JSON")
    s.add_argument("--out", required=True, help="written by rank 0")
    s.add_argument("--backend", default="auto", choices=["auto", "gloo", "nccl"])
    s.add_argument("--timeout-s", type=float, default=300.0, help="collective timeout")
    s.add_argument("--checkpoint", help="resume from / write to this file (rank 0 writes)")
    s.add_argument("--checkpoint-every", type=int, default=1)
    s.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    s.set_defaults(func=cmd_distributed_parallel)
    s = sub.add_parser("distributed-equivalence", help="normalized L1 of single vs parallel runs, table + figure")
    s.add_argument("--pair", nargs=3, action="append", required=True, metavar=("MODEL", "SINGLE", "PARALLEL"))
    s.add_argument("--reference", nargs=2, action="append", metavar=("MODEL", "SINGLE_FLOAT64"),
                   help="a float32 case's single run in float64: adds the fp32_noise column")
    s.add_argument("--csv", required=True)
    s.add_argument("--figure", required=True)
    s.set_defaults(func=cmd_distributed_equivalence)
    s = sub.add_parser("distributed-scaling", help="seconds per step of distributed runs against plain")
    s.add_argument("--parallel", nargs="+", required=True)
    s.add_argument("--plain", nargs="+", required=True, help="plain runs at the same tiles, in --parallel's order")
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_distributed_scaling)


def _add_data_parsers(sub) -> None:
    from slidetrain.data.commands import add_parsers

    add_parsers(sub)


def _add_docs_parsers(sub) -> None:
    from slidetrain.docs.commands import add_parsers

    add_parsers(sub)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        args.func(args)
    except SlidetrainError as err:
        print(f"slidetrain {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

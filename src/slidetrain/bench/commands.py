"""`slidetrain` subcommands of slidetrain.bench: benchmarks (memory, speed, equivalence, scaling).

slidetrain.cli calls `add_parsers`; imports stay inside the commands so that
`slidetrain --help` does not pay for torch.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from slidetrain.bench import encoders_cpu, heatmaps
from slidetrain.cli_args import json_arg, torch_threads


def cmd_bench_read(a: argparse.Namespace) -> None:
    from slidetrain.bench.read_speed import bench_read

    bench_read(a.slides, a.out, threads=a.threads, repeats=a.repeats, mpp_fallback=a.mpp_fallback)


def cmd_bench_train_memory(a: argparse.Namespace) -> None:
    from slidetrain.bench.local_memory import bench_train_memory

    bench_train_memory(
        a.method,
        a.size,
        a.device,
        a.out,
        params=a.params,
        seed=a.seed,
        threads=a.threads,
        timeout_s=a.timeout_s,
        variant=a.variant,
    )


def cmd_bench_inference(a: argparse.Namespace) -> None:
    from slidetrain.bench.inference_speed import bench_inference

    bench_inference(
        a.slides,
        a.out,
        a.markdown,
        device=a.device,
        threads=a.threads,
        warmup=a.warmup,
        repeats=a.repeats,
        batch_size=a.batch_size,
        tile_px=a.tile_px,
        min_tissue_fraction=a.min_tissue_fraction,
        seed=a.seed,
        mask_preset=a.mask_preset,
        mpp_fallback=a.mpp_fallback,
        reader=a.reader,
        out_html=a.out_html,
    )


def cmd_bench_offload_equivalence(a: argparse.Namespace) -> None:
    from slidetrain.bench.offload_equivalence import write_equivalence_csv

    for r in write_equivalence_csv(a.out):
        print(f"{r.case}: max_abs_diff={r.max_abs_diff:.2e} max_rel_diff={r.max_rel_diff:.2e}")


def cmd_bench_offload_sweep(a: argparse.Namespace) -> None:
    from slidetrain.bench.offload_sweep import SweepConfig, write_sweep

    torch_threads(a.threads)
    cfg = SweepConfig(
        sides=a.sides,
        budget_bytes=int(a.budget_mb * 2**20),
        warmup=a.warmup,
        repeats=a.repeats,
        max_transfer_bytes=int(a.max_transfer_mb * 2**20),
        seed=a.seed,
    )
    write_sweep(cfg, a.device, a.out)


def cmd_bench_max_tiles(a: argparse.Namespace) -> None:
    from slidetrain.bench.max_tiles import max_tiles_table

    max_tiles_table(
        a.encoders,
        a.precisions,
        a.tile_px,
        a.device,
        a.memory_budget_gb,
        a.out,
        start=a.start,
        limit=a.limit,
        threads=a.threads,
    )


def cmd_bench_tilebag_step(a: argparse.Namespace) -> None:
    from slidetrain.bench.tilebag_step import tilebag_step_table

    tilebag_step_table(
        a.params,
        a.slides,
        a.tiles_dir,
        a.tile_px,
        a.target_magnification,
        a.out,
        steps=a.steps,
        workers=a.workers,
        threads=a.threads,
        seed=a.seed,
    )


def cmd_bench_features(a: argparse.Namespace) -> None:
    from slidetrain.bench.features_throughput import bench_features_throughput
    from slidetrain.wsi.shard import parse_pairs

    bench_features_throughput(
        parse_pairs(a.slides, "path"),
        Path(a.tiles_dir),
        a.encoder,
        a.out,
        batch_size=a.batch_size,
        workers=a.workers,
        device=a.device,
        threads=a.threads,
        mpp_fallback=a.mpp_fallback,
    )


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

    opts = ParallelOptions(
        backend=a.backend,
        timeout_s=a.timeout_s,
        checkpoint=Path(a.checkpoint) if a.checkpoint else None,
        checkpoint_every=a.checkpoint_every,
    )
    import torch

    torch.set_num_threads(a.threads)  # per rank; a job's OMP_NUM_THREADS would oversubscribe the cores
    result = run_parallel(spec_from_dict(a.spec), opts)
    if result is not None:  # rank 0
        save_result(result, Path(a.out))


def cmd_distributed_equivalence(a: argparse.Namespace) -> None:
    from slidetrain.bench.distributed_equivalence import write_equivalence

    pairs = [(m, Path(s), Path(p)) for m, s, p in a.pair]
    write_equivalence(
        pairs,
        Path(a.csv),
        Path(a.figure),
        {m: Path(r) for m, r in a.reference or []},
        figure_data=Path(a.figure_data) if a.figure_data else None,
    )


def cmd_distributed_scaling(a: argparse.Namespace) -> None:
    import pandas as pd

    from slidetrain.bench.distributed_equivalence import scaling_rows
    from slidetrain.io import atomic_path

    with atomic_path(a.out) as tmp:
        pd.DataFrame(scaling_rows([Path(p) for p in a.parallel], [Path(p) for p in a.plain])).to_csv(tmp, index=False)


def _add_bench_read_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("bench-read", help="5x tissue-box reading speed: OpenSlide vs tifffile, side by side")
    s.add_argument("--slides", nargs="+", required=True, help="slide files")
    s.add_argument(
        "--threads",
        type=int,
        default=2,
        help="tifffile decoding threads, and the threads of the openslide_threads reader",
    )
    s.add_argument("--repeats", type=int, default=3, help="timed reads per slide and reader")
    s.add_argument("--mpp-fallback", type=float)
    s.add_argument("--out", required=True, help="CSV")
    s.set_defaults(func=cmd_bench_read)


def _add_bench_train_memory_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("bench-train-memory", help="peak memory of one training slide + step of a whole-image method")
    s.add_argument("--method", required=True, help="image_e2e | local_k4 | local_k8 (any whole-image learner)")
    s.add_argument("--size", required=True, help="image WIDTHxHEIGHT in px, as the paper writes it (8698x7496)")
    s.add_argument("--device", default="cpu", help="cpu (fresh process, peak RSS) or cuda[:i] (max allocated)")
    s.add_argument("--params", type=json_arg, default={}, help="JSON: learner config overrides")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--threads", type=int, help="torch threads in the measured process (default: torch's)")
    s.add_argument("--timeout-s", type=float, help="CPU: give up after this many seconds")
    s.add_argument("--out", required=True, help="measurement JSON")
    s.add_argument(
        "--variant", default="", help="name of the params' setting, shown in Table 2 (e.g. checkpoint_tiles)"
    )
    s.set_defaults(func=cmd_bench_train_memory)


def _add_bench_inference_parser(sub: argparse._SubParsersAction) -> None:
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


def _add_bench_offload_equivalence_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("bench-offload-equivalence", help="offload engine vs plain PyTorch, every gradient")
    s.add_argument("--out", required=True, help="CSV: case, max_abs_diff, max_rel_diff")
    s.set_defaults(func=cmd_bench_offload_equivalence)


def _add_bench_offload_sweep_parser(sub: argparse._SubParsersAction) -> None:
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


def _add_bench_max_tiles_parser(sub: argparse._SubParsersAction) -> None:
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


def _add_bench_tilebag_step_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("bench-tilebag-step", help="step time with on-the-fly reading vs tiles in memory")
    s.add_argument("--params", type=json_arg, default={})
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


def _add_bench_features_parser(sub: argparse._SubParsersAction) -> None:
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


def _add_bench_preprocess_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("bench-preprocess", help="per-slide preprocessing seconds")
    s.add_argument("--timings", nargs="*", default=[])
    s.add_argument("--features", nargs="*", default=[])
    s.add_argument("--manifests", nargs="*", default=[], help="shard manifests (their timings/features columns)")
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_bench_preprocess)


def cmd_bench_difficulty(a: argparse.Namespace) -> None:
    from slidetrain.bench.difficulty import difficulty_table, summary

    table = difficulty_table(a.runs, a.out, encoder=a.encoder, weights=a.weights, overrides=a.overrides)
    print(summary(table))


def _add_bench_difficulty_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser(
        "bench-difficulty", help="validation AUROC per synthetic difficulty and method (from history.csv, never test)"
    )
    s.add_argument(
        "--runs", type=json_arg, required=True, help="JSON list of {dataset, difficulty, method, split, seed, run_dir}"
    )
    s.add_argument("--overrides", type=json_arg, default={}, help="JSON: dataset -> synthetic_difficulty_overrides")
    s.add_argument("--encoder", required=True, help="the features' encoder (recorded in the table)")
    s.add_argument("--weights", required=True, help="the features' weights: none (random init) or a path (recorded)")
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_bench_difficulty)


def _add_bench_bags_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("bench-bags", help="write synthetic feature bags for the MIL throughput benchmark")
    s.add_argument("--out-dir", required=True)
    s.add_argument("--split", required=True)
    s.add_argument("--n-bags", type=int, default=1000)
    s.add_argument("--n-instances", type=int, default=2000)
    s.add_argument("--dim", type=int, default=512)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_bench_bags)


def _add_bench_mil_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("bench-mil", help="collect MIL training-epoch seconds per method")
    s.add_argument("--runs", nargs="+", required=True)
    s.add_argument("--benchmarks", nargs="+", required=True)
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_bench_mil)


def _add_distributed_single_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("distributed-single", help="equivalence case in one process (plain autograd, whole bag)")
    s.add_argument("--spec", type=json_arg, default={}, help="CaseSpec keys as JSON")
    s.add_argument("--out", required=True)
    s.add_argument("--threads", type=int, default=1)
    s.set_defaults(func=cmd_distributed_single)


def _add_distributed_parallel_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("distributed-parallel", help="equivalence case under torchrun (rank 0 aggregator, DDP encoders)")
    s.add_argument("--spec", type=json_arg, default={}, help="CaseSpec keys as JSON")
    s.add_argument("--out", required=True, help="written by rank 0")
    s.add_argument("--backend", default="auto", choices=["auto", "gloo", "nccl"])
    s.add_argument("--timeout-s", type=float, default=300.0, help="collective timeout")
    s.add_argument("--checkpoint", help="resume from / write to this file (rank 0 writes)")
    s.add_argument("--checkpoint-every", type=int, default=1)
    s.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    s.set_defaults(func=cmd_distributed_parallel)


def _add_distributed_equivalence_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("distributed-equivalence", help="normalized L1 of single vs parallel runs, table + figure")
    s.add_argument("--pair", nargs=3, action="append", required=True, metavar=("MODEL", "SINGLE", "PARALLEL"))
    s.add_argument(
        "--reference",
        nargs=2,
        action="append",
        metavar=("MODEL", "SINGLE_FLOAT64"),
        help="a float32 case's single run in float64: adds the fp32_noise column",
    )
    s.add_argument("--csv", required=True)
    s.add_argument("--figure", required=True)
    s.add_argument("--figure-data", help="CSV of the figure's plotted points (default: the PNG's path with .csv)")
    s.set_defaults(func=cmd_distributed_equivalence)


def _add_distributed_scaling_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("distributed-scaling", help="seconds per step of distributed runs against plain")
    s.add_argument("--parallel", nargs="+", required=True)
    s.add_argument("--plain", nargs="+", required=True, help="plain runs at the same tiles, in --parallel's order")
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_distributed_scaling)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    _add_bench_read_parser(sub)
    _add_bench_train_memory_parser(sub)
    _add_bench_inference_parser(sub)
    _add_bench_offload_equivalence_parser(sub)
    _add_bench_offload_sweep_parser(sub)
    _add_bench_max_tiles_parser(sub)
    _add_bench_tilebag_step_parser(sub)
    _add_bench_features_parser(sub)
    _add_bench_preprocess_parser(sub)
    _add_bench_difficulty_parser(sub)
    _add_bench_bags_parser(sub)
    _add_bench_mil_parser(sub)
    _add_distributed_single_parser(sub)
    _add_distributed_parallel_parser(sub)
    _add_distributed_equivalence_parser(sub)
    _add_distributed_scaling_parser(sub)
    heatmaps.add_parser(sub)
    encoders_cpu.add_parser(sub)

"""`slidetrain` subcommands of slidetrain.train: training and evaluation of every trainer (MIL, whole-image, tile-bag).

slidetrain.cli calls `add_parsers`; imports stay inside the commands so that
`slidetrain --help` does not pay for torch.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from slidetrain.cli_args import json_arg


def cmd_train_tilebag(a: argparse.Namespace) -> None:
    from slidetrain.train.tilebag import fit_tilebag

    sampling = {"tile_px": a.tile_px, "target_magnification": a.target_magnification, "mpp_fallback": a.mpp_fallback}
    fit_tilebag(
        a.params,
        sampling=sampling,
        out_dir=Path(a.out),
        seed=a.seed,
        ordinal=a.ordinal,
        threads=a.threads,
        backend=a.backend,
        timeout_s=a.timeout_s,
        **_tilebag_data(a),
    )


def cmd_evaluate_tilebag(a: argparse.Namespace) -> None:
    from slidetrain.train.tilebag import evaluate_tilebag

    evaluate_tilebag(
        Path(a.model),
        predictions_csv=Path(a.predictions),
        metrics_json=Path(a.metrics),
        attention_h5=Path(a.attention) if a.attention else None,
        ordinal=a.ordinal,
        n_bootstrap=a.n_bootstrap,
        seed=a.seed,
        threads=a.threads,
        **_tilebag_data(a),
        eval_overrides={
            k: v
            for k, v in (("eval_tiles", a.eval_tiles), ("eval_k", a.eval_k), ("eval_repeats", a.eval_repeats))
            if v is not None
        },
    )


def cmd_evaluate_tilebag_sets(a: argparse.Namespace) -> None:
    from slidetrain.train.tilebag import evaluate_tilebag_sets

    evaluate_tilebag_sets(
        Path(a.model), a.tests, a.modes, Path(a.out_dir), n_bootstrap=a.n_bootstrap, seed=a.seed, threads=a.threads
    )


def cmd_train_mil(a: argparse.Namespace) -> None:
    from slidetrain.train.mil import fit_mil

    fit_mil(a.method, a.params, Path(a.split), Path(a.features), a.classes, Path(a.out), a.seed, a.threads)


def cmd_evaluate_mil(a: argparse.Namespace) -> None:
    from slidetrain.train.mil import evaluate_mil

    evaluate_mil(
        Path(a.model),
        Path(a.split),
        Path(a.features),
        a.classes,
        Path(a.predictions),
        Path(a.metrics),
        attention_h5=Path(a.attention) if a.attention else None,
        ordinal=a.ordinal,
        n_bootstrap=a.n_bootstrap,
        seed=a.seed,
    )


def cmd_train_image(a: argparse.Namespace) -> None:
    from slidetrain.train.wholeimage.loop import fit_whole_image

    fit_whole_image(
        a.method, a.params, Path(a.split), Path(a.images), a.classes, Path(a.out), a.seed, a.threads, a.device
    )


def cmd_evaluate_image(a: argparse.Namespace) -> None:
    from slidetrain.train.wholeimage.loop import evaluate_whole_image

    evaluate_whole_image(
        Path(a.model),
        Path(a.split),
        Path(a.images),
        a.classes,
        Path(a.predictions),
        Path(a.metrics),
        ordinal=a.ordinal,
        n_bootstrap=a.n_bootstrap,
        seed=a.seed,
        device=a.device,
    )


def cmd_pretrain(a: argparse.Namespace) -> None:
    from slidetrain.train.pretrain.run import run_pretrain

    run_pretrain(
        a.arch,
        a.params,
        Path(a.sheet),
        Path(a.slides_dir),
        Path(a.tiles_dir),
        a.tile_px,
        a.target_magnification,
        Path(a.out_dir),
        max_tiles_per_slide=a.max_tiles_per_slide,
        threads=a.threads,
    )


def cmd_pretrain_probe(a: argparse.Namespace) -> None:
    from slidetrain.data.tilebag import BagSampling
    from slidetrain.train.pretrain.probe import run_probe

    sampling = BagSampling(k=1, tile_px=a.tile_px, target_magnification=a.target_magnification)
    run_probe(
        a.arch,
        Path(a.weights),
        Path(a.sheet),
        Path(a.split),
        a.classes,
        a.ordinal,
        Path(a.slides_dir),
        Path(a.tiles_dir),
        sampling,
        Path(a.out),
        max_tiles=a.max_tiles_per_slide,
        threads=a.threads,
    )


def _tilebag_data(a: argparse.Namespace) -> dict:
    return {
        "split_csv": Path(a.split),
        "sheet_csv": Path(a.sheet),
        "slides_dir": Path(a.slides_dir),
        "tiles_dir": Path(a.tiles_dir),
        "class_names": a.classes,
    }


def data_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("--split", required=True)
    s.add_argument("--sheet", required=True, help="slide sheet (slide ids and sources)")
    s.add_argument("--slides-dir", required=True, help="where synthetic slides were drawn")
    s.add_argument("--tiles-dir", required=True, help="tile coordinate h5 files, one per slide")
    s.add_argument("--classes", nargs="+", required=True)
    s.add_argument("--ordinal", action="store_true")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--threads", type=int, default=1)


def _add_train_tilebag_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("train-tilebag", help="train encoder + aggregator end to end on K tiles per slide")
    s.add_argument("--params", type=json_arg, default={})
    s.add_argument("--tile-px", type=int, required=True, help="tile side at the target magnification")
    s.add_argument("--target-magnification", type=float, required=True)
    s.add_argument("--mpp-fallback", type=float)
    s.add_argument("--out", required=True)
    s.add_argument("--backend", default="auto", choices=["auto", "gloo", "nccl"])
    s.add_argument("--timeout-s", type=float, default=300.0, help="collective timeout (distributed)")
    data_args(s)
    s.set_defaults(func=cmd_train_tilebag)


def _add_evaluate_tilebag_parser(sub: argparse._SubParsersAction) -> None:
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


def _add_evaluate_tilebag_sets_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("evaluate-tilebag-sets", help="score one tile-bag model on several test sets x protocols")
    s.add_argument("--model", required=True)
    s.add_argument(
        "--tests",
        type=json_arg,
        required=True,
        help="JSON list of {name, split, sheet, slides_dir, tiles_dir, classes, ordinal}",
    )
    s.add_argument("--modes", type=json_arg, required=True, help="JSON {mode: eval overrides}")
    s.add_argument("--out-dir", required=True, help="test_{name}_{mode}/ go below")
    s.add_argument("--n-bootstrap", type=int, default=1000)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--threads", type=int, default=1)
    s.set_defaults(func=cmd_evaluate_tilebag_sets)


def _add_train_mil_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("train-mil", help="train a MIL aggregator on frozen features")
    s.add_argument("--method", required=True)
    s.add_argument("--params", type=json_arg, default={})
    s.add_argument("--split", required=True)
    s.add_argument("--features", required=True)
    s.add_argument("--classes", nargs="+", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--threads", type=int, default=1)
    s.set_defaults(func=cmd_train_mil)


def _add_evaluate_mil_parser(sub: argparse._SubParsersAction) -> None:
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


def _add_train_image_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("train-image", help="train a whole-image learner (local_k4, image_e2e, streamingcnn, ...)")
    s.add_argument("--method", required=True)
    s.add_argument("--params", type=json_arg, default={})
    s.add_argument("--split", required=True)
    s.add_argument("--images", required=True, help="folder of {slide_id}.jpg whole-slide images")
    s.add_argument("--classes", nargs="+", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--threads", type=int, default=1)
    s.add_argument("--device", default="cpu")
    s.set_defaults(func=cmd_train_image)


def _add_evaluate_image_parser(sub: argparse._SubParsersAction) -> None:
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


def _cohort_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("--arch", required=True)
    s.add_argument("--sheet", required=True, help="slide sheet (tsv) of the slides read")
    s.add_argument("--slides-dir", required=True, help="where synthetic slides are drawn")
    s.add_argument("--tiles-dir", required=True, help="the slides' tile-coordinate h5 files")
    s.add_argument("--tile-px", type=int, required=True)
    s.add_argument("--target-magnification", type=float, required=True)
    s.add_argument("--max-tiles-per-slide", type=int, default=None)
    s.add_argument("--threads", type=int, default=1)


def _add_pretrain_parsers(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("pretrain", help="self-supervised (SimCLR) pretraining of a ResNet on a cohort's tiles")
    _cohort_args(s)
    s.add_argument("--params", type=json_arg, default={}, help="pretrain.params as JSON")
    s.add_argument("--out-dir", required=True)
    s.set_defaults(func=cmd_pretrain)
    s = sub.add_parser("pretrain-probe", help="linear probe of the slide label, pretrained vs random init")
    _cohort_args(s)
    s.add_argument("--weights", required=True, help="the pretrained encoder.pt")
    s.add_argument("--split", required=True, help="split CSV: fitted on train, read on val")
    s.add_argument("--classes", nargs="+", required=True)
    s.add_argument("--ordinal", action="store_true")
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_pretrain_probe)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    _add_train_tilebag_parser(sub)
    _add_evaluate_tilebag_parser(sub)
    _add_evaluate_tilebag_sets_parser(sub)
    _add_train_mil_parser(sub)
    _add_evaluate_mil_parser(sub)
    _add_train_image_parser(sub)
    _add_evaluate_image_parser(sub)
    _add_pretrain_parsers(sub)

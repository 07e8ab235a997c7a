"""Tile-bag end-to-end training: encoder and MIL aggregator trained together on K tiles per slide.

    slidetrain train-tilebag --params '{"k": 16, "backbone": "resnet18"}' \
        --split results/synthetic_binary/splits/mccv0.csv --sheet config/sheets/synthetic.tsv \
        --slides-dir resources/synthetic/slides --tiles-dir results/synthetic/tiles \
        --tile-px 128 --target-magnification 5 --classes negative positive \
        --out results/synthetic_binary/runs/tilebag_k16/mccv0/0 --seed 0
    slidetrain evaluate-tilebag --model .../model.pt --split ... (same data arguments) \
        --predictions .../predictions.csv --metrics .../metrics.json --attention .../attention.h5

One slide per step (Campanella et al., Big-Layers); `executor` picks how the
bag's forward and backward run (executors.py); selection on the validation
part only; the test part is read once, by `evaluate_tilebag`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, replace
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import torch

from slidetrain.configs.tilebag import TileBagConfig, tilebag_config
from slidetrain.data.splits import read_split
from slidetrain.data.tilebag import BagSampling, SlideRef, slide_paths, slide_refs
from slidetrain.errors import ConfigError
from slidetrain.evaluate.metrics import evaluate_predictions
from slidetrain.io import atomic_path, write_json
from slidetrain.train.common import (
    config_hash,
    default_dtype,
    part_slides,
    patient_of,
    predictions_table,
    seed_everything,
)
from slidetrain.train.fingerprint import input_fingerprint
from slidetrain.train.harness import Selection, run_epochs, write_run_files
from slidetrain.train.tilebag.model import build_tilebag_model, selection_metric
from slidetrain.train.tilebag.trainer import TileBagTrainer, metrics_over_repeats, resolve_device

log = logging.getLogger(__name__)

METHOD = "tilebag"
EVAL_KEYS = ("eval_tiles", "eval_k", "eval_repeats", "eval_chunk", "eval_bn")


def _refs(
    split: pd.DataFrame, part: str, class_names: list[str], sheet_csv: Path, slides_dir: Path, tiles_dir: Path
) -> list[SlideRef]:
    # Only slide_id and source are read from the sheet: a derived dataset's split relabels the slides.
    sep = "\t" if Path(sheet_csv).suffix in (".tsv", ".txt") else ","
    sheet = pd.read_csv(sheet_csv, sep=sep, dtype=str, keep_default_na=False)
    ids, labels = part_slides(split, part, class_names)
    return slide_refs(ids, labels, slide_paths(sheet, Path(sheet_csv).parent, Path(slides_dir)), tiles_dir)


def _class_weights(refs: list[SlideRef], n_classes: int) -> torch.Tensor:
    counts = np.bincount([r.label for r in refs], minlength=n_classes).astype(np.float64)
    return torch.tensor(
        np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / n_classes, 0.0), dtype=torch.float32
    )


def fit_tilebag(
    params: dict | None,
    split_csv: Path,
    sheet_csv: Path,
    slides_dir: Path,
    tiles_dir: Path,
    sampling: dict,
    class_names: list[str],
    out_dir: Path,
    seed: int,
    ordinal: bool = False,
    threads: int = 1,
    backend: str = "auto",
    timeout_s: float = 300.0,
) -> Path | None:
    """Train; writes model.pt, history.csv and run.json in `out_dir` (checkpoint.pt while running).

    `executor: distributed` runs on the ranks of a torchrun job (ranked.py; `backend` and the
    collectives' `timeout_s` apply there): rank 0 writes the files and returns model.pt, the other
    ranks return None.
    """
    cfg = tilebag_config(params)
    with default_dtype(cfg.dtype):  # float64: equivalence checks of the executors
        return _fit(
            cfg,
            split_csv,
            sheet_csv,
            slides_dir,
            tiles_dir,
            sampling,
            class_names,
            out_dir,
            seed,
            ordinal,
            threads,
            backend,
            timeout_s,
        )


def _trainer(
    cfg: TileBagConfig, model, samp: BagSampling, train: list, seed: int, weights, backend: str, timeout_s: float
):
    """(trainer, topology or None, device, launch record) for the configured executor: torchrun's ranks
    (distributed) or this process (every other executor)."""
    if cfg.executor == "distributed":
        from slidetrain.train.tilebag.distributed_executor import init_distributed
        from slidetrain.train.tilebag.ranked import RankedTileBagTrainer

        topo = init_distributed(backend, timeout_s, cfg.device)
        trainer = RankedTileBagTrainer(topo, model, cfg, samp, train, seed, weights)
        launch = {
            "executor": "distributed",
            "world_size": topo.world_size,
            "backend": topo.backend,
            "n_encoder_ranks": topo.n_encoders,
            "k_per_encoder_rank": cfg.k / topo.n_encoders,
        }
        return trainer, topo, topo.device, launch
    device = resolve_device(cfg.device)
    return TileBagTrainer(model, cfg, samp, train, seed, device, weights), None, device, {"executor": cfg.executor}


def _validator(trainer, val: list, ordinal: bool, distributed: bool):
    """The epoch's validation: metrics on rank 0 (or the one process), shared with every rank."""
    labels_val = np.array([r.label for r in val])

    def validate(epoch: int) -> dict:
        t0 = time.perf_counter()
        pred = trainer.predict(val)  # None on ranks 1..N of a distributed run
        row = None
        if pred is not None:
            m = metrics_over_repeats(labels_val, pred.probs, ordinal)
            row = {
                "val_loss": pred.loss,
                "val_accuracy": m["accuracy"],
                "val_auroc": m["auroc"],
                "val_qwk": m.get("qwk", float("nan")),
                "val_seconds": time.perf_counter() - t0,
            }
        if distributed:
            row = trainer.broadcast(row)
        trainer.schedule.step(row["val_loss"])  # epoch schedules (none for the default per-iteration one)
        return row

    return validate


def _fit(
    cfg: TileBagConfig,
    split_csv: Path,
    sheet_csv: Path,
    slides_dir: Path,
    tiles_dir: Path,
    sampling: dict,
    class_names: list[str],
    out_dir: Path,
    seed: int,
    ordinal: bool,
    threads: int,
    backend: str,
    timeout_s: float,
) -> Path | None:
    torch.set_num_threads(max(1, threads))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    split = read_split(split_csv)
    samp = BagSampling(k=cfg.k, input_px=cfg.input_px, augment=cfg.augment, **sampling)
    train, val = (_refs(split, p, class_names, sheet_csv, slides_dir, tiles_dir) for p in ("train", "val"))
    seed_everything(seed)
    model = build_tilebag_model(cfg, len(class_names), seed)
    weights = _class_weights(train, len(class_names)) if cfg.class_weights else None
    trainer, topo, device, launch = _trainer(cfg, model, samp, train, seed, weights, backend, timeout_s)
    primary = topo is None or trainer.primary
    snapshot, stop_hook = (trainer.snapshot, trainer.stop_hook) if topo else (model.state_dict, None)
    validate = _validator(trainer, val, ordinal, distributed=topo is not None)

    try:
        result = run_epochs(
            out_dir,
            config_hash(METHOD, cfg, seed, split_csv),
            cfg.epochs,
            train_epoch=trainer.train_epoch,
            validate=validate,
            stateful={"trainer": trainer},
            snapshot=snapshot,
            device=device,
            logger=log,
            stop_hook=stop_hook,
            primary=primary,
            selection=Selection(
                selection_metric(cfg, ordinal),
                patience=cfg.early_stopping_patience,
                min_epochs=cfg.early_stopping_min_epochs,
            ),
            # slide and tile-coordinate files of train and val; the sampling settings are not in cfg
            inputs=input_fingerprint([p for r in (*train, *val) for p in (r.slide_path, r.tiles_h5)], sampling),
        )
        if not primary:
            return None
        return write_run_files(
            out_dir,
            METHOD,
            cfg,
            seed,
            result,
            provenance={
                "class_names": class_names,
                "split": str(split_csv),
                "tiles": str(tiles_dir),
                "sampling": sampling,
                "n_train": len(train),
                "n_val": len(val),
                "launch": launch,
            },
            model_payload=lambda best: {
                "method": METHOD,
                "config": asdict(cfg),
                "class_names": class_names,
                "sampling": sampling,
                "state_dict": best,
            },
        )
    finally:
        if topo is not None:
            from slidetrain.train.tilebag.distributed_executor import shutdown

            shutdown()


def evaluate_tilebag(
    model_path: Path,
    split_csv: Path,
    sheet_csv: Path,
    slides_dir: Path,
    tiles_dir: Path,
    class_names: list[str],
    predictions_csv: Path,
    metrics_json: Path,
    attention_h5: Path | None = None,
    ordinal: bool = False,
    n_bootstrap: int = 1000,
    seed: int = 0,
    threads: int = 1,
    eval_overrides: dict | None = None,
) -> dict:
    """Score the test part once: predictions (mean over repeats), attention h5, metrics with bootstrap CIs.

    `eval_overrides` replaces the saved config's test-time keys (eval_tiles, eval_k, eval_repeats,
    eval_chunk, eval_bn), so one model is scored on all tiles and on R x K sampled tiles
    (Big-Layers' two protocols); any other key is an error.
    """
    torch.set_num_threads(max(1, threads))
    saved = torch.load(model_path, map_location="cpu", weights_only=False)
    overrides = dict(eval_overrides or {})
    bad = sorted(set(overrides) - set(EVAL_KEYS))
    if bad:
        raise ConfigError(f"evaluate-tilebag: {bad} cannot be overridden at test time; expected some of {EVAL_KEYS}")
    cfg = tilebag_config({**saved["config"], **overrides})
    if cfg.executor == "distributed":  # the trained model is a plain TileBagModel: score it in one process
        cfg = replace(cfg, executor="plain")
    device = resolve_device(cfg.device)
    split = read_split(split_csv, allow_external=True)
    test = _refs(split, "test", class_names, sheet_csv, slides_dir, tiles_dir)
    samp = BagSampling(k=cfg.k, input_px=cfg.input_px, augment=False, **saved["sampling"])
    with default_dtype(cfg.dtype):  # a float64 run is scored in float64, as its validation was
        model = build_tilebag_model(cfg, len(class_names), seed)
        model.load_state_dict(saved["state_dict"])
        pred = TileBagTrainer(model, cfg, samp, test, seed, device).predict(test)
    table = predictions_table([r.slide_id for r in test], [r.label for r in test], pred.mean_probs, class_names)
    with atomic_path(predictions_csv) as tmp:
        table.to_csv(tmp, index=False)
    if attention_h5 is not None:
        with atomic_path(attention_h5) as tmp, h5py.File(tmp, "w") as f:
            f.attrs["has_attention"] = model.aggregator.has_attention
            for ref, att, xy in zip(test, pred.attention, pred.coords, strict=True):
                if att is not None:
                    g = f.create_group(ref.slide_id)
                    g.create_dataset("attention", data=att)  # (N,) or (C, N)
                    g.create_dataset("coords", data=xy)  # (N, 2) level-0 x, y of the tiles scored
    result = evaluate_predictions(
        table, class_names, ordinal=ordinal, n_bootstrap=n_bootstrap, seed=seed, patient_of=patient_of(split)
    )
    labels = np.array([r.label for r in test])
    result["repeats"] = {
        "n": int(pred.probs.shape[0]),
        "mode": cfg.eval_tiles,
        "metrics_mean": metrics_over_repeats(labels, pred.probs, ordinal),
        "auroc_per_repeat": [float(v) for v in _per_repeat(labels, pred.probs, ordinal)],
    }
    write_json(metrics_json, result)
    return result


def evaluate_tilebag_sets(
    model_path: Path,
    tests: list[dict],
    modes: dict[str, dict],
    out_dir: Path,
    n_bootstrap: int = 1000,
    seed: int = 0,
    threads: int = 1,
) -> None:
    """Score one model on several test sets x test-time protocols in one process (one import, one load).

    `tests`: [{name, split, sheet, slides_dir, tiles_dir, classes, ordinal}]; `modes`: name -> eval
    overrides (e.g. {"all": {"eval_tiles": "all"}, "sampled": {"eval_tiles": "sampled", "eval_k": 8,
    "eval_repeats": 10}}). Writes out_dir/test_{test}_{mode}/predictions.csv and metrics.json.
    """
    for test in tests:
        missing = sorted({"name", "split", "sheet", "slides_dir", "tiles_dir", "classes"} - set(test))
        if missing:
            raise ConfigError(f"evaluate-tilebag-sets: test set {test.get('name', '?')!r} lacks {missing}")
        for mode, overrides in modes.items():
            where = Path(out_dir) / f"test_{test['name']}_{mode}"
            evaluate_tilebag(
                model_path,
                Path(test["split"]),
                Path(test["sheet"]),
                Path(test["slides_dir"]),
                Path(test["tiles_dir"]),
                list(test["classes"]),
                where / "predictions.csv",
                where / "metrics.json",
                ordinal=bool(test.get("ordinal", False)),
                n_bootstrap=n_bootstrap,
                seed=seed,
                threads=threads,
                eval_overrides=overrides,
            )
            log.info("%s: test set %s, %s tiles scored", model_path, test["name"], mode)


def _per_repeat(labels: np.ndarray, probs: np.ndarray, ordinal: bool) -> list[float]:
    from slidetrain.evaluate.metrics import classification_metrics

    return [classification_metrics(labels, p, ordinal=ordinal)["auroc"] for p in probs]


__all__ = ["TileBagConfig", "evaluate_tilebag", "evaluate_tilebag_sets", "fit_tilebag", "tilebag_config"]

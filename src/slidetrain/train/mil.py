"""Train and evaluate a MIL aggregator on frozen tile features.

    slidetrain train-mil --method abmil --split results/synthetic/splits/mccv0.csv \
        --features results/synthetic/features/resnet34 --out results/synthetic/runs/abmil/mccv0/0 --seed 0

One slide per step (bags differ in size), `accumulation` slides per optimiser
step (the loss is averaged over the slides of each step, a last short batch
included), model selection on the validation part only (the method's
`selection_rule`: metric and first eligible epoch; early stopping by
`early_stopping_patience`), through the shared harness (train/harness.py);
the test part is read only by `evaluate_mil`, once, after training.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from slidetrain.data.bags import Bag, load_bags
from slidetrain.data.splits import read_split
from slidetrain.errors import ConfigError
from slidetrain.evaluate.metrics import classification_metrics, evaluate_predictions
from slidetrain.io import atomic_path, write_json
from slidetrain.models import build_model, method_config
from slidetrain.models.base import MILModel
from slidetrain.train.common import (
    config_hash,
    part_slides,
    patient_of,
    predictions_table,
    seed_everything,
)
from slidetrain.train.fingerprint import input_fingerprint
from slidetrain.train.harness import Selection, run_epochs, write_run_files
from slidetrain.train.optim import build_optimizer, build_scheduler
from slidetrain.wsi.external_features import find_feature_file

log = logging.getLogger(__name__)

#: history columns a MIL run may select on
MIL_SELECTION_METRICS = ("val_loss", "val_auroc", "val_accuracy", "val_balanced_accuracy", "val_acc_auroc")


def part_bags(split: pd.DataFrame, part: str, class_names: list[str], features_dir: Path) -> list[Bag]:
    return load_bags(*part_slides(split, part, class_names), features_dir)


def feature_stats(bags: list[Bag], feature_norm: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per-dimension mean and std over every training tile, or None when features stay raw.

    Accumulated bag by bag in float64: the training part can hold millions of tiles.
    """
    if feature_norm == "none":
        return None
    if feature_norm != "standardize":
        raise ConfigError(f"feature_norm: unknown value {feature_norm!r}; expected none or standardize")
    dim = bags[0].features.shape[1]
    total, total_sq, n = torch.zeros(dim, dtype=torch.float64), torch.zeros(dim, dtype=torch.float64), 0
    for b in bags:
        x = b.features.double()  # (N, D)
        total += x.sum(0)
        total_sq += (x * x).sum(0)
        n += len(x)
    mean = total / n
    var = (total_sq / n - mean * mean).clamp_min(0) * n / max(n - 1, 1)
    return mean.float(), var.sqrt().clamp_min(1e-6).float()


def normalise_bags(bags: list[Bag], stats: tuple[torch.Tensor, torch.Tensor] | None) -> list[Bag]:
    """Standardise in place: the bags were read for this run alone, and a copy would double memory."""
    if stats is not None:
        mean, std = stats
        for b in bags:
            b.features.sub_(mean).div_(std)
    return bags


def class_weight_tensor(bags: list[Bag], n_classes: int) -> torch.Tensor:
    """Inverse class frequency of the training part, normalised to mean 1."""
    counts = np.bincount([b.label for b in bags], minlength=n_classes).astype(np.float64)
    weights = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / n_classes, 0.0)
    return torch.tensor(weights, dtype=torch.float32)


def balanced_sampling_weights(bags: list[Bag], n_classes: int) -> np.ndarray:
    """Per-slide draw probabilities 1 / (slides of its class), normalised (CLAM's weighted sampler)."""
    labels = np.array([b.label for b in bags])
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    w = 1.0 / counts[labels]
    return w / w.sum()


@torch.no_grad()
def predict_bags(model: MILModel, bags: list[Bag], class_weights: torch.Tensor | None = None):
    """(mean loss, probs (N, C), attentions list) with the model in eval mode."""
    model.eval()
    losses, probs, attentions = [], [], []
    for bag in bags:
        out = model(bag.features)
        losses.append(float(model.loss(out, torch.tensor(bag.label), class_weights)))
        probs.append(model.probabilities(out).numpy())
        attentions.append(None if out.attention is None else out.attention.numpy())
    return float(np.mean(losses)), np.stack(probs), attentions


def fit_mil(
    method: str,
    params: dict | None,
    split_csv: Path,
    features_dir: Path,
    class_names: list[str],
    out_dir: Path,
    seed: int,
    threads: int = 1,
) -> Path:
    """Train `method`; writes model.pt, history.csv and run.json in `out_dir`; returns model.pt."""
    # one piece: train_epoch and validate are closures over the bags, model, optimisers and schedulers
    # that run_epochs checkpoints; split apart, that state would travel as one more mutable bundle.
    torch.set_num_threads(max(1, threads))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = method_config(method, params)
    split = read_split(split_csv)
    n_classes = len(class_names)
    train, val = (part_bags(split, p, class_names, features_dir) for p in ("train", "val"))
    in_dim = train[0].features.shape[1]
    norm_stats = feature_stats(train, cfg.feature_norm)  # training part only: val/test never leak in
    train, val = normalise_bags(train, norm_stats), normalise_bags(val, norm_stats)

    metric, start_fraction = cfg.selection_rule()
    if metric not in MIL_SELECTION_METRICS:
        raise ConfigError(
            f"methods.{method}.selection_metric: expected one of {list(MIL_SELECTION_METRICS)}, got {metric!r}"
        )

    seed_everything(seed)
    model = build_model(method, in_dim, n_classes, cfg)
    group_cfgs = model.group_configs(cfg)
    optimizers = [build_optimizer(g, c) for g, c in zip(model.param_groups(), group_cfgs, strict=True)]
    iters_per_epoch = -(-len(train) // cfg.accumulation)  # optimiser steps per epoch (per-iteration schedules)
    schedulers = [build_scheduler(opt, c, iters_per_epoch) for opt, c in zip(optimizers, group_cfgs, strict=True)]
    weights = class_weight_tensor(train, n_classes) if cfg.class_weights else None
    sample_p = balanced_sampling_weights(train, n_classes) if cfg.weighted_sample else None

    def train_epoch(epoch: int) -> dict:
        model.on_epoch_start(epoch, cfg.epochs)
        model.eval()
        with torch.no_grad():
            inputs = model.epoch_bags([b.features for b in train])  # MIL-RNN stage 1: the top tiles
        model.train()
        rng = np.random.default_rng([seed, epoch])
        order = rng.choice(len(train), len(train), p=sample_p) if sample_p is not None else rng.permutation(len(train))
        sub_rng = np.random.default_rng([seed, epoch, 1])
        acc = model.accumulation(cfg.accumulation)
        train_losses = []
        for opt in optimizers:
            opt.zero_grad()
        steps = tqdm(order, desc=f"{method} epoch {epoch + 1}/{cfg.epochs}", leave=False, disable=None)  # quiet in logs
        for step, idx in enumerate(steps, 1):
            bag = train[idx]
            x = inputs[idx]
            if cfg.max_instances and len(x) > cfg.max_instances:
                x = x[torch.from_numpy(np.sort(sub_rng.choice(len(x), cfg.max_instances, replace=False)))]
            out = model(x)
            loss = model.loss(out, torch.tensor(bag.label), weights)
            window = min(acc, len(order) - (step - 1) // acc * acc)  # slides in this step's batch
            (loss / window).backward()  # the batch's mean loss, a last short batch included
            train_losses.append(float(loss.detach()))
            if step % acc == 0 or step == len(order):
                if cfg.grad_clip > 0:
                    for group in model.clip_groups():
                        torch.nn.utils.clip_grad_norm_(group, cfg.grad_clip)
                for opt, sch in zip(optimizers, schedulers, strict=True):
                    opt.step()
                    opt.zero_grad()
                    sch.step_iteration()
        return {"train_loss": float(np.mean(train_losses))}

    def validate(epoch: int) -> dict:
        val_loss, val_probs, _ = predict_bags(model, val, weights)
        val_metrics = classification_metrics(np.array([b.label for b in val]), val_probs)
        for sch in schedulers:
            sch.step(val_loss)
        return {
            "val_loss": val_loss,
            "val_accuracy": val_metrics["accuracy"],
            "val_auroc": val_metrics["auroc"],
            "val_balanced_accuracy": val_metrics["balanced_accuracy"],
            "val_acc_auroc": (val_metrics["accuracy"] + val_metrics["auroc"]) / 2,  # DSMIL's selection score
            "lr": optimizers[0].param_groups[0]["lr"],
        }

    result = run_epochs(
        out_dir,
        config_hash(method, cfg, seed, split_csv),
        cfg.epochs,
        train_epoch,
        validate,
        stateful={"model": model, "optimizers": optimizers, "schedulers": schedulers},
        snapshot=model.state_dict,
        selection=Selection(
            metric,
            start_epoch=int(start_fraction * cfg.epochs),
            patience=cfg.early_stopping_patience,
            min_epochs=cfg.early_stopping_min_epochs,
        ),
        selectable=model.selectable,
        logger=log,
        # the feature files of train and val, in whichever layout load_bags found them
        inputs=input_fingerprint(find_feature_file(features_dir, b.slide_id) for b in (*train, *val)),
    )
    return write_run_files(
        out_dir,
        method,
        cfg,
        seed,
        result,
        provenance={
            "in_dim": in_dim,
            "class_names": class_names,
            "split": str(split_csv),
            "features": str(features_dir),
        },
        model_payload=lambda best_state: {
            "method": method,
            "config": asdict(cfg),
            "in_dim": in_dim,
            "class_names": class_names,
            "state_dict": best_state,
            "feature_norm": norm_stats,
        },
    )


def load_trained(model_path: Path) -> tuple[MILModel, tuple[torch.Tensor, torch.Tensor] | None]:
    """The selected model and the feature normalisation it was trained with."""
    saved = torch.load(model_path, map_location="cpu", weights_only=False)
    cfg = method_config(saved["method"], saved["config"])
    model = build_model(saved["method"], saved["in_dim"], len(saved["class_names"]), cfg)
    model.load_state_dict(saved["state_dict"])
    return model.eval(), saved.get("feature_norm")


def evaluate_mil(
    model_path: Path,
    split_csv: Path,
    features_dir: Path,
    class_names: list[str],
    predictions_csv: Path,
    metrics_json: Path,
    attention_h5: Path | None = None,
    ordinal: bool = False,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> dict:
    """Score the test part once: predictions CSV, per-tile attention (h5), metrics JSON with bootstrap CIs."""
    model, norm_stats = load_trained(model_path)
    split = read_split(split_csv)
    test = normalise_bags(part_bags(split, "test", class_names, features_dir), norm_stats)
    _, probs, attentions = predict_bags(model, test)
    pred = predictions_table([b.slide_id for b in test], [b.label for b in test], probs, class_names)
    with atomic_path(predictions_csv) as tmp:
        pred.to_csv(tmp, index=False)
    if attention_h5 is not None:
        with atomic_path(attention_h5) as tmp:
            with h5py.File(tmp, "w") as f:
                f.attrs["has_attention"] = model.has_attention
                for bag, att in zip(test, attentions, strict=True):
                    if att is not None:
                        g = f.create_group(bag.slide_id)
                        g.create_dataset("attention", data=att)  # (N,) or (C, N)
                        g.create_dataset("coords", data=bag.coords)
    result = evaluate_predictions(
        pred, class_names, ordinal=ordinal, n_bootstrap=n_bootstrap, seed=seed, patient_of=patient_of(split)
    )
    write_json(metrics_json, result)
    return result

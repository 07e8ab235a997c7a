"""Train and evaluate a MIL aggregator on frozen tile features.

    slidetrain train-mil --method abmil --split results/synthetic/splits/mccv0.csv \
        --features results/synthetic/features/resnet34 --out results/synthetic/runs/abmil/mccv0/0 --seed 0

One slide per step (bags differ in size), `accumulation` slides per optimiser
step, model selection on the validation part only; the test part is read only
by `evaluate_mil`, once, after training.
"""

from __future__ import annotations

import logging
import time
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
    is_better,
    load_checkpoint,
    maybe_stop_for_test,
    part_slides,
    predictions_table,
    rng_state,
    save_checkpoint,
    seed_everything,
    set_rng_state,
    write_history,
    write_provenance,
)
from slidetrain.train.optim import build_optimizer, build_scheduler

log = logging.getLogger(__name__)


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

    seed_everything(seed)
    model = build_model(method, in_dim, n_classes, cfg)
    optimizers = [build_optimizer(group, cfg) for group in model.param_groups()]
    iters_per_epoch = -(-len(train) // cfg.accumulation)  # optimiser steps per epoch (per-iteration schedules)
    schedulers = [build_scheduler(opt, cfg, iters_per_epoch) for opt in optimizers]
    weights = class_weight_tensor(train, n_classes) if cfg.class_weights else None
    tag = config_hash(method, cfg, seed, split_csv)

    ckpt_path = out_dir / "checkpoint.pt"
    state = load_checkpoint(ckpt_path)
    if state is not None and state.get("tag") != tag:
        log.warning("ignoring %s: it was written for another config/seed/split", ckpt_path)
        state = None
    if state is None:
        start_epoch, history, best, best_state, stale = 0, [], None, None, 0
    else:
        model.load_state_dict(state["model"])
        for opt, s in zip(optimizers, state["optimizers"], strict=True):
            opt.load_state_dict(s)
        for sch, s in zip(schedulers, state["schedulers"], strict=True):
            sch.load_state_dict(s)
        set_rng_state(state["rng"])
        start_epoch, history, best = state["epoch"], state["history"], state["best"]
        best_state, stale = state["best_state"], state["stale"]
        log.info("resuming %s from epoch %d", out_dir, start_epoch)

    t_start = time.perf_counter()
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        model.on_epoch_start(epoch, cfg.epochs)
        model.train()
        order = np.random.default_rng([seed, epoch]).permutation(len(train))
        sub_rng = np.random.default_rng([seed, epoch, 1])
        train_losses = []
        for opt in optimizers:
            opt.zero_grad()
        steps = tqdm(order, desc=f"{method} epoch {epoch + 1}/{cfg.epochs}", leave=False, disable=None)  # quiet in logs
        for step, idx in enumerate(steps, 1):
            bag = train[idx]
            x = bag.features
            if cfg.max_instances and len(x) > cfg.max_instances:
                x = x[torch.from_numpy(np.sort(sub_rng.choice(len(x), cfg.max_instances, replace=False)))]
            out = model(x)
            loss = model.loss(out, torch.tensor(bag.label), weights)
            (loss / cfg.accumulation).backward()
            train_losses.append(float(loss.detach()))
            if step % cfg.accumulation == 0 or step == len(order):
                for group, opt, sch in zip(model.param_groups(), optimizers, schedulers, strict=True):
                    if cfg.grad_clip > 0:
                        torch.nn.utils.clip_grad_norm_(group, cfg.grad_clip)
                    opt.step()
                    opt.zero_grad()
                    sch.step_iteration()
        val_loss, val_probs, _ = predict_bags(model, val, weights)
        val_metrics = classification_metrics(np.array([b.label for b in val]), val_probs)
        for sch in schedulers:
            sch.step(val_loss)
        row = {
            "epoch": epoch + 1,
            "train_loss": float(np.mean(train_losses)),
            "val_loss": val_loss,
            "val_accuracy": val_metrics["accuracy"],
            "val_auroc": val_metrics["auroc"],
            "lr": optimizers[0].param_groups[0]["lr"],
            "seconds": time.perf_counter() - t0,
        }
        selection_value = row[cfg.selection_metric]
        if model.selectable() and is_better(selection_value, best, cfg.selection_metric):
            best, stale = selection_value, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            row["selected"] = True
        else:
            stale += 1
            row["selected"] = False
        history.append(row)
        log.info("epoch %d: %s", epoch + 1, {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
        save_checkpoint(
            ckpt_path,
            {
                "tag": tag, "epoch": epoch + 1, "model": model.state_dict(),
                "optimizers": [o.state_dict() for o in optimizers],
                "schedulers": [s.state_dict() for s in schedulers],
                "rng": rng_state(), "history": history, "best": best, "best_state": best_state, "stale": stale,
            },
        )
        write_history(out_dir / "history.csv", history)
        maybe_stop_for_test(epoch + 1)
        if (
            cfg.early_stopping_patience
            and epoch + 1 >= cfg.early_stopping_min_epochs
            and stale >= cfg.early_stopping_patience
        ):
            log.info("early stopping after epoch %d (%d epochs without improvement)", epoch + 1, stale)
            break

    if best_state is None:  # every validation value was NaN: keep the last model, say so
        log.warning("no epoch improved %s; keeping the last model", cfg.selection_metric)
        best_state = model.state_dict()
    write_provenance(
        out_dir / "run.json", method, cfg, seed,
        {"in_dim": in_dim, "class_names": class_names, "split": str(split_csv), "features": str(features_dir),
         "train_seconds": time.perf_counter() - t_start, "epochs_run": len(history)},
    )
    model_path = out_dir / "model.pt"
    with atomic_path(model_path) as tmp:
        torch.save({"method": method, "config": asdict(cfg), "in_dim": in_dim, "class_names": class_names,
                    "state_dict": best_state, "feature_norm": norm_stats}, tmp)
    ckpt_path.unlink(missing_ok=True)  # the run is complete: nothing left to resume
    return model_path


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
    result = evaluate_predictions(pred, class_names, ordinal=ordinal, n_bootstrap=n_bootstrap, seed=seed)
    write_json(metrics_json, result)
    return result

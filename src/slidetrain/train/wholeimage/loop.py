"""Train and evaluate a whole-image learner (local_k4/k8[_norfr], image_e2e, streamingcnn) on whole-slide images.

    slidetrain train-image --method local_k4 --split results/synthetic/splits/mccv0.csv \
        --images results/synthetic/images --classes a b --out results/synthetic/runs/local_k4/mccv0/0 \
        --seed 0 --device cuda

The images are the pipeline's one-JPEG-per-slide files ({images}/{slide_id}.jpg,
tissue box at the image magnification), read once. One slide per
`train_slide` call, `learner.step()` every `accumulation` slides of an epoch
(the authors' code: no extra step at its end; the rest carries over); per-channel normalisation
statistics from the training part only;
model selection on the validation part only; the test part is read only by
`evaluate_whole_image`, once, after training.

Augmentation draws come from a generator seeded by (seed, epoch, position in
the epoch), so a run killed after any epoch resumes from its checkpoint and
ends bit-identical (on the CPU) to an uninterrupted one.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch import Tensor
from tqdm import tqdm

from slidetrain.data.splits import read_split
from slidetrain.errors import ConfigError, SlideError, TrainingError
from slidetrain.evaluate.metrics import classification_metrics, evaluate_predictions
from slidetrain.io import atomic_path, write_json
from slidetrain.train.common import (
    config_hash,
    part_slides,
    patient_of,
    predictions_table,
    seed_everything,
)
from slidetrain.train.fingerprint import input_fingerprint
from slidetrain.train.harness import Selection, run_epochs, write_run_files
from slidetrain.train.wholeimage.augment import augment_slide, channel_stats, normalise
from slidetrain.train.wholeimage.interface import WholeImageLearner
from slidetrain.train.wholeimage.registry import build_learner, learner_config

log = logging.getLogger(__name__)

IMAGE_SUFFIX = ".jpg"

#: a channel whose training pixels are constant must not divide by zero
MIN_STD = 1e-6

NormStats = dict[str, list[float]]  # {"mean": [r, g, b], "std": [r, g, b]}


def load_images(slide_ids: list[str], images_dir: Path) -> list[Tensor]:
    """Each slide's {images_dir}/{slide_id}.jpg as a uint8 (3, H, W) tensor, in `slide_ids` order.

    A missing or unreadable file is an error naming the slide, never a skip.
    """
    images = []
    for slide_id in slide_ids:
        path = Path(images_dir) / f"{slide_id}{IMAGE_SUFFIX}"
        if not path.is_file():
            raise SlideError(slide_id, f"whole-slide image {path} is missing; run the preprocess rule first")
        limit = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None  # our own preprocess output: a 5x slide may exceed PIL's bomb guard
        try:
            with Image.open(path) as im:
                array = np.asarray(im.convert("RGB"))  # (H, W, 3) uint8; convert() decodes the whole file
        except (OSError, ValueError, SyntaxError) as err:  # PIL: truncated/corrupt files, bad headers
            raise SlideError(slide_id, f"whole-slide image {path} cannot be read: {err}") from err
        finally:
            Image.MAX_IMAGE_PIXELS = limit
        images.append(torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous())  # (3, H, W)
    return images


def part_images(
    split: pd.DataFrame, part: str, class_names: list[str], images_dir: Path
) -> tuple[list[str], list[int], list[Tensor]]:
    """(slide ids, class indices, uint8 images) of one part of the split."""
    slide_ids, labels = part_slides(split, part, class_names)
    return slide_ids, labels, load_images(slide_ids, images_dir)


def norm_stats_of(images: list[Tensor]) -> NormStats:
    """Per-channel mean/std over every pixel of `images` (pass the training part only)."""
    mean, std = channel_stats(images)
    return {"mean": list(mean), "std": [max(s, MIN_STD) for s in std]}


def as_input(image: Tensor) -> Tensor:
    """uint8 (3, H, W) -> float (3, H, W) in [0, 1]."""
    return image.to(torch.float32).div_(255.0)


def size_summary(images: list[Tensor]) -> dict:
    heights = np.array([im.shape[1] for im in images])
    widths = np.array([im.shape[2] for im in images])
    return {
        "n": len(images),
        "height_px_min_median_max": [int(heights.min()), float(np.median(heights)), int(heights.max())],
        "width_px_min_median_max": [int(widths.min()), float(np.median(widths)), int(widths.max())],
        "megapixels_total": float((heights * widths).sum() / 1e6),
    }


def augment_generator(seed: int, epoch: int, position: int) -> torch.Generator:
    """The augmentation RNG of one slide visit: depends only on (seed, epoch, position), so a resume replays it."""
    state = np.random.SeedSequence([seed, epoch, position]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


@torch.no_grad()
def predict_images(
    learner: WholeImageLearner,
    images: list[Tensor],
    labels: list[int],
    stats: NormStats,
    class_weights: list[float] | None = None,
) -> tuple[float, np.ndarray]:
    """(mean CE, probs (N, C)); each slide's CE times class_weights[label] when set, as in training."""
    losses, probs = [], []
    for image, label in zip(images, labels, strict=True):
        p = learner.predict(normalise(as_input(image), stats["mean"], stats["std"]))  # (C,)
        ce = -float(torch.log(p[label].clamp_min(torch.finfo(p.dtype).tiny)))
        losses.append(ce * (class_weights[label] if class_weights is not None else 1.0))
        probs.append(p.numpy())
    return float(np.mean(losses)), np.stack(probs)


def _learning_rate(learner: WholeImageLearner) -> float:
    """The first parameter group's lr (local/image_e2e: backbone), NaN for a learner without `optimizer`."""
    optimizer = getattr(learner, "optimizer", None)
    return float(optimizer.param_groups[0]["lr"]) if optimizer is not None else float("nan")


def _now() -> float:
    """Wall-clock seconds that include queued GPU work (CUDA kernels run asynchronously)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()


def fit_whole_image(
    method: str,
    params: dict | None,
    split_csv: Path,
    images_dir: Path,
    class_names: list[str],
    out_dir: Path,
    seed: int,
    threads: int = 1,
    device: str = "cpu",
) -> Path:
    """Train `method`; writes model.pt, history.csv and run.json in `out_dir`; returns model.pt."""
    # one piece: train_epoch and validate are closures over the images, normalisation and learner that
    # run_epochs checkpoints; split apart, that state would travel as one more mutable bundle.
    if not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed: expected an integer >= 0, got {seed!r}")
    torch.set_num_threads(max(1, threads))
    dev = torch.device(device)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = learner_config(method, params)
    split = read_split(split_csv)
    train_ids, train_labels, train_images = part_images(split, "train", class_names, images_dir)
    val_ids, val_labels, val_images = part_images(split, "val", class_names, images_dir)
    stats = norm_stats_of(train_images)  # training part only: val/test never leak in
    log.info("%s: %d train, %d val slides; normalisation %s", method, len(train_ids), len(val_ids), stats)

    seed_everything(seed)
    learner = build_learner(method, len(class_names), params, device=dev)
    if getattr(cfg, "calibrate_bn", False):
        # Once, before training; the statistics stay frozen. A resumed run recalibrates too, and
        # the checkpoint's learner state (BatchNorm buffers included) then replaces the result.
        n = learner.calibrate_batchnorm(
            normalise(as_input(image), stats["mean"], stats["std"]) for image in train_images
        )
        log.info("%s: BatchNorm statistics calibrated on %d training slides", method, n)

    n_train = len(train_ids)

    def train_epoch(epoch: int) -> dict:
        order = np.random.default_rng([seed, epoch]).permutation(n_train)
        train_losses, cropped = [], []
        steps = tqdm(order, desc=f"{method} epoch {epoch + 1}/{cfg.epochs}", leave=False, disable=None)  # quiet in logs
        for position, idx in enumerate(steps, 1):
            # one expression: no name holds the float image, so a learner that is done with it
            # after a frozen stem frees it (train_slide)
            losses = learner.train_slide(
                normalise(
                    augment_slide(as_input(train_images[idx]), augment_generator(seed, epoch, position)),
                    stats["mean"],
                    stats["std"],
                ),
                train_labels[idx],
            )
            if "loss" not in losses:
                raise ConfigError(f"{method}: its learner's train_slide returned no 'loss' (got {sorted(losses)})")
            train_losses.append(losses["loss"])
            if losses.get("oom_crops", 0) > 0:  # trained on its centre only (on_oom: crop): say so
                entry = f"{train_ids[idx]}:{int(losses['image_h'])}x{int(losses['image_w'])}"
                log.warning("slide %s: out of memory, trained on a %s crop", train_ids[idx], entry.split(":")[1])
                cropped.append(entry)
            if position % cfg.accumulation == 0:  # the reference: no extra step at the epoch's end
                learner.step()
        return {"train_loss": float(np.mean(train_losses)), "cropped": ";".join(cropped)}

    def validate(epoch: int) -> dict:
        val_loss, val_probs = predict_images(learner, val_images, val_labels, stats, cfg.class_weights)
        if not np.isfinite(val_probs).all():
            raise TrainingError(
                f"{method}: training diverged in epoch {epoch + 1} (non-finite validation probabilities); "
                f"lower the learning rate or set grad_clip in its config block (last checkpoint: epoch {epoch})"
            )
        val_metrics = classification_metrics(np.array(val_labels), val_probs)
        learner.end_epoch(epoch, val_loss)
        return {
            "val_loss": val_loss,
            "val_accuracy": val_metrics["accuracy"],
            "val_auroc": val_metrics["auroc"],
            "lr": _learning_rate(learner),
        }

    result = run_epochs(
        out_dir,
        config_hash(method, cfg, seed, split_csv),
        cfg.epochs,
        train_epoch,
        validate,
        stateful={"learner": learner},
        snapshot=learner.weights_state_dict,
        selection=Selection(cfg.selection_metric),
        device=dev,
        clock=_now,
        trailing=("cropped",),
        logger=log,
        stop_hook=None,
        inputs=input_fingerprint(Path(images_dir) / f"{s}{IMAGE_SUFFIX}" for s in (*train_ids, *val_ids)),
    )
    return write_run_files(
        out_dir,
        method,
        cfg,
        seed,
        result,
        provenance={
            "class_names": class_names,
            "split": str(split_csv),
            "images": str(images_dir),
            "device": str(dev),
            "norm_stats": stats,
            "image_sizes": {"train": size_summary(train_images), "val": size_summary(val_images)},
        },
        model_payload=lambda best_state: {
            "method": method,
            "config": asdict(cfg),
            "class_names": class_names,
            "state": best_state,
            "norm_stats": stats,
        },
    )


def load_trained(model_path: Path, device: str = "cpu") -> tuple[WholeImageLearner, dict]:
    """The selected learner and what model.pt says about it (method, config, class_names, norm_stats)."""
    saved = torch.load(model_path, map_location="cpu", weights_only=False)
    params = dict(saved["config"])
    if "weights" in params:
        params["weights"] = "none"  # the saved state replaces them: no download or path needed here
    learner = build_learner(saved["method"], len(saved["class_names"]), params, device=device)
    learner.load_weights(saved["state"])
    return learner, saved


def evaluate_whole_image(
    model_path: Path,
    split_csv: Path,
    images_dir: Path,
    class_names: list[str],
    predictions_csv: Path,
    metrics_json: Path,
    ordinal: bool = False,
    n_bootstrap: int = 1000,
    seed: int = 0,
    device: str = "cpu",
) -> dict:
    """Score the test part once: predictions CSV and metrics JSON with bootstrap CIs."""
    learner, saved = load_trained(model_path, device)
    if list(saved["class_names"]) != list(class_names):
        raise ConfigError(f"classes: {model_path} was trained on {saved['class_names']}, got {list(class_names)}")
    split = read_split(split_csv)
    test_ids, test_labels, test_images = part_images(split, "test", class_names, images_dir)
    _, probs = predict_images(learner, test_images, test_labels, saved["norm_stats"])
    pred = predictions_table(test_ids, test_labels, probs, class_names)
    with atomic_path(predictions_csv) as tmp:
        pred.to_csv(tmp, index=False)
    result = evaluate_predictions(
        pred, class_names, ordinal=ordinal, n_bootstrap=n_bootstrap, seed=seed, patient_of=patient_of(split)
    )
    write_json(metrics_json, result)
    return result

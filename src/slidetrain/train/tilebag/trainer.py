"""The tile-bag training loop: one slide per step, accumulation, AMP, per-iteration schedules.

`TileBagTrainer` owns the model, the optimiser, its schedule and the GradScaler;
the executor (executors.py) runs each bag's forward and backward. `train_epoch`
and `evaluate` are what the run loop (fit in __init__.py) calls per epoch.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from slidetrain.data.tilebag import (
    BagSampling,
    EpochSubset,
    EvalBags,
    SlideRef,
    TileBagDataset,
    bag_loader,
    check_item,
)
from slidetrain.errors import ConfigError, TrainingError
from slidetrain.evaluate.metrics import classification_metrics
from slidetrain.models.base import MILModel, MILOutput
from slidetrain.train.cpu_bf16 import warn_if_emulated
from slidetrain.train.optim import build_optimizer, build_scheduler
from slidetrain.train.tilebag.executors import StepContext, build_executor, full_precision
from slidetrain.train.tilebag.model import (
    TileBagConfig,
    TileBagModel,
    logged_rates,
    param_groups,
    set_train_mode,
)
from slidetrain.train.tilebag.slide_norm import SlideNormEncoder

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {name!r} requested but CUDA is not available; expected cpu on this machine")
    return device


def autocast_factory(device: torch.device, amp: bool):
    """fp16 autocast on CUDA, bf16 on CPU (CPU autocast has no fp16 GradScaler path), or none."""
    if not amp:
        return contextlib.nullcontext
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return lambda: torch.autocast(device.type, dtype=dtype)


@dataclass
class Prediction:
    """Evaluation of one part: probabilities per repeat (R, N, C), mean loss, attention per slide."""

    probs: np.ndarray  # (R, N, C); R = 1 for "all tiles"
    loss: float
    attention: list[np.ndarray | None]  # per slide, over `coords` (first repeat)
    coords: list[np.ndarray]

    @property
    def mean_probs(self) -> np.ndarray:  # (N, C)
        return self.probs.mean(0)


class PredictionCollector:
    """Scores bags one by one (loss, probabilities, first-repeat attention) into a `Prediction`;
    shared by the one-process trainer and the ranked one, which differ only in how features arrive."""

    def __init__(self, n_slides: int, class_weights: torch.Tensor | None):
        self.class_weights = class_weights
        self.probs: dict[tuple[int, int], np.ndarray] = {}
        self.losses: list[float] = []
        self.attention: list[np.ndarray | None] = [None] * n_slides
        self.coords: list[np.ndarray] = [np.zeros((0, 2), np.int64)] * n_slides

    def add(
        self,
        aggregator: MILModel,
        out: MILOutput,
        label: int,
        device: torch.device,
        slide_id: str,
        index: int,
        repeat: int,
        coords: Callable[[], np.ndarray],
    ) -> None:
        """One bag's output; `coords()` (the tiles scored) is called for the first repeat only."""
        self.losses.append(float(aggregator.loss(out, torch.tensor(label, device=device), self.class_weights)))
        p = aggregator.probabilities(out).float().cpu().numpy()  # (C,)
        if not np.isfinite(p).all():
            raise TrainingError(f"tile-bag evaluation: non-finite probabilities on slide {slide_id}")
        self.probs[(repeat, index)] = p
        if repeat == 0:
            self.attention[index] = None if out.attention is None else out.attention.float().cpu().numpy()
            self.coords[index] = coords()

    def result(self, repeats: int) -> Prediction:
        n_classes = len(next(iter(self.probs.values())))
        table = np.zeros((repeats, len(self.attention), n_classes), np.float64)  # (R, N, C)
        for (r, i), p in self.probs.items():
            table[r, i] = p
        return Prediction(table, float(np.mean(self.losses)), self.attention, self.coords)


def metrics_over_repeats(labels: np.ndarray, probs: np.ndarray, ordinal: bool) -> dict[str, float]:
    """Each metric computed per repeat, then averaged (Big-Layers' test-time protocol)."""
    per = [classification_metrics(labels, p, ordinal=ordinal) for p in probs]
    keys = per[0].keys()
    return {
        k: float(np.nanmean([m[k] for m in per])) if not all(np.isnan(m[k]) for m in per) else float("nan")
        for k in keys
    }


class TileBagTrainer:
    def __init__(
        self,
        model: TileBagModel,
        cfg: TileBagConfig,
        sampling: BagSampling,
        train_refs: list[SlideRef],
        seed: int,
        device: torch.device,
        class_weights: torch.Tensor | None = None,
    ):
        self.model, self.cfg, self.sampling, self.seed = model.to(device), cfg, sampling, seed
        self.device = device
        self.executor = build_executor(cfg.executor)
        self.train_set = TileBagDataset(train_refs, sampling, seed)
        self.sampler = EpochSubset(len(train_refs), cfg.slides_per_epoch, seed)
        iters = math.ceil(len(self.sampler) / cfg.accumulation)  # optimiser steps per epoch
        self.optimizer = build_optimizer(param_groups(model, cfg), cfg)
        self.schedule = build_scheduler(self.optimizer, cfg, iters)
        use_scaler = cfg.amp and device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda") if use_scaler else None
        self.ctx = StepContext(
            loss_scale=1.0 / cfg.accumulation,
            scaler=self.scaler,
            autocast=autocast_factory(device, cfg.amp),
            train_encoder=cfg.encoder == "trained",
            device=device,
        )
        self.class_weights = None if class_weights is None else class_weights.to(device)
        warn_if_emulated(device.type, cfg.amp)

    # ---------------------------------------------------------------- state for checkpoints
    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "scaler": None if self.scaler is None else self.scaler.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        if self.scaler is not None and state.get("scaler") is not None:
            self.scaler.load_state_dict(state["scaler"])

    def loss_fn(self, out, label):
        return self.model.aggregator.loss(out, label, self.class_weights)

    # ---------------------------------------------------------------- one optimiser step
    def _optimiser_step(self) -> None:
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if self.scaler is not None:
            if self.cfg.grad_clip > 0:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            if self.cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.schedule.step_iteration()

    def train_epoch(self, epoch: int, workers: int | None = None) -> dict:
        """One pass over this epoch's slide subset; returns train_loss, seconds and throughput."""
        cfg = self.cfg
        self.train_set.set_epoch(epoch)
        self.sampler.set_epoch(epoch)
        # Dropout (aggregator) draws from torch's global generator: seeded per epoch, so a resumed
        # run continues exactly.
        torch.manual_seed(self.seed * 100_003 + epoch)
        set_train_mode(self.model, cfg)
        loader = bag_loader(self.train_set, workers=cfg.workers if workers is None else workers, sampler=self.sampler)
        losses, n_tiles = [], 0
        t0 = time.perf_counter()
        wait = 0.0
        self.optimizer.zero_grad(set_to_none=True)
        n = len(self.sampler)
        t_wait = time.perf_counter()
        steps = tqdm(loader, total=n, desc=f"tilebag epoch {epoch + 1}/{cfg.epochs}", leave=False, disable=None)
        for step, item in enumerate(steps, 1):
            wait += time.perf_counter() - t_wait
            item = check_item(item)
            result = self.executor.step(
                item["tiles"],
                self.model.encoder,
                self.model.aggregator,
                torch.tensor(item["label"]),
                self.loss_fn,
                self.ctx,
            )
            if not math.isfinite(result.loss):
                raise TrainingError(
                    f"tile-bag training: loss is {result.loss} on slide {item['slide_id']} "
                    f"in epoch {epoch + 1}; expected a finite loss (lower lr or enable grad_clip)"
                )
            losses.append(result.loss)
            n_tiles += result.n_tiles
            if step % cfg.accumulation == 0 or step == n:
                self._optimiser_step()
            t_wait = time.perf_counter()
        seconds = time.perf_counter() - t0
        return {
            "train_loss": float(np.mean(losses)),
            "train_seconds": seconds,
            "loader_wait_seconds": wait,
            "tiles_per_second": n_tiles / max(seconds, 1e-9),
            **logged_rates(self.optimizer),
        }

    # ---------------------------------------------------------------- evaluation
    @torch.no_grad()
    def predict(
        self,
        refs: list[SlideRef],
        mode: str | None = None,
        repeats: int | None = None,
        seed: int | None = None,
        workers: int | None = None,
    ) -> Prediction:
        """Probabilities of every slide of `refs`: all tiles in chunks, or R seeded repeats of K tiles.

        Under `eval_bn: bag` each slide's tiles are normalised with all its tiles' statistics, in one or
        several passes over its chunks (slide_norm.py)."""
        cfg = self.cfg
        mode = mode or cfg.eval_tiles
        repeats = repeats or (cfg.eval_repeats if mode == "sampled" else 1)
        sampling = BagSampling(**{**self.sampling.__dict__, "k": cfg.eval_k or cfg.k, "augment": False})
        self.model.eval()
        encoder = SlideNormEncoder(self.model.encoder, bag=cfg.eval_bn == "bag")
        bags = EvalBags(
            refs,
            sampling,
            mode=mode,
            chunk=cfg.eval_chunk,
            repeats=repeats,
            seed=self.seed if seed is None else seed,
            passes=encoder.plan(cfg.eval_chunk),
        )
        collector = PredictionCollector(len(refs), self.class_weights)
        chunks: list[torch.Tensor] = []
        chunk_coords: list[np.ndarray] = []
        autocast = autocast_factory(self.device, cfg.amp)
        loader = bag_loader(bags, workers=cfg.workers if workers is None else workers)
        for item in loader:
            item = check_item(item)
            with autocast():
                features = encoder.encode(item["tiles"].to(self.device), item["pass"], item["passes"])  # (B, D)
            if features is not None:
                chunks.append(full_precision(features))
                chunk_coords.append(item["coords"].numpy())
            if not item["last"]:
                continue
            encoder.end_pass(item["pass"], item["passes"])
            if item["pass"] < item["passes"] - 1:
                continue
            out = self.model.aggregator(torch.cat(chunks))  # features (N, D)
            collector.add(
                self.model.aggregator,
                out,
                item["label"],
                self.device,
                item["slide_id"],
                item["index"],
                max(item["repeat"], 0),
                lambda done=chunk_coords: np.concatenate(done),
            )
            chunks, chunk_coords = [], []
        return collector.result(repeats)

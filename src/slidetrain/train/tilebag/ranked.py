"""The tile-bag trainer on ranks (`executor: distributed`): the loop of trainer.py, the engine of distributed.py.

Launched by torchrun, one process per rank; every rank runs `fit_tilebag` with the same arguments::

    torchrun --standalone --nproc-per-node 3 --no-python slidetrain train-tilebag \\
        --params '{"executor": "distributed", "k": 16, ...}' ... --out RUN_DIR

Rank 0 holds the aggregator and its optimiser, ranks 1..N the encoder in DDP (DistributedEngine).
Data: every rank iterates the same seeded slide order (EpochSubset); encoder rank r reads only
its share `split_bag(K, N)[r - 1]` of each slide's K tiles (TileBagDataset(share=...): the same
draw and augmentation as one process, so the shares together are exactly `plain`'s bag); rank 0
reads no pixels, only the labels (through a DataLoader all the same, so that it draws from
torch's generator what `plain` draws and the aggregator's dropout masks match). Validation runs on
the same ranks: each encoder rank encodes its share of every slide's evaluation tiles with an
eval-mode copy of its encoder (BatchNorm running statistics, or under `eval_bn: bag` statistics
merged over every encoder rank's tiles of the slide, as one process's), rank 0 gathers them and
scores the slide. Metrics are broadcast from rank 0, so
every rank takes the same selection and early-stopping decisions; rank 0 writes the checkpoint
(every rank's state, gathered), history.csv and the run files; a rerun resumes every rank from it.

Equal to `plain` (the same weights and losses up to rounding) with `sync_bn: true`; with the
default `sync_bn: false`, as the authors' script, each encoder rank's BatchNorm normalises its own
k = K / N tiles (tests/test_tilebag_ranked.py checks both).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from slidetrain.data.tilebag import (
    BagSampling,
    EpochSubset,
    EvalBags,
    SlideRef,
    TileBagDataset,
    bag_loader,
    check_item,
    read_coords,
    sample_indices,
)
from slidetrain.errors import ConfigError, TrainingError
from slidetrain.models.encoders import build_encoder
from slidetrain.train import common
from slidetrain.train.cpu_bf16 import warn_if_emulated
from slidetrain.train.optim import build_optimizer, build_scheduler
from slidetrain.train.tilebag.distributed_executor import DistributedEngine, Topology, split_bag
from slidetrain.train.tilebag.encoder_stages import encoder_groups, freeze_first_blocks
from slidetrain.train.tilebag.executors import full_precision
from slidetrain.train.tilebag.model import (
    TileBagConfig,
    TileBagModel,
    logged_rates,
)
from slidetrain.train.tilebag.slide_norm import SlideNormEncoder
from slidetrain.train.tilebag.trainer import Prediction, PredictionCollector


def before_step(rank: int, step: int) -> None:
    """Runs on every rank before each training step (1-based); a no-op.

    An extension point, looked up at call time: the tests replace it (tests/_entry.py) to kill or
    hang one rank at one step."""


@dataclass(frozen=True)
class RankShare:
    """Encoder rank `index` (0-based among N)'s contiguous share of n tiles (picklable for workers)."""

    n_ranks: int
    index: int

    def __call__(self, n: int) -> slice:
        return split_bag(n, self.n_ranks)[self.index]


class RankedTileBagTrainer:
    """TileBagTrainer's interface (train_epoch, predict, state_dict, schedule) across the ranks."""

    def __init__(
        self,
        topo: Topology,
        model: TileBagModel,
        cfg: TileBagConfig,
        sampling: BagSampling,
        train_refs: list[SlideRef],
        seed: int,
        class_weights: torch.Tensor | None = None,
    ):
        if cfg.encoder != "trained":
            raise ConfigError(
                "executor: distributed trains the encoder on its ranks; encoder: frozen runs in "
                "one process (executor: plain)"
            )
        if cfg.k < topo.n_encoders:
            raise ConfigError(
                f"k: {cfg.k} tiles cannot be shared by {topo.n_encoders} encoder ranks; expected k >= {topo.n_encoders}"
            )
        self.topo, self.cfg, self.sampling, self.seed = topo, cfg, sampling, seed
        self.primary = topo.is_aggregator
        self.device = topo.device
        self.rank_share = None if self.primary else RankShare(topo.n_encoders, topo.rank - 1)
        self.train_set = TileBagDataset(
            train_refs, sampling, seed, share=None if self.primary else self.rank_share(cfg.k), read=not self.primary
        )
        self.sampler = EpochSubset(len(train_refs), cfg.slides_per_epoch, seed)
        self.class_weights = None if class_weights is None else class_weights.to(self.device)
        part = "aggregator" if self.primary else "encoder"
        lr = (cfg.lr_aggregator if self.primary else cfg.lr_encoder) or cfg.lr

        def make_optimizer(module: torch.nn.Module) -> torch.optim.Optimizer:
            # this side's parameter group of param_groups(model, cfg), over the engine's module (SyncBN
            # conversion replaces BatchNorm parameters)
            if part == "encoder":
                return build_optimizer(encoder_groups(module, lr, cfg.layer_decay), cfg)
            return build_optimizer([{"params": list(module.parameters()), "lr": lr, "part": part}], cfg)

        self.engine = DistributedEngine(
            topo, model.encoder, model.aggregator, self.loss_fn, make_optimizer, amp=cfg.amp, sync_bn=cfg.sync_bn
        )
        self.optimizer = self.engine.optimizer
        self.schedule = build_scheduler(self.optimizer, cfg, math.ceil(len(self.sampler) / cfg.accumulation))
        self.step_count = 0  # slides seen in this process, for the collectives' error messages
        if not self.primary:  # the encoder ranks run the convolutions
            warn_if_emulated(self.device.type, cfg.amp)

    def loss_fn(self, out, label):
        return self.engine.aggregator.loss(out, label, self.class_weights)

    # ---------------------------------------------------------------- collectives of the run loop
    def broadcast(self, obj):
        """Rank 0's `obj` on every rank (metrics: the run loop decides alike everywhere)."""
        box = [obj]
        with self.engine.comm.guard("metrics broadcast"):
            dist.broadcast_object_list(box, src=0)
        return box[0]

    def state_dict(self) -> dict | None:
        """Every rank's engine state and schedule, gathered to rank 0 (None on the other ranks)."""
        parts = self.engine.gather_state({"schedule": self.schedule.state_dict()})
        return None if parts is None else {"world_size": self.topo.world_size, "ranks": parts}

    def load_state_dict(self, state: dict) -> None:
        extra = self.engine.restore_state(state["ranks"], state["world_size"])
        self.schedule.load_state_dict(extra["schedule"])

    def snapshot(self) -> dict | None:
        """The whole TileBagModel's state dict on rank 0 (the encoder's from rank 1), None elsewhere."""
        mine = None
        if self.topo.rank in (0, 1):
            prefix = "aggregator." if self.primary else "encoder."
            mine = {prefix + k: v.detach().cpu().clone() for k, v in self.engine.model.state_dict().items()}
        parts = [None] * self.topo.world_size if self.primary else None
        with self.engine.comm.guard("model gather"):
            dist.gather_object(mine, parts, dst=0)
        return {**parts[1], **parts[0]} if self.primary else None

    def stop_hook(self, epochs_done: int) -> None:
        """`after_epoch_checkpoint` on every rank only once rank 0's checkpoint is on disk."""
        self.engine.comm.barrier("epoch end")
        common.after_epoch_checkpoint(epochs_done)

    # ---------------------------------------------------------------- training
    def train_epoch(self, epoch: int) -> dict:
        cfg = self.cfg
        self.train_set.set_epoch(epoch)
        self.sampler.set_epoch(epoch)
        torch.manual_seed(self.seed * 100_003 + epoch)  # as TileBagTrainer: the aggregator's dropout
        # rank 0 reads nothing: no reader processes there
        loader = bag_loader(self.train_set, workers=0 if self.primary else cfg.workers, sampler=self.sampler)
        n = len(self.sampler)
        losses, wait = [], 0.0
        t0 = t_wait = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        for step, item in enumerate(loader, 1):
            wait += time.perf_counter() - t_wait
            item = check_item(item)
            self.step_count += 1
            before_step(self.topo.rank, self.step_count)
            loss = self.engine.forward_backward(
                None if self.primary else item["tiles"],
                torch.tensor(item["label"]),
                self.step_count,
                loss_scale=1.0 / cfg.accumulation,
            )
            if self.primary:
                if not math.isfinite(loss):
                    raise TrainingError(
                        f"tile-bag training: loss is {loss} on slide {item['slide_id']} in epoch "
                        f"{epoch + 1}; expected a finite loss (lower lr or enable grad_clip)"
                    )
                losses.append(loss)
            if step % cfg.accumulation == 0 or step == n:
                self.engine.optimizer_step(cfg.grad_clip)
                self.schedule.step_iteration()
            t_wait = time.perf_counter()
        seconds = time.perf_counter() - t0
        row = None
        if self.primary:
            row = {
                "train_loss": float(np.mean(losses)),
                "train_seconds": seconds,
                "loader_wait_seconds": wait,
                "tiles_per_second": n * cfg.k / max(seconds, 1e-9),
                **logged_rates(self.optimizer),
            }
        return self.broadcast(row)

    # ---------------------------------------------------------------- evaluation on the same ranks
    def _eval_encoder(self) -> SlideNormEncoder:
        """A plain eval-mode copy of this rank's encoder (no SyncBN, no DDP: ranks encode different chunk
        counts); under `eval_bn: bag` its BatchNorm statistics span every encoder rank's tiles of the slide,
        as one process's span all of them."""
        encoder = build_encoder(self.cfg.backbone, "none", seed=self.seed)  # weights come from the trained state below
        encoder.load_state_dict(self.engine.model.state_dict())
        freeze_first_blocks(encoder, self.cfg.freeze_blocks)  # their BatchNorm keeps running statistics, as in training
        return SlideNormEncoder(encoder.to(self.device), bag=self.cfg.eval_bn == "bag", gather=self._gather_moments)

    def _gather_moments(self, mine: torch.Tensor) -> list[torch.Tensor]:
        """Every encoder rank's packed BatchNorm moments (1 + 2C,), in rank order (all_gather, encoder group)."""
        mine = mine.to(self.topo.comm_device)
        out = [torch.empty_like(mine) for _ in range(self.topo.n_encoders)]
        with self.engine.comm.guard("slide BatchNorm statistics (all_gather)"):
            dist.all_gather(out, mine, group=self.topo.encoder_group)
        return out

    @torch.no_grad()
    def predict(
        self,
        refs: list[SlideRef],
        mode: str | None = None,
        repeats: int | None = None,
        seed: int | None = None,
        workers: int | None = None,
    ) -> Prediction | None:
        """TileBagTrainer.predict across the ranks: the Prediction on rank 0, None elsewhere."""
        cfg = self.cfg
        mode = mode or cfg.eval_tiles
        repeats = repeats or (cfg.eval_repeats if mode == "sampled" else 1)
        seed = self.seed if seed is None else seed
        sampling = BagSampling(**{**self.sampling.__dict__, "k": cfg.eval_k or cfg.k, "augment": False})
        if not self.primary:
            self._encode_shares(refs, sampling, mode, repeats, seed, cfg.workers if workers is None else workers)
            return None
        collector = PredictionCollector(len(refs), self.class_weights)
        # the order of EvalBags' items: slide by slide, each slide's repeats in turn
        for i, ref in enumerate(refs):
            for r in range(repeats):
                self.step_count += 1
                out = self.engine.predict_features(None, self.step_count)

                def scored(ref=ref, i=i) -> np.ndarray:  # the tiles the encoder ranks read
                    all_xy = read_coords(ref)
                    return (
                        all_xy
                        if mode == "all"
                        else all_xy[sample_indices(len(all_xy), sampling.k, np.random.default_rng([seed, 0, i]))]
                    )

                collector.add(self.engine.aggregator, out, ref.label, self.device, ref.slide_id, i, r, scored)
        return collector.result(repeats)

    def _encode_shares(self, refs, sampling, mode, repeats, seed, workers) -> None:
        encoder = self._eval_encoder()
        # the plan knows every rank's share size, so all ranks take the same passes over a slide
        plan = encoder.plan(self.cfg.eval_chunk, self.topo.n_encoders)
        bags = EvalBags(
            refs,
            sampling,
            mode=mode,
            chunk=self.cfg.eval_chunk,
            repeats=repeats,
            seed=seed,
            share=self.rank_share,
            passes=plan,
        )
        chunks: list[torch.Tensor] = []
        for item in bag_loader(bags, workers=workers):
            item = check_item(item)
            with self.engine.autocast():
                features = encoder.encode(item["tiles"].to(self.device), item["pass"], item["passes"])  # (c, D)
            if features is not None:
                chunks.append(full_precision(features))
            if item["last"]:
                encoder.end_pass(item["pass"], item["passes"])
            if item["last"] and item["pass"] == item["passes"] - 1:
                self.step_count += 1
                self.engine.predict_features(torch.cat(chunks), self.step_count)  # (k_r, D) to rank 0
                chunks = []

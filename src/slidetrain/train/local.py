"""Whole-image learners: locally supervised learning (Zhang et al., MICCAI 2022) and plain E2E.

A whole-image learner trains on one whole slide image (3, H, W) at a time and
keeps its own optimiser(s); the training loop only feeds slides and calls
`step` every `accumulation` slides of an epoch (as the authors' code: no extra
step at the end of an epoch; the gradients of an epoch's last
n_train % accumulation slides join the next epoch's first step)::

    learner = build_learner("local_k4", n_classes=2, params={"epochs": 55}, device=device)
    learner.calibrate_batchnorm(normalise(image) for image in train_slides)  # calibrate_bn only
    for epoch in range(cfg.epochs):
        for i, (image, label) in enumerate(train_slides, 1):
            losses = learner.train_slide(normalise(augment_slide(image, rng)), label)
            if i % cfg.accumulation == 0:
                learner.step()
        learner.end_epoch(epoch, val_loss)
    probs = learner.predict(normalise(image))          # (C,)

Methods: local_k4, local_k8 (RFR on), local_k4_norfr, local_k8_norfr (the
RFR ablation) and e2e (the same backbone and head trained with end-to-end
backprop: the memory reference). Other whole-image learners (StreamingCNN)
plug in with `register_learner`.

Where the authors' paper and code differ (defaults = code):

| key | code (default) | paper |
|---|---|---|
| schedule | "simultaneous": per slide, module k forward, its local loss backward, output detached and fed to module k+1 | "sequential": train F1, freeze it, then F2, ... |
| lr_backbone / lr_heads | 1e-5 (2e-5 * 0.5) / 2e-5 | 1e-5 / 2e-5 |
| weight_decay | 1e-2 | 1e-6 |
| epochs / scheduler | 55, x0.1 at epochs 25, 35, 45 (the README's training command) | "plateau", factor 0.1 |
| classifier norm | GroupNorm(C, C) ("group") | "norm": "batch" is an option |

The code's options defaults (80 epochs, x0.1 at 40 and 60) are the other
published schedule: `epochs: 80, step_milestones: [40, 60]`. (The authors'
first commit had StepLR(60), i.e. a constant rate over 55 epochs.)

`calibrate_bn` (default off: the reference starts from ImageNet statistics)
sets every backbone BatchNorm's running statistics once, before training, from
the normalised training slides, and keeps them frozen afterwards as the method
does. A randomly initialised backbone (`weights: none`) has identity
statistics, under which its activations grow by orders of magnitude per stage.

Out-of-memory: the authors crop 1/6 off each edge, retry once and then
return a zero loss (the slide is silently skipped). Here `on_oom="error"`
raises `SlideOOMError` naming the image size, and `on_oom="crop"` crops and
retries up to `oom_retries` times, reports the size trained on in the
returned dict, and raises if it still does not fit. Gradients of a failed
attempt are discarded, so a retry never double-counts a module.
"""

from __future__ import annotations

import abc
import gc
import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from torch import Tensor, nn

from slidetrain.configs.image import (  # noqa: F401 (re-exported)
    ConfigKeyError,
    E2EConfig,
    LocalConfig,
    WholeImageConfig,
    build_config,
)
from slidetrain.errors import ConfigError, SlidetrainError
from slidetrain.models.local import E2ENet, LocalNet
from slidetrain.train.optim import build_scheduler

#: normalisation statistics of TCGA slides at 5x used by the authors
TCGA_MEAN: tuple[float, float, float] = (0.7223, 0.5304, 0.6579)
TCGA_STD: tuple[float, float, float] = (0.2057, 0.2471, 0.2010)


class SlideOOMError(SlidetrainError):
    """A slide did not fit in memory (after the allowed crops)."""


def augment_slide(
    image: Tensor,
    rng: torch.Generator,
    *,
    crop_p: float = 0.6,
    crop_scale: tuple[float, float] = (0.5, 1.0),
    crop_scale_small: tuple[float, float] = (0.9, 1.0),
    small_side: int = 3000,
    flip_p: float = 0.75,
    rot90_p: float = 0.5,
    jitter: float = 0.1,
    jitter_p: float = 0.5,
) -> Tensor:
    """The authors' training augmentation on an RGB (3, H, W) float image in [0, 1], BEFORE normalisation.

    - edge crop (p=crop_p): each side keeps a uniform fraction of crop_scale
      (crop_scale_small for sides shorter than small_side px), at a random
      place; no resizing.
    - flip (p=flip_p): horizontal, vertical or both, equally likely.
    - rot90 (p=rot90_p): 0-3 quarter turns.
    - colour jitter (p=jitter_p): brightness, contrast, saturation in
      1 +- jitter and hue +- jitter, in random order.

    Every draw comes from `rng`, so a seeded generator reproduces the result.
    """

    def uniform(lo: float, hi: float) -> float:
        return lo + (hi - lo) * torch.rand((), generator=rng).item()

    def coin(p: float) -> bool:
        return torch.rand((), generator=rng).item() < p

    def randint(lo: int, hi: int) -> int:  # inclusive
        return int(torch.randint(lo, hi + 1, (), generator=rng).item())

    _, height, width = image.shape
    if coin(crop_p):
        keep = []
        for side in (height, width):
            lo, hi = crop_scale if side >= small_side else crop_scale_small
            keep.append(max(1, min(side, round(uniform(lo, hi) * side))))
        top, left = randint(0, height - keep[0]), randint(0, width - keep[1])
        image = image[:, top : top + keep[0], left : left + keep[1]]
    if coin(flip_p):
        image = image.flip(((2,), (1,), (1, 2))[randint(0, 2)])
    if coin(rot90_p):
        image = torch.rot90(image, randint(0, 3), dims=(1, 2))
    if jitter > 0 and coin(jitter_p):
        ops = [
            (TF.adjust_brightness, uniform(1 - jitter, 1 + jitter)),
            (TF.adjust_contrast, uniform(1 - jitter, 1 + jitter)),
            (TF.adjust_saturation, uniform(1 - jitter, 1 + jitter)),
            (TF.adjust_hue, uniform(-min(jitter, 0.5), min(jitter, 0.5))),
        ]
        for i in torch.randperm(len(ops), generator=rng).tolist():
            fn, factor = ops[i]
            image = fn(image, factor)
        image = image.clamp(0.0, 1.0)
    return image.contiguous()


def normalise(
    image: Tensor, mean: Iterable[float] = TCGA_MEAN, std: Iterable[float] = TCGA_STD
) -> Tensor:
    """(3, H, W) RGB in [0, 1] -> per-channel standardised float."""
    m = torch.as_tensor(tuple(mean), dtype=image.dtype, device=image.device).view(3, 1, 1)
    s = torch.as_tensor(tuple(std), dtype=image.dtype, device=image.device).view(3, 1, 1)
    return (image - m) / s


def channel_stats(
    images: Iterable[Tensor], rows_per_chunk: int = 512
) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Per-channel (mean, std) over every pixel of `images` ((3, H, W), float in [0, 1] or uint8).

    Pixel-weighted (a large slide counts more than a small one), summed in
    float64 over row chunks so a whole slide is never copied to float64.
    Use the training slides only.
    """
    s1 = torch.zeros(3, dtype=torch.float64)
    s2 = torch.zeros(3, dtype=torch.float64)
    n = 0
    for image in images:
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"channel_stats: expected (3, H, W) images, got {tuple(image.shape)}")
        scale = 1.0 / 255.0 if image.dtype == torch.uint8 else 1.0
        for rows in image.split(rows_per_chunk, dim=1):
            r = rows.to(torch.float64) * scale  # (3, h, W)
            s1 += r.sum(dim=(1, 2))
            s2 += (r * r).sum(dim=(1, 2))
            n += r.shape[1] * r.shape[2]
    if n == 0:
        raise SlidetrainError("channel_stats: no pixels (empty list of training slides?)")
    mean = s1 / n
    std = (s2 / n - mean * mean).clamp_min(0).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())


def is_oom_error(err: BaseException) -> bool:
    """True for CUDA and CPU allocator out-of-memory errors."""
    if isinstance(err, torch.OutOfMemoryError):
        return True
    msg = str(err)
    return isinstance(err, RuntimeError) and (
        "out of memory" in msg or "can't allocate memory" in msg or "not enough memory" in msg
    )


def crop_edges(image: Tensor, fraction: float = 1 / 6) -> Tensor:
    """(3, H, W) -> the centre with `fraction` of each side cut off each edge (the authors' OOM retry)."""
    _, height, width = image.shape
    dh, dw = int(height * fraction), int(width * fraction)
    return image[:, dh : height - dh, dw : width - dw]


@torch.no_grad()
def calibrate_batchnorm(root: nn.Module, run: Callable[[Tensor], Any], images: Iterable[Tensor]) -> int:
    """Set the running statistics of every BatchNorm under `root` from `images`; returns their count.

    Each BN's statistics are reset and replaced by the cumulative average
    (momentum None) of the per-image statistics it sees while `run(image)`
    runs with the BNs in training mode (so each layer sees the inputs its
    calibrated predecessors give it); then every BN is back in eval mode with
    its momentum restored: the statistics stay frozen during training.
    """
    bns = [m for m in root.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    n = 0
    try:
        for image in images:
            run(image)
            n += 1
    finally:
        for m, momentum in zip(bns, momenta, strict=True):
            m.momentum = momentum
            m.eval()
    if n == 0:
        raise SlidetrainError("calibrate_bn: no training slides to calibrate BatchNorm on")
    return n


def grads_of(net: nn.Module) -> dict[str, Tensor]:
    """Pending (accumulated, not yet stepped) gradients by parameter name, for an exact resume."""
    return {n: p.grad.detach().clone() for n, p in net.named_parameters() if p.grad is not None}


def load_grads(net: nn.Module, grads: dict[str, Tensor]) -> None:
    for name, p in net.named_parameters():
        p.grad = grads[name].to(p.device) if name in grads else None


# --------------------------------------------------------------------------- learners


class WholeImageLearner(abc.ABC):
    """What the training loop needs from a whole-image learner.

    - `train_slide(image, label)`: forward + backward for one (3, H, W)
      normalised slide; gradients ACCUMULATE (each loss scaled by
      1/accumulation). Returns float losses ({"m1_ce", "m1_rfr", ...,
      "final_ce", "loss"} for local learning) plus "image_h", "image_w"
      (the size trained on) and "oom_crops".
    - `step()`: optimiser step(s) + zero_grad; called every `accumulation`
      slides of an epoch (no extra step at its end: the rest carries over).
    - `calibrate_batchnorm(images)`: (learners whose config has
      `calibrate_bn`) BatchNorm statistics from the normalised training
      slides, once before the first epoch.
    - `end_epoch(epoch, val_loss)`: schedulers (and schedule stages);
      epoch counts from 0.
    - `predict(image)`: (C,) class probabilities (on the CPU) from the final head.
    - `state_dict()` / `load_state_dict()`: everything needed for an exact
      resume (model, optimisers, schedulers, schedule position, RNG of the
      learner); the loop restores torch's global RNG (dropout) itself.
    """

    cfg: Any

    @abc.abstractmethod
    def __init__(self, n_classes: int, cfg: Any, device: torch.device | str = "cpu"): ...

    @abc.abstractmethod
    def train_slide(self, image: Tensor, label: int) -> dict[str, float]: ...

    @abc.abstractmethod
    def step(self) -> None: ...

    @abc.abstractmethod
    def end_epoch(self, epoch: int, val_loss: float | None) -> None: ...

    @abc.abstractmethod
    def predict(self, image: Tensor) -> Tensor: ...

    @abc.abstractmethod
    def state_dict(self) -> dict: ...

    @abc.abstractmethod
    def load_state_dict(self, state: dict) -> None: ...

    #: keys of `state_dict` that only training needs (optimiser moments, schedule, pending gradients)
    TRAINING_ONLY_KEYS = ("optimizer", "scheduler", "generator", "grads", "scaler")

    def weights_state_dict(self) -> dict:
        """`state_dict` without what only training needs: what prediction loads (`load_weights`).

        The selected epoch's state and model.pt keep this; with Adam's two moments and the pending
        gradients the full state is about four times the weights, and copying and writing it every
        epoch cost ~8 s per epoch of a ResNet34 learner on this CPU."""
        return {k: v for k, v in self.state_dict().items() if k not in self.TRAINING_ONLY_KEYS}

    @abc.abstractmethod
    def load_weights(self, state: dict) -> None:
        """Load a `weights_state_dict` (or a full `state_dict`) for prediction."""

    def _check_learner_tag(self, state: dict) -> None:
        """A state carries its learner's class name ("learner"); refuse one written by another learner."""
        if state.get("learner") != type(self).__name__:
            raise ConfigError(
                f"checkpoint: written by {state.get('learner')!r}, cannot resume a {type(self).__name__}"
            )


class _ResNetLearner(WholeImageLearner):
    """Shared machinery of LocalLearner and E2ELearner: optimiser, schedule, OOM policy, checkpoints."""

    net: nn.Module

    def __init__(self, n_classes: int, cfg: WholeImageConfig, device: torch.device | str = "cpu"):
        if n_classes < 2:
            raise ConfigError(f"n_classes: expected >= 2, got {n_classes}")
        self.n_classes = n_classes
        self.cfg = cfg
        self.device = torch.device(device)
        self.net = self._build_net().to(self.device)
        self.class_weights: Tensor | None = None
        if cfg.class_weights is not None:
            if len(cfg.class_weights) != n_classes:
                raise ConfigKeyError(
                    "class_weights",
                    f"expected {n_classes} weights (one per class), got {cfg.class_weights}",
                )
            self.class_weights = torch.tensor(
                cfg.class_weights, dtype=torch.float32, device=self.device
            )
        backbone = [p for p in self.net.backbone.parameters() if p.requires_grad]  # stem excluded
        ids = {id(p) for p in self.net.backbone.parameters()}
        heads = [p for p in self.net.parameters() if id(p) not in ids]
        groups = [
            {"params": backbone, "lr": cfg.lr_backbone, "name": "backbone"},
            {"params": heads, "lr": cfg.lr_heads, "name": "heads"},
        ]
        opt_cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
        self.optimizer = opt_cls(
            groups, lr=cfg.lr_heads, betas=cfg.betas, weight_decay=cfg.weight_decay
        )
        self.scheduler = build_scheduler(self.optimizer, cfg)
        # RFR crop positions; seeded from torch's seed so a seeded run is reproducible
        self.generator = torch.Generator().manual_seed(torch.initial_seed() % (2**63))

    # -- subclass hooks
    def _build_net(self) -> nn.Module:
        raise NotImplementedError

    def _forward_backward(self, prepared: list[Tensor], label: Tensor) -> dict[str, float]:
        """Forward + backward of one slide from `prepared.pop()`, the (1, C, H, W) output of
        `backbone.prepare`; popping leaves this method the only reference to it."""
        raise NotImplementedError

    def _set_train_mode(self) -> None:
        self.net.train()

    def _extra_state(self) -> dict:
        return {}

    def _load_extra_state(self, state: dict) -> None:
        pass

    # -- shared pieces
    def _backward(self, loss: Tensor) -> None:
        (loss / self.cfg.accumulation).backward()

    def _ce(self, logits: Tensor, label: Tensor) -> Tensor:
        """CE of one slide, times class_weights[label] when set.

        (torch's weighted *mean* over a batch of one slide divides the weight
        out again, so in the authors' code the class weights had no effect.)
        """
        loss = F.cross_entropy(logits.unsqueeze(0), label)
        if self.class_weights is not None:
            loss = loss * self.class_weights[label[0]]
        return loss

    def train_slide(self, image: Tensor, label: int) -> dict[str, float]:
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"train_slide: expected a (3, H, W) image, got {tuple(image.shape)}")
        self._set_train_mode()
        image = image.to(self.device, torch.float32)
        height, width = image.shape[1:]  # of the image trained on (a crop after a retry)
        size = f"{height}x{width} px (H x W)"
        target = torch.tensor([int(label)], device=self.device)
        # Gradients of earlier slides are set aside so that the partial
        # gradients of a failed (out-of-memory) attempt can be dropped.
        params = [p for p in self.net.parameters() if p.requires_grad]
        earlier = [p.grad for p in params]
        for p in params:
            p.grad = None
        crops = 0
        rng_state = self.generator.get_state()  # a retry samples the same RFR crops
        losses = None
        while losses is None:
            try:
                # The input of module 1 (a frozen stem's output, or the image) is handed over in
                # a list that _forward_backward pops, so that it holds the only reference and each
                # module's input is freed once that module is done. Without a retry to crop for,
                # the image is dropped too: a caller that passed a temporary then frees it here,
                # which local learning's peak (a few maps of the first module) feels most.
                prepared = [self.net.backbone.prepare(image[None])]
                if self.cfg.on_oom == "error":
                    image = None
                losses = self._forward_backward(prepared, target)
            except Exception as err:
                for p, g in zip(params, earlier, strict=True):
                    p.grad = g
                if not is_oom_error(err):
                    raise
                if self.cfg.on_oom == "error":
                    raise SlideOOMError(
                        f"out of memory training on a {size} image with {type(self).__name__} "
                        f"on {self.device}; set on_oom: crop to retry on the centre, or use a "
                        f"method that needs less memory (local_k8)"
                    ) from err
                if crops >= self.cfg.oom_retries or min(image.shape[1:]) < 6:
                    raise SlideOOMError(
                        f"out of memory training on a {size} image after {crops} crop(s) of 1/6 "
                        f"per edge (oom_retries={self.cfg.oom_retries}) on {self.device}"
                    ) from err
                for p in params:
                    p.grad = None
            if losses is None:  # outside the except block: the error's frames are released
                gc.collect()
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                image = crop_edges(image)
                height, width = image.shape[1:]
                size = f"{height}x{width} px (H x W)"
                crops += 1
                self.generator.set_state(rng_state)
        for p, g in zip(params, earlier, strict=True):
            if g is not None:
                if p.grad is None:
                    p.grad = g
                else:
                    p.grad.add_(g)
        losses.update(image_h=float(height), image_w=float(width), oom_crops=float(crops))
        return losses

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def calibrate_batchnorm(self, images: Iterable[Tensor]) -> int:
        """Backbone BN statistics from normalised (3, H, W) slides (`calibrate_batchnorm`)."""
        backbone = self.net.backbone
        return calibrate_batchnorm(
            backbone, lambda im: backbone(im.to(self.device, torch.float32)[None]), images
        )

    def end_epoch(self, epoch: int, val_loss: float | None) -> None:
        self.scheduler.step(val_loss)

    @torch.no_grad()
    def predict(self, image: Tensor) -> Tensor:
        self.net.eval()
        logits = self.net(image.to(self.device, torch.float32)[None])  # (C,)
        return torch.softmax(logits.float(), dim=0).cpu()

    def state_dict(self) -> dict:
        return {
            "learner": type(self).__name__,
            "model": self.net.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "generator": self.generator.get_state(),
            "grads": grads_of(self.net),  # accumulated since the last step (carried across epochs)
            **self._extra_state(),
        }

    def load_weights(self, state: dict) -> None:
        self._check_learner_tag(state)
        self._load_extra_state(state)
        self.net.load_state_dict(state["model"])

    def load_state_dict(self, state: dict) -> None:
        self.load_weights(state)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"])
        load_grads(self.net, state.get("grads", {}))


class LocalLearner(_ResNetLearner):
    """ResNet34 in K gradient-isolated modules, each trained by its own loss.

    Module k < K: alpha * RFR + aux CE; module K: CE of the final head. The
    stem is frozen; backbone BatchNorms stay in eval mode.

    schedule="simultaneous" (authors' code): per slide every module is trained;
    module k's output is detached before module k+1 sees it, so no gradient
    crosses a module boundary and only one module's graph is alive at a time.
    schedule="sequential" (paper): module 1 (with G1) for epochs_per_module
    epochs, then it is frozen (eval, requires_grad False, run under no_grad)
    and module 2 trains, ...; module K and the head train for the rest.
    One optimiser and one LR schedule span all stages.
    """

    cfg: LocalConfig
    net: LocalNet

    def __init__(self, n_classes: int, cfg: LocalConfig, device: torch.device | str = "cpu"):
        if not isinstance(cfg, LocalConfig):
            raise TypeError(f"LocalLearner needs a LocalConfig, got {type(cfg).__name__}")
        super().__init__(n_classes, cfg, device)
        self.sequential = cfg.schedule == "sequential"
        self.active = 1 if self.sequential else cfg.K  # module being trained (sequential)

    def _build_net(self) -> LocalNet:
        c = self.cfg
        return LocalNet(
            self.n_classes, c.K, c.weights, c.rfr, c.n_patch, c.head_norm,
            checkpointing=c.checkpointing, checkpoint_tile_px=c.checkpoint_tile_px,
        )

    def frozen_modules(self) -> list[int]:
        return list(range(1, self.active)) if self.sequential else []

    def _module_nets(self, k: int) -> list[nn.Module]:
        nets = self.net.backbone.module_blocks(k)
        return nets + ([self.net.aux[k - 1]] if k < self.cfg.K else [self.net.head])

    def _apply_freeze(self) -> None:
        for k in self.frozen_modules():
            for m in self._module_nets(k):
                for p in m.parameters():
                    p.requires_grad_(False)
                    p.grad = None

    def _set_train_mode(self) -> None:
        self.net.train()
        for k in self.frozen_modules():
            for m in self._module_nets(k):
                m.eval()

    def _forward_backward(self, prepared: list[Tensor], label: Tensor) -> dict[str, float]:
        K, backbone = self.cfg.K, self.net.backbone
        losses: dict[str, float] = {}
        total = 0.0
        x = prepared.pop()  # (1, 64, H/6, W/6): the frozen stem's output, no graph
        last = self.active if self.sequential else K
        for k in range(1, last + 1):
            if k < last and self.sequential:  # frozen
                with torch.no_grad():
                    x = backbone.run_module(k, x)
                continue
            out = backbone.run_module(k, x)  # (1, C_k, h, w); x carries no graph
            if k < K:
                aux = self.net.aux[k - 1]
                ce = self._ce(aux.classifier(out), label)
                loss = ce
                losses[f"m{k}_ce"] = ce.item()
                if aux.rfr is not None:
                    rec = aux.rfr(out, x, self.generator)
                    loss = loss + self.cfg.alpha * rec
                    losses[f"m{k}_rfr"] = rec.item()
            else:
                loss = self._ce(self.net.head(out), label)
                losses["final_ce"] = loss.item()
            self._backward(loss)
            total += loss.item()
            x = out.detach()  # the gradient boundary between module k and k+1
            del out, loss
        losses["loss"] = total
        return losses

    def end_epoch(self, epoch: int, val_loss: float | None) -> None:
        super().end_epoch(epoch, val_loss)
        if self.sequential:
            stage = min(self.cfg.K, (epoch + 1) // self.cfg.epochs_per_module + 1)
            if stage > self.active:
                self.active = stage
                self._apply_freeze()

    def _extra_state(self) -> dict:
        return {"K": self.cfg.K, "schedule": self.cfg.schedule, "active_module": self.active}

    def _load_extra_state(self, state: dict) -> None:
        if state.get("K") != self.cfg.K or state.get("schedule") != self.cfg.schedule:
            raise ConfigError(
                f"checkpoint: K={state.get('K')} schedule={state.get('schedule')!r}, "
                f"but this run has K={self.cfg.K} schedule={self.cfg.schedule!r}"
            )
        self.active = int(state["active_module"])
        self._apply_freeze()


class E2ELearner(_ResNetLearner):
    """The same backbone (BN in eval) and final head, trained by end-to-end backprop."""

    cfg: E2EConfig
    net: E2ENet

    def _build_net(self) -> E2ENet:
        c = self.cfg
        return E2ENet(
            self.n_classes, c.weights, c.head_norm, train_stem=c.stem == "trained",
            checkpointing=c.checkpointing, checkpoint_tile_px=c.checkpoint_tile_px,
        )

    def _forward_backward(self, prepared: list[Tensor], label: Tensor) -> dict[str, float]:
        loss = self._ce(self.net.forward_prepared(prepared.pop()), label)
        self._backward(loss)
        return {"final_ce": loss.item(), "loss": loss.item()}


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class LearnerSpec:
    config_cls: type
    learner_cls: Callable[..., WholeImageLearner]  # (n_classes, cfg, device) -> learner
    preset: dict[str, Any] = field(default_factory=dict)  # keys fixed by the method name


#: method name -> learner; `register_learner` adds one
LEARNERS: dict[str, LearnerSpec] = {}
#: modules imported on the first `build_learner` call, so their `register_learner`
#: calls run (e.g. "slidetrain.train.streaming" for StreamingCNN)
LEARNER_MODULES: list[str] = ["slidetrain.models.streamingcnn"]


def register_learner(
    method: str,
    config_cls: type,
    learner_cls: Callable[..., WholeImageLearner],
    preset: dict[str, Any] | None = None,
) -> None:
    if method in LEARNERS:
        raise ValueError(f"learner {method!r} registered twice")
    LEARNERS[method] = LearnerSpec(config_cls, learner_cls, dict(preset or {}))


register_learner("local_k4", LocalConfig, LocalLearner, {"K": 4})
register_learner("local_k8", LocalConfig, LocalLearner, {"K": 8})
register_learner("local_k4_norfr", LocalConfig, LocalLearner, {"K": 4, "rfr": False, "alpha": 0.0})
register_learner("local_k8_norfr", LocalConfig, LocalLearner, {"K": 8, "rfr": False, "alpha": 0.0})
register_learner("e2e", E2EConfig, E2ELearner)


def _load_learner_modules() -> None:
    for name in LEARNER_MODULES:
        importlib.import_module(name)


def whole_image_methods() -> list[str]:
    """Every registered whole-image method (the workflow routes these to the image trainer)."""
    _load_learner_modules()
    return sorted(LEARNERS)


def learner_config(method: str, params: dict | None = None) -> Any:
    """The validated config of `method`: defaults, then the method's preset, then `params`."""
    _load_learner_modules()
    if method not in LEARNERS:
        raise ConfigError(
            f"methods: unknown whole-image method {method!r}; expected one of {sorted(LEARNERS)}"
        )
    spec = LEARNERS[method]
    return build_config(spec.config_cls, spec.preset, params, f"methods.{method}")


def build_learner(
    method: str, n_classes: int, params: dict | None = None, device: torch.device | str = "cpu"
) -> WholeImageLearner:
    """A ready learner for `method` (params override the reference defaults)."""
    cfg = learner_config(method, params)
    try:
        return LEARNERS[method].learner_cls(n_classes, cfg, torch.device(device))
    except ConfigKeyError as err:
        raise ConfigError(f"methods.{method}.{err.key}: {err.detail}") from None


__all__ = [
    "LEARNERS",
    "LEARNER_MODULES",
    "TCGA_MEAN",
    "TCGA_STD",
    "E2EConfig",
    "E2ELearner",
    "LearnerSpec",
    "LocalConfig",
    "LocalLearner",
    "SlideOOMError",
    "WholeImageConfig",
    "WholeImageLearner",
    "whole_image_methods",
    "augment_slide",
    "build_learner",
    "calibrate_batchnorm",
    "channel_stats",
    "crop_edges",
    "is_oom_error",
    "learner_config",
    "normalise",
    "register_learner",
]

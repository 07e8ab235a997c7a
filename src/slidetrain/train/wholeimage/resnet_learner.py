"""The machinery shared by the ResNet34 whole-image learners (local learning, image E2E).

Optimiser, schedule, out-of-memory policy, checkpoints; the learners are in
`local_learner` (LocalLearner) and `image_e2e_learner` (ImageE2ELearner), and
registered in `registry`.

Out-of-memory: see `oom`. Gradients of a failed attempt are discarded, so a
retry never double-counts a module.
"""

from __future__ import annotations

import gc
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slidetrain.configs.image import ConfigKeyError, WholeImageConfig
from slidetrain.errors import ConfigError
from slidetrain.train.optim import build_scheduler
from slidetrain.train.wholeimage.batchnorm import calibrate_batchnorm
from slidetrain.train.wholeimage.interface import WholeImageLearner, grads_of, load_grads
from slidetrain.train.wholeimage.oom import SlideOOMError, crop_edges, is_oom_error


class ResNetLearner(WholeImageLearner):
    """Shared machinery of LocalLearner and ImageE2ELearner: optimiser, schedule, OOM policy, checkpoints."""

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
            self.class_weights = torch.tensor(cfg.class_weights, dtype=torch.float32, device=self.device)
        backbone = [p for p in self.net.backbone.parameters() if p.requires_grad]  # stem excluded
        ids = {id(p) for p in self.net.backbone.parameters()}
        heads = [p for p in self.net.parameters() if id(p) not in ids]
        groups = [
            {"params": backbone, "lr": cfg.lr_backbone, "name": "backbone"},
            {"params": heads, "lr": cfg.lr_heads, "name": "heads"},
        ]
        opt_cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
        self.optimizer = opt_cls(groups, lr=cfg.lr_heads, betas=cfg.betas, weight_decay=cfg.weight_decay)
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
    @property
    def dtype(self) -> torch.dtype:
        """The network's floating dtype (float32; float64 when a check casts it to compute exactly)."""
        return next(self.net.parameters()).dtype

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
        image = image.to(self.device, self.dtype)
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
        return calibrate_batchnorm(backbone, lambda im: backbone(im.to(self.device, self.dtype)[None]), images)

    def end_epoch(self, epoch: int, val_loss: float | None) -> None:
        self.scheduler.step(val_loss)

    @torch.no_grad()
    def predict(self, image: Tensor) -> Tensor:
        self.net.eval()
        logits = self.net(image.to(self.device, self.dtype)[None])  # (C,)
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

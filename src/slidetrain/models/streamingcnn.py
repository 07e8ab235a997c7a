"""StreamingCNN baseline (Pinckaers et al.): ResNet34 trained on the whole image, streamed.

The trunk conv1 .. layer3 runs through `slidetrain.partitioned.StreamingEngine`
(tile by tile forward under no_grad, tile by tile recomputation backward), so
its activations never exist for the whole image at once. The head, run
normally on the layer3 map, is layer4 + global max pool + Linear(512, C), as
in the authors' code (`net.avgpool = AdaptiveMaxPool2d(1)`, fc Xavier-normal,
bias 0).

Choices, following DIAGNijmegen/pathology-streaming-pipeline (REFERENCE_NOTES):

- Batch norm: every BN, streamed or not, is kept in eval mode (running
  statistics frozen: a tile cannot see the image's statistics). Its affine
  weight and bias stay trainable, as in the authors' code (they only call
  `.eval()` on BN modules).
- Split: `stream_until="layer3"` (default; REFERENCE_NOTES and the code's
  mixed-precision path) or `"layer4.0"` (the code's fp32 path streams the
  first layer4 block too).
- What trains: `train_all_layers=False` (default, the code's default): layer4
  and fc only (13.1 M parameters at C=2; with `stream_until="layer4.0"`
  layer4's first block is streamed and trained through the streaming
  backward). `train_all_layers=True`: the whole network end to end, as the
  paper describes its experiments.
- Precision: fp32 by default (the paper's setting; its memory figures are
  fp32). `amp=True` is the code's mixed precision: autocast fp16 with a
  gradient scaler on CUDA (bfloat16 autocast, no scaler, on a CPU).
- Class weights: the code has none; `class_weights` scales a slide's CE by
  the weight of its class, as the other whole-image learners do (torch's
  weighted mean over a batch of one slide would divide the weight out).
- `calibrate_bn` (default off; for a randomly initialised network): every BN's
  running statistics set once from the normalised training slides before
  training, by the plain (not streamed) network, then frozen.
- Optimiser: SGD momentum 0.9, lr 1e-4, effective batch 16 slides
  (accumulation 16), 50 epochs, no weight decay: the code's defaults.
- `tile_px` keeps StreamingCNN's meaning (input tile including overlap, 5120)
  under `tile_mode="total"`; `"core"` counts only the pixels a tile owns.

Example:
    learner = StreamingLearner(n_classes=2, cfg=StreamingConfig(tile_px=2048))
    for image, label in slides:  # image (3, H, W), normalised
        learner.train_slide(image, label)
        ...  # learner.step() every cfg.accumulation slides
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slidetrain.configs.image import StreamingConfig
from slidetrain.errors import ConfigError
from slidetrain.models.encoders import load_resnet
from slidetrain.partitioned import StreamingEngine
from slidetrain.train.optim import build_optimizer, build_scheduler
from slidetrain.train.wholeimage.batchnorm import calibrate_batchnorm
from slidetrain.train.wholeimage.interface import WholeImageLearner, grads_of, load_grads


def freeze_batchnorm(module: nn.Module) -> None:
    """Eval mode for every BN: running statistics frozen, affine parameters untouched."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


class StreamingResNet34(nn.Module):
    """ResNet34 as trunk (streamed) + head (layer4 rest, global max pool, Linear(512, C))."""

    def __init__(self, n_classes: int, weights: str = "none", stream_until: str = "layer3"):
        super().__init__()
        # seed for weights="none" drawn from the global RNG, so the run's seed decides the init
        seed = int(torch.randint(2**31 - 1, ()).item())
        net = load_resnet("resnet34", "ResNet34_Weights", weights, seed=seed)
        stem = [net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3]
        if stream_until == "layer4.0":
            self.trunk = nn.Sequential(*stem, net.layer4[0])
            rest = net.layer4[1:]
        else:
            self.trunk = nn.Sequential(*stem)
            rest = net.layer4
        fc = nn.Linear(512, n_classes)
        nn.init.xavier_normal_(fc.weight)
        nn.init.zeros_(fc.bias)
        self.head = nn.Sequential(rest, nn.AdaptiveMaxPool2d(1), nn.Flatten(1), fc)
        freeze_batchnorm(self)

    def train(self, mode: bool = True) -> StreamingResNet34:
        super().train(mode)
        freeze_batchnorm(self)
        return self

    def forward(self, x: Tensor) -> Tensor:  # x: (B, 3, H, W) -> (B, C); plain, not streamed
        return self.head(self.trunk(x))


class StreamingLearner(WholeImageLearner):
    """One slide at a time: streamed trunk forward, head forward/backward, streamed trunk backward.

    Same interface as the whole-image learners of `slidetrain.train.wholeimage`:
    `train_slide` accumulates gradients (loss / accumulation), `step` every
    `accumulation` slides, `end_epoch` steps the schedule, `predict` gives (C,)
    probabilities on the CPU, `state_dict` resumes exactly.
    """

    def __init__(self, n_classes: int, cfg: StreamingConfig, device: torch.device | str = "cpu"):
        if n_classes < 2:
            raise ConfigError(f"n_classes: expected >= 2, got {n_classes}")
        self.cfg, self.device = cfg, torch.device(device)
        self.model = StreamingResNet34(n_classes, cfg.weights, cfg.stream_until).to(self.device)
        if not cfg.train_all_layers:  # the code's default: layer4 + fc
            trained = self.model.trunk[-1] if cfg.stream_until == "layer4.0" else None
            for m in self.model.trunk:
                if m is not trained:
                    for p in m.parameters():
                        p.requires_grad_(False)
        # fp16 + loss scaling on CUDA; bfloat16 (no scaling needed) on a CPU
        self.amp_dtype = torch.float16 if self.device.type == "cuda" else torch.bfloat16
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.amp and self.device.type == "cuda")
        self.engine = StreamingEngine(self.model.trunk, cfg.tile_px, cfg.tile_mode, self.device)
        self.class_weights = None
        if cfg.class_weights is not None:
            if len(cfg.class_weights) != n_classes:
                raise ConfigError(
                    f"StreamingConfig.class_weights: expected {n_classes} weights, got {cfg.class_weights}"
                )
            self.class_weights = torch.tensor(cfg.class_weights, dtype=torch.float32, device=self.device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.params, cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg)
        self.optimizer.zero_grad(set_to_none=True)

    def train_slide(self, image: Tensor, label: int) -> dict[str, float]:
        """Add the gradients of this slide's CE / accumulation; the image stays on its device."""
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"train_slide: expected a (3, H, W) image, got {tuple(image.shape)}")
        self.model.train()  # BN stays frozen (StreamingResNet34.train)
        x = image.to(torch.float32)[None]  # (1, 3, H, W); crops move to the device one by one
        target = torch.tensor([int(label)], device=self.device)
        with self._autocast():
            fmap = self.engine.forward(x).to(self.device).requires_grad_()  # (1, 256, h, w)
            logits = self.model.head(fmap).float()  # (1, C)
        loss = F.cross_entropy(logits, target)
        if self.class_weights is not None:
            loss = loss * self.class_weights[target[0]]
        self.scaler.scale(loss / self.cfg.accumulation).backward()  # head grads + dL/dfmap
        if any(p.requires_grad for p in self.model.trunk.parameters()):
            with self._autocast():  # the recomputed tiles in the forward's precision
                self.engine.accumulate_grad(x, fmap.grad)  # trunk grads, tile by tile
        ce = float(loss.detach())
        return {"ce": ce, "loss": ce}  # "loss": the main loss every learner reports

    def _autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, self.amp_dtype, enabled=self.cfg.amp)

    def calibrate_batchnorm(self, images: Iterable[Tensor]) -> int:
        """Every BN's statistics from normalised (3, H, W) slides, by the plain network."""
        return calibrate_batchnorm(self.model, lambda im: self.model(im.to(self.device, torch.float32)[None]), images)

    def step(self) -> None:
        if self.cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        self.scaler.step(self.optimizer)  # skips a step with inf/nan gradients under fp16
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

    def end_epoch(self, epoch: int, val_loss: float | None) -> None:
        self.scheduler.step(val_loss)

    @torch.no_grad()
    def predict(self, image: Tensor) -> Tensor:
        """Class probabilities (C,), on the CPU, for one image (3, H, W)."""
        self.model.eval()
        with self._autocast():
            fmap = self.engine.forward(image.to(torch.float32)[None]).to(self.device)  # (1, 256, h, w)
            logits = self.model.head(fmap).float()  # (1, C)
        return torch.softmax(logits, dim=1)[0].cpu()

    def state_dict(self) -> dict:
        return {
            "learner": type(self).__name__,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "grads": grads_of(self.model),  # accumulated since the last step
        }

    def load_weights(self, state: dict) -> None:
        self._check_learner_tag(state)
        self.model.load_state_dict(state["model"])

    def load_state_dict(self, state: dict) -> None:
        self.load_weights(state)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        load_grads(self.model, state.get("grads", {}))


def _register() -> None:
    from slidetrain.train.wholeimage.registry import register_learner

    register_learner("streamingcnn", StreamingConfig, StreamingLearner)


_register()

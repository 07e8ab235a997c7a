"""The whole-image learners' config dataclasses, free of torch so the workflow validates cheaply.

The workflow checks each `methods` block at parse time, before any job runs; importing torch and
torchvision for that cost ~5 s per `snakemake` call. The learners (slidetrain.train.wholeimage,
slidetrain.models.streamingcnn) import their configs from here.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from slidetrain.errors import ConfigError

#: validation metrics a whole-image run may select its model on (history columns)
SELECTION_METRICS = ("val_loss", "val_auroc", "val_accuracy")
#: the authors' module cuts of ResNet34 (slidetrain.models.local)
ALLOWED_K = (4, 8)
#: activation checkpointing inside each module: none (plain autograd, the paper's memory) |
#: blocks (each residual block recomputed in the backward, torch.utils.checkpoint) | tiles (the
#: module's forward run tile by tile without a graph and recomputed tile by tile in its
#: backward, `partitioned.StreamingEngine`; needs eval-mode BatchNorm, which the backbone keeps)
CHECKPOINTING = ("none", "blocks", "tiles")
#: StreamingCNN: where the streamed trunk ends, and the choices of its keys
STREAM_SPLITS = ("layer3", "layer4.0")
STREAM_TILE_MODES = ("total", "core")  # slidetrain.partitioned.streaming.TILE_MODES (a test pins it)
STREAM_OPTIMIZERS = ("sgd", "adam", "adamw")
STREAM_SCHEDULERS = ("none", "cosine", "step", "plateau")


class ConfigKeyError(ConfigError):
    """A bad value for one config key; `key` is prefixed with the method's path by `build_learner`."""

    def __init__(self, key: str, detail: str):
        self.key, self.detail = key, detail
        super().__init__(f"{key}: {detail}")


@dataclass
class WholeImageConfig:
    """Keys shared by every whole-image learner (image_e2e uses exactly these)."""

    epochs: int = 55  # the authors' README training command (their options default: 80)
    weights: str = "none"  # none | imagenet | path to a ResNet34 state dict
    lr_backbone: float = 1e-5  # paper 1e-5; code 2e-5 * lr-factor 0.5
    lr_heads: float = 2e-5  # auxiliary nets and final head
    weight_decay: float = 1e-2  # code; the paper says 1e-6
    betas: tuple[float, float] = (0.9, 0.999)
    optimizer: str = "adamw"  # adamw | adam
    scheduler: str = "step"  # none | step | plateau | cosine (stepped once per epoch)
    # the authors' README command; their options default: 80 epochs, (40, 60)
    step_milestones: tuple[int, ...] = (25, 35, 45)
    step_gamma: float = 0.1  # step and plateau factor
    plateau_patience: int = 5
    min_lr: float = 0.0  # cosine floor
    accumulation: int = 8  # slides per optimiser step; each slide's loss is scaled by 1/accumulation
    class_weights: list[float] | None = None  # per class; a slide's CE (every head) is scaled by its weight
    head_norm: str = "group"  # norm after the classifier conv: group (code) | batch
    on_oom: str = "error"  # error | crop
    oom_retries: int = 1  # on_oom=crop: crops of 1/6 per edge before giving up (code: 1)
    selection_metric: str = "val_loss"  # val_loss | val_auroc | val_accuracy (validation part only)
    # BatchNorm running statistics from the training slides once before training, then frozen
    # (for a backbone whose statistics are not those of the images: a random init, or the default's
    # encoder pretrained on small tile views; the reference's ImageNet statistics need none)
    calibrate_bn: bool = False
    # Less memory, the same gradients (default none: the paper's memory profile): blocks
    # (recompute each residual block in the backward) | tiles (recompute each module tile by tile,
    # tiles of checkpoint_tile_px input-map pixels a side); see slidetrain.models.local
    checkpointing: str = "none"
    checkpoint_tile_px: int = 64

    def __post_init__(self) -> None:
        _positive_int(self, "epochs")
        _choice(self, "checkpointing", CHECKPOINTING)
        _positive_int(self, "checkpoint_tile_px")
        if not isinstance(self.calibrate_bn, bool):
            raise ConfigKeyError("calibrate_bn", f"expected true or false, got {self.calibrate_bn!r}")
        _positive_int(self, "accumulation")
        for key in ("lr_backbone", "lr_heads", "weight_decay", "min_lr"):
            if not (isinstance(getattr(self, key), int | float) and getattr(self, key) >= 0):
                raise ConfigKeyError(key, f"expected a number >= 0, got {getattr(self, key)!r}")
        _choice(self, "optimizer", ("adamw", "adam"))
        _choice(self, "scheduler", ("none", "step", "plateau", "cosine"))
        _choice(self, "head_norm", ("group", "batch"))
        _choice(self, "on_oom", ("error", "crop"))
        _choice(self, "selection_metric", SELECTION_METRICS)
        if not isinstance(self.oom_retries, int) or self.oom_retries < 0:
            raise ConfigKeyError("oom_retries", f"expected an integer >= 0, got {self.oom_retries!r}")
        if not isinstance(self.weights, str) or not self.weights:
            raise ConfigKeyError("weights", f"expected none, imagenet or a path, got {self.weights!r}")
        self.betas = tuple(self.betas)
        self.step_milestones = tuple(self.step_milestones)
        if self.class_weights is not None:
            try:
                self.class_weights = [float(w) for w in self.class_weights]
            except (TypeError, ValueError):
                raise ConfigKeyError(
                    "class_weights", f"expected a list of numbers, got {self.class_weights!r}"
                ) from None
            if any(w < 0 for w in self.class_weights):
                raise ConfigKeyError("class_weights", f"expected weights >= 0, got {self.class_weights}")


@dataclass
class ImageE2EConfig(WholeImageConfig):
    """Plain end-to-end training of the same network (the memory reference of Table 2)."""

    # trained: the entire network, conv1 included (the paper's E2E: "the entire network";
    # its Table 2 memory, paper/data/local_table2.csv, needs the stem's activations) | frozen: the stem frozen as
    # local learning freezes it, so that only the gradient isolation differs.
    stem: str = "trained"

    def __post_init__(self) -> None:
        super().__post_init__()
        _choice(self, "stem", ("trained", "frozen"))


@dataclass
class LocalConfig(WholeImageConfig):
    """Locally supervised learning: K modules, auxiliary nets, RFR."""

    K: int = 4  # 4 or 8 (the authors' cuts)
    rfr: bool = True  # random feature reconstruction in the auxiliary nets
    alpha: float = 1.0  # weight of the RFR loss (aux CE weight is 1)
    n_patch: int = 10  # RFR crops per module and slide
    schedule: str = "simultaneous"  # simultaneous (code) | sequential (paper)
    sequential_epochs_per_module: int = 0  # sequential: epochs per module k < K; 0 = epochs // K

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.K not in ALLOWED_K:
            raise ConfigKeyError("K", f"expected one of {list(ALLOWED_K)}, got {self.K!r}")
        if not isinstance(self.rfr, bool):
            raise ConfigKeyError("rfr", f"expected true or false, got {self.rfr!r}")
        if not (isinstance(self.alpha, int | float) and self.alpha >= 0):
            raise ConfigKeyError("alpha", f"expected a number >= 0, got {self.alpha!r}")
        _positive_int(self, "n_patch")
        _choice(self, "schedule", ("simultaneous", "sequential"))
        if not isinstance(self.sequential_epochs_per_module, int) or self.sequential_epochs_per_module < 0:
            raise ConfigKeyError(
                "sequential_epochs_per_module",
                f"expected an integer >= 0, got {self.sequential_epochs_per_module!r}",
            )
        if self.schedule == "sequential" and self.epochs_per_module == 0:
            raise ConfigKeyError("epochs", f"the sequential schedule needs epochs >= K = {self.K}, got {self.epochs}")

    @property
    def epochs_per_module(self) -> int:
        return self.sequential_epochs_per_module or self.epochs // self.K


def _positive_int(cfg: object, key: str) -> None:
    value = getattr(cfg, key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigKeyError(key, f"expected an integer >= 1, got {value!r}")


def _choice(cfg: object, key: str, allowed: tuple[str, ...]) -> None:
    if getattr(cfg, key) not in allowed:
        raise ConfigKeyError(key, f"expected one of {list(allowed)}, got {getattr(cfg, key)!r}")


# --------------------------------------------------------------------------- data helpers


@dataclass
class StreamingConfig:
    """StreamingCNN keys; defaults are the authors' code (train.py, ExperimentOptions)."""

    epochs: int = 50
    tile_px: int = 5120  # streaming tile (input pixels); see tile_mode
    tile_mode: str = "total"  # total: tile_px includes the overlap (StreamingCNN) | core: owned px
    weights: str = "none"  # none | imagenet | path to a torchvision ResNet34 state dict
    stream_until: str = "layer3"  # layer3 | layer4.0 (the code's fp32 split)
    train_all_layers: bool = False  # False: layer4 + fc (the code's default) | True: all (paper)
    amp: bool = False  # mixed precision (the code's default); fp32 = the paper's setting
    optimizer: str = "sgd"  # sgd | adam | adamw
    lr: float = 1e-4
    momentum: float = 0.9  # sgd
    nesterov: bool = False  # sgd
    betas: tuple[float, float] = (0.9, 0.999)  # adam, adamw
    weight_decay: float = 0.0
    scheduler: str = "none"  # none | cosine | step | plateau (stepped once per epoch)
    min_lr: float = 0.0  # cosine floor
    step_milestones: tuple[int, ...] = ()
    step_gamma: float = 0.1  # step and plateau factor
    plateau_patience: int = 5
    accumulation: int = 16  # slides per optimiser step (the code: batch 16, one image per GPU pass)
    grad_clip: float = 0.0  # 0 = off
    class_weights: list[float] | None = None  # per class; a slide's CE is scaled by its weight
    selection_metric: str = "val_loss"  # val_loss | val_auroc | val_accuracy (validation part only)
    calibrate_bn: bool = False  # BN statistics from the training slides once before training

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        self.step_milestones = tuple(self.step_milestones)
        choices = {
            "tile_mode": STREAM_TILE_MODES,
            "stream_until": STREAM_SPLITS,
            "optimizer": STREAM_OPTIMIZERS,
            "scheduler": STREAM_SCHEDULERS,
            "selection_metric": SELECTION_METRICS,
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(f"StreamingConfig.{key}: expected one of {allowed}, got {getattr(self, key)!r}")
        for key in ("train_all_layers", "amp", "calibrate_bn"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"StreamingConfig.{key}: expected true or false, got {getattr(self, key)!r}")
        for key in ("epochs", "tile_px", "accumulation"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"StreamingConfig.{key}: expected an integer >= 1, got {value!r}")
        for key in ("lr", "weight_decay", "grad_clip", "min_lr"):
            if not isinstance(getattr(self, key), int | float) or getattr(self, key) < 0:
                raise ConfigError(f"StreamingConfig.{key}: expected a number >= 0, got {getattr(self, key)!r}")


def build_config(config_cls: type, preset: dict[str, Any], params: dict | None, where: str) -> Any:
    """`config_cls` from its defaults, then `params`, then the method's `preset` (keys its name fixes);
    an unknown key, a preset key set otherwise, or a bad value is a ConfigError naming `where.key`."""
    params = dict(params or {})
    known = [f.name for f in fields(config_cls)]
    for key in params:
        if key not in known:
            raise ConfigError(f"{where}.{key}: unknown key; expected some of {sorted(known)}")
    for key, value in preset.items():
        if key in params and params[key] != value:
            raise ConfigError(f"{where}.{key}: fixed to {value!r} by the method name, got {params[key]!r}")
    params.update(preset)
    try:
        return config_cls(**params)
    except ConfigKeyError as err:
        raise ConfigError(f"{where}.{err.key}: {err.detail}") from None
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: {err}") from err

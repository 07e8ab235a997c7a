"""Every MIL method's config dataclass, free of torch so the workflow validates configs cheaply.

The workflow checks each `methods` block against these at parse time (before any job runs); importing
torch for that cost ~5 s per `snakemake` call. A model file imports its config from here.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from slidetrain.errors import ConfigError


@dataclass
class TrainConfig:
    """Optimiser and schedule keys shared by every method (its block may override defaults)."""

    epochs: int = 20
    optimizer: str = "adam"  # adam | adamw | sgd | radam_lookahead
    lr: float = 2e-4
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = 0.9  # sgd only
    nesterov: bool = False  # sgd only
    scheduler: str = "none"  # none | cosine | step | exponential | plateau (per epoch) | warmup_cosine (per iteration)
    min_lr: float = 0.0  # cosine floor
    warmup_epochs: float = 0.0  # warmup_cosine: linear lr warm-up from 0 over this many epochs
    weight_decay_end: float | None = None  # None: constant; else cosine weight_decay -> this, per iteration
    no_decay_1d: bool = False  # biases and 1-D parameters get no weight decay
    decoupled_weight_decay: bool = False  # adam / radam_lookahead: decoupled (AdamW-style) decay
    step_milestones: tuple[int, ...] = ()  # step: epochs at which lr *= step_gamma
    step_gamma: float = 0.1  # step / exponential: lr factor; plateau: its reduction factor
    plateau_patience: int = 5
    accumulation: int = 1  # slides per optimiser step
    grad_clip: float = 0.0  # 0 = off
    class_weights: bool = False  # weight CE by inverse class frequency of the training part
    early_stopping_patience: int = 0  # 0 = off; epochs without validation improvement
    early_stopping_min_epochs: int = 0
    # val_loss | val_auroc | val_accuracy | val_balanced_accuracy | val_acc_auroc ((accuracy + AUROC) / 2)
    selection_metric: str = "val_loss"
    selection_start_fraction: float = 0.0  # epochs before this fraction of the run are never selected
    # class-balanced slide sampling (CLAM's --weighted_sample): each epoch draws len(train) slides with
    # replacement, each with weight 1 / (training slides of its class)
    weighted_sample: bool = False
    max_instances: int = 0  # 0 = all; else random subset per training bag (memory guard)
    # none (the references: raw features) | standardize (per-dimension z-score with the training
    # part's statistics, stored with the model). Random-init encoders give features of mean ~35 and
    # norm ~1000, on which attention MILs saturate; the default config standardises its pretrained
    # features too, as validation favoured (config/config.yaml).
    feature_norm: str = "none"

    def selection_rule(self) -> tuple[str, float]:
        """(history column to select on, fraction of the epochs before selection starts)."""
        return self.selection_metric, self.selection_start_fraction


def config_from_dict(cls: type, params: dict | None, where: str) -> object:
    """Build dataclass `cls` from `params`; an unknown key is an error naming `where.key`."""
    params = dict(params or {})
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; expected some of {sorted(known)}")
    for name, value in list(params.items()):
        default = getattr(cls, name, None) if not callable(getattr(cls, name, None)) else None
        if isinstance(default, tuple) and isinstance(value, list):
            params[name] = tuple(value)
    try:
        return cls(**params)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: {err}") from err


SIZES = {"small": (512, 256), "big": (512, 384)}  # (embedding, attention hidden)
DISTILL = ("AFS", "MaxS", "MaxMinS")


@dataclass
class PoolingConfig(TrainConfig):
    hidden: int = 128
    dropout: float = 0.25
    lr: float = 2e-4
    weight_decay: float = 1e-4


@dataclass
class ABMILConfig(TrainConfig):
    embed_dim: int = 500  # L
    attention_dim: int = 128  # D
    dropout: float = 0.0
    lr: float = 5e-4
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass
class GMAConfig(TrainConfig):
    size: str = "big"  # small | big
    dropout: float = 0.25
    epochs: int = 40
    optimizer: str = "sgd"
    lr: float = 5e-4
    momentum: float = 0.9
    nesterov: bool = True
    scheduler: str = "warmup_cosine"
    warmup_epochs: float = 10.0
    min_lr: float = 1e-8
    weight_decay: float = 0.04
    weight_decay_end: float | None = 0.4
    no_decay_1d: bool = True

    def __post_init__(self) -> None:
        if self.size not in SIZES:
            raise ValueError(f"size: expected one of {sorted(SIZES)}, got {self.size!r}")


@dataclass
class CLAMConfig(TrainConfig):
    size: str = "small"  # small | big
    dropout: float = 0.25
    k_sample: int = 8
    bag_weight: float = 0.7
    subtyping: bool | None = None  # None: True when the task has more than 2 classes
    inst_loss: str = "ce"  # ce | svm (the reference's --inst_loss)
    epochs: int = 200
    optimizer: str = "adam"
    lr: float = 1e-4
    weight_decay: float = 1e-5
    early_stopping_patience: int = 20
    early_stopping_min_epochs: int = 50

    def __post_init__(self) -> None:
        if self.size not in SIZES:
            raise ValueError(f"size: expected one of {sorted(SIZES)}, got {self.size!r}")
        if self.inst_loss not in ("ce", "svm"):
            raise ValueError(f"inst_loss: expected 'ce' or 'svm', got {self.inst_loss!r}")
        if self.k_sample < 1:
            raise ValueError(f"k_sample: expected >= 1, got {self.k_sample}")
        if not 0.0 <= self.bag_weight <= 1.0:
            raise ValueError(f"bag_weight: expected a value in [0, 1], got {self.bag_weight}")


@dataclass
class DSMILConfig(TrainConfig):
    query_dim: int = 128
    nonlinear_query: bool = True  # reference --non_linearity 1
    passing_v: bool = False  # reference default: v is the identity
    dropout_v: float = 0.0  # reference --dropout_node (only with passing_v)
    max_weight: float = 0.5  # loss = (1 - w) * bag BCE + w * max-instance BCE
    prediction: str = "bag"  # bag (reference default) | average (reference --average)
    orthogonal_init: bool = True
    epochs: int = 50
    optimizer: str = "adam"
    lr: float = 1e-4
    weight_decay: float = 1e-3
    betas: tuple[float, float] = (0.5, 0.9)
    scheduler: str = "cosine"
    min_lr: float = 5e-6
    selection_metric: str = "val_acc_auroc"
    early_stopping_patience: int = 10

    def __post_init__(self) -> None:
        if self.prediction not in ("average", "bag"):
            raise ValueError(f"prediction: expected 'average' or 'bag', got {self.prediction!r}")
        if not 0.0 <= self.max_weight <= 1.0:
            raise ValueError(f"max_weight: expected a value in [0, 1], got {self.max_weight}")


@dataclass
class DTFDConfig(TrainConfig):
    embed_dim: int = 512  # mDim
    attention_dim: int = 128
    n_groups: int = 4  # pseudo-bags per slide (numGroup)
    distill: str = "AFS"  # AFS | MaxS | MaxMinS
    instances_per_group: int = 1  # MaxS / MaxMinS: total_instance // numGroup
    dropout: float = 0.0  # before each classifier (droprate, droprate_2)
    epochs: int = 200
    optimizer: str = "adam"
    lr: float = 1e-4
    weight_decay: float = 1e-4
    grad_clip: float = 5.0
    scheduler: str = "step"
    step_milestones: tuple[int, ...] = (100,)
    step_gamma: float = 0.2
    tier1_gradient: str = "tier1"  # tier1 (reference effect) | sum (tier-2 gradient reaches tier 1 too)
    selection: str = "config"  # config (selection_metric, every epoch) | reference (val AUC, last 20%)

    def selection_rule(self) -> tuple[str, float]:
        if self.selection == "reference":
            return "val_auroc", 0.8
        return super().selection_rule()

    def __post_init__(self) -> None:
        if self.tier1_gradient not in ("tier1", "sum"):
            raise ValueError(f"tier1_gradient: expected 'tier1' or 'sum', got {self.tier1_gradient!r}")
        if self.selection not in ("config", "reference"):
            raise ValueError(f"selection: expected 'config' or 'reference', got {self.selection!r}")
        if self.distill not in DISTILL:
            raise ValueError(f"distill: expected one of {list(DISTILL)}, got {self.distill!r}")
        if self.n_groups < 1 or self.instances_per_group < 1:
            raise ValueError("n_groups and instances_per_group: expected >= 1")


@dataclass
class MILRNNConfig(TrainConfig):
    stage1_epochs: int = 0  # 0: half of `epochs` (at least one)
    tile_hidden: int = 0  # 0: linear tile classifier (the ResNet's fc); > 0: one hidden layer
    top_s: int = 10
    rnn_dim: int = 128
    shuffle: bool = False  # reference --shuffle: random order of the top-s tiles in training
    epochs: int = 200  # 100 MIL + 100 RNN epochs in the reference
    optimizer: str = "adam"  # MIL stage
    lr: float = 1e-4
    weight_decay: float = 1e-4
    rnn_lr: float = 0.1  # RNN stage: SGD with Nesterov momentum
    rnn_momentum: float = 0.9
    rnn_weight_decay: float = 1e-4
    rnn_batch: int = 128  # slides per RNN optimiser step
    selection_metric: str = "val_balanced_accuracy"

    def __post_init__(self) -> None:
        if self.top_s < 1 or self.rnn_dim < 1 or self.tile_hidden < 0 or self.stage1_epochs < 0:
            raise ValueError("top_s and rnn_dim: expected >= 1; tile_hidden, stage1_epochs: >= 0")
        if self.rnn_batch < 1:
            raise ValueError(f"rnn_batch: expected >= 1, got {self.rnn_batch}")


@dataclass
class TransMILConfig(TrainConfig):
    dim: int = 512
    heads: int = 8
    landmarks: int = 256  # dim // 2 in the reference
    pinv_iterations: int = 6
    residual_kernel: int = 33
    dropout: float = 0.1
    epochs: int = 200
    optimizer: str = "radam_lookahead"
    lr: float = 2e-4
    weight_decay: float = 1e-5
    decoupled_weight_decay: bool = True
    no_decay_1d: bool = True
    accumulation: int = 2
    early_stopping_patience: int = 10
    amp: bool = True  # fp16 autocast on CUDA bags only

    def __post_init__(self) -> None:
        if self.dim % self.heads:
            raise ValueError(f"heads: {self.heads} does not divide dim {self.dim}")
        if self.landmarks < 1 or self.pinv_iterations < 1:
            raise ValueError("landmarks and pinv_iterations: expected >= 1")
        if self.residual_kernel % 2 == 0:
            raise ValueError(f"residual_kernel: expected an odd size, got {self.residual_kernel}")

"""The tile-bag method block (`TileBagConfig`), free of torch so the workflow validates it cheaply.

Optimiser and schedule keys come from TrainConfig, with Campanella et al.'s values as defaults: SGD
Nesterov, lr 5e-4 after 10 warm-up epochs, cosine to 1e-8 per iteration, weight decay 0.04 -> 0.4
on weights only, 40 epochs, 50% of the training slides per epoch, GMA aggregator. The model lives
in slidetrain.train.tilebag.model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from slidetrain.configs.mil import TrainConfig, config_from_dict

#: the tile encoders of slidetrain.models.encoders and .foundation (tests/test_configs_catalogue.py pins them)
RESNET_ENCODERS = ("resnet18", "resnet34", "resnet50_trunc", "resnet50")
FOUNDATION_ENCODERS = (
    "uni",
    "uni2_h",
    "virchow2",
    "hoptimus0",
    "hoptimus1",
    "gigapath",
    "phikon_v2",
    "conch_v15",
    "vit_tiny_test",
)
ENCODER_NAMES = RESNET_ENCODERS + FOUNDATION_ENCODERS
ENCODER_MODES = ("trained", "frozen")
EVAL_MODES = ("all", "sampled")


@dataclass
class TileBagConfig(TrainConfig):
    backbone: str = "resnet50"  # tile encoder: a ResNet of models.encoders or a foundation model (docs/encoders.md)
    weights: str = "none"  # none | imagenet (ResNets) | path to a state dict / the model card's weights file
    weights_sha256: str = ""  # checked before a weights file loads ("" = not checked)
    # first blocks kept frozen while the rest trains (input stage + N blocks; 0 = none): ViT fine-tuning
    freeze_blocks: int = 0
    # layer-wise lr decay: stage s of S trains at lr_encoder * layer_decay ** (S - 1 - s) (1 = off)
    layer_decay: float = 1.0
    encoder: str = "trained"  # trained | frozen (Big-Layers' baseline: embeddings on the fly, no backward)
    aggregator: str = "gma"  # any registered MIL aggregator
    aggregator_params: dict = field(default_factory=dict)  # its architecture keys (dropout, size, ...)
    executor: str = "plain"  # plain | two_stage | offload | distributed (under torchrun: train/tilebag/ranked.py)
    # distributed: BatchNorm statistics over all encoder ranks' tiles (= plain's, exactly); false = each
    # rank normalises its own K / N tiles, as the authors' script (DDP without SyncBatchNorm)
    sync_bn: bool = False
    k: int = 600  # tiles per slide per step (the authors' k_per_gpu default)
    input_px: int | None = None  # resize tiles to this side before the encoder (None = tile size)
    augment: bool = True  # one draw per slide: flips, quarter turns, colour jitter, Gaussian blur
    slides_per_epoch: float = 0.5  # fraction of the training slides drawn per epoch (the paper: 50%)
    lr_encoder: float | None = None  # None = lr
    lr_aggregator: float | None = None  # None = lr
    amp: bool = False  # CUDA: fp16 autocast + GradScaler; CPU: bf16 autocast
    # float64: every weight, tile and feature in double precision, for equivalence checks of the
    # executors against plain (exact to rounding on any CPU); several times slower than float32
    dtype: str = "float32"
    device: str = "cpu"
    workers: int = 2  # DataLoader worker processes reading tiles (0 = in the training process)
    eval_tiles: str = "all"  # all (every tile, in chunks, no grad) | sampled (eval_repeats x eval_k)
    eval_k: int = 0  # 0 = k
    eval_repeats: int = 1
    eval_chunk: int = 256  # tiles per encoder call at evaluation
    # BatchNorm at evaluation: running (torch's eval mode: the running statistics) | bag (each slide
    # normalised by the statistics of all its evaluation tiles, as every training step normalises its one
    # slide's bag; exact over eval_chunk and encoder ranks, at extra passes when a slide needs several
    # calls; running statistics never change). docs/tilebag.md (Data) says why it matters.
    eval_bn: str = "running"
    # The authors' optimiser (REFERENCE_NOTES "Multi-GPU end-to-end")
    epochs: int = 40
    optimizer: str = "sgd"
    lr: float = 5e-4
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 0.04
    weight_decay_end: float | None = 0.4
    no_decay_1d: bool = True
    scheduler: str = "warmup_cosine"
    momentum_decay: str = "none"  # none | demon (Big-Layers' CAMELYON runs: Adam's beta1 decayed per iteration)
    warmup_epochs: float = 10.0
    min_lr: float = 1e-8
    selection_metric: str = "auto"  # auto = val_auroc (binary) / val_qwk (ordinal); or val_loss, ...

    def __post_init__(self) -> None:
        if self.backbone not in ENCODER_NAMES:
            raise ValueError(f"backbone: expected one of {list(ENCODER_NAMES)}, got {self.backbone!r}")
        if self.encoder not in ENCODER_MODES:
            raise ValueError(f"encoder: expected one of {list(ENCODER_MODES)}, got {self.encoder!r}")
        if self.eval_tiles not in EVAL_MODES:
            raise ValueError(f"eval_tiles: expected one of {list(EVAL_MODES)}, got {self.eval_tiles!r}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype: expected float32 or float64, got {self.dtype!r}")
        if self.dtype == "float64" and self.amp:
            raise ValueError("dtype: float64 with amp: true (half-precision autocast) contradicts itself")
        if self.freeze_blocks < 0 or not 0 < self.layer_decay <= 1:
            raise ValueError(
                f"freeze_blocks >= 0 and 0 < layer_decay <= 1 expected, got {self.freeze_blocks}, {self.layer_decay}"
            )
        if self.encoder == "frozen" and (self.freeze_blocks or self.layer_decay != 1):
            raise ValueError("freeze_blocks / layer_decay apply to a trained encoder; encoder is frozen")
        if self.eval_bn not in ("running", "bag"):
            raise ValueError(f"eval_bn: expected running or bag, got {self.eval_bn!r}")
        if self.k < 1 or self.eval_k < 0 or self.eval_repeats < 1 or self.eval_chunk < 1:
            raise ValueError("k, eval_repeats and eval_chunk must be >= 1 and eval_k >= 0")
        if not 0 < self.slides_per_epoch <= 1:
            raise ValueError(f"slides_per_epoch: expected a fraction in (0, 1], got {self.slides_per_epoch}")


def tilebag_config(params: dict | None) -> TileBagConfig:
    """The validated block; an unknown key or a bad value is a ConfigError naming `methods.tilebag`."""
    return config_from_dict(TileBagConfig, params, where="methods.tilebag")

"""Tile encoders for frozen features: torchvision ResNets truncated as the papers use them.

| name           | cut                          | dim  | used by                                |
|----------------|------------------------------|------|----------------------------------------|
| resnet18       | through layer4 + avg pool    | 512  | Big-Layers (ResNet18 encoder)          |
| resnet34       | through layer4 + avg pool    | 512  | local-learning baselines (5x, ResNet34)|
| resnet50_trunc | through layer3 + avg pool    | 1024 | CLAM / DSMIL / TransMIL features       |
| resnet50       | through layer4 + avg pool    | 2048 | Campanella et al. (tResNet50 stand-in)  |

`weights`: "none" (random init, seeded so every process builds the same
encoder), "imagenet" (torchvision's weights API; needs the weights in the
torch hub cache or network access), or a path to a state dict.

Pathology foundation models (UNI, UNI2-h, Virchow2, H-optimus-0/1, Prov-GigaPath, Phikon-v2,
CONCH v1.5) are registered in slidetrain.models.foundation; `build_encoder` hands their names
there (weights: none or a local file, with an optional sha256).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from slidetrain.errors import ConfigError
from slidetrain.models.foundation import FOUNDATION_NAMES, FOUNDATION_SPECS, build_foundation
from slidetrain.models.resnet import resnet

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_SPECS = {
    # name: (torchvision constructor, weights enum name, last layer kept, output dim)
    "resnet18": ("resnet18", "ResNet18_Weights", "layer4", 512),
    "resnet34": ("resnet34", "ResNet34_Weights", "layer4", 512),
    "resnet50_trunc": ("resnet50", "ResNet50_Weights", "layer3", 1024),
    "resnet50": ("resnet50", "ResNet50_Weights", "layer4", 2048),
}
ENCODER_NAMES = tuple(_SPECS)


class TruncatedResNet(nn.Module):
    """ResNet trunk up to `last_layer`, then global average pooling: (B, 3, H, W) -> (B, dim)."""

    def __init__(self, resnet: nn.Module, last_layer: str, dim: int):
        super().__init__()
        names = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
        keep = names[: names.index(last_layer) + 1]
        self.trunk = nn.Sequential(*[getattr(resnet, n) for n in keep])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 3, H, W)
        return self.pool(self.trunk(x)).flatten(1)  # (B, dim)


def load_resnet(arch: str, weights_enum: str, weights: str, seed: int = 0, light: bool = False) -> nn.Module:
    """A ResNet with `weights` = none | imagenet | path to a state dict.

    `light=True` builds slidetrain's torchvision-compatible ResNet (same names and
    weights, no torchvision import: per-slide feature jobs start seconds faster);
    otherwise torchvision's own class, which the partitioned engine knows.
    """
    if light:
        builder = lambda weights=None: resnet(arch)  # noqa: E731
    else:
        import torchvision

        builder = getattr(torchvision.models, arch)
    if weights == "none":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # same random encoder in every process and shard
            return builder(weights=None)
    if weights == "imagenet":
        import torchvision

        enum = getattr(torchvision.models, weights_enum).IMAGENET1K_V1
        try:
            if light:
                model = builder()
                model.load_state_dict(enum.get_state_dict(progress=False))
                return model
            return builder(weights=enum)
        except Exception as err:  # download failures come as URLError/OSError/RuntimeError
            raise ConfigError(
                f"weights: 'imagenet' for {arch} could not be loaded ({err}); put the torchvision checkpoint "
                f"in $TORCH_HOME/hub/checkpoints or set weights to a local state-dict path"
            ) from err
    path = Path(weights)
    if not path.exists():
        raise ConfigError(f"weights: expected 'none', 'imagenet' or a state-dict file; {weights!r} does not exist")
    model = builder(weights=None)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    trunk_missing = [k for k in missing if not k.startswith("fc.")]
    if trunk_missing or unexpected:
        raise ConfigError(
            f"weights: {path} does not fit {arch}: missing {trunk_missing[:5]}, unexpected {list(unexpected)[:5]}"
        )
    return model


def build_encoder(name: str, weights: str = "none", seed: int = 0, sha256: str | None = None) -> nn.Module:
    if name in FOUNDATION_NAMES:
        return build_foundation(name, weights, seed, sha256=sha256)
    if name not in _SPECS:
        raise ConfigError(f"features.encoder: unknown encoder {name!r}; expected one of {[*_SPECS, *FOUNDATION_NAMES]}")
    arch, enum, last, dim = _SPECS[name]
    encoder = TruncatedResNet(load_resnet(arch, enum, weights, seed, light=True), last, dim)
    return encoder.eval()


def encoder_dim(name: str) -> int:
    if name in FOUNDATION_NAMES:
        return FOUNDATION_SPECS[name].dim
    if name not in _SPECS:
        raise ConfigError(f"features.encoder: unknown encoder {name!r}; expected one of {list(_SPECS)}")
    return _SPECS[name][3]

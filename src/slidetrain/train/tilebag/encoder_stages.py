"""An encoder's parameters in depth order, for freezing its first blocks and layer-wise lr decay.

Stage 0 is the input side (a ResNet's stem; a ViT's patch embedding, class/register tokens and
position embedding), stages 1..B its blocks (ResNet layer1..layerN; ViT blocks 0..B-1), and a ViT
has one more stage after them for what follows the blocks (final norm, CONCH's attentional
pooler). This is the numbering of BEiT's and timm's layer decay ("layer_id" 0 = embedding,
i + 1 = block i, B + 1 = head), so `layer_decay` means what ViT fine-tuning recipes mean by it.

- `freeze_blocks: N` (N >= 1) freezes stage 0 and the first N blocks: their parameters get no
  gradient and their BatchNorm layers keep their running statistics (eval mode), as the frozen
  encoder does. The stem goes with the first block because a trained block over a moving stem is
  not what "freeze the first blocks" asks for.
- `layer_decay: d` scales stage s's learning rate by d ** (S - 1 - s) for S stages: the last
  stage trains at the encoder's lr, each earlier one d times slower.
"""

from __future__ import annotations

import re

from torch import nn

from slidetrain.errors import ConfigError

_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")
_VIT_INPUT = ("patch_embed.", "cls_token", "pos_embed", "reg_token")
_RESNET_STEM = 4  # TruncatedResNet.trunk: conv1, bn1, relu, maxpool, then layer1..


def _strip_wrappers(name: str) -> str:
    """DDP ("module.") and torch.compile ("_orig_mod.") prefixes are not part of the encoder's names."""
    while name.startswith(("module.", "_orig_mod.")):
        name = name.split(".", 1)[1]
    return name


def parameter_stages(encoder: nn.Module) -> tuple[list[tuple[str, nn.Parameter, int]], int]:
    """[(name, parameter, stage)] for every parameter of `encoder`, and the number of stages."""
    named = [(_strip_wrappers(n), p) for n, p in encoder.named_parameters()]
    if named and all(n.startswith("trunk.") for n, _ in named):  # models.encoders.TruncatedResNet
        index = [int(n.split(".")[1]) for n, _ in named]
        n_layers = max(index) - _RESNET_STEM + 1
        if n_layers < 1:
            raise ConfigError("freeze_blocks / layer_decay: the ResNet trunk has no residual layer")
        return [(n, p, max(i - _RESNET_STEM + 1, 0)) for (n, p), i in zip(named, index, strict=True)], n_layers + 1
    blocks = [int(m.group(1)) for n, _ in named if (m := _BLOCK.search(n))]
    if not blocks:
        raise ConfigError(
            f"freeze_blocks / layer_decay: {type(encoder).__name__} is neither a ResNet trunk nor a ViT with "
            f"`blocks.<i>` (models.encoders, models.foundation)"
        )
    n_blocks = max(blocks) + 1
    stages = []
    for n, p in named:
        if m := _BLOCK.search(n):
            stage = int(m.group(1)) + 1
        elif any(part in n for part in _VIT_INPUT):
            stage = 0
        else:  # after the blocks: final norm, pooling heads
            stage = n_blocks + 1
        stages.append((n, p, stage))
    return stages, n_blocks + 2


def freeze_first_blocks(encoder: nn.Module, n_blocks: int) -> int:
    """Turn off gradients of stage 0 and blocks 1..n_blocks; returns how many parameters were frozen."""
    if n_blocks <= 0:
        return 0
    stages, n_stages = parameter_stages(encoder)
    is_resnet = all(n.startswith("trunk.") for n, *_ in stages)
    n_total = n_stages - 1 if is_resnet else n_stages - 2  # blocks between the input stage and any head stage
    if n_blocks >= n_total:
        raise ConfigError(
            f"freeze_blocks: {n_blocks} would freeze every block of the encoder (it has {n_total}); "
            f"use encoder: frozen for a frozen encoder"
        )
    frozen = 0
    for _, p, stage in stages:
        if stage <= n_blocks:
            p.requires_grad_(False)
            frozen += p.numel()
    return frozen


def is_frozen_norm(m: nn.Module) -> bool:
    """A BatchNorm layer whose parameters are all frozen (frozen encoder, freeze_blocks): it normalises
    with its running statistics in training too."""
    if not isinstance(m, nn.modules.batchnorm._BatchNorm):
        return False
    params = list(m.parameters())
    return bool(params) and not any(p.requires_grad for p in params)


def keep_frozen_norms_in_eval(encoder: nn.Module) -> None:
    """BatchNorm layers whose parameters are all frozen keep their running statistics in training mode."""
    for m in encoder.modules():
        if is_frozen_norm(m):
            m.eval()


def encoder_groups(encoder: nn.Module, lr: float, layer_decay: float) -> list[dict]:
    """The encoder's trainable parameters as optimiser groups: one per stage with its decayed lr."""
    if layer_decay == 1.0:
        params = [p for p in encoder.parameters() if p.requires_grad]
        return [{"params": params, "lr": lr, "part": "encoder"}] if params else []
    stages, n_stages = parameter_stages(encoder)
    groups = []
    for s in range(n_stages):
        params = [p for _, p, stage in stages if stage == s and p.requires_grad]
        if params:
            groups.append(
                {"params": params, "lr": lr * layer_decay ** (n_stages - 1 - s), "part": "encoder", "stage": s}
            )
    return groups

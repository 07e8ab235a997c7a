"""Training augmentation and per-channel normalisation of whole-slide images (3, H, W)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torchvision.transforms.functional as TF
from torch import Tensor

from slidetrain.errors import SlidetrainError

#: normalisation statistics of TCGA slides at 5x used by the authors
TCGA_MEAN: tuple[float, float, float] = (0.7223, 0.5304, 0.6579)
TCGA_STD: tuple[float, float, float] = (0.2057, 0.2471, 0.2010)


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


def normalise(image: Tensor, mean: Iterable[float] = TCGA_MEAN, std: Iterable[float] = TCGA_STD) -> Tensor:
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

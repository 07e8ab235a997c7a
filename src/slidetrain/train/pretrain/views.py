"""Two augmented views per tile for contrastive pretraining, drawn for a whole batch at once.

Each view: a random resized crop (roi_align, so the batch is cropped and resized in one call), flips
and quarter turns, per-image colour jitter (brightness, contrast, saturation), a per-channel stain
scale (sites differ in stain strength), random greyscale. Vectorised over the batch because a
per-image torchvision pipeline costs as much as the encoder's step at these sizes on a CPU.

Every draw comes from the generator it is given (seeded by step), so a resumed run draws the
views an uninterrupted one draws.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from slidetrain.data.tilebag import normalise


@dataclass(frozen=True)
class ViewSettings:
    input_px: int = 64  # side of each view fed to the encoder
    crop_scale: tuple[float, float] = (0.3, 1.0)  # area fraction of the tile a crop covers
    crop_ratio: tuple[float, float] = (0.75, 4 / 3)
    jitter: float = 0.4  # brightness, contrast, saturation factors in [1 - j, 1 + j]
    stain: float = 0.1  # per-channel scale in [1 - s, 1 + s]
    grey_p: float = 0.2


def _crop_boxes(n: int, side: int, s: ViewSettings, gen: torch.Generator) -> Tensor:
    """(n, 5) roi_align boxes [batch index, x1, y1, x2, y2] of random resized crops of a side x side tile."""
    area = torch.empty(n).uniform_(*s.crop_scale, generator=gen) * side * side
    log_ratio = torch.empty(n).uniform_(*torch.tensor(s.crop_ratio).log().tolist(), generator=gen)
    ratio = log_ratio.exp()
    w = (area * ratio).sqrt().clamp(4, side)
    h = (area / ratio).sqrt().clamp(4, side)
    x1 = torch.rand(n, generator=gen) * (side - w)
    y1 = torch.rand(n, generator=gen) * (side - h)
    return torch.stack([torch.arange(n, dtype=torch.float32), x1, y1, x1 + w, y1 + h], dim=1)


def _flip_turn(x: Tensor, gen: torch.Generator) -> Tensor:
    n = len(x)
    hflip = torch.rand(n, generator=gen) < 0.5
    vflip = torch.rand(n, generator=gen) < 0.5
    turn = torch.rand(n, generator=gen) < 0.5  # a quarter turn; with the flips this covers all 8 symmetries
    x = torch.where(hflip.view(-1, 1, 1, 1), x.flip(-1), x)
    x = torch.where(vflip.view(-1, 1, 1, 1), x.flip(-2), x)
    return torch.where(turn.view(-1, 1, 1, 1), x.transpose(-2, -1), x)


def _grey(x: Tensor) -> Tensor:
    """(n, 3, H, W) -> (n, 1, H, W) luma (ITU-R 601, as torchvision's rgb_to_grayscale)."""
    return 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]


def _colour(x: Tensor, s: ViewSettings, gen: torch.Generator) -> Tensor:
    n = len(x)

    def factor(spread: float, shape: tuple[int, ...] = (1, 1, 1)) -> Tensor:
        return torch.empty(n, *shape).uniform_(1 - spread, 1 + spread, generator=gen)

    x = x * factor(s.stain, (3, 1, 1))
    x = x * factor(s.jitter)
    mean = _grey(x).mean(dim=(1, 2, 3), keepdim=True)
    x = mean + (x - mean) * factor(s.jitter)
    grey = _grey(x)
    x = grey + (x - grey) * factor(s.jitter)
    to_grey = (torch.rand(n, generator=gen) < s.grey_p).view(-1, 1, 1, 1)
    return torch.where(to_grey, _grey(x).expand_as(x), x).clamp(0, 1)


def one_view(tiles_u8: Tensor, s: ViewSettings, gen: torch.Generator) -> Tensor:
    """uint8 (n, 3, P, P) tiles -> normalised float (n, 3, input_px, input_px) views."""
    from torchvision.ops import roi_align

    x = tiles_u8.to(torch.float32).div_(255)
    boxes = _crop_boxes(len(x), x.shape[-1], s, gen)
    x = roi_align(x, boxes, output_size=(s.input_px, s.input_px), spatial_scale=1.0, sampling_ratio=2, aligned=True)
    x = _flip_turn(x, gen)
    return normalise(_colour(x, s, gen))


def two_views(tiles_u8: Tensor, s: ViewSettings, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    return one_view(tiles_u8, s, gen), one_view(tiles_u8, s, gen)

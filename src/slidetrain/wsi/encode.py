"""Encoding tiles on a device while worker processes read the next ones: the part of feature
extraction that knows nothing of slide files (torch and numpy only, so that the GPU script can
run it on a machine without OpenSlide or h5py).

A reader is any map-style Dataset whose item is one batch: (key, uint8 tiles (B, T, T, 3) or None,
error text). `tile_loader` runs it in worker processes (pinned batches on CUDA), `TileEncoder`
normalises on the device and runs the encoder (AMP optional), `encode_batches` ties them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import torch

from slidetrain.models.encoders import IMAGENET_MEAN, IMAGENET_STD

if TYPE_CHECKING:
    from tqdm import tqdm


class Normalizer:
    """uint8 RGB tiles (B, T, T, 3) on any device -> ImageNet-normalised float (B, 3, T, T) on `device`."""

    def __init__(self, device: torch.device, channels_last: bool = False):
        self.device = device
        self.mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, tiles: torch.Tensor) -> torch.Tensor:
        # uint8 crosses the bus (4x less than float); the division happens on the device
        x = tiles.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()  # (B, 3, T, T)
        return ((x - self.mean) / self.std).contiguous(memory_format=self.memory_format)


class TileEncoder:
    """The encoder, on its device, in inference mode; `amp` runs it in `amp_dtype` (float16 unless
    given, e.g. bfloat16 for ViTs) autocast on CUDA."""

    def __init__(
        self, encoder: torch.nn.Module, device: torch.device, amp: bool = False, amp_dtype: torch.dtype = torch.float16
    ):
        self.device = device
        self.amp = bool(amp) and device.type == "cuda"
        self.amp_dtype = amp_dtype
        channels_last = device.type == "cuda"
        self.encoder = encoder.to(device).eval()
        if channels_last:
            self.encoder = self.encoder.to(memory_format=torch.channels_last)
        self.normalize = Normalizer(device, channels_last)

    @torch.inference_mode()
    def __call__(self, tiles: torch.Tensor) -> torch.Tensor:
        """uint8 (B, T, T, 3) -> float32 features (B, D), left on the device (no sync per batch)."""
        with torch.autocast("cuda", dtype=self.amp_dtype, enabled=self.amp):
            return self.encoder(self.normalize(tiles)).float()


def tile_loader(dataset: torch.utils.data.Dataset, workers: int, device: torch.device, prefetch: int = 4):
    """Batches of `dataset` read `workers` processes ahead of the encoder (0: in this process)."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=None,  # items are batches already
        shuffle=False,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=prefetch if workers > 0 else None,
        # fork: workers start in milliseconds and inherit the imported modules (no second `import torch`)
        multiprocessing_context="fork" if workers > 0 else None,
    )


def encode_batches(
    run: TileEncoder, batches: Iterable[tuple[int, torch.Tensor | None, str]], progress: tqdm | None = None
) -> Iterator[tuple[int, torch.Tensor | None, str]]:
    """(slide index, features (B, D) on the device, error) per batch, in order."""
    for k, tiles, error in batches:
        if tiles is None:
            yield k, None, error
            continue
        out = run(tiles)
        if progress is not None:
            progress.update(len(tiles))
        yield k, out, ""

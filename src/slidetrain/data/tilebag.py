"""Tile bags for end-to-end training: K tiles per slide, read from the slide file on the fly.

    refs = slide_refs(split, "train", class_names, sheet, slides_dir, tiles_dir)
    train = TileBagDataset(refs, BagSampling(k=64, tile_px=128, target_magnification=5.0), seed=0)
    train.set_epoch(epoch)                  # new tile draw and augmentation per epoch
    loader = bag_loader(train, workers=2)   # reading runs in worker processes, overlapping compute

Per slide and epoch, K tile coordinates are drawn from the slide's tile h5
(results/{dataset}/tiles/{slide}.h5, wsi/tile.py): without replacement when
the slide has at least K tiles, with replacement otherwise (as Campanella et
al. do, so every bag has the same shape). The tiles are read with OpenSlide
(`wsi.tile.read_tiles`: the pyramid level at or just finer than the target
magnification, box-resized to `tile_px`), then optionally resized to
`input_px` (a CPU-scale knob; None keeps `tile_px`).

Augmentation (Big-Layers 4.2.6) is ONE random draw per slide applied to all
of its tiles: flips, quarter turns, colour jitter (brightness, contrast,
saturation, hue) and Gaussian blur. Then ImageNet normalisation.

Every random draw comes from a generator seeded by (seed, epoch, slide
position), so a worker process, a resumed run and an uninterrupted one read
and augment exactly the same bags.

A slide that cannot be read is never skipped: the worker returns the error,
and `check_item` raises a SlideError naming the slide in the main process
(DataLoader would otherwise re-wrap it as a bare RuntimeError).

Test time (`EvalBags`): all tiles of every slide in chunks (features are
concatenated by the caller), or R repeats of K random tiles, seeded.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from slidetrain.data.sheet import SYNTHETIC, local_path
from slidetrain.errors import ConfigError, SlideError
from slidetrain.models.encoders import IMAGENET_MEAN, IMAGENET_STD


@dataclass(frozen=True)
class SlideRef:
    """Where one slide's pixels and tile coordinates are, and its class index."""

    slide_id: str
    slide_path: Path
    tiles_h5: Path
    label: int


@dataclass(frozen=True)
class BagSampling:
    """How tiles are drawn and read (the slide-independent part of a tile-bag config)."""

    k: int = 64  # tiles per training bag
    tile_px: int = 128  # px at the target magnification, as tiled (the h5's patch_size)
    target_magnification: float = 5.0
    input_px: int | None = None  # resize read tiles to this side before the encoder (None = tile_px)
    augment: bool = True
    mpp_fallback: float | None = None

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ConfigError(f"k: expected tiles per bag >= 1, got {self.k}")
        if self.input_px is not None and self.input_px < 8:
            raise ConfigError(f"input_px: expected >= 8 px (or null), got {self.input_px}")


def slide_paths(sheet: pd.DataFrame, sheet_dir: Path | None, slides_dir: Path) -> dict[str, Path]:
    """slide_id -> slide file: synthetic slides live in `slides_dir`, others where the sheet says."""
    paths = {}
    for slide_id, source in zip(sheet.slide_id, sheet.source, strict=True):
        paths[slide_id] = slides_dir / f"{slide_id}.tiff" if source == SYNTHETIC else local_path(source, sheet_dir)
    return paths


def slide_refs(slide_ids: list[str], labels: list[int], paths: dict[str, Path], tiles_dir: Path) -> list[SlideRef]:
    missing = [s for s in slide_ids if s not in paths]
    if missing:
        raise SlideError(missing[0], f"is in the split but not in the slide sheet ({len(missing)} such slides)")
    return [SlideRef(s, Path(paths[s]), Path(tiles_dir) / f"{s}.h5", y) for s, y in zip(slide_ids, labels, strict=True)]


def read_coords(ref: SlideRef) -> np.ndarray:
    """The slide's tile coordinates (N, 2); SlideError when the file is missing or holds no tile."""
    from slidetrain.wsi.tile import read_tiles_h5

    if not ref.tiles_h5.exists():
        raise SlideError(ref.slide_id, f"tile coordinates {ref.tiles_h5} not found; expected the preprocess output")
    coords, _ = read_tiles_h5(ref.tiles_h5)
    if len(coords) == 0:
        raise SlideError(
            ref.slide_id, f"{ref.tiles_h5} holds no tiles; exclude the slide (on_bad_slide: exclude) or re-tile it"
        )
    return coords


def sample_indices(n_tiles: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """K tile indices: without replacement when the slide has >= K tiles, with replacement otherwise.

    Sorted, so neighbouring tiles of a row are read together (read_tiles batches runs).
    """
    return np.sort(rng.choice(n_tiles, size=k, replace=n_tiles < k))


# ---------------------------------------------------------------- augmentation (one draw per slide)


@dataclass(frozen=True)
class AugmentDraw:
    """One slide's augmentation parameters; the same draw is applied to every tile of the slide."""

    hflip: bool
    vflip: bool
    quarter_turns: int  # 0-3
    brightness: float  # factors around 1
    contrast: float
    saturation: float
    hue: float  # shift in [-0.5, 0.5] of a turn
    blur_sigma: float  # 0 = no blur


def draw_augmentation(
    rng: np.random.Generator,
    jitter: float = 0.1,
    hue: float = 0.05,
    blur_p: float = 0.5,
    blur_sigma: tuple[float, float] = (0.1, 1.5),
) -> AugmentDraw:
    return AugmentDraw(
        hflip=bool(rng.random() < 0.5),
        vflip=bool(rng.random() < 0.5),
        quarter_turns=int(rng.integers(0, 4)),
        brightness=float(rng.uniform(1 - jitter, 1 + jitter)),
        contrast=float(rng.uniform(1 - jitter, 1 + jitter)),
        saturation=float(rng.uniform(1 - jitter, 1 + jitter)),
        hue=float(rng.uniform(-hue, hue)),
        blur_sigma=float(rng.uniform(*blur_sigma)) if rng.random() < blur_p else 0.0,
    )


def apply_augmentation(tiles: Tensor, draw: AugmentDraw) -> Tensor:
    """(K, 3, H, W) float in [0, 1] -> same shape; one draw for the whole bag."""
    from torchvision.transforms.v2 import functional as TF

    if draw.hflip:
        tiles = tiles.flip(-1)
    if draw.vflip:
        tiles = tiles.flip(-2)
    if draw.quarter_turns:
        tiles = torch.rot90(tiles, draw.quarter_turns, dims=(-2, -1))
    tiles = TF.adjust_brightness(tiles, draw.brightness)
    tiles = TF.adjust_contrast(tiles, draw.contrast)
    tiles = TF.adjust_saturation(tiles, draw.saturation)
    tiles = TF.adjust_hue(tiles, draw.hue)
    if draw.blur_sigma > 0:
        kernel = 2 * math.ceil(2 * draw.blur_sigma) + 1
        tiles = TF.gaussian_blur(tiles, [kernel, kernel], [draw.blur_sigma, draw.blur_sigma])
    return tiles.clamp_(0, 1)


def normalise(tiles: Tensor) -> Tensor:
    """ImageNet mean/std, as the encoders' weights expect. (K, 3, H, W) -> same."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=tiles.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=tiles.dtype).view(1, 3, 1, 1)
    return (tiles - mean) / std


# ---------------------------------------------------------------- reading


class SlideReader:
    """Reads tiles of many slides, keeping the most recently used slides open (one reader per worker)."""

    def __init__(self, sampling: BagSampling, max_open: int = 16):
        self.sampling = sampling
        self.max_open = max_open
        self._open: OrderedDict[str, object] = OrderedDict()

    def _slide(self, ref: SlideRef):
        from slidetrain.wsi.slide import open_slide

        slide = self._open.pop(ref.slide_id, None)
        if slide is None:
            slide = open_slide(ref.slide_path, ref.slide_id, mpp_fallback=self.sampling.mpp_fallback)
        self._open[ref.slide_id] = slide
        while len(self._open) > self.max_open:
            self._open.popitem(last=False)[1].close()
        return slide

    def read(self, ref: SlideRef, coords: np.ndarray) -> Tensor:
        """uint8 (K, 3, P, P) tiles at `coords` (level-0 x, y), P = input_px or tile_px."""
        from slidetrain.wsi.tile import read_tiles

        s = self.sampling
        tiles = list(read_tiles(self._slide(ref), coords, s.target_magnification, s.tile_px))
        bag = torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2)  # (K, 3, tile_px, tile_px)
        if s.input_px is not None and s.input_px != s.tile_px:
            bag = (
                F.interpolate(
                    bag.float(), size=(s.input_px, s.input_px), mode="bilinear", antialias=True, align_corners=False
                )
                .round_()
                .clamp_(0, 255)
                .to(torch.uint8)
            )
        return bag.contiguous()

    def close(self) -> None:
        for slide in self._open.values():
            slide.close()
        self._open.clear()


def to_input(bag_u8: Tensor, draw: AugmentDraw | None) -> Tensor:
    """uint8 (K, 3, P, P) -> normalised float32 (K, 3, P, P), augmented when `draw` is given."""
    tiles = bag_u8.to(torch.get_default_dtype()).div_(255)  # float32 (float64 in equivalence checks)
    if draw is not None:
        tiles = apply_augmentation(tiles, draw)
    return normalise(tiles)


# ---------------------------------------------------------------- datasets


class TileBagDataset(Dataset):
    """Training bags: item i = K tiles of slide i, sampled and augmented anew each epoch (seeded).

    An item is a dict: slide_id, index, label, tiles (K, 3, P, P) float32, coords (K, 2), augment
    (the AugmentDraw or None); or {slide_id, index, error} when the slide could not be read.

    Distributed training (one encoder rank's part of each bag): `share` keeps the tiles
    `share` of the K drawn (the same draw and augmentation on every rank, so the ranks' shares
    together are exactly the bag one process reads); `read=False` reads nothing (the aggregator
    rank: slide_id, index and label only).
    """

    def __init__(
        self, refs: list[SlideRef], sampling: BagSampling, seed: int, share: slice | None = None, read: bool = True
    ):
        self.refs = refs
        self.sampling = sampling
        self.seed = seed
        self.share, self.read = share, read
        self.epoch = 0
        self._reader: SlideReader | None = None
        self._coords: dict[str, np.ndarray] = {}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.refs)

    def coords(self, i: int) -> np.ndarray:
        ref = self.refs[i]
        if ref.slide_id not in self._coords:
            self._coords[ref.slide_id] = read_coords(ref)
        return self._coords[ref.slide_id]

    @property
    def reader(self) -> SlideReader:
        if self._reader is None:  # opened lazily: each worker process gets its own handles
            self._reader = SlideReader(self.sampling)
        return self._reader

    def rng(self, i: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, i])

    def __getitem__(self, i: int) -> dict:
        ref = self.refs[i]
        if not self.read:
            return {"slide_id": ref.slide_id, "index": i, "label": ref.label}
        try:
            rng = self.rng(i)
            coords = self.coords(i)
            picked = coords[sample_indices(len(coords), self.sampling.k, rng)]  # (K, 2)
            draw = draw_augmentation(rng) if self.sampling.augment else None
            if self.share is not None:
                picked = picked[self.share]  # (k_r, 2): this rank's part of the bag
            tiles = to_input(self.reader.read(ref, picked), draw)  # (K, 3, P, P)
        except Exception as err:  # noqa: BLE001 - handed to the main process, which stops (check_item)
            return {"slide_id": ref.slide_id, "index": i, "error": f"{type(err).__name__}: {err}"}
        return {
            "slide_id": ref.slide_id,
            "index": i,
            "label": ref.label,
            "tiles": tiles,
            "coords": torch.from_numpy(picked),
            "augment": draw,
        }


@dataclass(frozen=True)
class EvalChunk:
    """Which tiles one evaluation item holds: slide position, repeat, and tile index range."""

    slide: int
    repeat: int  # -1 for "all tiles"
    start: int
    stop: int
    pass_index: int = 0  # which pass over the slide's chunks (eval_bn: bag, slide_norm.py)
    passes: int = 1


class EvalBags(Dataset):
    """Evaluation items, in slide order, never augmented.

    mode "all": every tile of every slide, in chunks of `chunk` tiles (the caller encodes each
    chunk under no_grad and concatenates the features of a slide, `last` marks its final chunk).
    mode "sampled": `repeats` bags of K random tiles per slide, drawn from a generator seeded by
    (seed, repeat, slide position): the same tiles every time the evaluation runs.

    `share(n) -> slice`: one encoder rank's part of each slide's n evaluation tiles (distributed
    evaluation); a slide whose share is empty stops with a SlideError naming it.

    `passes(n) -> int`: how many times a slide of n tiles is gone through in mode "all" (slide
    BatchNorm statistics take a pass per layer when the tiles need several calls; the items of
    pass p carry "pass" = p and "passes", `last` marks each pass's final chunk). A sampled bag is read
    whole, so it takes one pass.
    """

    def __init__(
        self,
        refs: list[SlideRef],
        sampling: BagSampling,
        mode: str = "all",
        chunk: int = 256,
        repeats: int = 1,
        seed: int = 0,
        share: Callable[[int], slice] | None = None,
        passes: Callable[[int], int] | None = None,
    ):
        if mode not in ("all", "sampled"):
            raise ConfigError(f"eval_tiles: unknown value {mode!r}; expected all or sampled")
        if chunk < 1 or repeats < 1:
            raise ConfigError(f"eval_chunk and eval_repeats: expected >= 1, got {chunk} and {repeats}")
        self.bags = TileBagDataset(refs, sampling, seed)
        self.refs, self.mode, self.seed, self.repeats = refs, mode, seed, repeats
        self.share = share
        self.items: list[EvalChunk] = []
        for i in range(len(refs)):
            n = len(self.bags.coords(i)) if mode == "all" else sampling.k
            part = share(n) if share is not None else slice(0, n)
            if part.stop <= part.start:
                raise SlideError(
                    refs[i].slide_id,
                    f"has {n} evaluation tiles, too few to give every encoder "
                    "rank one; use fewer ranks or eval_tiles: sampled",
                )
            if mode == "all":
                n_passes = passes(n) if passes is not None else 1
                self.items += [
                    EvalChunk(i, -1, a, min(a + chunk, part.stop), p, n_passes)
                    for p in range(n_passes)
                    for a in range(part.start, part.stop, chunk)
                ]
            else:  # (start, stop) index the sampled bag, read whole
                self.items += [EvalChunk(i, r, part.start, part.stop) for r in range(repeats)]
        self.bags._coords = {}  # read again in each worker; do not ship them through pickling

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, j: int) -> dict:
        item = self.items[j]
        ref = self.refs[item.slide]
        try:
            coords = self.bags.coords(item.slide)
            n = len(coords) if self.mode == "all" else self.bags.sampling.k
            last = item.stop == (self.share(n).stop if self.share is not None else n)
            if self.mode == "all":
                picked = coords[item.start : item.stop]
            else:
                rng = np.random.default_rng([self.seed, item.repeat, item.slide])
                picked = coords[sample_indices(len(coords), self.bags.sampling.k, rng)][item.start : item.stop]
            tiles = to_input(self.bags.reader.read(ref, picked), None)
        except Exception as err:  # noqa: BLE001 - see TileBagDataset.__getitem__
            return {"slide_id": ref.slide_id, "index": item.slide, "error": f"{type(err).__name__}: {err}"}
        return {
            "slide_id": ref.slide_id,
            "index": item.slide,
            "label": ref.label,
            "repeat": item.repeat,
            "tiles": tiles,
            "coords": torch.from_numpy(picked),
            "last": last,
            "pass": item.pass_index,
            "passes": item.passes,
        }


def check_item(item: dict) -> dict:
    """Raise the worker's reading error in the main process, naming the slide; otherwise pass through."""
    if "error" in item:
        raise SlideError(item["slide_id"], f"reading its tiles failed: {item['error']}")
    return item


def _first(batch: list[dict]) -> dict:
    return batch[0]


class EpochSubset(torch.utils.data.Sampler):
    """A seeded random fraction of the slides per epoch, in random order (`slides_per_epoch`)."""

    def __init__(self, n: int, fraction: float, seed: int):
        if not 0 < fraction <= 1:
            raise ConfigError(f"slides_per_epoch: expected a fraction in (0, 1], got {fraction}")
        self.n, self.fraction, self.seed, self.epoch = n, fraction, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return max(1, math.ceil(self.fraction * self.n))

    def __iter__(self):
        order = np.random.default_rng([self.seed, self.epoch, 7]).permutation(self.n)
        return iter(order[: len(self)].tolist())


def bag_loader(dataset: Dataset, workers: int = 0, sampler=None, prefetch: int = 2) -> DataLoader:
    """One bag per batch; `workers` processes read ahead so that reading overlaps compute."""
    kwargs = {"num_workers": workers, "collate_fn": _first, "sampler": sampler, "shuffle": False}
    if workers > 0:
        kwargs.update(prefetch_factor=prefetch, persistent_workers=False)
    return DataLoader(dataset, batch_size=1, **kwargs)

"""`eval_bn: bag`: every BatchNorm layer normalises a slide's tiles with the statistics of all of them.

A training step encodes one slide's whole bag at once, so each BatchNorm layer normalises it with
the bag's own statistics. Evaluation encodes every tile of a slide in chunks of `eval_chunk` (to bound
memory); normalising each chunk by its own statistics would make a slide's prediction depend on the
chunk size and on the tile order. `SlideNormEncoder` gives every chunk what one forward of the
slide's whole tile set in training-mode BatchNorm gives it (running statistics untouched):

- one call: a slide whose tiles (each encoder rank's share of them) fit one call is encoded in that
  call; each layer takes its statistics over the call's tiles (merged over the ranks) and applies them.
- layer by layer: otherwise pass l (l = 1..L, L BatchNorm layers) runs every chunk up to the l-th
  layer, the earlier ones normalising with their slide statistics (fixed by the earlier passes),
  adds the chunk's per-channel count, mean and sum of squared deviations to that layer's (Chan's
  merge, float64) and stops the forward there; once every chunk has passed (and the ranks have
  merged theirs) the layer's statistics are fixed. Pass L + 1 encodes. Memory stays one chunk's;
  the price is L + 1 reads of every tile and about L / 2 + 1 encoder forwards (docs/tilebag.md).

The statistics are float64 so that how the tiles are split into chunks and ranks changes them far
below float32 rounding: predictions then differ across `eval_chunk`, tile order and rank count only
by the convolutions' own rounding.

BatchNorm layers that training normalises with running statistics (a frozen encoder, the frozen
blocks of `freeze_blocks`: parameters without gradient) keep them; `bag=False` (`eval_bn: running`)
keeps every layer's. An encoder without BatchNorm (the ViTs) runs as it is, in one pass.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slidetrain.errors import ConfigError, TrainingError
from slidetrain.train.tilebag.encoder_stages import is_frozen_norm

#: (count, mean (C,), sum of squared deviations (C,)), float64
Moments = tuple[Tensor, Tensor, Tensor]
#: one rank's packed moments -> every encoder rank's, in rank order (None: one process)
GatherFn = Callable[[Tensor], list[Tensor]]


def moments(x: Tensor) -> Moments:
    """Per-channel moments of x (B, C, ...) over every dimension but the channel's, in float64."""
    dims = [0, *range(2, x.dim())]
    xd = x.detach().to(torch.float64)
    var, mean = torch.var_mean(xd, dim=dims, correction=0)  # (C,), (C,)
    n = torch.tensor(float(xd.numel() // xd.shape[1]), dtype=torch.float64, device=x.device)
    return n, mean, var * n


def merge(a: Moments, b: Moments) -> Moments:
    """Chan et al.'s pairwise merge: the moments of both sets together."""
    na, ma, m2a = a
    nb, mb, m2b = b
    n = na + nb
    delta = mb - ma
    return n, ma + delta * (nb / n), m2a + m2b + delta * delta * (na * nb / n)


def pack(m: Moments) -> Tensor:  # (1 + 2C,)
    return torch.cat([m[0].reshape(1), m[1], m[2]])


def unpack(t: Tensor) -> Moments:
    c = (t.numel() - 1) // 2
    return t[0], t[1 : 1 + c], t[1 + c :]


class _Collected(Exception):
    """Raised by the layer that collects in this pass: the rest of the forward is not needed."""


class SlideBatchNorm(nn.Module):
    """A BatchNorm layer's affine parameters and eps, normalising with slide statistics (see module doc)."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm, owner: SlideNormEncoder, name: str):
        super().__init__()
        self.weight, self.bias, self.eps = bn.weight, bn.bias, bn.eps
        self.stats_dtype = bn.running_mean.dtype if bn.running_mean is not None else torch.get_default_dtype()
        self.layer_name = name
        object.__setattr__(self, "_owner", owner)  # not a submodule: the owner holds this layer
        self.stats: tuple[Tensor, Tensor] | None = None  # (mean, biased var) over the slide, float64
        self.partial: Moments | None = None  # this rank's chunks so far, in a collecting pass
        self.calls = 0  # in the current encoder call

    def forward(self, x: Tensor) -> Tensor:  # (B, C, ...) -> same
        self.calls += 1
        if self.calls > 1:
            raise ConfigError(
                f"eval_bn: bag: BatchNorm layer {self.layer_name} runs more than once per forward; "
                "slide statistics need one call per layer (use eval_bn: running)"
            )
        if self.stats is None:
            part = moments(x)
            if not self._owner.one_call:
                self.partial = part if self.partial is None else merge(self.partial, part)
                raise _Collected(self)
            self.stats = self._owner.slide_statistics(part)
        mean, var = (s.to(self.stats_dtype) for s in self.stats)
        return F.batch_norm(x, mean, var, self.weight, self.bias, False, 0.0, self.eps)


def _replace_norms(module: nn.Module, owner: SlideNormEncoder, prefix: str = "") -> list[SlideBatchNorm]:
    """Swap, in place, every BatchNorm that training normalises with batch statistics; the new layers."""
    layers = []
    for name, child in module.named_children():
        full = f"{prefix}{name}"
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not is_frozen_norm(child):
            layer = SlideBatchNorm(child, owner, full)
            setattr(module, name, layer)
            layers.append(layer)
        else:
            layers += _replace_norms(child, owner, full + ".")
    return layers


@dataclass(frozen=True)
class PassPlan:
    """Passes over a slide of n evaluation tiles (picklable: EvalBags' workers call it)."""

    n_layers: int  # BatchNorm layers normalised with slide statistics
    chunk: int  # tiles per encoder call
    n_ranks: int = 1  # encoder ranks sharing each slide's tiles (as split_bag: sizes differ by <= 1)

    def __call__(self, n_tiles: int) -> int:
        largest_share = -(-n_tiles // self.n_ranks)
        return 1 if self.n_layers == 0 or largest_share <= self.chunk else self.n_layers + 1


class SlideNormEncoder:
    """An eval-mode encoder for scoring slides chunk by chunk, BatchNorm as one whole-slide forward.

    Per slide: `encode(tiles, p, passes)` for every chunk of pass p = 0..passes-1 (features on the
    last pass, None before), then `end_pass()` after each pass's last chunk. `gather` merges the
    moments of the encoder ranks (distributed evaluation; every rank runs the same passes).
    """

    def __init__(self, encoder: nn.Module, bag: bool, gather: GatherFn | None = None):
        self.gather = gather
        self.one_call = True
        self.collecting: SlideBatchNorm | None = None
        converts = bag and any(
            isinstance(m, nn.modules.batchnorm._BatchNorm) and not is_frozen_norm(m) for m in encoder.modules()
        )
        # the copy only when layers change: a foundation ViT has no BatchNorm and may weigh gigabytes
        self.encoder = copy.deepcopy(encoder) if converts else encoder
        self.layers = _replace_norms(self.encoder, self) if converts else []
        self.encoder.eval()

    def plan(self, chunk: int, n_ranks: int = 1) -> PassPlan:
        return PassPlan(len(self.layers), chunk, n_ranks)

    def slide_statistics(self, mine: Moments) -> tuple[Tensor, Tensor]:
        """(mean, biased var) over every rank's tiles: training-mode BatchNorm's statistics."""
        total = mine
        if self.gather is not None:
            parts = [unpack(t.to(mine[1].device)) for t in self.gather(pack(mine))]
            total = parts[0]
            for part in parts[1:]:
                total = merge(total, part)
        n, mean, m2 = total
        return mean, m2 / n

    def encode(self, tiles: Tensor, pass_index: int, passes: int) -> Tensor | None:
        """Features (B, D) on the last pass; None on a collecting pass (its layer's moments added)."""
        self.one_call = passes == 1
        for layer in self.layers:
            layer.calls = 0
        if pass_index == passes - 1:
            return self.encoder(tiles)
        try:
            self.encoder(tiles)
        except _Collected as stop:
            layer = stop.args[0]
            if self.collecting not in (None, layer):
                raise TrainingError(
                    f"eval_bn: bag: pass {pass_index} reached {layer.layer_name} after "
                    f"{self.collecting.layer_name}; the encoder's layer order changed between chunks"
                ) from None
            self.collecting = layer
            return None
        raise TrainingError(f"eval_bn: bag: pass {pass_index} of {passes} collected no BatchNorm layer")

    def end_pass(self, pass_index: int, passes: int) -> None:
        """After a pass's last chunk: fix the collected layer's statistics, or, after the last pass,
        forget the slide's."""
        if pass_index < passes - 1:
            layer, self.collecting = self.collecting, None
            layer.stats, layer.partial = self.slide_statistics(layer.partial), None
            return
        for layer in self.layers:
            layer.stats = layer.partial = None

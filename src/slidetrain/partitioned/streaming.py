"""Streaming execution of a CNN trunk (Pinckaers et al., StreamingCNN): tile by tile, exact.

Forward: the output feature map is cut into a grid of tiles; for each, the
input crop it depends on (`geometry`) is moved to the compute device and run
under no_grad, and the tile is written into the full output map. Only one
crop's activations exist at a time.

Backward: given dL/d(output) for the whole map, each tile's crop is run again
with autograd on and backpropagated with its slice of the output gradient.
Because every tile computes exactly its part of the full-image output, the
sum over tiles of the parameter gradients is the full-image gradient (up to
float reordering), while memory holds one crop's graph at a time.

`tile_px` is read in one of two ways (`tile_mode`):

- "total" (StreamingCNN's meaning, e.g. 5120): the largest input crop of an
  interior tile, overlap included; the output tile is the largest that fits.
  Fails when the receptive field alone is larger than `tile_px`.
- "core": the input pixels a tile owns (rounded down to the trunk's output
  stride); its crop is that plus the receptive-field margins. Valid for any
  `tile_px` >= output stride, so tests can use small tiles on deep trunks.

The image may live on a different device (host RAM) than the layers: crops
move to the layers' device and output tiles move back, which is what an
offloading strategy builds on. Nothing here knows about slides.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from slidetrain.partitioned.geometry import (
    Node,
    PartitionError,
    Region,
    Size,
    as_node,
    check_partitionable,
    crop,
)

TILE_MODES = ("total", "core")


@dataclass(frozen=True)
class Tile:
    out: Region  # region of the output map this tile computes
    inp: Region  # input crop it needs (clipped to the image)


@dataclass(frozen=True)
class TilePlan:
    in_size: Size
    out_size: Size
    core: Size  # output pixels per tile and axis (edge tiles may be smaller)
    tiles: tuple[Tile, ...]

    @property
    def max_crop(self) -> Size:
        return tuple(max(t.inp[a][1] - t.inp[a][0] for t in self.tiles) for a in range(2))  # type: ignore[return-value]


class StreamingEngine:
    """Run `layers` (a module or a list of modules, in order) tile by tile with full-image results.

    `engine(x)` is autograd-aware (streaming backward when gradients flow back);
    `forward` / `backward` are the explicit two halves StreamingCNN uses.
    """

    def __init__(
        self,
        layers: nn.Module | Sequence[nn.Module],
        tile_px: int | tuple[int, int],
        tile_mode: str = "total",
        device: torch.device | str | None = None,
    ):
        if tile_mode not in TILE_MODES:
            raise PartitionError(f"tile_mode: expected one of {TILE_MODES}, got {tile_mode!r}")
        tile = (tile_px, tile_px) if isinstance(tile_px, int) else tuple(tile_px)
        if len(tile) != 2 or min(tile) < 1:
            raise PartitionError(f"tile_px: expected a positive int or (h, w), got {tile_px!r}")
        self.layers = layers
        self.node: Node = as_node(layers)
        self.tile_px: Size = tile  # type: ignore[assignment]
        self.tile_mode = tile_mode
        self._device = torch.device(device) if device is not None else None
        self._modules = [layers] if isinstance(layers, nn.Module) else list(layers)

    # --- geometry ----------------------------------------------------------------------------

    def parameters(self) -> list[nn.Parameter]:
        return [p for m in self._modules for p in m.parameters()]

    @property
    def device(self) -> torch.device:
        if self._device is not None:
            return self._device
        params = self.parameters()
        return params[0].device if params else torch.device("cpu")

    def output_size(self, in_size: Size) -> Size:
        return self.node.out_size(tuple(in_size))  # type: ignore[arg-type]

    def stride_and_field(self) -> tuple[Size, Size]:
        """Output stride and receptive field (input pixels) per axis, ignoring borders."""
        one, two = self.node.need(((0, 1), (0, 1)), None), self.node.need(((0, 2), (0, 2)), None)
        field = tuple(hi - lo for lo, hi in one)
        stride = tuple((b[1] - b[0]) - (a[1] - a[0]) for a, b in zip(one, two, strict=True))
        return stride, field  # type: ignore[return-value]

    def plan(self, in_size: Size) -> TilePlan:
        in_size = tuple(int(n) for n in in_size)  # type: ignore[assignment]
        out_size = self.output_size(in_size)
        stride, field = self.stride_and_field()
        core = []
        for axis in range(2):
            t, s, f = self.tile_px[axis], stride[axis], field[axis]
            if self.tile_mode == "core":
                n = t // s
                if n < 1:
                    raise PartitionError(f"tile_px={t} (core) is smaller than the output stride {s}")
            elif in_size[axis] <= t:  # the whole axis fits in one crop
                n = out_size[axis]
            else:  # an interior crop of n outputs spans (n - 1) * s + f input pixels
                n = (t - f) // s + 1
                if n < 1:
                    raise PartitionError(
                        f"tile_px={t} (total) is smaller than the receptive field {f} of the "
                        f"streamed layers; use a larger tile or tile_mode='core'"
                    )
            core.append(min(n, out_size[axis]))
        tiles = []
        for r0, c0 in itertools.product(range(0, out_size[0], core[0]), range(0, out_size[1], core[1])):
            out = ((r0, min(r0 + core[0], out_size[0])), (c0, min(c0 + core[1], out_size[1])))
            tiles.append(Tile(out, self.node.need(out, in_size)))
        return TilePlan(in_size, out_size, tuple(core), tuple(tiles))  # type: ignore[arg-type]

    # --- execution ---------------------------------------------------------------------------

    def _input_crop(self, x: Tensor, tile: Tile) -> Tensor:
        """The tile's input crop (N, C, h, w), on the compute device.

        Always a copy: crops overlap, and an in-place first layer must not write into x.
        """
        return crop(x, ((0, x.shape[-2]), (0, x.shape[-1])), tile.inp).to(self.device, copy=True)

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        """Output map of the layers for x (N, C, H, W), computed tile by tile, on x's device."""
        check_partitionable(self.layers)
        in_size = tuple(x.shape[-2:])
        plan = self.plan(in_size)  # type: ignore[arg-type]
        out = None
        for tile in plan.tiles:
            y = self.node.run(self._input_crop(x, tile), tile.inp, tile.out, in_size)  # type: ignore[arg-type]
            if out is None:  # (N, C_out, H_out, W_out)
                out = y.new_empty((*y.shape[:-2], *plan.out_size), device=x.device)
            (r0, r1), (c0, c1) = tile.out
            out[..., r0:r1, c0:c1] = y.to(x.device)
        return out

    def backward(
        self,
        x: Tensor,
        grad_out: Tensor,
        params: Sequence[Tensor] | None = None,
        input_grad: bool = False,
    ) -> tuple[Tensor | None, list[Tensor | None]]:
        """Streaming backward: (dL/dx or None, dL/dparams), given dL/d(output) for the whole map.

        `params` defaults to the layers' parameters that require grad. Nothing is
        written to `.grad`; `accumulate_grad` does that.
        """
        check_partitionable(self.layers)
        params = [p for p in self.parameters() if p.requires_grad] if params is None else list(params)
        in_size = tuple(x.shape[-2:])
        plan = self.plan(in_size)  # type: ignore[arg-type]
        if tuple(grad_out.shape[-2:]) != plan.out_size:
            raise PartitionError(f"grad_out has spatial size {tuple(grad_out.shape[-2:])}, expected {plan.out_size}")
        grads: list[Tensor | None] = [None] * len(params)
        grad_x = torch.zeros_like(x) if input_grad else None
        if not params and not input_grad:
            return grad_x, grads
        for tile in plan.tiles:
            with torch.enable_grad():
                xin = self._input_crop(x, tile).detach().requires_grad_(input_grad)
                y = self.node.run(xin, tile.inp, tile.out, in_size)  # type: ignore[arg-type]
                g = crop(grad_out, ((0, plan.out_size[0]), (0, plan.out_size[1])), tile.out).to(y.device)
                inputs = [*params, xin] if input_grad else params
                tile_grads = torch.autograd.grad(y, inputs, g, allow_unused=True)
            for i, tg in enumerate(tile_grads[: len(params)]):
                if tg is not None:
                    grads[i] = tg if grads[i] is None else grads[i].add_(tg)
            if input_grad and tile_grads[-1] is not None:  # overlapping crops: gradients add up
                (r0, r1), (c0, c1) = tile.inp
                grad_x[..., r0:r1, c0:c1] += tile_grads[-1].to(x.device)
        return grad_x, grads

    def accumulate_grad(self, x: Tensor, grad_out: Tensor) -> None:
        """StreamingCNN's backward: add dL/dparams of the streamed layers into their `.grad`."""
        params = [p for p in self.parameters() if p.requires_grad]
        _, grads = self.backward(x, grad_out, params)
        for p, g in zip(params, grads, strict=True):
            if g is not None:
                p.grad = g if p.grad is None else p.grad.add_(g)

    def __call__(self, x: Tensor) -> Tensor:
        """Autograd-aware streaming forward: gradients reaching the output are streamed back."""
        params = [p for p in self.parameters() if p.requires_grad]
        if not torch.is_grad_enabled() or not (params or x.requires_grad):
            return self.forward(x)
        return _StreamFn.apply(self, x, *params)


class _StreamFn(torch.autograd.Function):
    """Autograd node around a whole streamed trunk; parameters are inputs so their grads flow."""

    @staticmethod
    def forward(ctx, engine: StreamingEngine, x: Tensor, *params: Tensor) -> Tensor:
        ctx.engine = engine
        ctx.params = params  # the Parameter objects themselves: the recomputed graph uses them
        ctx.save_for_backward(x)
        return engine.forward(x)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        (x,) = ctx.saved_tensors
        grad_x, grads = ctx.engine.backward(x, grad_out, ctx.params, input_grad=ctx.needs_input_grad[1])
        return None, grad_x, *grads

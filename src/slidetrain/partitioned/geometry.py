"""Region arithmetic for running a CNN on part of its input with full-image semantics.

A network is turned into a small tree of nodes (`as_node`): `Local` (a sliding
window: conv, max/avg pool), `Pointwise` (BN in eval mode, activations),
`Chain` (one after the other) and `Residual` (main path + shortcut, summed,
then a pointwise tail, as in torchvision's BasicBlock and Bottleneck).

Every node answers three questions about one axis-aligned region:

- `out_size(in_size)`: the full-image output size;
- `need(out, in_size)`: the input region that output region `out` depends on,
  clipped to the image (what lies outside is padding, which is synthesised);
- `run(x, x_region, out, in_size)`: compute exactly output region `out` from
  a tensor `x` holding input region `x_region` (which contains `need(out)`).

`run` pads with the layer's own padding value (0 for convolutions, -inf for
max pooling) only where the window really crosses the border of the
full-image tensor at that depth, and runs the layer with padding 0 otherwise.
So a tile's output is the full-image output at the same place, not an
approximation with zero-padded tile borders.

Regions are `((row_lo, row_hi), (col_lo, col_hi))`, half-open, in the pixel
units of the tensor they refer to. Nothing here knows about slides.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from slidetrain.errors import SlidetrainError

Span = tuple[int, int]  # [lo, hi) along one axis
Region = tuple[Span, Span]  # (rows, cols)
Size = tuple[int, int]  # (H, W)


class PartitionError(SlidetrainError):
    """A network or a tiling cannot be run partitioned with exact full-image semantics."""


def hull(a: Region, b: Region) -> Region:
    return tuple((min(sa[0], sb[0]), max(sa[1], sb[1])) for sa, sb in zip(a, b, strict=True))  # type: ignore[return-value]


def clip(region: Region, size: Size) -> Region:
    return tuple((max(lo, 0), min(hi, n)) for (lo, hi), n in zip(region, size, strict=True))  # type: ignore[return-value]


def crop(x: Tensor, x_region: Region, region: Region) -> Tensor:
    """The part of `x` (which holds `x_region`) that covers `region`: (..., h, w)."""
    (r0, r1), (c0, c1) = region
    (xr0, xr1), (xc0, xc1) = x_region
    if r0 < xr0 or r1 > xr1 or c0 < xc0 or c1 > xc1:
        raise PartitionError(f"region {region} is not inside the computed region {x_region}")
    return x[..., r0 - xr0 : r1 - xr0, c0 - xc0 : c1 - xc0]


@dataclass(frozen=True)
class Window:
    """A sliding window along one axis: output o reads inputs o*stride - pad_lo + j*dilation, j < kernel."""

    kernel: int
    stride: int = 1
    dilation: int = 1
    pad_lo: int = 0
    pad_hi: int = 0
    ceil_mode: bool = False

    def out_size(self, n: int) -> int:
        span = n + self.pad_lo + self.pad_hi - self.dilation * (self.kernel - 1) - 1
        if span < 0:
            raise PartitionError(f"input of size {n} is smaller than the window {self}")
        if not self.ceil_mode:
            return span // self.stride + 1
        out = math.ceil(span / self.stride) + 1
        if (out - 1) * self.stride >= n + self.pad_lo:  # torch: the last window must start inside
            out -= 1
        return out

    def need(self, out: Span) -> Span:
        """Input span read by output span `out` (unclipped: may reach into the padding)."""
        lo, hi = out
        return lo * self.stride - self.pad_lo, (hi - 1) * self.stride - self.pad_lo + self.dilation * (
            self.kernel - 1
        ) + 1


class Node:
    """One piece of the network, as far as regions are concerned."""

    def out_size(self, in_size: Size) -> Size:
        raise NotImplementedError

    def need(self, out: Region, in_size: Size | None) -> Region:
        """Input region for output region `out`, clipped to `in_size` (None: unclipped)."""
        raise NotImplementedError

    def run(self, x: Tensor, x_region: Region, out: Region, in_size: Size) -> Tensor:
        raise NotImplementedError


class Local(Node):
    """A sliding-window layer run with padding 0 on an explicitly padded crop."""

    def __init__(self, module: nn.Module, windows: tuple[Window, Window], pad_value: float, fn: Callable):
        self.module, self.windows, self.pad_value, self.fn = module, windows, pad_value, fn

    def out_size(self, in_size: Size) -> Size:
        return tuple(w.out_size(n) for w, n in zip(self.windows, in_size, strict=True))  # type: ignore[return-value]

    def need(self, out: Region, in_size: Size | None) -> Region:
        region = tuple(w.need(s) for w, s in zip(self.windows, out, strict=True))
        return region if in_size is None else clip(region, in_size)  # type: ignore[return-value]

    def run(self, x: Tensor, x_region: Region, out: Region, in_size: Size) -> Tensor:
        full = self.need(out, None)
        inside = clip(full, in_size)
        x = crop(x, x_region, inside)
        (fr0, fr1), (fc0, fc1) = full
        (ir0, ir1), (ic0, ic1) = inside
        pad = (ic0 - fc0, fc1 - ic1, ir0 - fr0, fr1 - ir1)  # (left, right, top, bottom)
        if any(pad):  # only where the window crosses the true border at this depth
            x = F.pad(x, pad, value=self.pad_value)
        return self.fn(x)


class Pointwise(Node):
    """A layer acting on each position alone (activation, BN with frozen statistics)."""

    def __init__(self, module: nn.Module):
        self.module = module

    def out_size(self, in_size: Size) -> Size:
        return in_size

    def need(self, out: Region, in_size: Size | None) -> Region:
        return out

    def run(self, x: Tensor, x_region: Region, out: Region, in_size: Size) -> Tensor:
        return self.module(crop(x, x_region, out))


class Chain(Node):
    """Nodes one after the other (an empty chain is the identity)."""

    def __init__(self, nodes: Sequence[Node]):
        self.nodes = list(nodes)

    def sizes(self, in_size: Size) -> list[Size]:
        sizes = [in_size]
        for node in self.nodes:
            sizes.append(node.out_size(sizes[-1]))
        return sizes

    def out_size(self, in_size: Size) -> Size:
        return self.sizes(in_size)[-1]

    def needs(self, out: Region, sizes: list[Size] | None) -> list[Region]:
        """Region needed at every depth: needs[i] is the input region of node i, needs[-1] = out."""
        needs = [out]
        for i in range(len(self.nodes) - 1, -1, -1):
            needs.append(self.nodes[i].need(needs[-1], None if sizes is None else sizes[i]))
        return needs[::-1]

    def need(self, out: Region, in_size: Size | None) -> Region:
        return self.needs(out, None if in_size is None else self.sizes(in_size))[0]

    def run(self, x: Tensor, x_region: Region, out: Region, in_size: Size) -> Tensor:
        sizes = self.sizes(in_size)
        needs = self.needs(out, sizes)
        for i, node in enumerate(self.nodes):
            x = node.run(x, x_region, needs[i + 1], sizes[i])
            x_region = needs[i + 1]
        return crop(x, x_region, out)


class Residual(Node):
    """post(main(x) + shortcut(x)): torchvision's BasicBlock and Bottleneck."""

    def __init__(self, main: Chain, shortcut: Chain, post: Chain):
        self.main, self.shortcut, self.post = main, shortcut, post

    def out_size(self, in_size: Size) -> Size:
        size, short = self.main.out_size(in_size), self.shortcut.out_size(in_size)
        if size != short:
            raise PartitionError(f"residual block: main path gives {size}, shortcut {short} for input {in_size}")
        return self.post.out_size(size)

    def need(self, out: Region, in_size: Size | None) -> Region:
        mid = self.post.need(out, None)
        return hull(self.main.need(mid, in_size), self.shortcut.need(mid, in_size))

    def run(self, x: Tensor, x_region: Region, out: Region, in_size: Size) -> Tensor:
        mid_size = self.main.out_size(in_size)
        mid = self.post.need(out, mid_size)
        y = self.main.run(x, x_region, mid, in_size) + self.shortcut.run(x, x_region, mid, in_size)
        return self.post.run(y, mid, out, mid_size)


# --- module -> node adapters -------------------------------------------------------------------


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)  # type: ignore[return-value]


def _conv(m: nn.Conv2d) -> Node:
    if m.padding_mode != "zeros":
        raise PartitionError(f"{type(m).__name__} with padding_mode={m.padding_mode!r}: only 'zeros' is supported")
    k, s, d = _pair(m.kernel_size), _pair(m.stride), _pair(m.dilation)
    if m.padding == "valid":
        pads = [(0, 0), (0, 0)]
    elif m.padding == "same":  # torch puts the odd pixel on the high side
        pads = [(d[i] * (k[i] - 1) // 2, d[i] * (k[i] - 1) - d[i] * (k[i] - 1) // 2) for i in range(2)]
    else:
        pads = [(p, p) for p in _pair(m.padding)]
    windows = tuple(Window(k[i], s[i], d[i], *pads[i]) for i in range(2))

    def fn(x: Tensor) -> Tensor:
        return F.conv2d(x, m.weight, m.bias, m.stride, 0, m.dilation, m.groups)

    return Local(m, windows, 0.0, fn)  # type: ignore[arg-type]


def _maxpool(m: nn.MaxPool2d) -> Node:
    if m.return_indices:
        raise PartitionError("MaxPool2d(return_indices=True) is not supported")
    k, s, p, d = (
        _pair(m.kernel_size),
        _pair(m.stride or m.kernel_size),
        _pair(m.padding),
        _pair(m.dilation),
    )
    windows = tuple(Window(k[i], s[i], d[i], p[i], p[i], m.ceil_mode) for i in range(2))

    def fn(x: Tensor) -> Tensor:  # padding is -inf, as torch's own max pooling treats it
        return F.max_pool2d(x, m.kernel_size, m.stride or m.kernel_size, 0, m.dilation)

    return Local(m, windows, -math.inf, fn)  # type: ignore[arg-type]


def _avgpool(m: nn.AvgPool2d) -> Node:
    k, s, p = _pair(m.kernel_size), _pair(m.stride or m.kernel_size), _pair(m.padding)
    if m.ceil_mode or m.divisor_override is not None or (any(p) and not m.count_include_pad):
        raise PartitionError(
            "AvgPool2d: only ceil_mode=False, no divisor_override, and count_include_pad=True when padded "
            "give the same divisor on a crop as on the full image"
        )
    windows = tuple(Window(k[i], s[i], 1, p[i], p[i]) for i in range(2))

    def fn(x: Tensor) -> Tensor:
        return F.avg_pool2d(x, m.kernel_size, m.stride or m.kernel_size, 0)

    return Local(m, windows, 0.0, fn)  # type: ignore[arg-type]


def _basic_block(m: torchvision.models.resnet.BasicBlock) -> Node:
    main = Chain([as_node(x) for x in (m.conv1, m.bn1, m.relu, m.conv2, m.bn2)])
    shortcut = as_node(m.downsample) if m.downsample is not None else Chain([])
    return Residual(main, _as_chain(shortcut), Chain([as_node(m.relu)]))


def _bottleneck(m: torchvision.models.resnet.Bottleneck) -> Node:
    layers = (m.conv1, m.bn1, m.relu, m.conv2, m.bn2, m.relu, m.conv3, m.bn3)
    main = Chain([as_node(x) for x in layers])
    shortcut = as_node(m.downsample) if m.downsample is not None else Chain([])
    return Residual(main, _as_chain(shortcut), Chain([as_node(m.relu)]))


def _as_chain(node: Node) -> Chain:
    return node if isinstance(node, Chain) else Chain([node])


POINTWISE: set[type[nn.Module]] = {
    nn.Identity, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh,
    nn.Hardswish, nn.Hardsigmoid, nn.Mish, nn.BatchNorm2d, nn.Dropout, nn.Dropout2d,
}  # fmt: skip
#: exact type -> adapter; a subclass may override forward, so it must be registered itself
ADAPTERS: dict[type[nn.Module], Callable[[nn.Module], Node]] = {
    nn.Sequential: lambda m: Chain([as_node(c) for c in m]),
    nn.Conv2d: _conv,
    nn.MaxPool2d: _maxpool,
    nn.AvgPool2d: _avgpool,
    torchvision.models.resnet.BasicBlock: _basic_block,
    torchvision.models.resnet.Bottleneck: _bottleneck,
}


def register_adapter(module_type: type[nn.Module], adapter: Callable[[nn.Module], Node]) -> None:
    """Teach the engine a new block type (`adapter` builds its node from an instance)."""
    ADAPTERS[module_type] = adapter


def as_node(layers: nn.Module | Sequence[nn.Module]) -> Node:
    """The node tree of a module or a list of modules (run in that order)."""
    if not isinstance(layers, nn.Module):
        return Chain([as_node(m) for m in layers])
    kind = type(layers)
    if kind in ADAPTERS:
        return ADAPTERS[kind](layers)
    if kind in POINTWISE:
        return Pointwise(layers)
    raise PartitionError(
        f"{kind.__name__} cannot be run partitioned: its spatial geometry is unknown; known are "
        f"{sorted(t.__name__ for t in (*ADAPTERS, *POINTWISE))} (register_adapter adds one)"
    )


def check_partitionable(root: nn.Module | Sequence[nn.Module]) -> None:
    """Layers whose output on a crop would differ from the full image must be frozen.

    BatchNorm in training mode normalises with the statistics of whatever it sees
    (a tile, not the image); dropout draws a different mask per tile. StreamingCNN
    therefore keeps every BN in eval mode.
    """
    modules = (
        root.named_modules()
        if isinstance(root, nn.Module)
        else ((f"{i}.{n}" if n else str(i), m) for i, r in enumerate(root) for n, m in r.named_modules())
    )
    for name, m in modules:
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or not m.track_running_stats):
            raise PartitionError(
                f"BatchNorm {name!r} is in training mode (or has no running statistics); a partitioned run "
                f"needs frozen statistics: call .eval() on it"
            )
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0:
            raise PartitionError(f"Dropout {name!r} is in training mode; a partitioned run needs it in eval mode")


__all__ = [
    "ADAPTERS", "Chain", "Local", "Node", "PartitionError", "Pointwise", "Region", "Residual", "Size",
    "Window", "as_node", "check_partitionable", "clip", "crop", "hull", "register_adapter",
]  # fmt: skip

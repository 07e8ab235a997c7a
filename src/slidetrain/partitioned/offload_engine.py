"""Big-Layers offload engine: layers whose activations live in host RAM, run on device-sized parts.

The paper's Algorithm 1 (and 2 for BatchNorm), exact in fp32:

- Activations of the offloaded layers are host tensors (pinned when CUDA exists). Each heavy layer
  (Conv2d, BatchNorm2d) is an autograd function that cuts its input into sub-tensors, moves them
  to the device one at a time, computes there, and moves the result back into a host tensor.
- Conv2d is partitioned along the batch (a bag of tiles) while one sample fits the transfer
  budget, otherwise spatially into output tiles whose input crops carry the halo the kernel,
  stride and padding need (`geometry.Local`: padding synthesised only at the true border).
  Its backward runs the same partitions through `convolution_backward` (no recomputation):
  input gradients of overlapping crops add up on the host, weight gradients add up on the device.
- BatchNorm2d in training mode takes two passes: Welford/Chan statistics over all partitions,
  then normalisation; running statistics are updated as `nn.BatchNorm2d` does (unbiased
  variance, momentum or cumulative average, `num_batches_tracked`). Its backward takes two
  passes too: the reductions sum(g) and sum(g * x_hat) over all partitions, then dx.
  Eval mode normalises with the running statistics in one pass.
- ReLU, MaxPool and the residual add run on the host, as Algorithm 1 does: they are
  memory-bound, so moving their operands to the device and back would cost more than the
  arithmetic; plain torch ops on host tensors give their autograd for free.

`DeviceLedger` is the engine's own account of the device bytes it holds (every sub-tensor it
moves or produces there, while alive); its peak is what the budget tests check on CPU, where
"device" and "host" are the same RAM. Nothing here knows about slides.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slidetrain.partitioned.geometry import Local, PartitionError, Region, Size, as_node, crop

# --- accounting -------------------------------------------------------------------------------


def nbytes(*tensors: Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class DeviceLedger:
    """Bytes the engine holds on the device now and at most (its own accounting, any device)."""

    def __init__(self) -> None:
        self.current = 0
        self.peak = 0

    def reset_peak(self) -> None:
        self.peak = self.current

    @contextlib.contextmanager
    def hold(self, *tensors: Tensor | None) -> Iterator[None]:
        n = nbytes(*tensors)
        self.current += n
        self.peak = max(self.peak, self.current)
        try:
            yield
        finally:
            self.current -= n


class OffloadEngine:
    """Where offloaded layers compute, how much one transfer may carry, and the ledger.

    `max_transfer_bytes`: the largest working set of one partition on the device (its input
    crop, output and, in the backward, their gradients), the budget of Algorithm 1's max_N.
    """

    def __init__(self, device: torch.device | str = "cpu", max_transfer_bytes: int = 64 * 2**20):
        if max_transfer_bytes < 1:
            raise PartitionError(f"max_transfer_bytes: expected a positive byte count, got {max_transfer_bytes}")
        self.device = torch.device(device)
        self.max_transfer_bytes = int(max_transfer_bytes)
        self.ledger = DeviceLedger()
        self.pinned = self.device.type == "cuda"
        self.parts_run = 0  # partitions moved to the device so far (tests check that they split)
        self.spatial_parts_run = 0  # of which cut inside a sample's map

    def record(self, parts: list[Part], out_size: Size) -> list[Part]:
        self.parts_run += len(parts)
        self.spatial_parts_run += sum(p.out != ((0, out_size[0]), (0, out_size[1])) for p in parts)
        return parts

    def to_device(self, x: Tensor) -> Tensor:
        """A sub-tensor on the device (a copy when the device is the host: crops overlap)."""
        if self.device.type == "cpu":
            return x.contiguous()
        return x.to(self.device, non_blocking=self.pinned)

    def host_empty(self, shape: Sequence[int], dtype: torch.dtype) -> Tensor:
        return torch.empty(tuple(shape), dtype=dtype, pin_memory=self.pinned)

    def host_zeros(self, shape: Sequence[int], dtype: torch.dtype) -> Tensor:
        return self.host_empty(shape, dtype).zero_()

    def to_host(self, dst: Tensor, src: Tensor) -> None:
        # asynchronous only into a contiguous pinned slice (a batch partition): a strided
        # destination goes through a host temporary that must not be read before the copy lands
        dst.copy_(src, non_blocking=self.pinned and dst.is_contiguous())

    def sync(self) -> None:
        """Host buffers written with non_blocking copies are complete after this."""
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()


def compute_dtype(device: torch.device) -> torch.dtype | None:
    """fp16 under CUDA autocast (the activations and transfers are then half the bytes), else None."""
    if device.type == "cuda" and torch.is_autocast_enabled("cuda"):
        return torch.get_autocast_dtype("cuda")
    return None


# --- partition plans --------------------------------------------------------------------------


@dataclass(frozen=True)
class Part:
    batch: slice  # samples of this partition
    out: Region  # output region it computes (the whole map for batch partitions)
    inp: Region  # input region it reads (clipped to the map)


def _area(region: Region) -> int:
    return (region[0][1] - region[0][0]) * (region[1][1] - region[1][0])


def plan_parts(
    node: Local | None,
    n: int,
    c_in: int,
    c_out: int,
    in_size: Size,
    elem_bytes: int,
    budget: int,
    factor_in: int = 2,
    factor_out: int = 2,
    reserve: int = 0,
) -> list[Part]:
    """Partitions of an (n, c_in, *in_size) -> (n, c_out, *out) layer under `budget` bytes each.

    A partition's working set is estimated as factor_in * input crop + factor_out * output
    (forward: crop and output; backward: crop, padded crop, output gradient, input gradient).
    `node` None means a pointwise layer (output region = input region).
    """
    out_size = in_size if node is None else node.out_size(in_size)

    def need(out: Region) -> Region:
        return out if node is None else node.need(out, in_size)

    def cost(samples: int, out: Region) -> int:  # the padded crop is what lives on the device
        padded = out if node is None else node.need(out, None)
        return samples * elem_bytes * (factor_in * c_in * _area(padded) + factor_out * c_out * _area(out))

    budget -= reserve  # what stays on the device across partitions (weight gradient, casts)

    whole = ((0, out_size[0]), (0, out_size[1]))
    per_sample = cost(1, whole)
    if per_sample <= budget:  # batch partitions, each the whole map
        b = max(1, min(n, budget // per_sample))
        return [Part(slice(i, min(i + b, n)), whole, need(whole)) for i in range(0, n, b)]
    # one sample is too big: output tiles, full rows first, then columns, largest that fit
    th, tw = out_size
    while th > 1 and cost(1, ((0, th), (0, tw))) > budget:
        th = max(1, th // 2) if cost(1, ((0, th // 2 or 1), (0, tw))) > budget else th - max(1, th // 16)
    while tw > 1 and cost(1, ((0, th), (0, tw))) > budget:
        tw = max(1, tw // 2) if cost(1, ((0, th), (0, tw // 2 or 1))) > budget else tw - max(1, tw // 16)
    if cost(1, ((0, th), (0, tw))) > budget:
        raise PartitionError(
            f"max_transfer_bytes={budget + reserve} ({reserve} of it held across partitions): even one output pixel of a ({c_in}->{c_out}) layer needs "
            f"{cost(1, ((0, 1), (0, 1)))} bytes"
        )
    parts = []
    for s in range(n):
        for r0 in range(0, out_size[0], th):
            for c0 in range(0, out_size[1], tw):
                out = ((r0, min(r0 + th, out_size[0])), (c0, min(c0 + tw, out_size[1])))
                parts.append(Part(slice(s, s + 1), out, need(out)))
    return parts


def _crop(x: Tensor, part: Part, region: Region) -> Tensor:
    full = ((0, x.shape[-2]), (0, x.shape[-1]))
    return crop(x[part.batch], full, region)


# --- Conv2d -----------------------------------------------------------------------------------


def _conv_node(conv: nn.Conv2d) -> Local:
    node = as_node(conv)
    if not isinstance(node, Local):
        raise PartitionError(f"{conv}: expected a sliding-window node")
    return node


def _padded_crop(engine: OffloadEngine, node: Local, x: Tensor, part: Part, in_size: Size) -> Tensor:
    """The partition's input crop on the device, padded where its window crosses the border."""
    full = node.need(part.out, None)
    xin = engine.to_device(_crop(x, part, part.inp))
    (fr0, fr1), (fc0, fc1) = full
    (ir0, ir1), (ic0, ic1) = part.inp
    pad = (ic0 - fc0, fc1 - ic1, ir0 - fr0, fr1 - ir1)
    return F.pad(xin, pad) if any(pad) else xin


class _ConvFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, layer: OffloadConv2d, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        engine, conv, node = layer.engine, layer.conv, layer.node
        in_size: Size = tuple(x.shape[-2:])  # type: ignore[assignment]
        out_size = node.out_size(in_size)
        dtype = compute_dtype(engine.device) or x.dtype
        w = weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        n, c_out = x.shape[0], weight.shape[0]
        y = engine.host_empty((n, c_out, *out_size), dtype)  # (N, C_out, H_out, W_out) on host
        reserve = nbytes(w, b) if dtype != weight.dtype else 0
        parts = engine.record(plan_parts(node, n, x.shape[1], c_out, in_size, x.element_size(),
                                         engine.max_transfer_bytes, 1, 1, reserve), out_size)
        cast = (w, b) if dtype != weight.dtype else ()  # fp16 copies of the parameters under AMP
        with torch.autocast(engine.device.type, enabled=False), engine.ledger.hold(*cast):
            for part in parts:
                xin = _padded_crop(engine, node, x, part, in_size).to(dtype)
                with engine.ledger.hold(xin):
                    out = F.conv2d(xin, w, b, conv.stride, 0, conv.dilation, conv.groups)
                    with engine.ledger.hold(out):
                        (r0, r1), (c0, c1) = part.out
                        engine.to_host(y[part.batch, :, r0:r1, c0:c1], out)
        engine.sync()
        ctx.layer, ctx.has_bias, ctx.dtype = layer, bias is not None, dtype
        ctx.save_for_backward(x, weight)
        return y

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        x, weight = ctx.saved_tensors
        layer = ctx.layer
        engine, conv, node = layer.engine, layer.conv, layer.node
        in_size: Size = tuple(x.shape[-2:])  # type: ignore[assignment]
        dtype = ctx.dtype
        w = weight.to(dtype)
        need_x, need_w, need_b = ctx.needs_input_grad[1], ctx.needs_input_grad[2], ctx.has_bias and ctx.needs_input_grad[3]
        grad_x = engine.host_zeros(x.shape, x.dtype) if need_x else None
        grad_w = torch.zeros_like(weight) if need_w else None  # summed over partitions, on the device
        grad_b = torch.zeros(weight.shape[0], device=weight.device, dtype=weight.dtype) if need_b else None
        # grad_w / grad_b become the parameters' .grad: model state (counted with the parameters),
        # not part of the transfer budget nor of the ledger
        reserve = nbytes(w) if dtype != weight.dtype else 0
        parts = plan_parts(node, x.shape[0], x.shape[1], weight.shape[0], in_size, x.element_size(),
                           engine.max_transfer_bytes, 2, 1, reserve)
        cast = w if dtype != weight.dtype else None
        with torch.autocast(engine.device.type, enabled=False), engine.ledger.hold(cast):
            for part in parts:
                xin = _padded_crop(engine, node, x, part, in_size).to(dtype)
                (r0, r1), (c0, c1) = part.out
                g = engine.to_device(grad_y[part.batch, :, r0:r1, c0:c1]).to(dtype)
                with engine.ledger.hold(xin, g):
                    gx, gw, gb = torch.ops.aten.convolution_backward(
                        g, xin, w, [weight.shape[0]] if need_b else None, list(conv.stride), [0, 0],
                        list(conv.dilation), False, [0, 0], conv.groups, [need_x, need_w, need_b],
                    )
                    with engine.ledger.hold(gx):
                        if need_w:
                            grad_w += gw.to(grad_w.dtype)
                        if need_b:
                            grad_b += gb.to(grad_b.dtype)
                        if need_x:  # strip the synthesised padding; overlapping crops add up
                            full = node.need(part.out, None)
                            (ir0, ir1), (ic0, ic1) = part.inp
                            inner = gx[..., ir0 - full[0][0] : ir1 - full[0][0], ic0 - full[1][0] : ic1 - full[1][0]]
                            grad_x[part.batch, :, ir0:ir1, ic0:ic1] += inner.to("cpu", grad_x.dtype)
        engine.sync()
        return None, grad_x, grad_w, grad_b


class OffloadConv2d(nn.Module):
    """An nn.Conv2d (its parameters, shared) run on host input, partitioned (see module doc)."""

    def __init__(self, conv: nn.Conv2d, engine: OffloadEngine):
        super().__init__()
        self.conv, self.engine = conv, engine
        self.node = _conv_node(conv)

    def forward(self, x: Tensor) -> Tensor:  # (N, C_in, H, W) host -> (N, C_out, H', W') host
        return _ConvFn.apply(self, x, self.conv.weight, self.conv.bias)


# --- BatchNorm2d ------------------------------------------------------------------------------


def _bn_parts(engine: OffloadEngine, x: Tensor, factor: int) -> list[Part]:
    size: Size = tuple(x.shape[-2:])  # type: ignore[assignment]
    parts = plan_parts(None, x.shape[0], x.shape[1], x.shape[1], size, x.element_size(),
                       engine.max_transfer_bytes, factor, 1)
    return engine.record(parts, size)


def _part_view(x: Tensor, part: Part) -> Tensor:
    (r0, r1), (c0, c1) = part.out
    return x[part.batch, :, r0:r1, c0:c1]


def stat_dtype(x: Tensor) -> torch.dtype:
    """Statistics in fp32 at least (fp16 activations under AMP), fp64 for fp64 input."""
    return torch.promote_types(x.dtype, torch.float32)


def welford_stats(engine: OffloadEngine, x: Tensor) -> tuple[Tensor, Tensor, int]:
    """Per-channel mean and M2 (sum of squared deviations) of host x over all partitions.

    Each partition's own mean and M2 are combined with Chan et al.'s parallel form of Welford's
    update, in fp32 on the device: no sum of squares of the whole tensor (which cancels badly).
    """
    count, mean, m2 = 0, None, None
    for part in _bn_parts(engine, x, 1):
        xp = engine.to_device(_part_view(x, part)).to(stat_dtype(x))  # (n, C, h, w)
        with engine.ledger.hold(xp):
            k = xp.numel() // xp.shape[1]
            mean_p = xp.mean(dim=(0, 2, 3))
            m2_p = (xp - mean_p[None, :, None, None]).square().sum(dim=(0, 2, 3))
        if mean is None:
            count, mean, m2 = k, mean_p, m2_p
            continue
        delta = mean_p - mean
        total = count + k
        mean = mean + delta * (k / total)
        m2 = m2 + m2_p + delta.square() * (count * k / total)
        count = total
    return mean, m2, count


class _BatchNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, layer: OffloadBatchNorm2d, x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        engine, bn = layer.engine, layer.bn
        acc = stat_dtype(x)
        with torch.autocast(engine.device.type, enabled=False):
            if bn.training:
                mean, m2, count = welford_stats(engine, x)  # pass 1
                if count < 2:
                    raise PartitionError(f"BatchNorm2d in training mode needs more than 1 value per channel, got {count}")
                var = m2 / count  # biased: what normalises
                if bn.track_running_stats:
                    _update_running(bn, mean, m2 / (count - 1))
            else:
                mean, var = bn.running_mean.to(acc), bn.running_var.to(acc)
            invstd = torch.rsqrt(var + bn.eps)
            scale = weight.to(acc) * invstd  # (C,)
            shift = bias.to(acc) - mean * scale
            y = engine.host_empty(x.shape, x.dtype)
            for part in _bn_parts(engine, x, 1):  # pass 2: normalise
                xp = engine.to_device(_part_view(x, part))
                with engine.ledger.hold(xp):
                    yp = torch.addcmul(shift[None, :, None, None], xp.to(acc), scale[None, :, None, None]).to(x.dtype)
                    with engine.ledger.hold(yp):
                        engine.to_host(_part_view(y, part), yp)
            engine.sync()
        ctx.layer = layer
        ctx.save_for_backward(x, weight, mean, invstd)
        return y

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        x, weight, mean, invstd = ctx.saved_tensors
        engine = ctx.layer.engine
        training = ctx.layer.bn.training
        c = x.shape[1]
        count = x.numel() // c
        acc = mean.dtype
        with torch.autocast(engine.device.type, enabled=False):
            sum_g = torch.zeros(c, device=mean.device, dtype=acc)
            sum_gx = torch.zeros(c, device=mean.device, dtype=acc)
            for part in _bn_parts(engine, x, 2):  # pass 1: the two reductions over all partitions
                xp, gp = engine.to_device(_part_view(x, part)), engine.to_device(_part_view(grad_y, part))
                with engine.ledger.hold(xp, gp):
                    g = gp.to(acc)
                    xhat = (xp.to(acc) - mean[None, :, None, None]) * invstd[None, :, None, None]
                    sum_g += g.sum(dim=(0, 2, 3))
                    sum_gx += (g * xhat).sum(dim=(0, 2, 3))
            grad_x = None
            if ctx.needs_input_grad[1]:
                grad_x = engine.host_empty(x.shape, grad_y.dtype)
                k = (weight.to(acc) * invstd)[None, :, None, None]
                mean_g, mean_gx = (sum_g / count)[None, :, None, None], (sum_gx / count)[None, :, None, None]
                for part in _bn_parts(engine, x, 2):  # pass 2: dx
                    gp = engine.to_device(_part_view(grad_y, part)).to(acc)
                    with engine.ledger.hold(gp):
                        if training:  # x's change moves the batch statistics too
                            xp = engine.to_device(_part_view(x, part))
                            xhat = (xp.to(acc) - mean[None, :, None, None]) * invstd[None, :, None, None]
                            dx = (gp - mean_g - xhat * mean_gx) * k
                        else:
                            xp, dx = None, gp * k
                        with engine.ledger.hold(xp, dx):
                            engine.to_host(_part_view(grad_x, part), dx.to(grad_x.dtype))
                engine.sync()
        return None, grad_x, sum_gx.to(weight.dtype), sum_g.to(weight.dtype)


@torch.no_grad()
def _update_running(bn: nn.BatchNorm2d, mean: Tensor, unbiased_var: Tensor) -> None:
    """nn.BatchNorm2d's update: count the batch, then average with momentum (None: cumulative)."""
    bn.num_batches_tracked.add_(1)
    factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    bn.running_mean.mul_(1 - factor).add_(mean.to(bn.running_mean.dtype), alpha=factor)
    bn.running_var.mul_(1 - factor).add_(unbiased_var.to(bn.running_var.dtype), alpha=factor)


class OffloadBatchNorm2d(nn.Module):
    """An nn.BatchNorm2d (parameters and running statistics shared) on host input, partitioned."""

    def __init__(self, bn: nn.BatchNorm2d, engine: OffloadEngine):
        super().__init__()
        if not bn.affine:
            raise PartitionError("OffloadBatchNorm2d: only affine BatchNorm2d (torchvision's) is supported")
        if bn.training is False and not bn.track_running_stats:
            raise PartitionError("OffloadBatchNorm2d: eval mode needs running statistics")
        self.bn, self.engine = bn, engine

    def forward(self, x: Tensor) -> Tensor:  # (N, C, H, W) host -> same, host
        return _BatchNormFn.apply(self, x, self.bn.weight, self.bn.bias)


# --- blocks, transfers, ResNet ----------------------------------------------------------------


class OffloadBasicBlock(nn.Module):
    """torchvision's BasicBlock with convs and BNs offloaded; ReLU and the add on the host."""

    def __init__(self, block: nn.Module, engine: OffloadEngine):
        super().__init__()
        self.block = block
        self.conv1, self.bn1 = OffloadConv2d(block.conv1, engine), OffloadBatchNorm2d(block.bn1, engine)
        self.conv2, self.bn2 = OffloadConv2d(block.conv2, engine), OffloadBatchNorm2d(block.bn2, engine)
        self.down = None
        if block.downsample is not None:
            conv, bn = block.downsample
            self.down = nn.Sequential(OffloadConv2d(conv, engine), OffloadBatchNorm2d(bn, engine))

    def forward(self, x: Tensor) -> Tensor:  # host -> host
        identity = x if self.down is None else self.down(x)
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + identity)


class _ToDevice(torch.autograd.Function):
    """Host -> device (the rest of the network runs there); the gradient comes back to the host."""

    @staticmethod
    def forward(ctx, x: Tensor, device: torch.device) -> Tensor:
        ctx.host_dtype = x.dtype
        return x.view_as(x) if device.type == "cpu" else x.to(device)

    @staticmethod
    def backward(ctx, g: Tensor):
        return g.to("cpu", ctx.host_dtype), None


class _ToHost(torch.autograd.Function):
    """Device -> host (pinned under CUDA); the gradient goes back to the device."""

    @staticmethod
    def forward(ctx, x: Tensor, engine: OffloadEngine) -> Tensor:
        ctx.device = x.device
        if x.device.type == "cpu":
            return x.view_as(x)
        host = engine.host_empty(x.shape, x.dtype)
        host.copy_(x)
        return host

    @staticmethod
    def backward(ctx, g: Tensor):
        return g.to(ctx.device), None


STEM = ("conv1", "bn1", "relu", "maxpool")
STAGES = ("layer1", "layer2", "layer3", "layer4")


class OffloadResNet(nn.Module):
    """A ResNet trunk (conv1 ... layer4) whose stem and first `stages` stages run offloaded.

    `trunk` is an nn.Sequential or a ResNet with torchvision's names (torchvision's model, the
    project's `models.resnet`, or an encoder's `.trunk`); its modules and parameters are
    shared, so an optimiser over the plain model trains this one. The rest of the trunk runs
    as is, wholly on the device; input is a host tensor (N, 3, H, W), output the device map.
    `stages` in 0..4 (0: only the stem offloaded).
    """

    def __init__(self, trunk: nn.Module, stages: int, engine: OffloadEngine):
        super().__init__()
        if not 0 <= stages <= len(STAGES):
            raise PartitionError(f"stages: expected 0..{len(STAGES)} offloaded stages, got {stages}")
        parts = trunk_parts(trunk)
        missing = [n for n in (*STEM, *STAGES) if n not in parts]
        if missing:
            raise PartitionError(f"OffloadResNet: the trunk lacks {missing} (torchvision's names expected)")
        if not isinstance(parts["maxpool"], nn.MaxPool2d):
            raise PartitionError("OffloadResNet: the stem must end in nn.MaxPool2d")
        self.engine, self.stages = engine, stages
        self.conv1 = OffloadConv2d(parts["conv1"], engine)
        self.bn1 = OffloadBatchNorm2d(parts["bn1"], engine)
        self.maxpool = parts["maxpool"]  # host: F.max_pool2d on the host tensor
        self.offloaded = nn.ModuleList(
            nn.Sequential(*[_offload_block(b, engine) for b in parts[name]]) for name in STAGES[:stages]
        )
        self.rest = nn.Sequential(*[parts[name] for name in STAGES[stages:]])

    def forward(self, x: Tensor) -> Tensor:  # (N, 3, H, W) host -> (N, C, H/32, W/32) device
        x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
        for stage in self.offloaded:
            x = stage(x)
        return self.rest(_ToDevice.apply(x, self.engine.device))


def trunk_parts(trunk: nn.Module) -> dict[str, nn.Module]:
    """conv1 ... layer4 of a ResNet, or of an nn.Sequential of those eight in order (an encoder's trunk)."""
    children = dict(trunk.named_children())
    if all(n in children for n in (*STEM, *STAGES)):
        return {n: children[n] for n in (*STEM, *STAGES)}
    if isinstance(trunk, nn.Sequential) and len(trunk) == len(STEM) + len(STAGES):
        return dict(zip((*STEM, *STAGES), trunk, strict=True))
    return children


def _offload_block(block: nn.Module, engine: OffloadEngine) -> nn.Module:
    if not all(hasattr(block, a) for a in ("conv1", "bn1", "conv2", "bn2", "downsample")) or hasattr(block, "conv3"):
        raise PartitionError(f"{type(block).__name__}: only BasicBlock (ResNet18/34) stages can be offloaded")
    return OffloadBasicBlock(block, engine)


class OffloadEncoder(nn.Module):
    """A tile encoder (`TruncatedResNet`: trunk + global pooling) on the engine: (N, 3, H, W) -> (N, dim).

    The input may be on the device or the host; it is moved to the host first (pinned under
    CUDA). The pooled embedding is on the device, where the aggregator runs.
    """

    def __init__(self, encoder: nn.Module, stages: int, engine: OffloadEngine):
        super().__init__()
        self.encoder = encoder
        self.trunk = OffloadResNet(encoder.trunk, stages, engine)
        self.engine = engine

    def forward(self, x: Tensor) -> Tensor:
        x = _ToHost.apply(x, self.engine) if x.device.type != "cpu" else x
        return self.encoder.pool(self.trunk(x)).flatten(1)


# --- memory estimates and the stage policy ----------------------------------------------------


def saved_bytes(fn, *args) -> tuple[int, object]:
    """Bytes of the distinct storages autograd saves while running fn(*args) (and its result).

    Storages are told apart by their address, so a tensor saved by two nodes counts once.
    """
    seen: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        s = t.untyped_storage()
        seen[s._cdata] = s.nbytes()  # the StorageImpl's address: stable across Python wrappers
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    return sum(seen.values()), out


def estimate_device_bytes(trunk: nn.Module, shape: Sequence[int], stages: int | None,
                          transfer_bytes: int = 0, elem_bytes: int = 4) -> int:
    """Device bytes of one training step: parameters, grads and two Adam moments, plus either the
    whole trunk's saved activations (`stages` None: plain) or the on-device rest's after `stages`
    offloaded stages and one partition's working set (`transfer_bytes`). Run on the meta device.

    The transient of the backward (the gradients of one layer's input and output) is added as
    twice the largest activation of the part that runs on the device.
    """
    params = sum(p.numel() for p in trunk.parameters()) * elem_bytes
    saved = 0
    meta_parts = trunk_parts(copy.deepcopy(trunk).to("meta"))
    names = [n for n in (*STEM, *STAGES) if n in meta_parts]
    x = torch.empty(tuple(shape), device="meta", requires_grad=True)
    on_device = names if stages is None else list(STAGES[stages:])
    largest = x.numel() if stages is None else 0
    for name in names:
        if name not in on_device:
            with torch.no_grad():
                x = meta_parts[name](x)
            continue
        if not x.requires_grad:
            x = x.detach().requires_grad_(True)
        largest = max(largest, x.numel())
        size, x = saved_bytes(meta_parts[name], x)
        saved += size
        largest = max(largest, x.numel())
    return 4 * params + saved + 2 * largest * elem_bytes + (transfer_bytes if stages is not None else 0)


def choose_stages(trunk: nn.Module, shape: Sequence[int], budget_bytes: int, transfer_bytes: int) -> int | None:
    """Fewest offloaded stages (0..4) whose estimated device bytes fit `budget_bytes`; None if none do."""
    for stages in range(len(STAGES) + 1):
        if estimate_device_bytes(trunk, shape, stages, transfer_bytes) <= budget_bytes:
            return stages
    return None


__all__ = [
    "DeviceLedger", "OffloadBasicBlock", "OffloadBatchNorm2d", "OffloadConv2d", "OffloadEncoder",
    "OffloadEngine", "OffloadResNet", "Part", "choose_stages", "estimate_device_bytes", "plan_parts",
    "saved_bytes", "welford_stats",
]  # fmt: skip

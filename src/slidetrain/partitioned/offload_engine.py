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

`DeviceLedger` is the engine's own account of the device bytes it holds: every tensor it
allocates there while alive (transferred crops and their staging copies, outputs, input and
per-partition weight gradients, the weight-gradient sums, BatchNorm's x_hat and g * x_hat, fp16
parameter casts, a bound on the per-channel statistics). The plans keep it under
`max_transfer_bytes`. All device work runs inside `OffloadEngine.device_scope()`, so an
independent measure (`partitioned.device_meter`) can count the tensors created there and check
the ledger against them on CPU, where "device" and "host" are the same RAM. Nothing here
knows about slides.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

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

    def add_bytes(self, n: int) -> None:
        self.current += n
        self.peak = max(self.peak, self.current)

    @contextlib.contextmanager
    def scope(self) -> Iterator[Held]:
        """Tensors added inside are held until released or until the block ends, whichever is first."""
        held = Held(self)
        try:
            yield held
        finally:
            self.current -= held.bytes


class Held:
    """The tensors one block of engine code holds on the device (see `DeviceLedger.scope`).

    A tensor is added when it is allocated and released where its last reference is dropped;
    one added twice counts twice (an over-count is safe, an under-count is what the meter catches).
    """

    def __init__(self, ledger: DeviceLedger) -> None:
        self.ledger, self.bytes = ledger, 0

    def add_bytes(self, n: int) -> None:
        self.bytes += n
        self.ledger.add_bytes(n)

    def add(self, t: Tensor | None) -> Tensor | None:
        self.add_bytes(nbytes(t))
        return t

    def release(self, *tensors: Tensor | None) -> None:
        n = nbytes(*tensors)
        self.bytes -= n
        self.ledger.current -= n


@dataclass
class DeviceScope:
    """One stretch of device work; what it hands over (parameter gradients) outlives it as model state."""

    handed_over: list[Tensor] = field(default_factory=list)

    def hand_over(self, *tensors: Tensor | None) -> None:
        self.handed_over.extend(t for t in tensors if t is not None)


class OffloadEngine:
    """Where offloaded layers compute, how much one transfer may carry, and the ledger.

    `max_transfer_bytes`: the most the engine holds on the device at once (the budget of
    Algorithm 1's max_N): one partition's working set (input crop, output, in the backward
    their gradients and the partition's weight gradient) plus what a layer keeps across its
    partitions (the weight-gradient sums, fp16 parameter casts, per-channel statistics).
    Parameters, their `.grad` and optimiser state are model state, outside this budget.
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
        self.scope: DeviceScope | None = None  # the device work under way, if any
        self.scope_exit_hooks: list[Callable[[DeviceScope], None]] = []  # a meter's, while one watches

    def record(self, parts: list[Part], out_size: Size) -> list[Part]:
        self.parts_run += len(parts)
        self.spatial_parts_run += sum(p.out != ((0, out_size[0]), (0, out_size[1])) for p in parts)
        return parts

    @contextlib.contextmanager
    def device_scope(self) -> Iterator[DeviceScope]:
        """Where a layer computes on the device. Host buffers are allocated outside it, so on CPU
        every tensor created inside is device memory (what `device_meter` counts). Nested: the outer."""
        if self.scope is not None:
            yield self.scope
            return
        scope = self.scope = DeviceScope()
        try:
            yield scope
        finally:
            self.scope = None
            for hook in self.scope_exit_hooks:
                hook(scope)

    def copy_in(self, src: Tensor, dtype: torch.dtype, held: Held) -> Tensor:
        """A fresh device tensor holding src (a host view) in dtype, held. Always a copy, so the
        caller may work in place. A cast on CUDA goes through a staging copy in src's dtype
        (converting on the host would cost a host temporary per partition), held while alive."""
        if self.device.type == "cpu" or src.dtype == dtype:
            out = held.add(torch.empty(src.shape, dtype=dtype, device=self.device))
            out.copy_(src, non_blocking=self.pinned)
            return out
        staged = held.add(src.to(self.device, non_blocking=self.pinned))
        out = held.add(staged.to(dtype))
        held.release(staged)
        return out

    def add_to_host(self, dst: Tensor, src: Tensor, held: Held) -> None:
        """dst (a host view) += src (a device view): overlapping crops' input gradients add up."""
        if self.device.type == "cpu":
            dst.add_(src)
            return
        # the copy would make a strided device view contiguous on the device: do it here, held
        staged = src if src.is_contiguous() else held.add(src.contiguous())
        dst.add_(staged.to("cpu"))  # a host temporary in src's dtype; the add converts
        if staged is not src:
            held.release(staged)

    def host_empty(self, shape: Sequence[int], dtype: torch.dtype) -> Tensor:
        return torch.empty(tuple(shape), dtype=dtype, pin_memory=self.pinned)

    def host_zeros(self, shape: Sequence[int], dtype: torch.dtype) -> Tensor:
        return self.host_empty(shape, dtype).zero_()

    def host_copy(self, t: Tensor) -> Tensor:
        """A host copy of a small device tensor (statistics saved from forward to backward)."""
        return t.to("cpu", copy=True)

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

    A partition's working set is bounded by factor_in * padded input crop + factor_out * output,
    at elem_bytes per value (the callers count what their code holds at once: a convolution's
    forward the crop, its padded copy and the output; its backward the padded crop, the input
    gradient, the output gradient and its staging copy). `reserve`: what the layer holds across
    its partitions. `node` None means a pointwise layer (output region = input region).
    """
    out_size = in_size if node is None else node.out_size(in_size)

    def need(out: Region) -> Region:
        return out if node is None else node.need(out, in_size)

    def cost(samples: int, out: Region) -> int:  # the padded crop is what lives on the device
        padded = out if node is None else node.need(out, None)
        return samples * elem_bytes * (factor_in * c_in * _area(padded) + factor_out * c_out * _area(out))

    if reserve >= budget:
        raise PartitionError(
            f"max_transfer_bytes={budget}: a ({c_in}->{c_out}) layer holds {reserve} bytes across its "
            "partitions (weight-gradient sums and each partition's weight gradient, fp16 casts, "
            "per-channel statistics); expected a budget above that"
        )
    budget -= reserve  # what stays on the device across partitions

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
            f"max_transfer_bytes={budget + reserve} ({reserve} of it held across partitions): "
            f"even one output pixel of a ({c_in}->{c_out}) layer needs "
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


def _itemsize(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits // 8


def _conv_node(conv: nn.Conv2d) -> Local:
    node = as_node(conv)
    if not isinstance(node, Local):
        raise PartitionError(f"{conv}: expected a sliding-window node")
    return node


def _cast_params(weight: Tensor, bias: Tensor | None, dtype: torch.dtype, held: Held) -> tuple[Tensor, Tensor | None]:
    """The parameters in the compute dtype: themselves, or fp16 copies under AMP (held)."""
    if dtype == weight.dtype:
        return weight, bias
    return held.add(weight.to(dtype)), held.add(None if bias is None else bias.to(dtype))


def _padded_crop(engine: OffloadEngine, node: Local, x: Tensor, part: Part, dtype: torch.dtype, held: Held) -> Tensor:
    """The partition's input crop on the device, padded where its window crosses the border."""
    full = node.need(part.out, None)
    xin = engine.copy_in(_crop(x, part, part.inp), dtype, held)
    (fr0, fr1), (fc0, fc1) = full
    (ir0, ir1), (ic0, ic1) = part.inp
    pad = (ic0 - fc0, fc1 - ic1, ir0 - fr0, fr1 - ir1)
    if not any(pad):
        return xin
    padded = held.add(F.pad(xin, pad))  # both alive while F.pad copies: the planner's factor_in 2
    held.release(xin)  # its last reference goes with this frame
    return padded


def _conv_forward_part(
    engine: OffloadEngine,
    conv: nn.Conv2d,
    node: Local,
    x: Tensor,
    w: Tensor,
    b: Tensor | None,
    part: Part,
    dtype: torch.dtype,
    y: Tensor,
) -> None:
    with engine.ledger.scope() as held:
        xin = _padded_crop(engine, node, x, part, dtype, held)  # (n, C_in, h_in, w_in)
        out = held.add(F.conv2d(xin, w, b, conv.stride, 0, conv.dilation, conv.groups))  # (n, C_out, h, w)
        (r0, r1), (c0, c1) = part.out
        engine.to_host(y[part.batch, :, r0:r1, c0:c1], out)


def _conv_backward_part(
    engine: OffloadEngine,
    conv: nn.Conv2d,
    node: Local,
    x: Tensor,
    w: Tensor,
    grad_y: Tensor,
    part: Part,
    dtype: torch.dtype,
    grad_x: Tensor | None,
    grad_w: Tensor | None,
    grad_b: Tensor | None,
) -> None:
    need = [grad_x is not None, grad_w is not None, grad_b is not None]
    with engine.ledger.scope() as held:
        xin = _padded_crop(engine, node, x, part, dtype, held)  # (n, C_in, h_in, w_in)
        (r0, r1), (c0, c1) = part.out
        g = engine.copy_in(grad_y[part.batch, :, r0:r1, c0:c1], dtype, held)  # (n, C_out, h, w)
        gx, gw, gb = torch.ops.aten.convolution_backward(
            g,
            xin,
            w,
            [w.shape[0]] if need[2] else None,
            list(conv.stride),
            [0, 0],
            list(conv.dilation),
            False,
            [0, 0],
            conv.groups,
            need,
        )
        for t in (gx, gw, gb):  # the input gradient and this partition's weight and bias gradients
            held.add(t)
        if grad_w is not None:
            grad_w.add_(gw)
        if grad_b is not None:
            grad_b.add_(gb)
        if grad_x is not None:  # strip the synthesised padding; overlapping crops add up
            full = node.need(part.out, None)
            (ir0, ir1), (ic0, ic1) = part.inp
            inner = gx[..., ir0 - full[0][0] : ir1 - full[0][0], ic0 - full[1][0] : ic1 - full[1][0]]
            engine.add_to_host(grad_x[part.batch, :, ir0:ir1, ic0:ic1], inner, held)


class _ConvFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, layer: OffloadConv2d, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        engine, conv, node = layer.engine, layer.conv, layer.node
        in_size: Size = tuple(x.shape[-2:])  # type: ignore[assignment]
        out_size = node.out_size(in_size)
        dtype = compute_dtype(engine.device) or x.dtype
        n, c_out = x.shape[0], weight.shape[0]
        y = engine.host_empty((n, c_out, *out_size), dtype)  # (N, C_out, H_out, W_out) on host
        elem = max(x.element_size(), _itemsize(dtype))  # a cast's staging copy is in x's dtype
        with torch.autocast(engine.device.type, enabled=False), engine.device_scope(), engine.ledger.scope() as held:
            w, b = _cast_params(weight, bias, dtype, held)
            parts = engine.record(
                plan_parts(node, n, x.shape[1], c_out, in_size, elem, engine.max_transfer_bytes, 2, 1, held.bytes),
                out_size,
            )
            for part in parts:
                _conv_forward_part(engine, conv, node, x, w, b, part, dtype, y)
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
        need_x, need_w, need_b = (
            ctx.needs_input_grad[1],
            ctx.needs_input_grad[2],
            ctx.has_bias and ctx.needs_input_grad[3],
        )
        grad_x = engine.host_zeros(x.shape, x.dtype) if need_x else None
        elem = max(x.element_size(), grad_y.element_size(), _itemsize(dtype))
        with (
            torch.autocast(engine.device.type, enabled=False),
            engine.device_scope() as scope,
            engine.ledger.scope() as held,
        ):
            # the sums over partitions stay on the device for the whole layer, then become the
            # parameters' .grad (model state from there: handed over)
            grad_w = held.add(torch.zeros_like(weight)) if need_w else None
            grad_b = (
                held.add(torch.zeros(weight.shape[0], device=weight.device, dtype=weight.dtype)) if need_b else None
            )
            w, _ = _cast_params(weight, None, dtype, held)
            # convolution_backward returns each partition's weight (and bias) gradient in the compute dtype
            part_grads = ((weight.numel() if need_w else 0) + (weight.shape[0] if need_b else 0)) * _itemsize(dtype)
            parts = plan_parts(
                node,
                x.shape[0],
                x.shape[1],
                weight.shape[0],
                in_size,
                elem,
                engine.max_transfer_bytes,
                2,
                2,
                held.bytes + part_grads,
            )
            for part in parts:
                _conv_backward_part(engine, conv, node, x, w, grad_y, part, dtype, grad_x, grad_w, grad_b)
            scope.hand_over(grad_w, grad_b)
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

#: per-channel (C,) vectors a BatchNorm layer has alive at once at most, counted along the code
#: below (forward: mean, M2, var, invstd, scale, shift and a temporary; backward: mean, invstd,
#: the two sums, a partition's sum, k, the two means); held for the whole layer
STAT_VECTORS = 8


def _stat_bytes(x: Tensor) -> int:
    return STAT_VECTORS * x.shape[1] * _itemsize(stat_dtype(x))


def _bytes_per_value(acc: torch.dtype, tensors: int, *dtypes: torch.dtype) -> int:
    """A partition's device bytes per element: `tensors` maps in acc, plus a staging copy or an
    output cast in another dtype (never both alive: staging ends before the compute)."""
    return tensors * _itemsize(acc) + max((_itemsize(d) for d in dtypes if d != acc), default=0)


def _bn_parts(engine: OffloadEngine, x: Tensor, bytes_per_value: int, reserve: int) -> list[Part]:
    size: Size = tuple(x.shape[-2:])  # type: ignore[assignment]
    parts = plan_parts(
        None, x.shape[0], x.shape[1], x.shape[1], size, 1, engine.max_transfer_bytes, bytes_per_value, 0, reserve
    )
    return engine.record(parts, size)


def _part_view(x: Tensor, part: Part) -> Tensor:
    (r0, r1), (c0, c1) = part.out
    return x[part.batch, :, r0:r1, c0:c1]


def stat_dtype(x: Tensor) -> torch.dtype:
    """Statistics in fp32 at least (fp16 activations under AMP), fp64 for fp64 input."""
    return torch.promote_types(x.dtype, torch.float32)


def _part_moments(engine: OffloadEngine, x: Tensor, part: Part, acc: torch.dtype) -> tuple[int, Tensor, Tensor]:
    """Count, mean (C,) and M2 (C,) of one partition; var_mean reduces without a centred copy."""
    with engine.ledger.scope() as held:
        xp = engine.copy_in(_part_view(x, part), acc, held)  # (n, C, h, w)
        var, mean = torch.var_mean(xp, dim=(0, 2, 3), correction=0)
        k = xp.numel() // xp.shape[1]
        return k, mean, var.mul_(k)


def welford_stats(engine: OffloadEngine, x: Tensor) -> tuple[Tensor, Tensor, int]:
    """Per-channel mean and M2 (sum of squared deviations) of host x over all partitions.

    Each partition's own mean and M2 are combined with Chan et al.'s parallel form of Welford's
    update, in fp32 on the device: no sum of squares of the whole tensor (which cancels badly).
    The running mean and M2 are updated in place (fewer per-channel vectors alive).
    """
    acc = stat_dtype(x)
    count, mean, m2 = 0, None, None
    for part in _bn_parts(engine, x, _bytes_per_value(acc, 1, x.dtype), _stat_bytes(x)):
        k, mean_p, m2_p = _part_moments(engine, x, part, acc)
        if mean is None:
            count, mean, m2 = k, mean_p, m2_p
            continue
        total = count + k
        delta = mean_p - mean  # (C,)
        mean.add_(delta, alpha=k / total)
        m2.add_(m2_p).add_(delta.square_(), alpha=count * k / total)
        count = total
    return mean, m2, count


def _bn_normalise_part(engine: OffloadEngine, x: Tensor, part: Part, scale: Tensor, shift: Tensor, y: Tensor) -> None:
    with engine.ledger.scope() as held:
        yp = engine.copy_in(_part_view(x, part), scale.dtype, held)  # (n, C, h, w): x, then y in place
        yp.mul_(scale[None, :, None, None]).add_(shift[None, :, None, None])
        # back to the activations' dtype on the device: half the bytes to move under AMP
        out = yp if yp.dtype == y.dtype else held.add(yp.to(y.dtype))
        engine.to_host(_part_view(y, part), out)


def _bn_grad_sums_part(
    engine: OffloadEngine,
    x: Tensor,
    grad_y: Tensor,
    part: Part,
    mean: Tensor,
    invstd: Tensor,
    sum_g: Tensor,
    sum_gx: Tensor,
) -> None:
    with engine.ledger.scope() as held:
        xhat = engine.copy_in(_part_view(x, part), mean.dtype, held)  # (n, C, h, w): x, then x_hat in place
        gxhat = engine.copy_in(_part_view(grad_y, part), mean.dtype, held)  # g, then g * x_hat in place
        sum_g.add_(gxhat.sum(dim=(0, 2, 3)))
        xhat.sub_(mean[None, :, None, None]).mul_(invstd[None, :, None, None])
        sum_gx.add_(gxhat.mul_(xhat).sum(dim=(0, 2, 3)))


def _bn_grad_input_part(
    engine: OffloadEngine,
    x: Tensor,
    grad_y: Tensor,
    part: Part,
    mean: Tensor,
    invstd: Tensor,
    k: Tensor,
    mean_g: Tensor,
    mean_gx: Tensor,
    training: bool,
    grad_x: Tensor,
) -> None:
    with engine.ledger.scope() as held:
        dx = engine.copy_in(_part_view(grad_y, part), k.dtype, held)  # (n, C, h, w): g, then dx in place
        if training:  # x's change moves the batch statistics: dx = (g - mean(g) - x_hat * mean(g x_hat)) * k
            xhat = engine.copy_in(_part_view(x, part), k.dtype, held)
            xhat.sub_(mean[None, :, None, None]).mul_(invstd[None, :, None, None])
            dx.sub_(mean_g[None, :, None, None]).sub_(xhat.mul_(mean_gx[None, :, None, None]))
        dx.mul_(k[None, :, None, None])
        out = dx if dx.dtype == grad_x.dtype else held.add(dx.to(grad_x.dtype))
        engine.to_host(_part_view(grad_x, part), out)


class _BatchNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, layer: OffloadBatchNorm2d, x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        engine, bn = layer.engine, layer.bn
        acc = stat_dtype(x)
        y = engine.host_empty(x.shape, x.dtype)
        with torch.autocast(engine.device.type, enabled=False), engine.device_scope(), engine.ledger.scope() as held:
            held.add_bytes(_stat_bytes(x))
            if bn.training:
                mean, m2, count = welford_stats(engine, x)  # pass 1
                if count < 2:
                    raise PartitionError(
                        f"BatchNorm2d in training mode needs more than 1 value per channel, got {count}"
                    )
                if bn.track_running_stats:
                    _update_running(bn, mean, m2 / (count - 1))
                var = m2.div_(count)  # biased: what normalises
            else:
                mean, var = bn.running_mean.to(acc), bn.running_var.to(acc)
            invstd = torch.rsqrt(var + bn.eps)
            scale = weight.to(acc) * invstd  # (C,)
            shift = bias.to(acc) - mean * scale
            for part in _bn_parts(engine, x, _bytes_per_value(acc, 1, x.dtype), held.bytes):  # pass 2
                _bn_normalise_part(engine, x, part, scale, shift, y)
        engine.sync()
        ctx.layer = layer
        # the statistics wait for the backward on the host: nothing of the engine's stays on the device
        ctx.save_for_backward(x, weight, engine.host_copy(mean), engine.host_copy(invstd))
        return y

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        x, weight, saved_mean, saved_invstd = ctx.saved_tensors
        engine = ctx.layer.engine
        training = ctx.layer.bn.training
        c = x.shape[1]
        count = x.numel() // c
        acc = saved_mean.dtype
        grad_x = engine.host_empty(x.shape, grad_y.dtype) if ctx.needs_input_grad[1] else None
        per_value = _bytes_per_value(acc, 2, x.dtype, grad_y.dtype)
        with (
            torch.autocast(engine.device.type, enabled=False),
            engine.device_scope() as scope,
            engine.ledger.scope() as held,
        ):
            held.add_bytes(_stat_bytes(x))
            mean, invstd = saved_mean.to(engine.device), saved_invstd.to(engine.device)  # (C,)
            sum_g = torch.zeros(c, device=engine.device, dtype=acc)
            sum_gx = torch.zeros(c, device=engine.device, dtype=acc)
            for part in _bn_parts(engine, x, per_value, held.bytes):  # pass 1: sum(g), sum(g * x_hat)
                _bn_grad_sums_part(engine, x, grad_y, part, mean, invstd, sum_g, sum_gx)
            if grad_x is not None:
                k = weight.to(acc) * invstd  # (C,)
                mean_g, mean_gx = sum_g / count, sum_gx / count
                for part in _bn_parts(engine, x, per_value, held.bytes):  # pass 2: dx
                    _bn_grad_input_part(engine, x, grad_y, part, mean, invstd, k, mean_g, mean_gx, training, grad_x)
            grad_w, grad_b = sum_gx.to(weight.dtype), sum_g.to(weight.dtype)
            scope.hand_over(grad_w, grad_b)
        engine.sync()
        return None, grad_x, grad_w, grad_b


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


def estimate_device_bytes(
    trunk: nn.Module, shape: Sequence[int], stages: int | None, transfer_bytes: int = 0, elem_bytes: int = 4
) -> int:
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
    "DeviceLedger", "DeviceScope", "Held", "OffloadBasicBlock", "OffloadBatchNorm2d", "OffloadConv2d", "OffloadEncoder",
    "OffloadEngine", "OffloadResNet", "Part", "choose_stages", "estimate_device_bytes", "plan_parts",
    "saved_bytes", "welford_stats",
]  # fmt: skip

"""The offload engine against plain PyTorch: outputs and every gradient, case by case.

Each case builds a layer (or network), runs it plainly and on the engine with the same input
and output gradient, and compares the output, the input gradient, every parameter gradient
and (BatchNorm) the running statistics after several steps. A case's `max_abs_diff` is the
largest absolute difference over all compared tensors, `max_rel_diff` the largest of
max|engine - plain| / max|plain| per tensor (see SCALE_FLOOR).

fp64 rows show the engine is exact (differences at rounding level, ~1e-14). In fp32 the engine
cannot equal plain PyTorch bit for bit: both round, in orders that depend on the CPU's kernels,
and in a deep ReLU network a pre-activation within rounding of 0 can fall on either side. So
fp32 rows also compare both with the plain model in float64 (`fp32_noise`: plain fp32's own
distance, `engine_vs_fp64`: the engine's) and give the share of the bound the engine uses
(slidetrain.bench.fidelity), which holds on every CPU.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slidetrain.bench.fidelity import JUMP, Fidelity, fidelity
from slidetrain.partitioned.offload_engine import (
    OffloadBasicBlock,
    OffloadBatchNorm2d,
    OffloadConv2d,
    OffloadEncoder,
    OffloadEngine,
)


@dataclass
class CaseResult:
    case: str
    max_abs_diff: float  # engine vs plain, same dtype
    max_rel_diff: float
    #: fp32 only (NaN in fp64): plain fp32's own largest relative rms distance from the float64
    #: reference, the engine's, and the engine's distance as a share of the bound it must keep
    #: (slidetrain.bench.fidelity: <= FACTOR x plain's + FLOOR; <= 1 passes)
    fp32_noise: float = float("nan")
    engine_vs_fp64: float = float("nan")
    bound_use: float = float("nan")


#: a tensor's scale is floored at this fraction of the case's largest: a gradient that is zero
#: in exact arithmetic (ABMIL's last attention bias: softmax ignores a shift) is rounding noise
#: on both sides, and dividing noise by noise says nothing
SCALE_FLOOR = 1e-3


def compare(pairs: list[tuple[Tensor, Tensor]]) -> tuple[float, float]:
    """(max abs diff, max per-tensor relative diff) over (engine, plain) pairs."""
    if any((got is None) != (ref is None) for got, ref in pairs):
        raise AssertionError("a gradient is present on one side only")
    pairs = [(got, ref) for got, ref in pairs if ref is not None]
    case_scale = max(float(ref.double().abs().max()) for _, ref in pairs)
    max_abs = max_rel = 0.0
    for got, ref in pairs:
        diff = float((got.double() - ref.double()).abs().max())
        scale = max(float(ref.double().abs().max()), SCALE_FLOOR * case_scale)
        max_abs = max(max_abs, diff)
        max_rel = max(max_rel, diff / scale if scale > 0 else diff)
    return max_abs, max_rel


def _grads(module: nn.Module) -> list[Tensor | None]:
    return [p.grad for p in module.parameters() if p.requires_grad]


def run_sides(
    plain: nn.Module,
    wrap: Callable[[nn.Module, OffloadEngine], nn.Module],
    x: Tensor,
    budget: int,
    steps: int = 1,
    loss: Callable[[Tensor], Tensor] | None = None,
    seed: int = 0,
    reference: bool = False,
) -> tuple[dict[str, dict[str, Tensor | None]], OffloadEngine]:
    """Run `steps` forward/backward passes plainly and on the engine; every compared tensor by name.

    Returns {"plain": {...}, "engine": {...}} (and "reference": the plain model cast to float64
    and fed the same inputs, cast, when `reference`). Each step draws a new input (x's shape
    and dtype, from `seed`) and a new output gradient (unless `loss` reduces the output);
    parameters are not updated, so only the running statistics carry over from step to step.
    """
    twin = copy.deepcopy(plain)
    engine = OffloadEngine("cpu", budget)
    models = {"plain": plain, "engine": wrap(twin, engine)}
    if reference:
        models["reference"] = copy.deepcopy(plain).double()
    names = [n for n, p in plain.named_parameters() if p.requires_grad]  # wrappers rename, not reorder
    gen = torch.Generator().manual_seed(seed)
    sides: dict[str, dict[str, Tensor | None]] = {side: {} for side in models}
    for step in range(steps):
        xs = x if step == 0 else torch.randn(x.shape, generator=gen, dtype=x.dtype) * 2 + 0.5
        g = None
        for side, model in models.items():
            model.zero_grad(set_to_none=True)
            xin = xs.clone().to(torch.float64 if side == "reference" else xs.dtype).requires_grad_(True)
            y = model(xin)
            if loss is not None:
                loss(y).backward()
            else:
                if g is None:  # drawn once in the compared dtype, cast for the reference
                    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed + step), dtype=y.dtype)
                y.backward(g.to(y.dtype))
            sides[side].update(
                {
                    f"step{step}.output": y.detach(),
                    f"step{step}.grad_input": xin.grad,
                    **{f"step{step}.grad.{n}": t for n, t in zip(names, _grads(model), strict=True)},
                }
            )
    buffers = {side: dict(m.named_buffers()) for side, m in (("plain", plain), ("engine", twin))}
    if reference:
        buffers["reference"] = dict(models["reference"].named_buffers())
    for name, b_ref in buffers["plain"].items():
        for side in buffers:
            b = buffers[side][name]
            if b_ref.is_floating_point():
                sides[side][f"buffer.{name}"] = b
            elif not torch.equal(b_ref, b):  # num_batches_tracked
                raise AssertionError(f"integer buffer {name} differs: {side} {b.tolist()} vs plain {b_ref.tolist()}")
    return sides, engine


# --- the cases --------------------------------------------------------------------------------


def _conv_case(c_in, c_out, k, stride, pad, shape, budget, bias=True):
    def make(dtype, seed):
        torch.manual_seed(seed)
        conv = nn.Conv2d(c_in, c_out, k, stride, pad, bias=bias).to(dtype)
        x = torch.randn(shape, dtype=dtype)
        return conv, OffloadConv2d, x, budget, 1, None

    return make


def _bn_case(shape, budget, steps, momentum=0.1, train=True):
    def make(dtype, seed):
        torch.manual_seed(seed)
        bn = nn.BatchNorm2d(shape[1], momentum=momentum).to(dtype)
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
            if not train:
                bn.running_mean.uniform_(-1, 1)
                bn.running_var.uniform_(0.5, 2)
        bn.train(train)
        x = torch.randn(shape, dtype=dtype) * 3 + 1
        return bn, OffloadBatchNorm2d, x, budget, steps, None

    return make


def _block_case(c_in, planes, stride, shape, budget):
    def make(dtype, seed):
        import torchvision

        torch.manual_seed(seed)
        down = None
        if stride != 1 or c_in != planes:
            down = nn.Sequential(nn.Conv2d(c_in, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
        block = torchvision.models.resnet.BasicBlock(c_in, planes, stride, down).to(dtype)
        x = torch.randn(shape, dtype=dtype)
        return block, OffloadBasicBlock, x, budget, 2, None

    return make


class _BagModel(nn.Module):
    """Tile encoder + ABMIL on one bag: (K, 3, h, w) -> (n_classes,) logits."""

    def __init__(self, encoder: nn.Module, aggregator: nn.Module):
        super().__init__()
        self.encoder, self.aggregator = encoder, aggregator

    def forward(self, x: Tensor) -> Tensor:
        return self.aggregator(self.encoder(x)).logits


def _resnet_case(shape, stages, budget, bag: bool):
    def make(dtype, seed):
        from slidetrain.models.abmil import ABMIL, ABMILConfig
        from slidetrain.models.encoders import build_encoder

        torch.manual_seed(seed)
        encoder = build_encoder("resnet18", "none", seed=seed).train().to(dtype)
        aggregator = ABMIL(512, 3, ABMILConfig(embed_dim=64, attention_dim=32)).to(dtype)
        model = _BagModel(encoder, aggregator)

        def wrap(m: _BagModel, engine: OffloadEngine) -> nn.Module:
            return _BagModel(OffloadEncoder(m.encoder, stages, engine), m.aggregator)

        x = torch.randn(shape, dtype=dtype)
        target = torch.tensor(1)
        return model, wrap, x, budget, 2, lambda logits: F.cross_entropy(logits[None], target[None])

    return make


#: name -> builder(dtype, seed) -> (plain module, wrapper, input, transfer budget in fp32 bytes, steps, loss)
CASES: dict[str, Callable] = {
    "conv3x3_s1_batch": _conv_case(5, 7, 3, 1, 1, (6, 5, 13, 11), 2 * 4 * (2 * 5 * 15 * 13 + 7 * 13 * 11)),
    "conv3x3_s2_batch": _conv_case(5, 7, 3, 2, 1, (6, 5, 13, 11), 2 * 4 * (2 * 5 * 15 * 13 + 7 * 7 * 6)),
    "conv3x3_s1_spatial_odd": _conv_case(4, 6, 3, 1, 1, (2, 4, 37, 29), 6000),
    "conv3x3_s2_spatial_odd": _conv_case(4, 6, 3, 2, 1, (2, 4, 37, 29), 4000),
    "conv7x7_s2_spatial_odd": _conv_case(3, 8, 7, 2, 3, (1, 3, 45, 39), 12000, bias=False),
    "conv1x1_s2_spatial_odd": _conv_case(6, 4, 1, 2, 0, (2, 6, 31, 27), 1500, bias=False),
    "bn_train_batch_3steps": _bn_case((6, 5, 9, 7), 2 * 4 * 2 * 5 * 9 * 7 * 2, 3),
    "bn_train_spatial_3steps": _bn_case((2, 5, 23, 19), 3000, 3),
    "bn_train_cumulative_3steps": _bn_case((2, 5, 23, 19), 3000, 3, momentum=None),
    "bn_eval_spatial": _bn_case((2, 5, 23, 19), 3000, 1, train=False),
    "basic_block_s1_spatial": _block_case(8, 8, 1, (2, 8, 21, 17), 20000),
    "basic_block_s2_down_spatial": _block_case(8, 16, 2, (2, 8, 21, 17), 20000),
    # stem + 2 stages: an offloaded layer's weight-gradient sum and per-partition gradient count in
    # its budget, and layer3/4's (2 x 2.4 / 9.4 MB) would leave these small inputs unpartitioned
    "resnet18_abmil_bag_batch": _resnet_case((6, 3, 64, 64), 2, 2 * 2**20, bag=True),
    "resnet18_abmil_image_spatial": _resnet_case((1, 3, 160, 144), 2, 3 * 2**19, bag=False),
}


#: deep ReLU networks: their fp32 gradients may jump where a branch flips near its kink
#: (slidetrain.bench.fidelity.JUMP); their float64 rows are exact
DEEP_CASES = frozenset({"resnet18_abmil_bag_batch", "resnet18_abmil_image_spatial"})


def run_case(
    name: str, dtype: torch.dtype = torch.float32, seed: int = 0
) -> tuple[CaseResult, OffloadEngine, Fidelity | None]:
    """One case: engine vs plain; in fp32 also both against the float64 reference (a Fidelity)."""
    plain, wrap, x, budget, steps, loss = CASES[name](dtype, seed)
    budget = budget * torch.finfo(dtype).bits // 32  # budgets are fp32 bytes: fp64 cuts the same partitions
    fp32 = dtype == torch.float32
    sides, engine = run_sides(plain, wrap, x, budget, steps, loss, seed, reference=fp32)
    max_abs, max_rel = compare([(sides["engine"][k], sides["plain"][k]) for k in sides["plain"]])
    result = CaseResult(name, max_abs, max_rel)
    report = None
    if fp32:
        report = fidelity(sides["engine"], sides["plain"], sides["reference"], jump=JUMP if name in DEEP_CASES else 0.0)
        result = CaseResult(name, max_abs, max_rel, report.noise, report.engine_rel, report.worst.use)
    return result, engine, report


def run_all(dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float64)) -> Iterator[CaseResult]:
    for dtype in dtypes:
        suffix = {torch.float32: "fp32", torch.float64: "fp64"}[dtype]
        for name in CASES:
            result, _, _ = run_case(name, dtype)
            result.case = f"{name}/{suffix}"
            yield result


def write_equivalence_csv(path: str) -> list[CaseResult]:
    import dataclasses

    import pandas as pd

    from slidetrain.io import atomic_path

    rows = list(run_all())
    frame = pd.DataFrame([dataclasses.asdict(r) for r in rows])
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False, float_format="%.3e")
    return rows

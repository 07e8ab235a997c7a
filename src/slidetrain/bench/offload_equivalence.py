"""The offload engine against plain PyTorch: outputs and every gradient, case by case.

Each case builds a layer (or network), runs it plainly and on the engine with the same input
and output gradient, and compares the output, the input gradient, every parameter gradient
and (BatchNorm) the running statistics after several steps. A case's `max_abs_diff` is the
largest absolute difference over all compared tensors, `max_rel_diff` the largest of
max|engine - plain| / max|plain| per tensor (see SCALE_FLOOR).

fp64 rows show the engine is exact (differences at rounding level, ~1e-14). fp32 rows are what
the issue asks within 1e-4; in a deep ReLU network an fp32 reordering can move a pre-activation
that is within rounding of 0 to the other side, flipping one element's ReLU derivative, which
no partitioned (or differently vectorised) computation can avoid: the fp64 rows are the proof.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slidetrain.partitioned.offload import (
    OffloadBasicBlock,
    OffloadBatchNorm2d,
    OffloadConv2d,
    OffloadEncoder,
    OffloadEngine,
)


@dataclass
class CaseResult:
    case: str
    max_abs_diff: float
    max_rel_diff: float


#: a tensor's scale is floored at this fraction of the case's largest: a gradient that is zero
#: in exact arithmetic (ABMIL's last attention bias: softmax ignores a shift) is rounding noise
#: on both sides, and dividing noise by noise says nothing
SCALE_FLOOR = 1e-3


def compare(pairs: list[tuple[Tensor, Tensor]]) -> tuple[float, float]:
    """(max abs diff, max per-tensor relative diff) over (engine, plain) pairs."""
    if any(got is None or ref is None for got, ref in pairs):
        raise AssertionError("a gradient is missing on one side")
    case_scale = max(float(ref.double().abs().max()) for _, ref in pairs)
    max_abs = max_rel = 0.0
    for got, ref in pairs:
        diff = float((got.double() - ref.double()).abs().max())
        scale = max(float(ref.double().abs().max()), SCALE_FLOOR * case_scale)
        max_abs = max(max_abs, diff)
        max_rel = max(max_rel, diff / scale if scale > 0 else diff)
    return max_abs, max_rel


def _grads(module: nn.Module) -> list[Tensor]:
    return [p.grad for p in module.parameters() if p.requires_grad]


def run_pair(
    plain: nn.Module, wrap: Callable[[nn.Module, OffloadEngine], nn.Module], x: Tensor, budget: int,
    steps: int = 1, loss: Callable[[Tensor], Tensor] | None = None, seed: int = 0,
) -> tuple[list[tuple[Tensor, Tensor]], OffloadEngine]:
    """Run `steps` forward/backward passes plainly and on the engine; the pairs to compare.

    Each step draws a new input (x's shape and dtype, from `seed`) and a new output gradient
    (unless `loss` reduces the output); parameters are not updated, so only the running
    statistics carry over from step to step.
    """
    twin = copy.deepcopy(plain)
    engine = OffloadEngine("cpu", budget)
    off = wrap(twin, engine)
    gen = torch.Generator().manual_seed(seed)
    pairs: list[tuple[Tensor, Tensor]] = []
    for step in range(steps):
        xs = x if step == 0 else torch.randn(x.shape, generator=gen, dtype=x.dtype) * 2 + 0.5
        outs = []
        for model in (plain, off):
            model.zero_grad(set_to_none=True)
            xin = xs.clone().requires_grad_(True)
            y = model(xin)
            if loss is not None:
                loss(y).backward()
            else:
                g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed + step), dtype=y.dtype)
                y.backward(g)
            outs.append((y.detach(), xin.grad, _grads(model)))
        (y_ref, gx_ref, g_ref), (y_off, gx_off, g_off) = outs
        pairs += [(y_off, y_ref), (gx_off, gx_ref), *zip(g_off, g_ref, strict=True)]
    pairs += [(b_off, b_ref) for b_ref, b_off in zip(plain.buffers(), twin.buffers(), strict=True)
              if b_ref.is_floating_point()]
    for b_ref, b_off in zip(plain.buffers(), twin.buffers(), strict=True):
        if not b_ref.is_floating_point() and not torch.equal(b_ref, b_off):  # num_batches_tracked
            raise AssertionError(f"integer buffer differs: engine {b_off.tolist()} vs plain {b_ref.tolist()}")
    return pairs, engine


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


#: name -> builder(dtype, seed) -> (plain module, wrapper, input, transfer budget, steps, loss)
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
    "resnet18_abmil_bag_batch": _resnet_case((6, 3, 64, 64), 4, 2 * 2**20, bag=True),
    "resnet18_abmil_image_spatial": _resnet_case((1, 3, 160, 144), 4, 256 * 2**10, bag=False),
}


def run_case(name: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> tuple[CaseResult, OffloadEngine]:
    plain, wrap, x, budget, steps, loss = CASES[name](dtype, seed)
    pairs, engine = run_pair(plain, wrap, x, budget, steps, loss, seed)
    max_abs, max_rel = compare(pairs)
    return CaseResult(name, max_abs, max_rel), engine


def run_all(dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float64)) -> Iterator[CaseResult]:
    for dtype in dtypes:
        suffix = {torch.float32: "fp32", torch.float64: "fp64"}[dtype]
        for name in CASES:
            result, _ = run_case(name, dtype)
            result.case = f"{name}/{suffix}"
            yield result


def write_equivalence_csv(path: str) -> list[CaseResult]:
    import pandas as pd

    from slidetrain.io import atomic_path

    rows = list(run_all())
    frame = pd.DataFrame([{"case": r.case, "max_abs_diff": r.max_abs_diff, "max_rel_diff": r.max_rel_diff}
                          for r in rows])
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False, float_format="%.3e")
    return rows

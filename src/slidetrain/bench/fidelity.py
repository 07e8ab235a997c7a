"""Is an fp32 engine as close to the exact result as plain PyTorch is? The reference's own rounding.

An engine that reorders plain PyTorch's arithmetic (partitions, checkpoints, ranks) cannot equal
plain fp32 bit for bit, and how far apart the two land depends on the CPU: oneDNN picks AVX-512,
AVX2 or SSE4.1 kernels, each summing in its own order, and in a deep ReLU network a
pre-activation within rounding of 0 can fall on either side. A fixed tolerance on
|engine32 - plain32| therefore passes on one CPU and fails on another. What holds on every CPU is
a comparison with a float64 reference (the plain model, cast to float64, on the same inputs):
plain fp32 stands some distance from it (its rounding on this CPU), and an engine computing the
same function stands at a distance of the same order. A real error (a missing halo row, a wrong
BatchNorm reduction, a dropped gradient) stands orders of magnitude further. Per tensor:

    rms(engine32 - ref64) <= FACTOR * rms(plain32 - ref64) + FLOOR * scale

where scale is the tensor's rms, floored at SCALE_FLOOR of the largest in the comparison (a
gradient that is zero in exact arithmetic, like ABMIL's last attention bias, is rounding noise on
every side). FLOOR allows ~100 fp32 ulps where plain fp32 happens to land on the reference.

Deep ReLU networks add one thing rounding bounds cannot cover: a gradient is a discontinuous
function of the input. Where a pre-activation (or two max-pool candidates) lies within rounding of
the kink, fp32 may take the other branch, and every gradient upstream of that element moves by
what its path carries (measured on a random ResNet18: 1e-3 to 2e-2 of a tensor's rms, on plain
fp32 for one kernel set, on the engine for another). Forward values stay continuous and keep the
bound. So comparisons of a deep network's gradients pass `jump=JUMP`, an allowance (relative to
scale) for gradient tensors (names containing "grad"); their exactness is proven in float64.
A dropped gradient or a wrong factor moves a tensor by its whole scale, far above it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from torch import Tensor

#: how many times plain fp32's own distance from float64 an engine may stand (measured ratios on
#: AVX-512, AVX2 and SSE4.1 kernels: docs/reproducibility.md)
FACTOR = 4.0
#: relative rms allowed where plain fp32 lands exactly on the reference (~100 fp32 ulps)
FLOOR = 1e-5
#: relative rms a deep ReLU network's gradient may move by branches flipped near their kinks: 2.6x the
#: largest jump measured (3.9e-2; ResNet18 offload cases, 4 seeds x AVX-512, AVX2, SSE4.1 kernels)
JUMP = 0.1
#: a tensor's scale is at least this fraction of the largest scale compared
SCALE_FLOOR = 1e-3
#: plain fp32 further than this (relative rms) from the reference is not its rounding: the two
#: computed different things (another initialisation, other inputs), and the bound would be vacuous
SAME_COMPUTATION = 0.5


@dataclass(frozen=True)
class TensorFidelity:
    name: str
    engine_err: float  # rms(engine32 - ref64)
    plain_err: float  # rms(plain32 - ref64): the reference's own fp32 rounding
    scale: float  # floored rms(ref64)
    jump: float = 0.0  # allowance for a flipped branch, relative to scale

    @property
    def allowed(self) -> float:
        return FACTOR * self.plain_err + (FLOOR + self.jump) * self.scale

    @property
    def use(self) -> float:
        """engine_err / allowed: <= 1 passes."""
        return self.engine_err / self.allowed if self.allowed > 0 else math.inf * (self.engine_err > 0)


@dataclass(frozen=True)
class Fidelity:
    tensors: list[TensorFidelity]

    @property
    def worst(self) -> TensorFidelity:
        return max(self.tensors, key=lambda t: t.use)

    @property
    def ok(self) -> bool:
        return self.worst.use <= 1.0

    @property
    def noise(self) -> float:
        """Largest rms(plain32 - ref64) / scale: plain fp32's relative rounding on this CPU."""
        return max(t.plain_err / t.scale if t.scale > 0 else 0.0 for t in self.tensors)

    @property
    def engine_rel(self) -> float:
        """Largest rms(engine32 - ref64) / scale."""
        return max(t.engine_err / t.scale if t.scale > 0 else 0.0 for t in self.tensors)

    def check(self, what: str = "engine") -> None:
        if self.noise > SAME_COMPUTATION:
            raise AssertionError(
                f"{what}: plain fp32 stands {self.noise:.3g} (relative rms) from the float64 reference: "
                f"they are not the same computation, so the reference bounds nothing"
            )
        if not self.ok:
            w = self.worst
            raise AssertionError(
                f"{what}: {w.name} stands {w.engine_err:.3e} (rms) from the float64 reference, "
                f"over {FACTOR:g} x plain fp32's {w.plain_err:.3e} + {FLOOR:g} x scale {w.scale:.3e} "
                f"(use {w.use:.2f})"
            )


def _rms(t: Tensor) -> float:
    return float(t.double().pow(2).mean().sqrt()) if t.numel() else 0.0


def fidelity(
    engine: Mapping[str, Tensor | None],
    plain: Mapping[str, Tensor | None],
    reference: Mapping[str, Tensor | None],
    jump: float = 0.0,
    jump_on: Callable[[str], bool] = lambda name: "grad" in name,
) -> Fidelity:
    """Per tensor, the engine's and plain fp32's distances from the float64 reference.

    `jump` (e.g. JUMP, for deep ReLU networks) is added to the allowance of the tensors `jump_on`
    selects: gradients (names containing "grad"); over several optimiser steps, the parameters too,
    since a flipped branch's jump in one step's gradient is in every later parameter. All three map the
    same names; a tensor present on one side only (a dropped gradient) or of another shape is an
    AssertionError naming it.
    """
    if not (set(engine) == set(plain) == set(reference)):
        diff = set(engine) ^ set(plain) | set(plain) ^ set(reference)
        raise AssertionError(f"compared tensors differ by name: {sorted(diff)}")
    names = [k for k in reference if reference[k] is not None or engine[k] is not None or plain[k] is not None]
    for k in names:
        missing = [side for side, m in (("engine", engine), ("plain", plain), ("reference", reference)) if m[k] is None]
        if missing:
            raise AssertionError(f"{k}: present on one side only (missing on {', '.join(missing)})")
        if not (engine[k].shape == plain[k].shape == reference[k].shape):
            raise AssertionError(
                f"{k}: shapes differ: engine {tuple(engine[k].shape)}, "
                f"plain {tuple(plain[k].shape)}, reference {tuple(reference[k].shape)}"
            )
    if not names:
        raise AssertionError("nothing to compare")
    scales = {k: _rms(reference[k]) for k in names}
    floor = SCALE_FLOOR * max(scales.values())
    out = []
    for k in names:
        ref = reference[k].double()
        out.append(
            TensorFidelity(
                k,
                _rms(engine[k].double() - ref),
                _rms(plain[k].double() - ref),
                max(scales[k], floor),
                jump if jump_on(k) else 0.0,
            )
        )
    return Fidelity(out)


def assert_exact(
    got: Mapping[str, Tensor | None], ref: Mapping[str, Tensor | None], rtol: float = 1e-9, what: str = "engine"
) -> float:
    """float64: every tensor within rtol (rms, scale floored as above) of the reference; the worst."""
    report = fidelity(got, ref, ref)
    worst = max(report.tensors, key=lambda t: t.engine_err / t.scale if t.scale > 0 else 0.0)
    rel = worst.engine_err / worst.scale if worst.scale > 0 else 0.0
    if rel > rtol:
        raise AssertionError(
            f"{what}: {worst.name} is {rel:.3e} (rms, relative) from the reference in float64, over {rtol:g}"
        )
    return rel


def named(prefix: str, tensors) -> dict[str, Tensor | None]:
    """{prefix.i: tensor} for a sequence, or {prefix.name: tensor} for (name, tensor) pairs."""
    items = list(tensors)
    if items and isinstance(items[0], tuple):
        return {f"{prefix}.{n}": t for n, t in items}
    return {f"{prefix}.{i}": t for i, t in enumerate(items)}


__all__ = [
    "FACTOR",
    "FLOOR",
    "JUMP",
    "SAME_COMPUTATION",
    "SCALE_FLOOR",
    "Fidelity",
    "TensorFidelity",
    "assert_exact",
    "fidelity",
    "named",
]

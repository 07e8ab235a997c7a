"""The fp32 bound of the equivalence tests: it passes a reordered computation and fails a wrong one."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from slidetrain.bench.fidelity import JUMP, assert_exact, fidelity

pytestmark = pytest.mark.equivalence


def _grads(model: nn.Module, x: torch.Tensor, scale: float = 1.0) -> dict:
    model.zero_grad(set_to_none=True)
    (model(x).square().sum() * scale).backward()
    return {f"grad.{n}": p.grad.clone() for n, p in model.named_parameters()}


@pytest.fixture
def case():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 8))
    x = torch.randn(32, 64)
    plain = _grads(model, x)
    reference = _grads(copy.deepcopy(model).double(), x.double())
    return model, x, plain, reference


def test_the_same_sums_in_another_order_pass(case):
    model, x, plain, reference = case
    # the batch in two halves: the same function, summed in another order
    halves = [_grads(model, part) for part in x.split(16)]
    engine = {k: halves[0][k] + halves[1][k] for k in plain}
    fidelity(engine, plain, reference).check()


def test_a_gradient_off_by_one_percent_fails(case):
    model, x, plain, reference = case
    engine = _grads(model, x, scale=1.01)
    with pytest.raises(AssertionError, match="from the float64 reference"):
        fidelity(engine, plain, reference).check()
    with pytest.raises(AssertionError, match="from the float64 reference"):  # also with the deep-net allowance
        fidelity(_grads(model, x, scale=1 + 2 * JUMP), plain, reference, jump=JUMP).check()


def test_a_gradient_on_one_side_only_fails(case):
    _, _, plain, reference = case
    engine = {**plain, "grad.0.weight": None}
    with pytest.raises(AssertionError, match="one side only"):
        fidelity(engine, plain, reference)


def test_a_reference_of_another_computation_is_refused(case):
    _, x, plain, _ = case
    torch.manual_seed(1)  # another initialisation: plain's distance would make any engine pass
    other = _grads(nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 8)).double(), x.double())
    with pytest.raises(AssertionError, match="not the same computation"):
        fidelity(plain, plain, other).check()


def test_float64_exactness(case):
    model, x, _, reference = case
    double = copy.deepcopy(model).double()
    halves = [_grads(double, part) for part in x.double().split(16)]
    assert assert_exact({k: halves[0][k] + halves[1][k] for k in reference}, reference) < 1e-12
    with pytest.raises(AssertionError, match="in float64"):
        assert_exact(_grads(double, x.double(), scale=1 + 1e-6), reference)

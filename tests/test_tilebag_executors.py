"""Tile-bag executors: every route leaves the gradients of one autograd graph (`plain`)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from slidetrain.models import build_model, method_config
from slidetrain.train.tilebag.executors import (
    EXECUTORS,
    Executor,
    PlainExecutor,
    StepContext,
    TwoStageExecutor,
    build_executor,
)


class SmallCNN(nn.Module):
    """conv-BN-ReLU x2, global pool: (B, 3, 16, 16) -> (B, 12); BN in training mode uses bag statistics."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 12, 3, stride=2, padding=1),
            nn.BatchNorm2d(12),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )

    def forward(self, x):
        return self.body(x)


def _setup(seed=0):
    torch.manual_seed(seed)
    encoder = SmallCNN().double()
    aggregator = build_model("gma", 12, 2, method_config("gma", {"dropout": 0.25})).double()
    tiles = torch.randn(10, 3, 16, 16, dtype=torch.float64)
    return encoder, aggregator, tiles


def _grads(*modules):
    return {f"{i}.{n}": p.grad.clone() for i, m in enumerate(modules) for n, p in m.named_parameters()}


def _run(executor: Executor, encoder, aggregator, tiles, accumulation=1, n_slides=1):
    """`n_slides` steps with loss scale 1/accumulation (gradients add up), dropout seeded alike."""
    enc, agg = copy.deepcopy(encoder), copy.deepcopy(aggregator)
    enc.train(), agg.train()
    ctx = StepContext(loss_scale=1.0 / accumulation)
    losses = []
    for s in range(n_slides):
        torch.manual_seed(100 + s)  # the aggregator's dropout masks: the same draw for every executor
        result = executor.step(
            tiles * (1 + s), enc, agg, torch.tensor(s % 2), lambda out, y, a=agg: a.loss(out, y), ctx
        )
        losses.append(result.loss)
    return losses, _grads(enc, agg)


def _max_rel(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-30)) for k in b)


def test_registry_has_plain_and_two_stage():
    assert {"plain", "two_stage"} <= set(EXECUTORS)
    assert isinstance(build_executor("plain"), PlainExecutor)


@pytest.mark.parametrize("accumulation,n_slides", [(1, 1), (3, 3)])
@pytest.mark.equivalence
def test_two_stage_equals_one_graph(accumulation, n_slides):
    encoder, aggregator, tiles = _setup()
    loss_a, ga = _run(PlainExecutor(), encoder, aggregator, tiles, accumulation, n_slides)
    loss_b, gb = _run(TwoStageExecutor(), encoder, aggregator, tiles, accumulation, n_slides)
    assert loss_a == pytest.approx(loss_b, rel=1e-12)
    assert any(k.startswith("0.") for k in gb) and all(v.abs().sum() > 0 for v in gb.values())
    assert _max_rel(gb, ga) < 1e-6


@pytest.mark.equivalence
def test_a_missing_factor_is_caught():
    """The comparison above can fail: a pseudo-loss off by a factor (as a forgotten N would be) does."""
    encoder, aggregator, tiles = _setup()
    _, ga = _run(PlainExecutor(), encoder, aggregator, tiles)
    _, gb = _run(TwoStageExecutor(pseudo_loss_factor=0.5), encoder, aggregator, tiles)
    assert _max_rel(gb, ga) > 0.1


def test_frozen_encoder_has_no_backward_and_keeps_bn_stats():
    encoder, aggregator, tiles = _setup()
    encoder.requires_grad_(False).eval()
    before = copy.deepcopy(encoder.state_dict())
    backward_calls = []
    for m in encoder.modules():
        m.register_full_backward_hook(lambda *a: backward_calls.append(1))
    for executor in (PlainExecutor(), TwoStageExecutor()):
        agg = copy.deepcopy(aggregator).train()
        executor.step(
            tiles, encoder, agg, torch.tensor(1), lambda o, y, a=agg: a.loss(o, y), StepContext(train_encoder=False)
        )
        assert all(p.grad is not None for p in agg.parameters())
    assert backward_calls == []
    assert all(p.grad is None for p in encoder.parameters())
    after = encoder.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BN running stats

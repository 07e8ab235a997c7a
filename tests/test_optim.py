"""Optimisers and schedules: the Campanella/GMA recipe (warm-up, per-iteration cosine, weight-decay ramp)."""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import pytest
import torch
from torch import nn

from slidetrain.errors import ConfigError
from slidetrain.models.base import TrainConfig
from slidetrain.train.optim import Lookahead, build_optimizer, build_scheduler

GMA_RECIPE = TrainConfig(
    epochs=40,
    optimizer="sgd",
    lr=5e-4,
    momentum=0.9,
    nesterov=True,
    scheduler="warmup_cosine",
    warmup_epochs=10,
    min_lr=1e-8,
    weight_decay=0.04,
    weight_decay_end=0.4,
    no_decay_1d=True,
)
ITERS = 7  # optimiser steps per epoch


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 2))


def run_steps(net, opt, sch, n: int) -> list[tuple[float, float]]:
    """n optimiser steps on a fixed toy loss; (lr, wd of group 0) used by each step."""
    seen = []
    for i in range(n):
        x = torch.randn(5, 4, generator=torch.Generator().manual_seed(i))
        net(x).pow(2).mean().backward()
        seen.append((opt.param_groups[0]["lr"], opt.param_groups[0]["weight_decay"]))
        opt.step()
        opt.zero_grad()
        sch.step_iteration()
    return seen


def test_warmup_cosine_values_at_known_iterations():
    net = small_net()
    opt = build_optimizer(list(net.parameters()), GMA_RECIPE)
    sch = build_scheduler(opt, GMA_RECIPE, iters_per_epoch=ITERS)
    total, warm = 40 * ITERS, 10 * ITERS
    seen = run_steps(net, opt, sch, total)
    lrs = [lr for lr, _ in seen]
    assert lrs[0] == 0.0  # warm-up starts from 0
    assert lrs[warm // 2] == pytest.approx(5e-4 * (warm // 2) / (warm - 1))  # linear
    assert lrs[warm - 1] == pytest.approx(5e-4)  # reached at the last warm-up iteration
    rest = total - warm
    assert lrs[warm] == pytest.approx(5e-4)  # cosine starts at the peak
    assert lrs[warm + rest // 2] == pytest.approx(
        1e-8 + 0.5 * (5e-4 - 1e-8) * (1 + math.cos(math.pi * (rest // 2) / rest))
    )
    assert lrs[-1] == pytest.approx(1e-8 + 0.5 * (5e-4 - 1e-8) * (1 + math.cos(math.pi * (rest - 1) / rest)))
    assert lrs[-1] < 1e-6 and all(b <= a for a, b in zip(lrs[warm:], lrs[warm + 1 :], strict=False))


def test_weight_decay_ramps_on_weights_only():
    net = small_net()
    opt = build_optimizer(list(net.parameters()), GMA_RECIPE)
    groups = opt.param_groups
    assert len(groups) == 2
    ndims = [{p.ndim for p in g["params"]} for g in groups]
    assert ndims == [{2}, {1}]  # weights; biases + LayerNorm (1-D)
    assert sum(len(g["params"]) for g in groups) == len(list(net.parameters()))
    assert groups[1]["weight_decay"] == 0.0
    sch = build_scheduler(opt, GMA_RECIPE, iters_per_epoch=ITERS)
    total = 40 * ITERS
    wds = [wd for _, wd in run_steps(net, opt, sch, total)]
    assert wds[0] == pytest.approx(0.04)
    assert wds[total // 2] == pytest.approx(0.04 + 0.5 * (0.4 - 0.04) * (1 - math.cos(math.pi * (total // 2) / total)))
    assert wds[-1] == pytest.approx(0.4, abs=1e-4) and wds[-1] < 0.4
    assert all(b >= a for a, b in zip(wds, wds[1:], strict=False))
    assert groups[1]["weight_decay"] == 0.0  # the no-decay group never decays
    assert groups[1]["lr"] == groups[0]["lr"]  # but follows the lr schedule


def test_groups_with_their_own_lr_keep_their_ratio_and_split():
    net = small_net()
    cfg = replace(GMA_RECIPE, warmup_epochs=0)
    params = [{"params": list(net[0].parameters()), "lr": 1e-3}, {"params": list(net[3].parameters()), "lr": 1e-4}]
    opt = build_optimizer(params, cfg)
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 1e-3, 1e-4, 1e-4]
    build_scheduler(opt, cfg, iters_per_epoch=ITERS)  # no warm-up: iteration 0 at the peak
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 1e-3, 1e-4, 1e-4]


@pytest.mark.parametrize("optimizer", ["sgd", "radam_lookahead"])
def test_a_resumed_schedule_continues_exactly(optimizer):
    cfg = replace(GMA_RECIPE, epochs=4, warmup_epochs=1, optimizer=optimizer, decoupled_weight_decay=True)
    net = small_net()
    opt = build_optimizer(list(net.parameters()), cfg)
    sch = build_scheduler(opt, cfg, iters_per_epoch=ITERS)
    whole = run_steps(net, opt, sch, 4 * ITERS)
    net2 = small_net()
    opt2 = build_optimizer(list(net2.parameters()), cfg)
    sch2 = build_scheduler(opt2, cfg, iters_per_epoch=ITERS)
    first = run_steps(net2, opt2, sch2, 2 * ITERS + 3)
    saved = copy.deepcopy((net2.state_dict(), opt2.state_dict(), sch2.state_dict()))
    net3 = small_net()
    opt3 = build_optimizer(list(net3.parameters()), cfg)
    sch3 = build_scheduler(opt3, cfg, iters_per_epoch=ITERS)
    net3.load_state_dict(saved[0])
    opt3.load_state_dict(saved[1])
    sch3.load_state_dict(saved[2])
    second = run_steps(net3, opt3, sch3, 2 * ITERS - 3)
    assert first + second == whole  # (lr, wd) of every step, across the resume
    assert opt3.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    assert isinstance(opt3, Lookahead) == (optimizer == "radam_lookahead")


def test_resume_gives_identical_weights():
    cfg = replace(GMA_RECIPE, epochs=3, warmup_epochs=1)

    def steps(net, opt, sch, idx):
        for i in idx:
            x = torch.randn(5, 4, generator=torch.Generator().manual_seed(i))
            net(x).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            sch.step_iteration()

    net = small_net()
    opt = build_optimizer(list(net.parameters()), cfg)
    sch = build_scheduler(opt, cfg, iters_per_epoch=ITERS)
    steps(net, opt, sch, range(3 * ITERS))
    net2 = small_net()
    opt2 = build_optimizer(list(net2.parameters()), cfg)
    sch2 = build_scheduler(opt2, cfg, iters_per_epoch=ITERS)
    steps(net2, opt2, sch2, range(10))
    saved = copy.deepcopy((net2.state_dict(), opt2.state_dict(), sch2.state_dict()))
    net3 = small_net()
    opt3 = build_optimizer(list(net3.parameters()), cfg)
    sch3 = build_scheduler(opt3, cfg, iters_per_epoch=ITERS)
    for obj, s in zip((net3, opt3, sch3), saved, strict=True):
        obj.load_state_dict(s)
    steps(net3, opt3, sch3, range(10, 3 * ITERS))
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), net3.state_dict().values(), strict=True))


def test_decoupled_radam_decays_weights_not_biases():
    cfg = TrainConfig(
        optimizer="radam_lookahead", lr=2e-4, weight_decay=1e-5, no_decay_1d=True, decoupled_weight_decay=True
    )
    opt = build_optimizer(list(small_net().parameters()), cfg)
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-5, 0.0]
    assert all(g["decoupled_weight_decay"] for g in opt.param_groups)
    assert isinstance(opt.inner, torch.optim.RAdam)


def test_epoch_schedules_still_step_per_epoch():
    net = small_net()
    cfg = TrainConfig(epochs=4, lr=1.0, scheduler="cosine", min_lr=0.0)
    opt = build_optimizer(list(net.parameters()), cfg)
    sch = build_scheduler(opt, cfg)
    opt.step()
    sch.step_iteration()  # per-iteration calls leave an epoch schedule alone
    assert opt.param_groups[0]["lr"] == 1.0
    sch.step(0.5)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))


def test_exponential_schedule_multiplies_lr_by_gamma_each_epoch_and_resumes():
    """Big-Layers' second PANDA setting: lr x 0.955 after every epoch (45 epochs, no accumulation)."""
    cfg = TrainConfig(epochs=45, lr=1e-4, scheduler="exponential", step_gamma=0.955)
    opt = build_optimizer(list(small_net().parameters()), cfg)
    sch = build_scheduler(opt, cfg)
    for _ in range(3):
        opt.step()
        sch.step(0.5)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-4 * 0.955**3, rel=1e-12)
    opt2 = build_optimizer(list(small_net().parameters()), cfg)
    sch2 = build_scheduler(opt2, cfg)
    opt2.load_state_dict(opt.state_dict())
    sch2.load_state_dict(sch.state_dict())
    sch2.step(0.5)
    assert opt2.param_groups[0]["lr"] == pytest.approx(1e-4 * 0.955**4, rel=1e-12)


def test_per_iteration_schedule_without_iteration_count_is_a_config_error():
    with pytest.raises(ConfigError, match="iters_per_epoch"):
        build_scheduler(build_optimizer(list(small_net().parameters()), GMA_RECIPE), GMA_RECIPE)


def test_demon_decays_adam_beta1_per_iteration_and_resumes():
    from types import SimpleNamespace

    from slidetrain.train.optim import demon

    cfg = SimpleNamespace(
        **{**TrainConfig(optimizer="adam", lr=1e-3, epochs=3, scheduler="cosine").__dict__, "momentum_decay": "demon"}
    )
    net = small_net()
    opt = build_optimizer(list(net.parameters()), cfg)
    sch = build_scheduler(opt, cfg, iters_per_epoch=ITERS)
    total = 3 * ITERS
    betas = []
    for i in range(total):
        betas.append(opt.param_groups[0]["betas"])
        x = torch.randn(5, 4, generator=torch.Generator().manual_seed(i))
        net(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        sch.step_iteration()
    b1 = [b[0] for b in betas]
    # the rule: beta_0 at t = 0, (1 - t/T) / ((1 - b0) / b0 + (1 - t/T)) after, towards 0 at t = T
    assert b1[0] == pytest.approx(0.9) and all(b[1] == 0.999 for b in betas)
    t = 10
    assert b1[t] == pytest.approx(0.9 * (1 - t / total) / (0.1 + 0.9 * (1 - t / total)))
    assert all(a > b for a, b in zip(b1, b1[1:], strict=False)) and b1[-1] < 0.5
    assert list(demon(0.9, total)) == pytest.approx(b1)
    # a rebuilt schedule on a resumed optimizer continues from its iteration
    opt2 = build_optimizer(list(small_net().parameters()), cfg)
    sch2 = build_scheduler(opt2, cfg, iters_per_epoch=ITERS)
    opt2.load_state_dict(opt.state_dict())
    sch2.load_state_dict({"iteration": t, "epoch": {}})
    assert opt2.param_groups[0]["betas"][0] == pytest.approx(b1[t])
    with pytest.raises(ConfigError, match="momentum_decay"):
        build_scheduler(opt, SimpleNamespace(**{**cfg.__dict__, "momentum_decay": "nesterov"}), ITERS)

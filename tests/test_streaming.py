"""Streaming (partitioned) execution equals the full-image computation, forward and backward."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from slidetrain.models.streamingcnn import StreamingConfig, StreamingLearner
from slidetrain.partitioned import PartitionError, StreamingEngine

torch.set_num_threads(1)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def assert_grads_match(params, reference, tol=1e-4):
    assert len(reference) > 0
    for i, (p, ref) in enumerate(zip(params, reference, strict=True)):
        assert p.grad is not None, f"parameter {i} got no gradient"
        assert rel_err(p.grad, ref) < tol, f"parameter {i} {tuple(p.shape)}: rel err {rel_err(p.grad, ref):.2e}"


def assert_real_tiling(engine: StreamingEngine, in_size):
    """The plan has several tiles, and some crop is cut inside the image (not padded)."""
    plan = engine.plan(in_size)
    assert len(plan.tiles) > 1
    assert any(t.inp[a][0] > 0 or t.inp[a][1] < in_size[a] for t in plan.tiles for a in range(2))


def full_backward(module: nn.Module, x: torch.Tensor, grad_out: torch.Tensor) -> list[torch.Tensor]:
    module.zero_grad(set_to_none=True)
    module(x).backward(grad_out)
    grads = [p.grad.clone() for p in module.parameters()]
    module.zero_grad(set_to_none=True)
    return grads


def resnet34_to_layer3() -> nn.Sequential:
    torch.manual_seed(0)
    r = torchvision.models.resnet34(weights=None)
    trunk = nn.Sequential(r.conv1, r.bn1, r.relu, r.maxpool, r.layer1, r.layer2, r.layer3)
    for m in trunk.modules():  # non-trivial frozen statistics, so BN is not an identity
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.1, 0.1)
    return trunk.eval()


@pytest.fixture(scope="module")
def resnet_case():
    trunk = resnet34_to_layer3()
    x = torch.randn(1, 3, 320, 448, generator=torch.Generator().manual_seed(1))
    engine = StreamingEngine(trunk, 128, tile_mode="core")  # 20x28 output in 8x8 tiles: edges of 4
    full = trunk(x).detach()
    grad_out = torch.randn(full.shape, generator=torch.Generator().manual_seed(2))
    return trunk, x, engine, full, grad_out


@pytest.mark.equivalence
def test_resnet34_streamed_output_equals_full(resnet_case):
    trunk, x, engine, full, _ = resnet_case
    assert_real_tiling(engine, (320, 448))
    assert engine.plan((320, 448)).core == (8, 8) and full.shape[-2:] == (20, 28)
    streamed = engine.forward(x)
    assert streamed.shape == full.shape
    assert (streamed - full).abs().max() <= 1e-5 * full.abs().max()


@pytest.mark.equivalence
def test_resnet34_streamed_param_grads_equal_backprop(resnet_case):
    """fp32: the streamed sum runs tile by tile, so it adds the same terms in another order than the
    full backward, and how far the two land apart depends on the CPU's kernels. Both are compared
    with the float64 reference instead: the engine stands as close to it as plain fp32 does
    (slidetrain.bench.fidelity). The float64 test below shows the engine itself is exact."""
    import copy

    from slidetrain.bench.fidelity import JUMP, fidelity

    trunk, x, engine, _, grad_out = resnet_case
    names = [f"grad.{n}" for n, _ in trunk.named_parameters()]
    plain = dict(zip(names, full_backward(trunk, x, grad_out), strict=True))
    reference = dict(
        zip(names, full_backward(copy.deepcopy(trunk).double(), x.double(), grad_out.double()), strict=True)
    )
    engine.accumulate_grad(x, grad_out)
    streamed = {f"grad.{n}": p.grad for n, p in trunk.named_parameters()}
    fidelity(streamed, plain, reference, jump=JUMP).check("streamed ResNet34")
    trunk.zero_grad(set_to_none=True)


@pytest.mark.equivalence
def test_resnet34_streamed_param_grads_equal_backprop_float64():
    trunk = resnet34_to_layer3().double()
    x = torch.randn(1, 3, 320, 448, generator=torch.Generator().manual_seed(1)).double()
    engine = StreamingEngine(trunk, 128, tile_mode="core")
    grad_out = torch.randn(trunk(x).shape, generator=torch.Generator().manual_seed(2)).double()
    reference = full_backward(trunk, x, grad_out)
    engine.accumulate_grad(x, grad_out)
    assert_grads_match(list(trunk.parameters()), reference, tol=1e-10)


def tiny_stack(ceil_mode: bool = False) -> nn.Sequential:
    torch.manual_seed(3)
    bn = nn.BatchNorm2d(8)
    bn.running_mean.uniform_(-0.5, 0.5)
    bn.running_var.uniform_(0.5, 2.0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        bn,
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1),
        nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=ceil_mode),
        nn.Conv2d(8, 12, 5, stride=2, padding=2),
        nn.ReLU(),
        nn.Conv2d(12, 12, 3, padding=2, dilation=2),
        nn.Conv2d(12, 12, (3, 2), stride=(1, 2), padding="valid"),
        nn.AvgPool2d(2),
        nn.Conv2d(12, 6, 3, padding="same"),
    ).eval()


@pytest.mark.equivalence
@pytest.mark.parametrize(
    "tile_px, mode, ceil_mode",
    [(64, "core", False), ((40, 96), "core", True), (180, "total", False), (170, "total", True)],
)
def test_tiny_stack_output_and_grads(tile_px, mode, ceil_mode):
    net = tiny_stack(ceil_mode)
    x = torch.randn(2, 3, 301, 267, generator=torch.Generator().manual_seed(4))
    engine = StreamingEngine(net, tile_px, tile_mode=mode)
    assert_real_tiling(engine, (301, 267))
    if mode == "total":
        assert all(t.inp[a][1] - t.inp[a][0] <= tile_px for t in engine.plan((301, 267)).tiles for a in range(2))
    full = net(x).detach()
    streamed = engine.forward(x)
    assert streamed.shape == full.shape
    assert (streamed - full).abs().max() <= 1e-5 * full.abs().max()

    grad_out = torch.randn(full.shape, generator=torch.Generator().manual_seed(5))
    reference = full_backward(net, x, grad_out)
    engine.accumulate_grad(x, grad_out)
    assert_grads_match(list(net.parameters()), reference)


def test_autograd_call_gives_input_and_param_grads():
    net = tiny_stack()
    x = torch.randn(1, 3, 150, 170, generator=torch.Generator().manual_seed(6))
    x_full = x.clone().requires_grad_()
    net(x_full).square().sum().backward()
    reference = [p.grad.clone() for p in net.parameters()]
    net.zero_grad(set_to_none=True)

    x_stream = x.clone().requires_grad_()
    StreamingEngine(net, 48, tile_mode="core")(x_stream).square().sum().backward()
    assert rel_err(x_stream.grad, x_full.grad) < 1e-4
    assert_grads_match(list(net.parameters()), reference)


def test_training_mode_batchnorm_is_refused():
    net = tiny_stack().train()
    with pytest.raises(PartitionError, match="BatchNorm"):
        StreamingEngine(net, 32, tile_mode="core").forward(torch.randn(1, 3, 64, 64))


def test_total_tile_smaller_than_receptive_field_is_refused():
    engine = StreamingEngine(resnet34_to_layer3(), 256, tile_mode="total")
    _, field = engine.stride_and_field()
    assert field == (547, 547)  # conv1 7/2, maxpool 3/2, 6 + 8 + 12 3x3 convs at strides 4, 8, 16
    with pytest.raises(PartitionError, match="receptive field"):
        engine.plan((1024, 1024))
    assert len(StreamingEngine(resnet34_to_layer3(), 600, tile_mode="total").plan((1024, 1024)).tiles) > 1


def test_unknown_layer_is_refused():
    with pytest.raises(PartitionError, match="GroupNorm"):
        StreamingEngine(nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4)), 32)


# --- StreamingLearner ------------------------------------------------------------------------------


def small_cfg(**kw) -> StreamingConfig:
    """Every layer trained, so that the streamed backward is exercised (the default trains layer4 + fc)."""
    return StreamingConfig(**{"tile_px": 128, "tile_mode": "core", "accumulation": 2, "train_all_layers": True, **kw})


@pytest.mark.equivalence
def test_learner_gradients_equal_plain_backprop():
    torch.manual_seed(7)
    learner = StreamingLearner(3, small_cfg())
    # wider than ResNet34's receptive field (547 px), so some crops end inside the image
    image = torch.randn(3, 128, 416, generator=torch.Generator().manual_seed(8))
    assert_real_tiling(learner.engine, (128, 416))

    import copy

    from slidetrain.bench.fidelity import JUMP, fidelity

    model = learner.model.train()
    names = {id(p): n for n, p in model.named_parameters()}

    def plain_grads(net, x):  # plain full-image forward/backward of the same network
        logits = net(x[None])
        ce = torch.nn.functional.cross_entropy(logits, torch.tensor([2]))
        (ce / 2).backward()
        by_name = dict(net.named_parameters())
        return float(ce), {f"grad.{names[id(p)]}": by_name[names[id(p)]].grad.clone() for p in learner.params}

    ref_ce, reference = plain_grads(copy.deepcopy(model).double(), image.double())  # float64
    plain_ce, plain = plain_grads(model, image)
    learner.optimizer.zero_grad(set_to_none=True)

    out = learner.train_slide(image, 2)
    assert abs(out["ce"] - ref_ce) <= 4 * abs(plain_ce - ref_ce) + 1e-5 * max(1.0, ref_ce)
    streamed = {f"grad.{names[id(p)]}": p.grad for p in learner.params}
    fidelity(streamed, plain, reference, jump=JUMP).check("streaming learner")
    # BN stays frozen in training: running statistics untouched
    assert all(not m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d))

    probs = learner.predict(image)
    assert probs.shape == (3,) and abs(float(probs.sum()) - 1) < 1e-5
    assert torch.allclose(probs, torch.softmax(model(image[None]).detach(), 1)[0], atol=1e-5)


@pytest.mark.parametrize("stream_until", ["layer3", "layer4.0"])
def test_learner_trains_layer4_and_fc_by_default(stream_until):
    """The code's default (train_all_layers off): layer4 + fc, 13.1 M parameters, whatever is streamed."""
    torch.manual_seed(9)
    learner = StreamingLearner(2, StreamingConfig(tile_px=128, tile_mode="core", stream_until=stream_until))
    layer4 = sum(p.numel() for p in torchvision.models.resnet34().layer4.parameters())
    n_trained = sum(p.numel() for p in learner.params)
    assert n_trained == layer4 + 512 * 2 + 2 and round(n_trained / 1e6, 1) == 13.1
    learner.train_slide(torch.randn(3, 96, 128), 1)
    streamed_trained = learner.model.trunk[-1] if stream_until == "layer4.0" else None
    for m in learner.model.trunk:
        expect = m is streamed_trained
        assert all((p.grad is not None) == expect for p in m.parameters())
    assert all(p.grad is not None for p in learner.model.head.parameters())


def moderate_image(seed: int) -> torch.Tensor:
    """(3, 96, 128) noise scaled so that the random network's logits stay O(1) (CE neither 0 nor huge)."""
    return 0.005 * torch.randn(3, 96, 128, generator=torch.Generator().manual_seed(seed))


def test_learner_class_weights_scale_the_slide_loss():
    """A slide's CE times its class's weight, as the other learners (a weighted mean of one cancels)."""
    image = moderate_image(3)
    torch.manual_seed(5)
    plain = StreamingLearner(2, small_cfg())
    weighted = StreamingLearner(2, small_cfg(class_weights=[1.0, 3.0]))
    weighted.model.load_state_dict(plain.model.state_dict())
    label = 1
    a, b = plain.train_slide(image, label), weighted.train_slide(image, label)
    assert a["ce"] > 1e-3  # a loss (and gradients) to scale
    assert b["ce"] == pytest.approx(3 * a["ce"], rel=1e-5)
    for pa, pb in zip(plain.params, weighted.params, strict=True):
        assert rel_err(pb.grad, 3 * pa.grad) < 1e-4


def test_learner_amp_trains_close_to_fp32():
    """amp: autocast (bfloat16 on a CPU, fp16 + scaler on CUDA) gives gradients near the fp32 ones."""
    image = moderate_image(4)
    torch.manual_seed(6)
    fp32 = StreamingLearner(2, small_cfg())
    amp = StreamingLearner(2, small_cfg(amp=True))
    amp.model.load_state_dict(fp32.model.state_dict())
    a, b = fp32.train_slide(image, 0), amp.train_slide(image, 0)
    assert a["ce"] > 1e-3 and b["ce"] == pytest.approx(a["ce"], rel=0.05)
    cosines = [  # bfloat16 keeps 8 bits of mantissa: directions agree, values within a few %
        float(F.cosine_similarity(pb.grad.flatten(), pa.grad.flatten(), dim=0))
        for pa, pb in zip(fp32.params, amp.params, strict=True)
    ]
    assert min(cosines) > 0.9 and sorted(cosines)[len(cosines) // 2] > 0.97
    amp.step()
    assert all(torch.isfinite(p).all() for p in amp.params)
    assert abs(float(amp.predict(image).sum()) - 1) < 1e-5


def test_learner_resume_is_exact():
    images = [torch.randn(3, 96, 128, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    cfg = small_cfg(optimizer="adam", lr=1e-3, accumulation=1)
    torch.manual_seed(10)
    a = StreamingLearner(2, cfg)
    a.train_slide(images[0], 0)
    a.step()
    a.end_epoch(0, 0.5)
    state = copy.deepcopy(a.state_dict())
    for i in (1, 2):
        a.train_slide(images[i], i % 2)
        a.step()

    torch.manual_seed(11)  # a different init, overwritten by the checkpoint
    b = StreamingLearner(2, cfg)
    b.load_state_dict(state)
    for i in (1, 2):
        b.train_slide(images[i], i % 2)
        b.step()
    for (name, pa), pb in zip(a.model.state_dict().items(), b.model.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name


def test_in_place_first_layer_leaves_the_input_alone():
    net = nn.Sequential(nn.ReLU(inplace=True), nn.Conv2d(3, 4, 3, padding=1), nn.MaxPool2d(2))
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(12))
    x_before = x.clone()
    streamed = StreamingEngine(net, 8, tile_mode="core").forward(x)
    assert torch.equal(x, x_before)  # overlapping crops would otherwise see an already-rectified input
    assert torch.allclose(streamed, net(x_before.clone()), atol=1e-6)

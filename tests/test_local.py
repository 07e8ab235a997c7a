"""Locally supervised learning (models/local.py, train/wholeimage/): cut, isolation, RFR, schedules, resume."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock

from slidetrain.configs.image import LocalConfig
from slidetrain.errors import ConfigError
from slidetrain.models.local import (
    RFR_TABLE,
    LocalBackbone,
    RFRDecoder,
    crop_boxes,
    entries_from_resnet,
    module_channels,
    module_groups,
    rfr_specs,
    sample_rfr_boxes,
)
from slidetrain.train.wholeimage.augment import (
    TCGA_MEAN,
    TCGA_STD,
    augment_slide,
    channel_stats,
    normalise,
)
from slidetrain.train.wholeimage.image_e2e_learner import ImageE2ELearner
from slidetrain.train.wholeimage.local_learner import LocalLearner
from slidetrain.train.wholeimage.oom import SlideOOMError
from slidetrain.train.wholeimage.registry import LEARNERS, build_learner, register_learner

torch.set_num_threads(1)

BN = nn.modules.batchnorm._BatchNorm


# --------------------------------------------------------------------------- fixtures


def colour_image(label: int, size: int = 128, seed: int = 0) -> torch.Tensor:
    """RGB (3, size, size) in [0, 1]: pinkish (class 0) or bluish (class 1) tissue-like noise."""
    g = torch.Generator().manual_seed(seed)
    base = torch.tensor([0.85, 0.45, 0.6]) if label == 0 else torch.tensor([0.45, 0.4, 0.85])
    blobs = torch.nn.functional.interpolate(torch.rand(1, 1, 8, 8, generator=g), size=size, mode="bilinear")[0]
    noise = 0.08 * torch.randn(3, size, size, generator=g)
    return (base.view(3, 1, 1) * (0.7 + 0.3 * blobs) + noise).clamp(0, 1)


def slide(label: int, size: int = 128, seed: int = 0) -> torch.Tensor:
    return normalise(colour_image(label, size, seed))


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> str:
    """A ResNet34 state dict whose BN running statistics fit our images (stands in for ImageNet)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = torchvision.models.resnet34()
    entries = entries_from_resnet(net)
    for m in net.modules():
        if isinstance(m, BN):
            m.reset_running_stats()
            m.momentum = None  # cumulative average
    net.train()
    with torch.no_grad():
        x = torch.stack([slide(i % 2, 160, seed=100 + i) for i in range(4)])
        for entry in entries:
            x = entry(x)
    path = tmp_path_factory.mktemp("weights") / "resnet34_calibrated.pt"
    torch.save(net.state_dict(), path)
    return str(path)


def grads(params) -> list[torch.Tensor | None]:
    return [None if p.grad is None else p.grad.detach().clone() for p in params]


def no_dropout(learner) -> None:
    """Attention dropout acts on the softmaxed weights: on a map with one position (our small
    images) it zeroes the whole pooled vector 20% of the time, and with it every gradient."""
    for m in learner.net.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0


def has_grad(params) -> bool:
    return any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


# --------------------------------------------------------------------------- the cut


def reference_blocks(net: torchvision.models.ResNet, K: int) -> list[list[nn.Module]]:
    """The REFERENCE_NOTES cut written out by hand (independent of the g = 8 // K formula)."""
    l1, l2, l3, l4 = net.layer1, net.layer2, net.layer3, net.layer4
    if K == 4:
        return [
            [l1[0], l1[1]],
            [l1[2], l2[0], l2[1]],
            [l2[2], l2[3], l3[0], l3[1], l3[2]],
            [l3[3], l3[4], l3[5], l4[0], l4[1], l4[2]],
        ]
    return [
        [l1[0]],
        [l1[1]],
        [l1[2]],
        [l2[0], l2[1]],
        [l2[2], l2[3]],
        [*l3[0:3]],
        [*l3[3:6]],
        [*l4],
    ]


@pytest.mark.parametrize("K", [4, 8])
def test_module_cut_matches_reference(K):
    net = torchvision.models.resnet34()
    backbone = LocalBackbone(entries_from_resnet(net), K)
    assert backbone.n_modules == K
    for k, expected in enumerate(reference_blocks(net, K), start=1):
        got = [m for block in backbone.module_blocks(k) for m in block.modules() if isinstance(m, BasicBlock)]
        assert [id(m) for m in got] == [id(m) for m in expected], f"module {k}"
        assert {id(p) for p in backbone.module_parameters(k)} == {id(p) for m in expected for p in m.parameters()}
    stem = list(backbone.entries[0])
    assert [id(m) for m in stem] == [id(net.conv1), id(net.bn1), id(net.relu), id(net.maxpool)]
    assert net.conv1.stride == (3, 3)
    # per-module channels and the RFR table agree with the cut
    specs = rfr_specs(K)
    assert len(specs) == K - 1
    for (c_in, c_out), spec in zip(module_channels(K)[:-1], specs, strict=True):
        assert (spec.in_channels, spec.out_channels) == (c_in, c_out)
    assert module_channels(K)[-1][1] == 512


def test_groups_and_bad_k():
    assert module_groups(4) == [[1, 2], [3, 4], [5, 6], [7, 8]]
    assert module_groups(8) == [[i] for i in range(1, 9)]
    for bad in (1, 2, 3, 5, 16):
        with pytest.raises(ConfigError, match="K"):
            module_groups(bad)
    with pytest.raises(ConfigError, match="K"):
        LocalConfig(K=6)
    with pytest.raises(ConfigError, match=r"methods\.local_k4\.K"):
        build_learner("local_k4", 2, {"K": 8})
    with pytest.raises(ConfigError, match=r"methods\.local_k8\.lr_heads_typo"):
        build_learner("local_k8", 2, {"lr_heads_typo": 1e-3})
    with pytest.raises(ConfigError, match=r"methods\.local_k4_norfr\.alpha"):
        build_learner("local_k4_norfr", 2, {"alpha": 1.0})
    with pytest.raises(ConfigError, match=r"methods\.image_e2e\.K"):
        build_learner("image_e2e", 2, {"K": 4})  # e2e has no modules
    with pytest.raises(ConfigError, match=r"methods\.local_k4\.schedule"):
        build_learner("local_k4", 2, {"schedule": "greedy"})
    assert {"local_k4", "local_k8", "local_k4_norfr", "local_k8_norfr", "image_e2e"} <= set(LEARNERS)
    with pytest.raises(ValueError, match="twice"):
        register_learner("image_e2e", LocalConfig, ImageE2ELearner)


# --------------------------------------------------------------------------- gradient isolation


@pytest.mark.parametrize("K", [4, 8])
def test_each_module_gets_gradient_only_from_its_own_loss(K, weights):
    learner = build_learner(f"local_k{K}", 2, {"weights": weights, "accumulation": 1})
    assert isinstance(learner, LocalLearner)
    no_dropout(learner)
    net = learner.net
    # parameter set k: module k of the backbone + its aux net (k < K) or the head (k = K)
    sets = [
        list(net.backbone.module_parameters(k)) + list((net.aux[k - 1] if k < K else net.head).parameters())
        for k in range(1, K + 1)
    ]
    changed_per_call: list[set[int]] = []
    backward = learner._backward

    def recording_backward(loss):
        before = [grads(s) for s in sets]
        backward(loss)
        after = [grads(s) for s in sets]
        changed = set()
        for k, (b, a) in enumerate(zip(before, after, strict=True), start=1):
            if any(
                (x is None) != (y is None) or (x is not None and not torch.equal(x, y))
                for x, y in zip(b, a, strict=True)
            ):
                changed.add(k)
        changed_per_call.append(changed)

    learner._backward = recording_backward
    losses = learner.train_slide(slide(1, 96), 1)
    assert len(changed_per_call) == K
    for k, changed in enumerate(changed_per_call, start=1):
        assert changed == {k}, f"loss of module {k} changed the gradients of modules {sorted(changed)}"
    # every module's backbone part did receive gradient from its own loss
    for k in range(1, K + 1):
        assert has_grad(net.backbone.module_parameters(k)), f"module {k}"
    # the stem is frozen
    assert all(p.grad is None and not p.requires_grad for p in net.backbone.entries[0].parameters())
    expected = {f"m{k}_{t}" for k in range(1, K) for t in ("ce", "rfr")} | {"final_ce", "loss"}
    assert expected <= set(losses)
    assert all(math.isfinite(v) for v in losses.values())


def test_norfr_has_no_decoder_and_no_rfr_loss(weights):
    learner = build_learner("local_k4_norfr", 2, {"weights": weights, "class_weights": [1, 3]})
    assert all(aux.rfr is None for aux in learner.net.aux)
    losses = learner.train_slide(slide(0), 0)
    assert not any(key.endswith("_rfr") for key in losses)
    assert {"m1_ce", "m2_ce", "m3_ce", "final_ce"} <= set(losses)
    # class weights scale the slide's CE (a weighted mean over one slide would cancel them)
    logits = torch.tensor([0.3, -0.2])
    ce = torch.nn.functional.cross_entropy(logits[None], torch.tensor([1]))
    assert learner._ce(logits, torch.tensor([1])).item() == pytest.approx(3 * ce.item())
    with pytest.raises(ConfigError, match=r"methods\.image_e2e\.class_weights"):
        build_learner("image_e2e", 3, {"class_weights": [1, 2]})


def test_backbone_bn_stays_in_eval_and_stats_unchanged(weights):
    learner = build_learner("local_k4", 2, {"weights": weights, "accumulation": 1})
    backbone = learner.net.backbone
    stats = {k: v.clone() for k, v in backbone.state_dict().items() if "running" in k or "num_batches" in k}
    assert stats
    learner.train_slide(slide(0), 0)
    learner.step()
    assert backbone.training
    assert all(not m.training for m in backbone.modules() if isinstance(m, BN))
    for key, value in backbone.state_dict().items():
        if key in stats:
            assert torch.equal(value, stats[key]), key
    # BN affine parameters of the trained modules do learn (only the statistics are frozen)
    bn_weights = [m.weight for m in backbone.entries[1].modules() if isinstance(m, BN)]
    assert has_grad(bn_weights) or learner.optimizer.state[bn_weights[0]]


@pytest.mark.parametrize("stem", ["trained", "frozen"])
def test_image_e2e_every_parameter_gets_gradient_stem_only_when_trained(weights, stem):
    learner = build_learner("image_e2e", 2, {"weights": weights, "accumulation": 1, "stem": stem})
    assert isinstance(learner, ImageE2ELearner)
    no_dropout(learner)
    # A 64 x 480 strip (fewer pixels than 256 x 256) gives a 2 x 10 layer4 map, so
    # the head's conv output has 2 positions and its norm and attention get a
    # gradient (on a single position both are constant).
    image = normalise(torch.nn.functional.interpolate(colour_image(1, 128)[None], size=(64, 480))[0])
    losses = learner.train_slide(image, 1)
    assert set(losses) >= {"final_ce", "loss"}
    net = learner.net
    stem_ids = {id(p) for p in net.backbone.entries[0].parameters()}
    # softmax ignores a constant shift: the attention score's bias has zero gradient by design
    shift = {id(net.head.pool.w.bias)}
    frozen = stem_ids if stem == "frozen" else set()
    for name, p in net.named_parameters():
        if id(p) in frozen:
            assert p.grad is None, name
        elif id(p) not in shift:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    # the stem's BatchNorm keeps its statistics either way (every backbone BN is in eval)
    assert not net.backbone.entries[0][1].training


@pytest.mark.parametrize(
    "method, params, released",
    [
        ("local_k4", {}, True),
        ("local_k8", {}, True),
        ("image_e2e", {"stem": "frozen"}, True),
        ("image_e2e", {"stem": "trained"}, False),  # conv1's weight gradient needs the image
        ("local_k4", {"on_oom": "crop"}, False),  # a retry crops the image, so it is kept
    ],
)
def test_image_is_released_after_a_frozen_stem(method, params, released):
    """Passed as a temporary, the slide image is freed before module 1 runs when nothing needs it."""
    import weakref

    learner = build_learner(method, 2, {"weights": "none", **params})
    refs: list[weakref.ref] = []

    def slide() -> torch.Tensor:
        image = normalise(colour_image(7, 96))
        refs.append(weakref.ref(image))
        return image

    alive: list[bool] = []
    first_block = learner.net.backbone.entries[1]
    first_block.register_forward_pre_hook(lambda m, a: alive.append(refs[0]() is not None))
    learner.train_slide(slide(), 1)
    assert alive == [not released]


# --------------------------------------------------------------------------- RFR geometry


@pytest.mark.parametrize("K", [4, 8])
def test_rfr_crops_cover_the_same_region(K):
    backbone = LocalBackbone(entries_from_resnet(torchvision.models.resnet34()), K).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        x = backbone.stem(torch.randn(1, 3, 250, 238))
        maps = [x]
        for k in range(1, K + 1):
            x = backbone.run_module(k, x)
            maps.append(x)
    for k, spec in enumerate(rfr_specs(K), start=1):
        x_in, x_out = maps[k - 1], maps[k]
        # the table's channels and upscale are the real module's
        assert (x_in.shape[1], x_out.shape[1]) == (spec.in_channels, spec.out_channels)
        for d in (2, 3):
            assert x_out.shape[d] == math.ceil(x_in.shape[d] / spec.upscale), (k, d)
        pairs = sample_rfr_boxes(x_out.shape[-2:], x_in.shape[-2:], spec.patch_sz, spec.upscale, 10, g)
        assert len(pairs) == 10
        u = spec.upscale
        for (t, c, h, w), in_box in pairs:
            # output pixel i sits over input pixel u * i: the boxes match after scaling
            assert in_box == (t * u, c * u, h * u, w * u)
            assert t >= 0 and c >= 0 and t + h <= x_out.shape[2] and c + w <= x_out.shape[3]
            assert in_box[0] + in_box[2] <= x_in.shape[2] and in_box[1] + in_box[3] <= x_in.shape[3]
            # maps smaller than the patch are used whole (clipped to what both maps hold)
            assert h == min(spec.patch_sz, x_out.shape[2], x_in.shape[2] // u)
            assert w == min(spec.patch_sz, x_out.shape[3], x_in.shape[3] // u)


@pytest.mark.parametrize("upscale", [1, 2])
def test_rfr_crop_content_corresponds(upscale):
    g = torch.Generator().manual_seed(1)
    x_in = torch.randn(1, 4, 301, 277)
    x_out = x_in[:, :, ::upscale, ::upscale]  # a stride-`upscale` map without receptive field
    for out_box, in_box in sample_rfr_boxes(x_out.shape[-2:], x_in.shape[-2:], 64, upscale, 20, g):
        a = crop_boxes(x_out, [out_box])
        b = crop_boxes(x_in, [in_box])[:, :, ::upscale, ::upscale]
        assert torch.equal(a, b)
    # a large patch on a small map: the whole (clipped) map
    (out_box, in_box) = sample_rfr_boxes((20, 30), (40, 61), 128, 2, 1, g)[0]
    assert out_box == (0, 0, 20, 30) and in_box == (0, 0, 40, 60)


def test_rfr_decoder_loss_reaches_output_not_input():
    spec = RFR_TABLE[4][1]  # 64 -> 128 channels, upscale 2
    dec = RFRDecoder(spec, n_patch=3)
    x_in = torch.randn(1, 64, 40, 40, requires_grad=True)
    x_out = torch.randn(1, 128, 20, 20, requires_grad=True)
    loss = dec(x_out, x_in, torch.Generator().manual_seed(0))
    loss.backward()
    assert loss.item() > 0
    assert x_out.grad is not None and x_out.grad.abs().sum() > 0
    assert x_in.grad is None  # the target is detached


# --------------------------------------------------------------------------- schedules, resume


def test_sequential_schedule_freezes_module_1_after_its_epochs(weights):
    learner = build_learner(
        "local_k4",
        2,
        {"weights": weights, "schedule": "sequential", "epochs": 8, "accumulation": 1},
    )
    no_dropout(learner)
    net = learner.net
    assert learner.cfg.epochs_per_module == 2
    losses = learner.train_slide(slide(0), 0)
    assert set(k for k in losses if k.startswith(("m", "final"))) == {"m1_ce", "m1_rfr"}
    assert has_grad(net.backbone.module_parameters(1))
    assert not has_grad(list(net.backbone.module_parameters(2)) + list(net.head.parameters()))
    learner.step()
    learner.end_epoch(0, None)
    assert learner.active == 1  # module 1 trains for 2 epochs
    learner.end_epoch(1, None)
    assert learner.active == 2
    m1 = list(net.backbone.module_parameters(1)) + list(net.aux[0].parameters())
    assert all(not p.requires_grad for p in m1)
    before = [p.detach().clone() for p in m1]
    losses = learner.train_slide(slide(1), 1)
    assert set(k for k in losses if k.startswith(("m", "final"))) == {"m2_ce", "m2_rfr"}
    assert all(not m.training for m in net.backbone.module_blocks(1))
    assert all(p.grad is None for p in m1)
    assert has_grad(net.backbone.module_parameters(2))
    learner.step()
    assert all(torch.equal(b, p) for b, p in zip(before, m1, strict=True))  # no decay either
    for epoch in range(2, 8):
        learner.end_epoch(epoch, None)
    assert learner.active == 4
    losses = learner.train_slide(slide(1), 1)
    assert "final_ce" in losses and not any(k.startswith("m") for k in losses)


def _train_a_bit(learner, n: int = 2):
    for i in range(n):
        learner.train_slide(slide(i % 2, 96, seed=i), i % 2)
    learner.step()


@pytest.mark.parametrize("schedule", ["simultaneous", "sequential"])
def test_state_dict_round_trip_resumes_exactly(weights, schedule):
    params = {"weights": weights, "accumulation": 2, "schedule": schedule, "epochs": 4}
    params |= {"scheduler": "step", "step_milestones": [1], "lr_heads": 1e-3, "lr_backbone": 1e-4}
    torch.manual_seed(1)
    a = build_learner("local_k4", 2, params)
    _train_a_bit(a)
    a.end_epoch(0, 0.7)
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    buffer.seek(0)
    torch.manual_seed(2)  # a different init, overwritten by the checkpoint
    b = build_learner("local_k4", 2, params)
    b.load_state_dict(torch.load(buffer, weights_only=False))
    assert b.active == a.active
    assert torch.equal(b.generator.get_state(), a.generator.get_state())  # RFR crop positions
    assert b.optimizer.param_groups[1]["lr"] == pytest.approx(1e-4)  # the step schedule fired
    image = slide(1, 96, seed=9)
    assert torch.equal(a.predict(image), b.predict(image))
    for learner in (a, b):
        torch.manual_seed(3)  # the loop restores torch's RNG (attention dropout)
        _train_a_bit(learner, n=1)
    for (name, pa), pb in zip(a.net.named_parameters(), b.net.parameters(), strict=True):
        assert torch.equal(pa, pb), name
    with pytest.raises(ConfigError, match="K=4"):
        build_learner("local_k8", 2, {"weights": weights}).load_state_dict(a.state_dict())


def test_tiny_training_run_reduces_the_loss(weights):
    torch.manual_seed(0)
    learner = build_learner(
        "local_k4",
        2,
        {"weights": weights, "accumulation": 2, "lr_backbone": 1e-5, "lr_heads": 3e-4, "epochs": 4},
    )
    data = [(slide(i % 2, 128, seed=10 + i), i % 2) for i in range(6)]
    epoch_loss, epoch_final = [], []
    for epoch in range(4):
        totals = [learner.train_slide(x, y) for x, y in data]
        learner.step()
        learner.end_epoch(epoch, None)
        epoch_loss.append(sum(t["loss"] for t in totals) / len(totals))
        epoch_final.append(sum(t["final_ce"] for t in totals) / len(totals))
    assert epoch_loss[-1] < 0.8 * epoch_loss[0], epoch_loss
    assert epoch_final[-1] < 0.6 * epoch_final[0], epoch_final
    probs = torch.stack([learner.predict(x) for x, _ in data])  # (6, 2)
    assert torch.allclose(probs.sum(1), torch.ones(6))
    labels = torch.tensor([y for _, y in data])
    assert (probs.argmax(1) == labels).float().mean() >= 0.75


# --------------------------------------------------------------------------- out of memory


def _oom_above(learner, entry: int, max_side: int):
    """Make backbone entry `entry` raise an out-of-memory error on maps wider than `max_side`."""

    def hook(module, args):
        if args[0].shape[-1] > max_side:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB (simulated)")

    return learner.net.backbone.entries[entry].register_forward_pre_hook(hook)


def test_oom_error_names_the_size_and_keeps_earlier_gradients(weights):
    learner = build_learner("local_k4", 2, {"weights": weights, "accumulation": 2})
    learner.train_slide(slide(0, 96), 0)
    earlier = grads(learner.net.parameters())
    _oom_above(learner, entry=3, max_side=20)  # module 2 fails after module 1's backward
    with pytest.raises(SlideOOMError, match="144x144"):
        learner.train_slide(slide(1, 144), 1)
    for g, p in zip(earlier, learner.net.parameters(), strict=True):
        assert (g is None and p.grad is None) or torch.equal(g, p.grad)


def test_oom_crop_retries_on_the_centre_without_double_counting(weights):
    params = {"weights": weights, "accumulation": 2, "on_oom": "crop"}
    a = build_learner("local_k4", 2, params)
    b = build_learner("local_k4", 2, params)
    b.load_state_dict(a.state_dict())
    for learner in (a, b):
        no_dropout(learner)  # the failed attempt would otherwise consume dropout draws
    earlier = slide(0, 96, seed=4)
    a.train_slide(earlier, 0)  # gradients waiting for the next step
    image = slide(1, 144)
    _oom_above(a, entry=3, max_side=20)  # 144 px -> stem map 24: fails; 96 px -> 16: fits
    losses = a.train_slide(image, 1)
    assert (losses["image_h"], losses["image_w"], losses["oom_crops"]) == (96, 96, 1)
    b.train_slide(image[:, 24:120, 24:120], 1)
    b.train_slide(earlier, 0)  # the other order: the sum is the same
    for (name, pa), pb in zip(a.net.named_parameters(), b.net.parameters(), strict=True):
        assert (pa.grad is None) == (pb.grad is None), name
        if pa.grad is not None:
            assert torch.allclose(pa.grad, pb.grad, atol=1e-6), name
    _oom_above(a, entry=3, max_side=1)
    with pytest.raises(SlideOOMError, match="after 1 crop"):
        a.train_slide(image, 1)


# --------------------------------------------------------------------------- data helpers


def test_augment_slide_is_seeded_and_keeps_pixels():
    image = colour_image(0, 120, seed=3)
    a = augment_slide(image, torch.Generator().manual_seed(5))
    b = augment_slide(image, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    assert a.min() >= 0 and a.max() <= 1
    shapes = set()
    for seed in range(30):
        out = augment_slide(image, torch.Generator().manual_seed(seed), small_side=0)
        assert out.shape[0] == 3 and 60 <= min(out.shape[1:]) and max(out.shape[1:]) <= 120
        shapes.add(tuple(out.shape))
    assert len(shapes) > 3  # random edge crops happen
    # geometry only: the result is one of the 8 flips/rotations of the input
    g = torch.Generator().manual_seed(0)
    for _ in range(10):
        out = augment_slide(image, g, crop_p=0.0, jitter_p=0.0)
        dihedral = [torch.rot90(im, k, (1, 2)) for im in (image, image.flip(2)) for k in range(4)]
        assert any(d.shape == out.shape and torch.equal(d, out) for d in dihedral)


def test_channel_stats_and_defaults():
    images = [colour_image(0, 64, seed=1), colour_image(1, 48, seed=2)]
    mean, std = channel_stats(images)
    pixels = torch.cat([im.reshape(3, -1) for im in images], dim=1).double()
    assert mean == pytest.approx(pixels.mean(1).tolist(), abs=1e-9)
    assert std == pytest.approx(pixels.std(1, unbiased=False).tolist(), abs=1e-9)
    as_uint8 = [(im * 255).round().to(torch.uint8) for im in images]
    assert channel_stats(as_uint8)[0] == pytest.approx(mean, abs=3e-3)
    assert TCGA_MEAN == (0.7223, 0.5304, 0.6579) and TCGA_STD == (0.2057, 0.2471, 0.2010)
    x = normalise(images[0])
    assert torch.allclose(x[0], (images[0][0] - 0.7223) / 0.2057)


def test_each_slide_loss_is_scaled_by_one_over_accumulation(weights):
    a = build_learner("local_k4", 2, {"weights": weights, "accumulation": 1})
    b = build_learner("local_k4", 2, {"weights": weights, "accumulation": 4})
    b.load_state_dict(a.state_dict())
    image = slide(0, 96)
    for learner in (a, b):
        no_dropout(learner)
        learner.train_slide(image, 0)
    for (name, pa), pb in zip(a.net.named_parameters(), b.net.parameters(), strict=True):
        if pa.grad is not None:
            assert torch.allclose(pa.grad, 4 * pb.grad, rtol=1e-4, atol=1e-7), name


# --------------------------------------------------------------------------- issue 11 item 7, issue 17


def test_default_schedule_is_the_readme_training_command():
    """55 epochs, lr x0.1 after epochs 25, 35 and 45 (the authors' README command)."""
    learner = build_learner("local_k4", 2)
    assert learner.cfg.epochs == 55 and learner.cfg.step_milestones == (25, 35, 45)
    lrs = []
    for epoch in range(learner.cfg.epochs):
        lrs.append([g["lr"] for g in learner.optimizer.param_groups])  # the lr epoch `epoch` trains at
        learner.end_epoch(epoch, 1.0)
    base = lrs[0]
    assert base == [1e-5, 2e-5]
    for epoch, factor in ((0, 1), (24, 1), (25, 0.1), (34, 0.1), (35, 0.01), (45, 0.001), (54, 0.001)):
        assert lrs[epoch] == pytest.approx([b * factor for b in base]), epoch
    # the code's options default is the other published schedule, one key away
    other = build_learner("local_k4", 2, {"epochs": 80, "step_milestones": [40, 60]})
    assert other.cfg.step_milestones == (40, 60)


def test_rfr_corners_are_drawn_from_zero_to_space_minus_one():
    """space = map - patch = 2: corners 0 and 1 only (the reference never draws 2)."""
    g = torch.Generator().manual_seed(0)
    boxes = sample_rfr_boxes((130, 131), (130, 131), 128, 1, 2000, g)
    tops = {b[0][0] for b in boxes}
    lefts = {b[0][1] for b in boxes}
    assert tops == {0, 1} and lefts == {0, 1, 2}
    # a map exactly the patch's size has the one corner 0
    assert {b[0][:2] for b in sample_rfr_boxes((128, 128), (128, 128), 128, 1, 50, g)} == {(0, 0)}


def test_batchnorm_calibration_sets_statistics_once_and_keeps_them_frozen():
    """Calibrated on the slides, the stem's BN outputs zero mean, unit variance over them; then frozen."""
    torch.manual_seed(0)
    learner = build_learner("local_k4", 3, {"calibrate_bn": True})
    images = [slide(i % 2, 96, seed=i) for i in range(4)]
    backbone = learner.net.backbone
    conv1, bn1 = backbone.entries[0][0], backbone.entries[0][1]
    assert learner.calibrate_batchnorm(images) == 4
    bns = [m for m in backbone.modules() if isinstance(m, BN)]
    assert all(not m.training and m.momentum == 0.1 for m in bns)
    assert all(m.running_mean.abs().sum() > 0 and (m.running_var != 1).all() for m in bns)
    with torch.no_grad():
        y = torch.cat([conv1(im[None]) for im in images], dim=0)  # (4, 64, h, w): bn1's inputs
    # the average of the per-slide statistics (each slide one batch)
    assert torch.allclose(bn1.running_mean, y.mean(dim=(2, 3)).mean(0), rtol=1e-4, atol=1e-6)
    assert torch.allclose(bn1.running_var, y.var(dim=(2, 3)).mean(0), rtol=1e-3, atol=1e-6)
    stats = [m.running_var.clone() for m in bns]
    learner.train_slide(images[1], 1)  # training leaves the calibrated statistics alone
    learner.step()
    assert all(torch.equal(s, m.running_var) for s, m in zip(stats, bns, strict=True))
    with pytest.raises(ConfigError, match="calibrate_bn"):
        build_learner("local_k4", 3, {"calibrate_bn": "yes"})


def _checkpointing_run(method, weights, mode, image, dtype):
    """(learner, losses) of one slide's forward/backward with `checkpointing: mode` in `dtype`."""
    torch.manual_seed(0)
    tile = 96 if method == "image_e2e" else 16  # a tile owns >= 1 output pixel (e2e's stride: 48)
    learner = build_learner(method, 2, {"weights": weights, "checkpointing": mode, "checkpoint_tile_px": tile})
    no_dropout(learner)
    learner.net.to(dtype)
    return learner, learner.train_slide(image.to(dtype), 1)


def _named_grads(learner) -> dict:
    return {f"grad.{n}": p.grad for n, p in learner.net.named_parameters()}


@pytest.mark.equivalence
@pytest.mark.parametrize("method", ["local_k4", "local_k8", "image_e2e"])
def test_checkpointing_keeps_the_gradients(weights, method):
    """blocks and tiles recompute what plain autograd keeps: the same losses and gradients.

    float64: equal to rounding (the proof); float32: as close to the float64 reference as plain
    fp32 is, on any CPU's kernels (slidetrain.bench.fidelity; a deep ReLU network, so with JUMP).
    """
    from slidetrain.bench.fidelity import JUMP, assert_exact, fidelity

    # 160 px: module 1's map is 27 x 27 and the aux classifier's GroupNorm sees 3 x 3 positions
    # (at 2 x 2 it normalises near-equal values, and float noise of 1e-6 moves its gradient by %)
    image = slide(1, 160, seed=3)
    runs = {
        (mode, dtype): _checkpointing_run(method, weights, mode, image, dtype)
        for mode in ("none", "blocks", "tiles")
        for dtype in (torch.float32, torch.float64)
    }
    if method != "image_e2e":  # tiles really tile module 1 (a 27 x 27 map in tiles of 16)
        assert len(runs["tiles", torch.float32][0].net.backbone._engines[0].plan((27, 27)).tiles) > 1
    reference, ref_losses = runs["none", torch.float64]
    plain, plain_losses = runs["none", torch.float32]
    for mode in ("blocks", "tiles"):
        exact, exact_losses = runs[mode, torch.float64]
        assert exact_losses["loss"] == pytest.approx(ref_losses["loss"], rel=1e-12)
        assert_exact(_named_grads(exact), _named_grads(reference), what=f"{method} {mode} float64")
        learner, losses = runs[mode, torch.float32]
        assert abs(losses["loss"] - ref_losses["loss"]) <= 4 * abs(plain_losses["loss"] - ref_losses["loss"]) + 1e-5
        fidelity(_named_grads(learner), _named_grads(plain), _named_grads(reference), jump=JUMP).check(
            f"{method} {mode} float32"
        )
    with pytest.raises(ConfigError, match="checkpointing"):
        build_learner(method, 2, {"checkpointing": "all"})


@pytest.mark.equivalence
def test_checkpointing_with_misplaced_crop_gradients_would_fail(weights, monkeypatch):
    """The assembled backward of `tiles` with RFR's crops mirrored (their gradients land on the
    wrong pixels): the check catches it."""
    import slidetrain.train.wholeimage.local_learner as learners_module
    from slidetrain.bench.fidelity import JUMP, fidelity

    image = slide(1, 160, seed=3)
    reference, _ = _checkpointing_run("local_k4", weights, "none", image, torch.float64)
    plain, _ = _checkpointing_run("local_k4", weights, "none", image, torch.float32)
    real, calls = learners_module.crop_boxes, []

    def mirrored(x, boxes):
        calls.append(1)
        crops = real(x, boxes)
        return crops.flip(-1) if len(calls) % 2 else crops  # odd calls: the output's crops

    monkeypatch.setattr(learners_module, "crop_boxes", mirrored)
    broken, _ = _checkpointing_run("local_k4", weights, "tiles", image, torch.float32)
    assert calls
    report = fidelity(_named_grads(broken), _named_grads(plain), _named_grads(reference), jump=JUMP)
    with pytest.raises(AssertionError, match="from the float64 reference"):
        report.check()

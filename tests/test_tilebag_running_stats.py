"""Why BatchNorm running statistics inverted the tile-bag validation AUROC (docs/tilebag.md, "Why running
statistics inverted validation AUROC").

A small case of the default task: 35 small synthetic slides (a third normal; 24 train, 11 validation),
32 px tiles at 5x, ResNet18 + GMA trained with the default recipe (K = 16, one slide per step, SGD lr
5e-3, 3 epochs). Scored with each slide's own statistics it separates the validation slides (AUROC 1.00
here); scored with the running statistics it ranks them the wrong way round (0.18), as the default's
mccv0 run did (0.98 against 0.00). The tests pin the mechanism, not only the low AUROC:

- the statistic is the mean of the input of the encoder's last BatchNorm layer (layer4.1.bn2): the
  slide's own mean there (running variance kept, every other layer on running statistics) restores the
  ranking (1.00), the slide's own variance there does not (0.04);
- that mean differs by class: along the direction u from the positive to the negative training slides'
  offsets (slide mean - running mean, in running standard deviations) every negative validation slide
  sits above the positives' average, and the offset alone ranks the validation slides;
- the head reads an offset along u as positive evidence: shifting every tile's last BatchNorm output along
  u raises the logit of positive over negative. Training never shows the head such a shift (each
  step's BatchNorm removes the slide's mean), so the sign of this response is not learnt from labels;
  here it is positive, so the negatives' offset pushes them above the positives.

The run is seeded and the same on AVX-512, AVX2 and SSE4.1 kernels (checked with ATEN_CPU_CAPABILITY and
ONEDNN_MAX_CPU_ISA); another seed or slide draw may rank correctly with running statistics (docs).
"""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from torch import nn

from slidetrain.data.tilebag import BagSampling, EvalBags, SlideRef
from slidetrain.train.tilebag.model import TileBagConfig, build_tilebag_model
from slidetrain.train.tilebag.trainer import TileBagTrainer

N_SLIDES, TILE_PX, SEED = 35, 32, 0


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(model in eval mode, train tiles and labels, validation tiles and labels): one training, shared."""
    from slidetrain.wsi.mask import mask_params, segment_tissue
    from slidetrain.wsi.slide import open_slide
    from slidetrain.wsi.synthetic import synthetic_spec, write_synthetic_slide
    from slidetrain.wsi.tile import tile_coordinates, write_tiles_h5

    root = tmp_path_factory.mktemp("running_stats")
    refs = []
    for i in range(N_SLIDES):
        grade = ["normal", "low_grade", "high_grade"][i % 3]
        path, h5 = root / f"s_{i:03d}.tiff", root / f"s_{i:03d}.h5"
        write_synthetic_slide(path, synthetic_spec(path.stem, grade, seed=3, size_range_px=(1600, 2200)))
        with open_slide(path, path.stem) as slide:
            coords = tile_coordinates(slide, segment_tissue(slide, mask_params("default")), 5.0, TILE_PX, 0, 0.5)
            write_tiles_h5(h5, coords, slide=slide, target_magnification=5.0, tile_px=TILE_PX, overlap_px=0)
        refs.append(SlideRef(path.stem, path, h5, int(grade != "normal")))
    train, val = refs[:24], refs[24:]
    # config.yaml's tilebag recipe, but every training slide in every epoch (few slides here)
    recipe = {"epochs": 3, "warmup_epochs": 0.75, "lr": 5e-3, "slides_per_epoch": 1.0}
    cfg = TileBagConfig(backbone="resnet18", k=16, input_px=TILE_PX, workers=0, **recipe)
    sampling = BagSampling(k=16, input_px=TILE_PX, augment=True, tile_px=TILE_PX, target_magnification=5.0)
    trainer = TileBagTrainer(build_tilebag_model(cfg, 2, SEED), cfg, sampling, train, SEED, torch.device("cpu"))
    for epoch in range(cfg.epochs):
        trainer.train_epoch(epoch)
    plain = BagSampling(k=16, input_px=TILE_PX, augment=False, tile_px=TILE_PX, target_magnification=5.0)

    def tiles(part: list[SlideRef]) -> tuple[list[torch.Tensor], np.ndarray]:
        bags = EvalBags(part, plain, mode="all", chunk=10**6)  # each slide whole: one call, exact bag statistics
        return [bags[i]["tiles"] for i in range(len(part))], np.array([r.label for r in part])

    return trainer.model.eval(), *tiles(train), *tiles(val)


def _logit_diff(model, encoder: nn.Module, slides: list[torch.Tensor]) -> np.ndarray:
    """Per slide: logit(positive) - logit(negative)."""
    with torch.no_grad():
        return np.array([float(np.diff(model.aggregator(encoder(t)).logits.numpy())[0]) for t in slides])


def _bag_statistics(encoder: nn.Module) -> nn.Module:
    """A copy whose BatchNorm layers use each call's batch statistics (each call here is a whole slide)."""
    bag = copy.deepcopy(encoder)
    for m in bag.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.track_running_stats, m.running_mean, m.running_var = False, None, None
    return bag.eval()


class _LastNorm(nn.Module):
    """The last BatchNorm with the slide's own mean and/or variance in place of the running ones."""

    def __init__(self, bn: nn.BatchNorm2d, slide_mean: bool, slide_var: bool):
        super().__init__()
        self.bn, self.slide_mean, self.slide_var = bn, slide_mean, slide_var

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # (N, C, h, w)
        mean = z.mean((0, 2, 3)) if self.slide_mean else self.bn.running_mean
        var = z.var((0, 2, 3), unbiased=False) if self.slide_var else self.bn.running_var
        return F.batch_norm(z, mean, var, self.bn.weight, self.bn.bias, False, 0.0, self.bn.eps)


def _with_last_norm(encoder: nn.Module, slide_mean: bool, slide_var: bool) -> nn.Module:
    swapped = copy.deepcopy(encoder)
    block = swapped.trunk[-1][-1]  # layer4's last BasicBlock: bn2 is the encoder's last BatchNorm
    block.bn2 = _LastNorm(block.bn2, slide_mean, slide_var)
    return swapped


def _offsets(encoder: nn.Module, slides: list[torch.Tensor]) -> torch.Tensor:
    """(slide mean - running mean) / running std of the last BatchNorm's input, per slide (S, C)."""
    bn = encoder.trunk[-1][-1].bn2
    got = []
    hook = bn.register_forward_pre_hook(lambda m, args: got.append(args[0].mean((0, 2, 3))))
    with torch.no_grad():
        for t in slides:
            encoder(t)
    hook.remove()
    return (torch.stack(got) - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps)


def test_running_statistics_invert_what_bag_statistics_separate(trained):
    model, _, _, val, y = trained
    bag = roc_auc_score(y, _logit_diff(model, _bag_statistics(model.encoder), val))
    running = roc_auc_score(y, _logit_diff(model, model.encoder, val))
    assert bag >= 0.9 and running <= 0.3, (bag, running)


def test_the_mean_of_the_last_batchnorm_input_flips_the_ranking(trained):
    model, _, _, val, y = trained
    auroc = {
        (m, v): roc_auc_score(y, _logit_diff(model, _with_last_norm(model.encoder, m, v), val))
        for m, v in [(True, False), (False, True)]
    }
    assert auroc[(True, False)] >= 0.8, auroc  # the slide's mean there, everything else running: restored
    assert auroc[(False, True)] <= 0.3, auroc  # the slide's variance there: still inverted


def test_that_mean_differs_by_class_and_the_head_reads_it_as_positive(trained):
    model, train, y_train, val, y = trained
    off_train = _offsets(model.encoder, train)
    u = off_train[y_train == 0].mean(0) - off_train[y_train == 1].mean(0)  # positive -> negative slides
    u = u / u.norm()
    along = (_offsets(model.encoder, val) @ u).numpy()  # (S,), validation slides, u from training slides
    table = pd.DataFrame({"label": y, "offset_along_u": along})
    assert along[y == 0].min() > along[y == 1].mean(), table
    assert roc_auc_score(y, -along) >= 0.9, table
    # the head under training's normalisation, every tile's last BatchNorm output shifted by delta * gamma * u
    shifted = {}
    for delta in (-4.0, 0.0, 4.0):
        encoder = _bag_statistics(model.encoder)
        bn = encoder.trunk[-1][-1].bn2
        bn.register_forward_hook(lambda m, args, out, d=delta: out + (d * m.weight * u).view(1, -1, 1, 1))
        shifted[delta] = _logit_diff(model, encoder, val)
    for cls in (0, 1):
        means = [shifted[d][y == cls].mean() for d in (-4.0, 0.0, 4.0)]
        assert means[0] < means[1] < means[2], (cls, means)

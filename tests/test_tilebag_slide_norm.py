"""`eval_bn: bag`: a slide's tiles, scored in chunks, are normalised as one whole-slide forward.

The reference is one call of the encoder on every tile of the slide in training-mode BatchNorm
(what a one-slide training step does); chunk size, tile order and the encoder ranks' shares must
change nothing but rounding. The distributed half (ranks merging their moments) is checked against
one process in tests/test_tilebag_ranked.py.
"""

from __future__ import annotations

import copy
import shutil

import h5py
import pandas as pd
import pytest
import torch

from slidetrain.data.tilebag import BagSampling, read_coords
from slidetrain.models.encoders import build_encoder
from slidetrain.train.common import default_dtype
from slidetrain.train.tilebag.encoder_stages import freeze_first_blocks, keep_frozen_norms_in_eval
from slidetrain.train.tilebag.model import TileBagConfig, build_tilebag_model
from slidetrain.train.tilebag.slide_norm import SlideNormEncoder
from slidetrain.train.tilebag.trainer import TileBagTrainer


def _encoder(dtype: torch.dtype, freeze_blocks: int = 0) -> torch.nn.Module:
    enc = build_encoder("resnet18", "none", seed=0).to(dtype)
    freeze_first_blocks(enc, freeze_blocks)
    enc.train()
    with torch.no_grad():  # running statistics far from any batch's: a layer that used them would show
        for _ in range(3):
            enc(torch.randn(6, 3, 32, 32, dtype=dtype) * 4 + 2)
    return enc.eval()


def _whole_bag(encoder: torch.nn.Module, tiles: torch.Tensor) -> torch.Tensor:
    """One training-mode forward of every tile (frozen layers on running statistics), on a copy."""
    ref = copy.deepcopy(encoder).train()
    keep_frozen_norms_in_eval(ref)
    with torch.no_grad():
        return ref(tiles)  # (N, D)


def _in_chunks(norm: SlideNormEncoder, tiles: torch.Tensor, chunk: int) -> torch.Tensor:
    """The passes predict() makes over one slide, chunk by chunk."""
    passes = norm.plan(chunk)(len(tiles))
    out = []
    with torch.no_grad():
        for p in range(passes):
            for a in range(0, len(tiles), chunk):
                f = norm.encode(tiles[a : a + chunk], p, passes)
                if f is not None:
                    out.append(f)
            norm.end_pass(p, passes)
    return torch.cat(out)


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-10), (torch.float32, 2e-4)])
def test_chunks_and_order_change_nothing_and_equal_one_whole_bag_forward(dtype, tol):
    torch.manual_seed(0)
    encoder = _encoder(dtype)
    before = copy.deepcopy(encoder.state_dict())
    tiles = torch.randn(40, 3, 32, 32, dtype=dtype)
    reference = _whole_bag(encoder, tiles)
    norm = SlideNormEncoder(encoder, bag=True)
    assert len(norm.layers) == 20 and norm.plan(8)(40) == 21 and norm.plan(64)(40) == 1
    perm = torch.randperm(40)
    got = {
        "chunk 8": _in_chunks(norm, tiles, 8),
        "chunk 64": _in_chunks(norm, tiles, 64),
        "chunk 7, shuffled": _in_chunks(norm, tiles[perm], 7)[torch.argsort(perm)],
    }
    for name, features in got.items():
        torch.testing.assert_close(features, reference, rtol=tol, atol=tol, msg=name)
    # what it replaced: each chunk normalised by its own statistics is another function of the slide
    per_chunk = torch.cat([_whole_bag(encoder, tiles[a : a + 8]) for a in range(0, 40, 8)])
    assert (per_chunk - reference).abs().max() > 100 * tol
    assert all(torch.equal(before[k], v) for k, v in encoder.state_dict().items())  # running stats untouched


def test_frozen_layers_keep_running_statistics_and_running_mode_is_the_encoder_itself():
    torch.manual_seed(1)
    encoder = _encoder(torch.float64, freeze_blocks=2)  # stem + layer1 + layer2 frozen
    tiles = torch.randn(20, 3, 32, 32, dtype=torch.float64)
    norm = SlideNormEncoder(encoder, bag=True)
    assert len(norm.layers) == 20 - 1 - 4 - 5  # stem, layer1 (4), layer2 (4 + downsample) keep theirs
    torch.testing.assert_close(_in_chunks(norm, tiles, 6), _whole_bag(encoder, tiles), rtol=1e-10, atol=1e-10)
    running = SlideNormEncoder(encoder, bag=False)
    assert running.encoder is encoder and running.plan(6)(20) == 1
    with torch.no_grad():
        torch.testing.assert_close(_in_chunks(running, tiles, 6), encoder(tiles))


def _trainer(refs, chunk: int) -> TileBagTrainer:
    """An untrained float64 tile-bag model scoring `refs` with eval_chunk = `chunk` (call under default_dtype)."""
    cfg = TileBagConfig(
        backbone="resnet18", k=6, input_px=16, eval_chunk=chunk, eval_bn="bag", workers=0, dtype="float64"
    )
    sampling = BagSampling(k=6, input_px=16, augment=False, tile_px=32, target_magnification=5.0)
    return TileBagTrainer(build_tilebag_model(cfg, 2, seed=0), cfg, sampling, refs, 0, torch.device("cpu"))


def test_predict_is_the_same_at_any_chunk_size_and_tile_order(tiled_synthetic, tmp_path):
    _, _, refs = tiled_synthetic
    refs = refs[:1]
    shuffled = []
    for i, ref in enumerate(refs):
        coords = read_coords(ref)
        assert len(coords) > 16  # several chunks of 8
        perm = torch.randperm(len(coords), generator=torch.Generator().manual_seed(i)).numpy()
        path = tmp_path / ref.tiles_h5.name
        shutil.copy(ref.tiles_h5, path)
        with h5py.File(path, "r+") as f:
            f["coords"][...] = coords[perm]
        shuffled.append(type(ref)(ref.slide_id, ref.slide_path, path, ref.label))
    with default_dtype("float64"):  # as fit_tilebag's dtype: float64
        probs = {
            "chunk 8": _trainer(refs, 8).predict(refs).probs,
            "chunk 64": _trainer(refs, 64).predict(refs).probs,
            "chunk 8, tiles shuffled": _trainer(shuffled, 8).predict(shuffled).probs,
        }
    table = pd.DataFrame({k: v[0, :, 1] for k, v in probs.items()})
    for name in table:
        assert table[name].tolist() == pytest.approx(table["chunk 64"].tolist(), rel=1e-9, abs=1e-12), table

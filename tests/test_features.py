"""Frozen tile features: cached per slide and encoder, reused, identical across processes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slidetrain.errors import ConfigError
from slidetrain.models.encoders import build_encoder, encoder_dim
from slidetrain.wsi.features import FeatureJob, extract_features, read_features


@pytest.fixture(scope="module")
def tiled_slide(synthetic_slides, tmp_path_factory):
    from slidetrain.wsi.mask import mask_params, segment_tissue
    from slidetrain.wsi.slide import open_slide
    from slidetrain.wsi.tile import tile_coordinates, write_tiles_h5

    path, _, spec = synthetic_slides[2]
    tiles_h5 = tmp_path_factory.mktemp("tiles") / "t.h5"
    with open_slide(path, "t_02") as slide:
        tissue = segment_tissue(slide, mask_params("default"))
        coords = tile_coordinates(slide, tissue, 5.0, 64, 0, 0.5)
        write_tiles_h5(tiles_h5, coords, slide=slide, target_magnification=5.0, tile_px=64, overlap_px=0)
    return path, tiles_h5, len(coords)


def test_features_are_cached_and_reused(tiled_slide, tmp_path):
    path, tiles_h5, n = tiled_slide
    job = FeatureJob("t_02", path, tiles_h5, tmp_path / "t_02.h5")
    rows = extract_features([job], "resnet18", batch_size=16)
    assert len(rows) == 1 and rows[0]["n_tiles"] == n
    features, coords = read_features(job.out_h5)
    assert features.shape == (n, encoder_dim("resnet18")) and coords.shape == (n, 2)
    assert np.isfinite(features).all() and features.std() > 0
    mtime = job.out_h5.stat().st_mtime_ns
    assert extract_features([job], "resnet18", batch_size=16) == []  # nothing recomputed
    assert job.out_h5.stat().st_mtime_ns == mtime


def test_interrupted_feature_file_is_redone(tiled_slide, tmp_path):
    path, tiles_h5, n = tiled_slide
    out = tmp_path / "t_02.h5"
    out.write_bytes(b"half a file")  # what a kill mid-write by another tool could leave
    rows = extract_features([FeatureJob("t_02", path, tiles_h5, out)], "resnet18", batch_size=16)
    assert len(rows) == 1
    assert read_features(out)[0].shape[0] == n


def test_random_encoder_is_the_same_in_every_process():
    a, b = build_encoder("resnet18", "none", seed=0), build_encoder("resnet18", "none", seed=0)
    x = torch.rand(2, 3, 64, 64)
    torch.manual_seed(123)  # global RNG state must not matter
    assert torch.equal(a(x), b(x))


def test_local_state_dict_weights_load(tmp_path):
    import torchvision

    model = torchvision.models.resnet18(weights=None)
    torch.nn.init.constant_(model.conv1.weight, 0.01)
    path = tmp_path / "w.pt"
    torch.save(model.state_dict(), path)
    enc = build_encoder("resnet18", str(path))
    assert torch.allclose(enc.trunk[0].weight, torch.full_like(enc.trunk[0].weight, 0.01))


def test_bad_weights_and_encoder_names():
    with pytest.raises(ConfigError, match="does not exist"):
        build_encoder("resnet18", "/no/such/weights.pt")
    with pytest.raises(ConfigError, match="unknown encoder 'vit'"):
        build_encoder("vit")


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_light_resnet_is_torchvisions_resnet(arch):
    """Same parameter names and shapes, same outputs for the same weights: torchvision checkpoints load as is."""
    import torchvision

    from slidetrain.models.resnet import resnet

    ours, theirs = resnet(arch).eval(), getattr(torchvision.models, arch)(weights=None).eval()
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    ours.load_state_dict(theirs.state_dict())
    x = torch.rand(2, 3, 96, 96)
    assert torch.allclose(ours(x), theirs(x), atol=1e-5)

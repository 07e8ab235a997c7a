"""Tile-bag dataset: sampling, on-the-fly reading, one augmentation draw per slide, seeded test-time bags."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slidetrain.data.tilebag import (
    BagSampling,
    EpochSubset,
    EvalBags,
    SlideRef,
    TileBagDataset,
    bag_loader,
    check_item,
    sample_indices,
)
from slidetrain.errors import SlideError


@pytest.fixture(scope="module")
def tiled(tiled_synthetic):
    return tiled_synthetic[2]


SAMPLING = BagSampling(k=8, tile_px=32, target_magnification=5.0)


def test_sampling_with_replacement_only_when_too_few():
    rng = np.random.default_rng(0)
    few = sample_indices(3, 10, rng)
    assert len(few) == 10 and set(few) <= {0, 1, 2} and len(set(few)) <= 3
    many = sample_indices(50, 10, rng)
    assert len(many) == 10 and len(set(many)) == 10


def test_bag_shape_and_reading_matches_read_tiles(tiled):
    from slidetrain.data.tilebag import normalise
    from slidetrain.wsi.slide import open_slide
    from slidetrain.wsi.tile import read_tiles

    ds = TileBagDataset(tiled, BagSampling(k=8, tile_px=32, target_magnification=5.0, augment=False), seed=0)
    item = check_item(ds[0])
    assert item["tiles"].shape == (8, 3, 32, 32) and item["tiles"].dtype == torch.float32
    with open_slide(tiled[0].slide_path) as slide:
        direct = np.stack(list(read_tiles(slide, item["coords"].numpy(), 5.0, 32)))  # (K, H, W, 3)
    expected = normalise(torch.from_numpy(direct).permute(0, 3, 1, 2).float() / 255)
    torch.testing.assert_close(item["tiles"], expected)


def test_slide_with_fewer_tiles_than_k_is_sampled_with_replacement(tiled):
    n = len(TileBagDataset(tiled, SAMPLING, 0).coords(0))
    ds = TileBagDataset(tiled, BagSampling(k=n + 5, tile_px=32, target_magnification=5.0), seed=0)
    coords = check_item(ds[0])["coords"].numpy()
    assert len(coords) == n + 5
    assert len({tuple(c) for c in coords}) <= n  # repeats


def test_every_tile_of_a_slide_gets_the_same_augmentation_draw(tiled, tmp_path):
    """A slide whose K tiles are one tile repeated: after augmentation all K are still identical."""
    from slidetrain.wsi.slide import open_slide
    from slidetrain.wsi.tile import read_tiles_h5, write_tiles_h5

    coords, _ = read_tiles_h5(tiled[1].tiles_h5)
    one = tmp_path / "one.h5"
    with open_slide(tiled[1].slide_path) as slide:
        write_tiles_h5(one, coords[:1], slide=slide, target_magnification=5.0, tile_px=32, overlap_px=0)
    ref = SlideRef(tiled[1].slide_id, tiled[1].slide_path, one, 1)
    ds = TileBagDataset([ref], BagSampling(k=6, tile_px=32, target_magnification=5.0, augment=True), seed=3)
    plain = TileBagDataset([ref], BagSampling(k=6, tile_px=32, target_magnification=5.0, augment=False), seed=3)
    changed = 0
    for epoch in range(4):
        ds.set_epoch(epoch), plain.set_epoch(epoch)
        item = check_item(ds[0])
        tiles = item["tiles"]
        assert all(torch.equal(tiles[0], t) for t in tiles[1:])
        changed += not torch.allclose(tiles, check_item(plain[0])["tiles"])
    assert changed >= 3  # augmentation did act


def test_draws_are_seeded_per_epoch_and_reproducible(tiled):
    a, b = TileBagDataset(tiled, SAMPLING, seed=1), TileBagDataset(tiled, SAMPLING, seed=1)
    a.set_epoch(2), b.set_epoch(2)
    ia, ib = check_item(a[3]), check_item(b[3])
    assert torch.equal(ia["tiles"], ib["tiles"]) and ia["augment"] == ib["augment"]
    a.set_epoch(3)
    assert not torch.equal(check_item(a[3])["coords"], ia["coords"]) or check_item(a[3])["augment"] != ia["augment"]


def test_loader_with_workers_gives_the_same_bags(tiled):
    ds = TileBagDataset(tiled, SAMPLING, seed=0)
    in_process = [check_item(x)["tiles"] for x in bag_loader(ds, workers=0)]
    workers = [check_item(x)["tiles"] for x in bag_loader(ds, workers=2)]
    assert all(torch.equal(a, b) for a, b in zip(in_process, workers, strict=True))


def test_epoch_subset_draws_the_fraction():
    s = EpochSubset(10, 0.5, seed=0)
    first = list(s)
    s.set_epoch(1)
    second = list(s)
    assert len(first) == len(second) == 5 and len(set(first)) == 5 and first != second


def test_eval_all_tiles_in_chunks_covers_every_tile(tiled):
    bags = EvalBags(tiled[:2], SAMPLING, mode="all", chunk=7)
    per_slide = {}
    for item in bags:
        item = check_item(item)
        per_slide.setdefault(item["index"], []).append(item["coords"].numpy())
    for i, ref in enumerate(tiled[:2]):
        from slidetrain.wsi.tile import read_tiles_h5

        np.testing.assert_array_equal(np.concatenate(per_slide[i]), read_tiles_h5(ref.tiles_h5)[0])


def test_eval_repeats_are_seeded_and_reproducible(tiled):
    a = [check_item(x)["coords"] for x in EvalBags(tiled, SAMPLING, mode="sampled", repeats=3, seed=5)]
    b = [check_item(x)["coords"] for x in EvalBags(tiled, SAMPLING, mode="sampled", repeats=3, seed=5)]
    c = [check_item(x)["coords"] for x in EvalBags(tiled, SAMPLING, mode="sampled", repeats=3, seed=6)]
    assert len(a) == 3 * len(tiled)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))
    assert not torch.equal(a[0], a[1])  # repeats of one slide differ


def test_unreadable_slide_raises_naming_it(tiled, tmp_path):
    broken = tmp_path / "broken.tiff"
    data = tiled[0].slide_path.read_bytes()
    broken.write_bytes(data[: len(data) // 3])  # cut short, as a failed copy leaves it
    ref = SlideRef("broken_slide", broken, tiled[0].tiles_h5, 0)
    ds = TileBagDataset([tiled[1], ref], SAMPLING, seed=0)
    with pytest.raises(SlideError, match="broken_slide"):
        for item in bag_loader(ds, workers=1):
            check_item(item)


def test_slide_without_tiles_raises_naming_it(tiled, tmp_path):
    from slidetrain.wsi.slide import open_slide
    from slidetrain.wsi.tile import write_tiles_h5

    empty = tmp_path / "empty.h5"
    with open_slide(tiled[0].slide_path) as slide:
        write_tiles_h5(empty, np.zeros((0, 2)), slide=slide, target_magnification=5.0, tile_px=32, overlap_px=0)
    ds = TileBagDataset([SlideRef("no_tiles_slide", tiled[0].slide_path, empty, 0)], SAMPLING, seed=0)
    with pytest.raises(SlideError, match="no_tiles_slide.*no tiles"):
        check_item(ds[0])


def test_rank_shares_make_up_the_bag_one_process_reads(tiled):
    """Distributed training: encoder ranks' shares (same draw and augmentation) concatenate to the full bag."""
    from slidetrain.train.tilebag.ranked import RankShare

    full = TileBagDataset(tiled, SAMPLING, seed=3)
    shares = [TileBagDataset(tiled, SAMPLING, seed=3, share=RankShare(3, r)(SAMPLING.k)) for r in range(3)]
    for ds in (full, *shares):
        ds.set_epoch(1)
    whole = check_item(full[2])
    parts = [check_item(ds[2]) for ds in shares]
    assert [len(p["tiles"]) for p in parts] == [3, 3, 2]
    torch.testing.assert_close(torch.cat([p["tiles"] for p in parts]), whole["tiles"])
    torch.testing.assert_close(torch.cat([p["coords"] for p in parts]), whole["coords"])
    labels_only = TileBagDataset(tiled, SAMPLING, seed=3, read=False)[2]
    assert labels_only == {"slide_id": whole["slide_id"], "index": 2, "label": whole["label"]}


@pytest.mark.parametrize("mode", ["all", "sampled"])
def test_eval_shares_cover_each_slide_once_in_order(tiled, mode):
    from slidetrain.train.tilebag.ranked import RankShare

    def coords_per_slide(bags):
        out, current = {}, []
        for j in range(len(bags)):
            item = check_item(bags[j])
            current.append(item["coords"])
            if item["last"]:
                out.setdefault(item["index"], []).append(torch.cat(current))
                current = []
        return out

    kw = {"mode": mode, "chunk": 3, "repeats": 2, "seed": 1}
    whole = coords_per_slide(EvalBags(tiled[:2], SAMPLING, **kw))
    parts = [coords_per_slide(EvalBags(tiled[:2], SAMPLING, share=RankShare(2, r), **kw)) for r in range(2)]
    for i, bags in whole.items():
        for rep, expected in enumerate(bags):
            torch.testing.assert_close(torch.cat([p[i][rep] for p in parts]), expected)

"""Reading benchmarks compare like with like: cold reads are cold, OpenSlide gets the same threads."""

from __future__ import annotations

import dataclasses
import math
import os

import numpy as np
import pandas as pd
import pytest

from slidetrain.bench.page_cache import cached_fraction
from slidetrain.bench.read_speed import READ_COLUMNS, ThreadedOpenSlide, bench_read
from slidetrain.bench.tilebag_step import ColdBags
from slidetrain.data.tilebag import SlideRef
from slidetrain.wsi.slide import open_slide


class CacheSpy:
    """A stand-in dataset that records, at read time, how much of each slide's files is cached."""

    def __init__(self, refs):
        self.refs = refs

    def __len__(self):
        return len(self.refs)

    def __getitem__(self, i):
        ref = self.refs[i]
        return {"slide_id": ref.slide_id, "seen": max(cached_fraction(ref.slide_path), cached_fraction(ref.tiles_h5))}


def test_cold_bags_are_read_after_their_files_leave_the_page_cache(tmp_path):
    refs = []
    for name in ("a", "b"):
        slide, tiles = tmp_path / f"{name}.tiff", tmp_path / f"{name}.h5"
        for path in (slide, tiles):
            path.write_bytes(os.urandom(2 * 2**20))
        refs.append(SlideRef(name, slide, tiles, 0))
    os.sync()  # clean pages: the only kind an eviction drops
    for ref in refs:
        ref.slide_path.read_bytes(), ref.tiles_h5.read_bytes()
    if math.isnan(cached_fraction(refs[0].slide_path)) or cached_fraction(refs[0].slide_path) < 0.9:
        pytest.skip("the page cache cannot be observed here")
    cold = ColdBags(CacheSpy(refs))
    for i in range(len(cold)):
        item = cold[i]
        assert item["seen"] < 0.05, f"{item['slide_id']} was read warm"
        assert item["cache_left"] < 0.05


@pytest.fixture(scope="module")
def small_slide(tmp_path_factory):
    from slidetrain.wsi.synthetic import synthetic_spec, write_synthetic_slide

    spec = synthetic_spec("read_0", "high_grade", seed=5, size_range_px=(2400, 2400))
    spec = dataclasses.replace(spec, width_px=2400, height_px=2000)
    path = tmp_path_factory.mktemp("read") / "read_0.tiff"
    write_synthetic_slide(path, spec)
    return path


def test_threaded_openslide_reads_the_same_pixels(small_slide):
    with open_slide(small_slide) as plain, ThreadedOpenSlide.open(small_slide, threads=3) as threaded:
        level = plain.level_count - 1
        w, h = plain.level_dimensions[level]
        box = (min(w, 301), min(h, 257))
        assert np.array_equal(threaded.read_region((0, 0), level, box), plain.read_region((0, 0), level, box))
        assert np.array_equal(threaded.read_level(0)[:200], plain.read_level(0)[:200])


def test_read_speed_rows_name_each_readers_threads(small_slide, tmp_path):
    table = bench_read([small_slide], tmp_path / "read.csv", threads=2, repeats=1)
    assert list(pd.read_csv(tmp_path / "read.csv").columns) == READ_COLUMNS
    rows = table.set_index("reader")
    assert list(rows.index) == ["openslide", "openslide_threads", "auto"]
    assert rows.threads.to_dict() == {"openslide": 1, "openslide_threads": 2, "auto": 2}
    assert rows.max_abs_diff["openslide_threads"] == 0
    # auto (2 threads) is compared with OpenSlide on 2 threads, not only with one-thread OpenSlide
    assert rows.speedup_equal_threads["auto"] == pytest.approx(rows.seconds["openslide_threads"] / rows.seconds["auto"])
    assert rows.speedup["auto"] == pytest.approx(rows.seconds["openslide"] / rows.seconds["auto"])

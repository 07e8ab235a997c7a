"""Cold reads: drop_page_cache evicts a file from the page cache, and cached_fraction sees it."""

from __future__ import annotations

import math
import os

import pytest

from slidetrain.bench.page_cache import cached_fraction, drop_and_measure, drop_page_cache


@pytest.fixture
def read_file(tmp_path):
    path = tmp_path / "slide.bin"
    path.write_bytes(os.urandom(8 * 2**20))
    os.sync()  # written back: DONTNEED drops clean pages only
    path.read_bytes()  # now cached
    return path


def test_a_read_file_is_cached_and_dropping_it_evicts_it(read_file):
    before = cached_fraction(read_file)
    if math.isnan(before):
        pytest.skip("mincore cannot tell on this file system")
    assert before > 0.9
    drop_page_cache(read_file)
    assert cached_fraction(read_file) < 0.05
    read_file.read_bytes()
    assert cached_fraction(read_file) > 0.9  # measuring did not get in the way of caching it again


def test_drop_and_measure_reports_what_is_left(read_file, tmp_path):
    other = tmp_path / "empty.bin"
    other.write_bytes(b"")
    left = drop_and_measure([read_file, other, read_file])
    assert left == pytest.approx(0.0, abs=0.05) or math.isnan(left)

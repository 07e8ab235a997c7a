"""The memory probe sees a known allocation, and only that."""

from __future__ import annotations

import numpy as np
import pytest

from slidetrain.bench.memory import CPU_METHOD, CUDA_METHOD, peak_memory

MB = 10**6


def allocate_touched(n_bytes: int) -> None:
    buf = np.empty(n_bytes, dtype=np.uint8)
    buf[::4096] = 1  # write one byte per page: every page becomes resident
    assert buf.sum() > 0


def allocate_nothing() -> None:
    return None


def fail() -> None:
    raise ValueError("boom")


def test_cpu_probe_sees_a_200mb_allocation():
    report = peak_memory(allocate_touched, 200 * MB, device="cpu")
    assert report.device == "cpu" and report.method.startswith(CPU_METHOD)
    assert report.increment_bytes >= 190 * MB
    assert report.peak_bytes >= report.baseline_bytes + report.increment_bytes - 1
    assert report.increment_bytes < 260 * MB  # the child's imports are not counted
    assert "mmap_threshold=65536" in report.method  # glibc: the allocator setting took effect


def test_cpu_probe_without_fixed_threshold():
    report = peak_memory(allocate_touched, 100 * MB, device="cpu", mmap_threshold=None)
    assert "mmap_threshold" not in report.method
    assert 95 * MB <= report.increment_bytes < 160 * MB


def test_cpu_probe_sees_nothing_when_nothing_is_allocated():
    report = peak_memory(allocate_nothing, device="cpu")
    assert report.increment_bytes < 20 * MB
    assert report.peak_bytes > 0


def test_cpu_probe_reports_errors_from_the_child():
    with pytest.raises(RuntimeError, match="boom"):
        peak_memory(fail, device="cpu")


def allocate_cuda(n_bytes: int) -> None:
    import torch

    x = torch.ones(n_bytes // 4, device="cuda")
    torch.cuda.synchronize()
    del x


def test_cuda_probe_sees_an_allocation():
    import torch  # not at module level: the spawned children import this module, keep them light

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    report = peak_memory(allocate_cuda, 64 * 2**20, device="cuda")
    assert report.method == CUDA_METHOD
    assert 64 * 2**20 <= report.increment_bytes < 80 * 2**20

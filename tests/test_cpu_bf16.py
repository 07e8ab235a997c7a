"""Native or emulated bf16 autocast on the CPU (slidetrain.train.cpu_bf16), the probes monkeypatched both ways."""

from __future__ import annotations

import logging

import pytest
import torch

from slidetrain.train import cpu_bf16


@pytest.fixture
def cpu(monkeypatch):
    """Set the CPU's bf16 instructions (avx512_bf16, amx_tile) and the oneDNN cap; returns the setter."""

    def set_cpu(avx512_bf16: bool, amx: bool = False, onednn_cap: str | None = None) -> None:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
        for name in cpu_bf16.ONEDNN_ENV:
            monkeypatch.delenv(name, raising=False)
        if onednn_cap is not None:
            monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", onednn_cap)

    return set_cpu


def test_native_with_avx512_bf16_or_amx(cpu):
    cpu(avx512_bf16=True)
    found = cpu_bf16.cpu_bf16()
    assert found.native and "avx512_bf16" in found.detail and "oneDNN ISA cap ALL" in found.detail
    cpu(avx512_bf16=False, amx=True, onednn_cap="avx512_core_amx")  # oneDNN reads the cap case-insensitively
    assert cpu_bf16.cpu_bf16().native


def test_emulated_without_the_instructions(cpu):
    cpu(avx512_bf16=False)
    found = cpu_bf16.cpu_bf16()
    assert not found.native and found.detail.startswith("no AVX512-BF16 or AMX")


def test_emulated_when_onednn_is_capped_below_bf16(cpu):
    """How an AVX2 machine is emulated on an AVX-512 one: the instructions exist, oneDNN may not use them."""
    cpu(avx512_bf16=True, onednn_cap="AVX2")
    found = cpu_bf16.cpu_bf16()
    assert not found.native and found.detail.startswith("ONEDNN_MAX_CPU_ISA=AVX2 keeps oneDNN below AVX512_CORE_BF16")


def test_warning_only_for_amp_on_an_emulating_cpu(cpu, caplog):
    cpu(avx512_bf16=False)
    with caplog.at_level(logging.WARNING, logger="slidetrain.train.cpu_bf16"):
        assert cpu_bf16.warn_if_emulated("cpu", amp=False) is None
        assert cpu_bf16.warn_if_emulated("cuda", amp=True) is None  # fp16 on a GPU: not this question
        assert caplog.records == []
        assert not cpu_bf16.warn_if_emulated("cpu", amp=True).native
    assert "bf16 autocast is emulated on this CPU" in caplog.text
    caplog.clear()
    cpu(avx512_bf16=True)
    assert cpu_bf16.warn_if_emulated("cpu", amp=True).native and caplog.records == []

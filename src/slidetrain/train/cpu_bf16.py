"""Whether this CPU runs bf16 autocast natively, or emulates it (the tile-bag `half` strategy on a CPU).

CPU autocast runs convolutions and matrix products in bf16 through oneDNN. With AVX512-BF16 or AMX
they are native and cost no more than fp32; without, oneDNN converts to fp32 and back around every
kernel: an AVX2-only AMD EPYC took 729 s for a `half` run that took 42 s in fp32, and a ResNet18 step
(K = 16, 48 px) is 22-29x slower under ONEDNN_MAX_CPU_ISA=AVX2 than natively on an AVX-512 EPYC.

Native means: the CPU has the instructions (torch's cpuinfo probes) and oneDNN may use them
(ONEDNN_MAX_CPU_ISA, or its older name DNNL_MAX_CPU_ISA, does not cap it below AVX512_CORE_BF16;
the variable is how an AVX2 machine is emulated on a newer one). ATEN_CPU_CAPABILITY is recorded
but does not decide: capping ATen's own kernels at AVX2 left the bf16 step as fast as natively.
"""

from __future__ import annotations

import logging
import os
import platform
from dataclasses import dataclass

log = logging.getLogger(__name__)

#: oneDNN ISA caps below the first bf16 ISA (AVX512_CORE_BF16); ALL (the default) and newer ones allow it
ONEDNN_BELOW_BF16 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI")
ONEDNN_ENV = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")


@dataclass(frozen=True)
class CpuBf16:
    native: bool
    detail: str  # what decided it, for logs and table notes


def _probe(name: str) -> bool:
    """torch.cpu's private cpuinfo probe `name`; False where this torch lacks it."""
    import torch

    fn = getattr(torch.cpu, name, None)
    return bool(fn()) if callable(fn) else False


def cpu_bf16() -> CpuBf16:
    """Native bf16 autocast on this CPU, with the evidence."""
    import torch

    aten = torch.backends.cpu.get_cpu_capability()
    hardware = [n for n in ("avx512_bf16", "amx_tile") if _probe(f"_is_{n}_supported")]
    cap_var = next((v for v in ONEDNN_ENV if os.environ.get(v)), None)
    cap = os.environ[cap_var].strip().upper() if cap_var else "ALL"
    where = f"{platform.machine()} CPU, ATen capability {aten}, oneDNN ISA cap {cap}"
    if not torch.backends.mkldnn.is_available():
        return CpuBf16(False, f"no oneDNN in this torch build ({where})")
    if not hardware:
        return CpuBf16(False, f"no AVX512-BF16 or AMX ({where})")
    if cap in ONEDNN_BELOW_BF16:
        return CpuBf16(False, f"{cap_var}={cap} keeps oneDNN below AVX512_CORE_BF16 ({where})")
    return CpuBf16(True, f"{' and '.join(hardware)} ({where})")


def warn_if_emulated(device_type: str, amp: bool) -> CpuBf16 | None:
    """Log a warning when `amp` on a CPU would run bf16 emulated; the finding (None when not asked)."""
    if not amp or device_type != "cpu":
        return None
    found = cpu_bf16()
    if not found.native:
        log.warning("amp: bf16 autocast is emulated on this CPU (%s): many times slower than fp32", found.detail)
    return found

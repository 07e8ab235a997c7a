"""Peak memory of one call, for every benchmark: `peak_memory(fn, *args, device=...)`.

- CUDA: `torch.cuda.reset_peak_memory_stats` then `max_memory_allocated`
  around the call, in this process (what the caching allocator handed out to
  tensors; the allocator's reserve and the CUDA context are not counted).
- CPU: the peak resident set size of a fresh process. `fn(*args)` runs in a
  child started with multiprocessing "spawn" (so nothing the parent has
  allocated or cached counts). After the child has imported what unpickling
  `fn` and `args` needs, its high-water mark is reset to the current RSS
  (`/proc/self/clear_refs`, Linux >= 4.0); that RSS is the baseline. After the
  call the peak is the high-water mark VmHWM (`ru_maxrss` where /proc is
  missing; it cannot come first, as after exec it still holds the parent's
  peak). Where the reset is not allowed, the baseline is the high-water mark
  after imports (`method` says which), which under-counts a call that peaks
  below the import peak.

glibc's malloc raises its mmap threshold (up to 32 MiB) each time a mapped
block is freed, after which freed blocks stay in the heap, fragmented. A
method that frees and reallocates activations of changing sizes (tiles,
modules) then shows heap growth that belongs to the allocator, not to the
method: measured here, one StreamingCNN step on a 1536 px image peaked at
2435 MiB with the default and 1027 MiB with a fixed threshold. So the child
fixes the threshold (`mmap_threshold`, default 64 KiB, via mallopt; None keeps
glibc's default): every block from 64 KiB up is its own mapping, returned on
free, and RSS follows the live tensors. `method` records the setting.

`fn` must be picklable: a module-level function, with picklable arguments.
Its return value is not sent back (it may be large); measure, don't compute.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import multiprocessing as mp
import os
import resource
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

CPU_METHOD = "cpu_peak_rss_spawn"
CUDA_METHOD = "cuda_max_memory_allocated"
DEFAULT_MMAP_THRESHOLD = 64 * 1024
_M_MMAP_THRESHOLD = -3  # mallopt parameter (malloc.h)


@dataclass(frozen=True)
class MemoryReport:
    peak_bytes: int  # absolute: peak RSS of the child (CPU) or max allocated (CUDA)
    device: str
    method: str  # CPU_METHOD[+hwm_reset] | CUDA_METHOD
    baseline_bytes: int  # before the call: child RSS after imports (CPU), allocated (CUDA)
    increment_bytes: int  # peak_bytes - baseline_bytes: what the call itself added
    wall_s: float  # duration of the call alone

    @property
    def increment_mib(self) -> float:
        return self.increment_bytes / 2**20

    @property
    def peak_mib(self) -> float:
        return self.peak_bytes / 2**20


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    """This process's peak RSS: VmHWM where /proc has it, else ru_maxrss.

    ru_maxrss is not used first: after fork+exec (how "spawn" starts a child) it
    still carries the high-water mark of the pre-exec image, i.e. of the parent.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def _reset_high_water_mark() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # 5: reset the peak RSS to the current RSS
        return True
    except OSError:
        return False


def _fix_mmap_threshold(n_bytes: int) -> bool:
    """glibc: serve blocks >= n_bytes by mmap, and stop the threshold from adapting."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, int(n_bytes)))
    except (OSError, AttributeError, TypeError):
        return False


def _child(conn, fn: Callable, args: tuple, kwargs: dict, mmap_threshold: int | None) -> None:
    try:
        fixed = mmap_threshold is not None and _fix_mmap_threshold(mmap_threshold)
        reset = _reset_high_water_mark()
        baseline = _rss_bytes() if reset else _peak_rss_bytes()
        start = time.perf_counter()
        fn(*args, **kwargs)
        wall = time.perf_counter() - start
        conn.send(("ok", baseline, _peak_rss_bytes(), reset, fixed, wall))
    except BaseException:  # noqa: B036 - report anything to the parent, then die
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def _peak_cpu(
    fn: Callable, args: tuple, kwargs: dict, timeout_s: float | None, mmap_threshold: int | None
) -> MemoryReport:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(child, fn, args, kwargs, mmap_threshold), daemon=True)
    proc.start()
    child.close()
    try:
        if not parent.poll(timeout_s):
            raise TimeoutError(f"peak_memory: {getattr(fn, '__name__', fn)} did not finish in {timeout_s} s")
        message = parent.recv()
    except EOFError as err:
        proc.join()
        raise RuntimeError(
            f"peak_memory: the child running {getattr(fn, '__name__', fn)} died (exit code {proc.exitcode}); "
            f"killed for memory?"
        ) from err
    finally:
        if proc.is_alive():
            proc.join(5)
            if proc.is_alive():
                proc.kill()
        parent.close()
    if message[0] == "error":
        raise RuntimeError(f"peak_memory: {getattr(fn, '__name__', fn)} raised in the child:\n{message[1]}")
    _, baseline, peak, reset, fixed, wall = message
    method = CPU_METHOD + ("+hwm_reset" if reset else "")
    method += f"+mmap_threshold={mmap_threshold}" if fixed else ""
    return MemoryReport(peak, "cpu", method, baseline, max(peak - baseline, 0), wall)


def _peak_cuda(fn: Callable, args: tuple, kwargs: dict, device) -> MemoryReport:
    import torch

    device = with_index(device)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    baseline = torch.cuda.memory_allocated(device)
    start = time.perf_counter()
    fn(*args, **kwargs)
    torch.cuda.synchronize(device)
    wall = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device)
    return MemoryReport(peak, str(device), CUDA_METHOD, baseline, peak - baseline, wall)


#: what a CUDA library says when the allocator (or the memory fraction) refuses it memory: cuDNN and
#: cuBLAS ask for workspaces outside the OOM path, so near the limit they fail with their own messages
ALLOC_FAILURE_MARKERS = (
    "out of memory",
    "CUDNN_STATUS_ALLOC_FAILED",
    "CUBLAS_STATUS_ALLOC_FAILED",
    "CUDNN_STATUS_NOT_ENOUGH_WORKSPACE",
    "CUDA_ERROR_OUT_OF_MEMORY",
)


def is_alloc_failure(err: BaseException) -> bool:
    """Whether `err` means "the device memory ran out" (a miss for a probe) rather than a bug."""
    import torch

    if isinstance(err, torch.cuda.OutOfMemoryError):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and any(m.lower() in text.lower() for m in ALLOC_FAILURE_MARKERS)


def with_index(device: Any):
    """`device` as a torch.device; a CUDA one with an explicit index (the current device's if none).

    torch's per-device calls take a bare "cuda" badly: set_per_process_memory_fraction rejects it on
    every version, so the GPU script threads one indexed device through all of them.
    """
    import torch

    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def peak_memory(
    fn: Callable,
    *args: Any,
    device: Any = "cpu",
    timeout_s: float | None = None,
    mmap_threshold: int | None = DEFAULT_MMAP_THRESHOLD,
    **kwargs: Any,
) -> MemoryReport:
    """Peak memory while `fn(*args, **kwargs)` runs on `device` ("cpu", "cuda", "cuda:1", torch.device).

    `timeout_s` and `mmap_threshold` apply to the CPU child only (see the module docstring).
    """
    kind = device.type if hasattr(device, "type") else str(device).split(":")[0]
    if kind == "cuda":
        return _peak_cuda(fn, args, kwargs, device)
    if kind == "cpu":
        return _peak_cpu(fn, args, kwargs, timeout_s, mmap_threshold)
    raise ValueError(f"peak_memory: device must be 'cpu' or 'cuda[:i]', got {device!r}")


__all__ = [
    "CPU_METHOD",
    "CUDA_METHOD",
    "DEFAULT_MMAP_THRESHOLD",
    "MemoryReport",
    "is_alloc_failure",
    "peak_memory",
    "with_index",
]

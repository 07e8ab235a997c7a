"""The GPU script's first ten seconds: what the machine and its torch offer, before any benchmark.

The GPU machine's torch is not the one pinned here (2.11 there, 2.14 here), so each API or keyword
the sections need is looked up in the installed torch, and a section reads the answer to switch to
its fallback or to skip a part with the reason recorded, instead of failing on a TypeError after
minutes. Every check catches its own errors: a preflight that raised would cost the whole run.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import torch

from slidetrain.bench.section_runner import error_text

#: packages the sections import (the GPU machine has these; it has no OpenSlide, Snakemake, imagecodecs)
PACKAGES = ("torchvision", "numpy", "pandas", "PIL", "h5py", "timm")


def _check(fn: Callable[[], object]) -> dict:
    try:
        return {"ok": True, "value": fn()}
    except Exception as err:  # noqa: BLE001 - the answer is "no", with why
        return {"ok": False, "error": error_text(err, 300)}


def _version(name: str) -> str | None:
    try:
        module = importlib.import_module(name)
    except Exception:  # noqa: BLE001 - absent or broken: both mean "not there"
        return None
    return str(getattr(module, "__version__", "?"))


def _free_gib(path: str) -> dict | None:
    if not os.path.exists(path):
        return None
    usage = shutil.disk_usage(path)
    return {"path": path, "free_gib": round(usage.free / 2**30, 2), "total_gib": round(usage.total / 2**30, 2)}


def device_info(device: torch.device) -> dict:
    """The header of every recorded figure: date, versions, device and its memory."""
    info = {
        "date_utc": datetime.now(UTC).strftime("%Y-%m-%d %H:%M"),
        "python": platform.python_version(),
        "host": platform.node(),
        "torch": torch.__version__,
        "torchvision": _version("torchvision"),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "device": str(device),
        "cpu_count": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        free, total = torch.cuda.mem_get_info(device)
        info.update(
            name=props.name,
            capability=f"{props.major}.{props.minor}",
            memory_gib=round(total / 2**30, 2),
            free_memory_gib=round(free / 2**30, 2),
        )
    else:
        info.update(name=platform.processor() or "cpu", memory_gib=None)
    return info


def api_checks(device: torch.device) -> dict[str, dict]:
    """Each API or keyword a section needs: {"ok": bool, "value" or "error"}."""
    import torch.distributed as dist

    def ddp_keyword() -> str:
        from slidetrain.train.tilebag.distributed_executor import ddp_buffer_kwargs

        return next(iter(ddp_buffer_kwargs(True)))

    def memory_fraction() -> str:
        if device.type != "cuda":
            return "not needed on the CPU"
        torch.cuda.set_per_process_memory_fraction(1.0, device)  # the default: a no-op if it works
        return f"set_per_process_memory_fraction(1.0, {device})"

    def all_reduce() -> str:
        from slidetrain.train.tilebag.distributed_executor import differentiable_all_reduce_impl

        impl = differentiable_all_reduce_impl()
        if impl is None:
            raise RuntimeError("no differentiable all_reduce: the gloo SyncBN (distributed equivalence) is skipped")
        return impl

    def init_device_id() -> bool:  # init_process_group's device_id (used with NCCL only)
        return "device_id" in inspect.signature(dist.init_process_group).parameters

    def torchrun() -> str:
        if importlib.util.find_spec("torch.distributed.run") is None:
            raise ModuleNotFoundError("torch.distributed.run")
        return "python -m torch.distributed.run"

    def gloo() -> bool:
        if not (dist.is_available() and dist.is_gloo_available()):
            raise RuntimeError("torch.distributed with gloo is not available")
        return True

    return {
        "ddp_buffer_sync_keyword": _check(ddp_keyword),
        "differentiable_all_reduce": _check(all_reduce),
        "memory_fraction": _check(memory_fraction),
        "save_on_cpu": _check(lambda: torch.autograd.graph.save_on_cpu.__name__),
        "torchrun": _check(torchrun),
        "gloo": _check(gloo),
        "nccl": _check(lambda: bool(dist.is_available() and dist.is_nccl_available())),
        "init_process_group_device_id": _check(init_device_id),
    }


def import_checks(modules: list[str]) -> dict[str, str]:
    """Every module the sections import, imported now: a missing package shows in seconds."""
    out = {}
    for name in modules:
        try:
            importlib.import_module(name)
            out[name] = "ok"
        except Exception as err:  # noqa: BLE001 - recorded; the section that needs it will fail alone
            out[name] = error_text(err, 300)
    return out


def preflight(device: torch.device, modules: list[str], tmp_dir: Path) -> dict:
    """Everything above, with /dev/shm (gloo and DataLoader workers share memory there) and the
    temporary directory's free space."""
    started = time.perf_counter()
    result: dict = {"device": _check(lambda: device_info(device))}
    result["apis"] = api_checks(device)
    result["packages"] = {name: _version(name) for name in PACKAGES}
    result["imports"] = import_checks(modules)
    result["disk"] = {"shm": _free_gib("/dev/shm"), "tmp": _free_gib(str(tmp_dir))}
    result["executable"] = sys.executable
    result["seconds"] = round(time.perf_counter() - started, 2)
    return result


def api_ok(preflight_result: dict | None, name: str) -> tuple[bool, str]:
    """(whether the API works, why not) from a preflight; True when there was no preflight (tests)."""
    if not preflight_result:
        return True, ""
    check = preflight_result.get("apis", {}).get(name, {"ok": True})
    return bool(check.get("ok")), check.get("error", "")

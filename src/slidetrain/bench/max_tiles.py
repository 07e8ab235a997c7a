"""The most tiles one forward + backward holds (Campanella et al., Figure 1), per encoder and precision.

    slidetrain bench-max-tiles --encoders resnet18 resnet34 resnet50 vit_b_16 --precisions fp32 amp \
        --tile-px 224 --device cuda --out results/bench/tilebag_max_tiles.csv
    slidetrain bench-max-tiles --encoders uni gigapath --precisions fp32 amp --tile-px 224 --device cuda ...

A probe encodes N random tiles with a freshly built encoder (random weights:
memory does not depend on them) and backpropagates a dummy loss on the
features, as the paper does. Encoders: the registry's ResNets, torchvision's
ViT-B/16 (`vit_b_16`, the paper's ViT-base), and every pathology foundation
model of slidetrain.models.foundation by its registry name (UNI's ViT-L/16,
Prov-GigaPath's ViT-g/14, ...), built at random init through timm and probed
as tile-bag training runs it: its card transform resizes the tiles to the
card's input size (224 px for most; the probes' `tile_px` is what is read).
A probe fits when it finishes within the budget: on CUDA the device memory
(an OOM is a miss; `max_memory_allocated` must stay within `memory_budget_gb`,
default the device's total), on CPU the peak RSS of a fresh process per probe
(bench/memory.py) against `memory_budget_gb`. N doubles from `start` until a
probe misses (or `limit`), then bisection between the last fit and the first
miss finds the largest N that fits.

AMP is fp16 autocast on CUDA and bf16 autocast on CPU.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from slidetrain.bench.memory import is_alloc_failure, with_index
from slidetrain.errors import ConfigError
from slidetrain.io import atomic_path

if TYPE_CHECKING:  # pandas is imported where tables are written: the GPU script runs without it
    import pandas as pd

log = logging.getLogger(__name__)

#: the paper's Figure 1 encoders (the config's default list); any foundation-model registry name is probed too
ENCODERS = ("resnet18", "resnet34", "resnet50", "vit_b_16")
RESNETS = ("resnet18", "resnet34", "resnet50", "resnet50_trunc")
PRECISIONS = ("fp32", "amp")
COLUMNS = ["encoder", "precision", "tile_px", "max_tiles", "device", "memory_budget_gb"]


def build_probe_encoder(name: str, tile_px: int) -> torch.nn.Module:
    """ResNets from the encoder registry (full trunk + pool); torchvision's ViT-B/16 at `tile_px`; a
    foundation model by its registry name at random init (timm; its card transform resizes the tiles)."""
    if name == "vit_b_16":
        from torchvision.models import vit_b_16

        model = vit_b_16(weights=None, image_size=tile_px)
        model.heads = torch.nn.Identity()  # (B, 768) class-token features
        return model
    from slidetrain.models.encoders import build_encoder
    from slidetrain.models.foundation import FOUNDATION_NAMES

    if name not in RESNETS + FOUNDATION_NAMES:
        raise ConfigError(
            f"encoders: unknown {name!r}; expected a ResNet {list(RESNETS)}, vit_b_16 (torchvision) or a "
            f"foundation model of the registry {list(FOUNDATION_NAMES)}"
        )
    return build_encoder(name)  # weights "none": random init, seeded (memory does not depend on the weights)


def forward_backward(
    encoder_name: str, precision: str, n_tiles: int, tile_px: int, device: str = "cpu", threads: int = 1
) -> None:
    """One training forward + backward of `n_tiles` random tiles with a dummy loss on the features."""
    torch.set_num_threads(max(1, threads))
    dev = torch.device(device)
    # a foundation model is built on the GPU itself: a ViT-L's random init on the CPU costs seconds per probe
    with torch.device(dev) if dev.type == "cuda" and encoder_name not in ENCODERS + RESNETS else nullcontext():
        model = build_probe_encoder(encoder_name, tile_px)
    model = model.to(dev).train()
    x = torch.randn(n_tiles, 3, tile_px, tile_px, device=dev)  # (N, 3, P, P)
    amp = precision == "amp"
    dtype = torch.float16 if dev.type == "cuda" else torch.bfloat16
    with torch.autocast(dev.type, dtype=dtype, enabled=amp):
        features = model(x)  # (N, D)
    loss = features.float().pow(2).mean()  # dummy loss on the features
    loss.backward()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def fits(
    encoder_name: str,
    precision: str,
    n_tiles: int,
    tile_px: int,
    device: str,
    budget_bytes: int,
    threads: int = 1,
    timeout_s: float | None = None,
) -> tuple[bool, float | None]:
    """(fits, peak GiB) of one probe."""
    from slidetrain.bench.memory import peak_memory

    kind = torch.device(device).type
    try:
        report = peak_memory(
            forward_backward,
            encoder_name,
            precision,
            n_tiles,
            tile_px,
            device,
            threads,
            device=device,
            timeout_s=timeout_s,
        )
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return False, None
    except RuntimeError as err:  # the CPU child died (killed for memory) or raised
        log.info("probe %s %s N=%d failed: %s", encoder_name, precision, n_tiles, str(err).splitlines()[0])
        return False, None
    finally:
        if kind == "cuda":
            torch.cuda.empty_cache()
    return report.peak_bytes <= budget_bytes, report.peak_bytes / 2**30


def search_max(fit: Callable[[int], bool], start: int = 1, limit: int = 65536, resolution: float = 0.0) -> int:
    """Largest N in [0, limit] with fit(N), assuming fit is monotone: doubling, then bisection.

    resolution > 0 stops the bisection once the miss is within that fraction of the fit (the GPU
    script's time box: 1/64 saves about four probes of a second or more each); the N returned still
    fits, and is at most that fraction below the exact answer. 0 = exact.
    """
    lo, hi = 0, None  # lo fits (0 trivially), hi misses
    n = max(1, min(start, limit))
    while hi is None:
        if fit(n):
            lo = n
            if n == limit:
                return limit
            n = min(2 * n, limit)
        else:
            hi = n
    while hi - lo > max(1, int(resolution * lo)):
        mid = (lo + hi) // 2
        if fit(mid):
            lo = mid
        else:
            hi = mid
    return lo


def max_tiles_table(
    encoders: list[str],
    precisions: list[str],
    tile_px: int,
    device: str,
    memory_budget_gb: float | None,
    out_csv: str | Path,
    start: int = 1,
    limit: int = 65536,
    threads: int = 1,
) -> pd.DataFrame:
    """One row per (encoder, precision); every probe goes to <out>_probes.csv beside it."""
    import pandas as pd

    dev = torch.device(device)
    if memory_budget_gb is None:
        if dev.type != "cuda":
            raise ConfigError("memory_budget_gb: required on the CPU (the peak RSS a probe may reach)")
        memory_budget_gb = torch.cuda.get_device_properties(dev).total_memory / 2**30
    budget = int(memory_budget_gb * 2**30)
    rows, probes = [], []
    for enc in encoders:
        for prec in precisions:
            if prec not in PRECISIONS:
                raise ConfigError(f"precisions: unknown {prec!r}; expected some of {list(PRECISIONS)}")

            def fit(n: int, enc=enc, prec=prec) -> bool:
                t0 = time.perf_counter()
                ok, peak = fits(enc, prec, n, tile_px, device, budget, threads)
                probes.append(
                    {
                        "encoder": enc,
                        "precision": prec,
                        "tile_px": tile_px,
                        "n_tiles": n,
                        "fits": ok,
                        "peak_gib": peak,
                        "seconds": time.perf_counter() - t0,
                    }
                )
                log.info("%s %s N=%d: %s (peak %s GiB)", enc, prec, n, ok, peak)
                return ok

            best = search_max(fit, start, limit)
            rows.append(
                {
                    "encoder": enc,
                    "precision": prec,
                    "tile_px": tile_px,
                    "max_tiles": best,
                    "device": str(dev),
                    "memory_budget_gb": round(memory_budget_gb, 2),
                }
            )
    table = pd.DataFrame(rows, columns=COLUMNS)
    out_csv = Path(out_csv)
    with atomic_path(out_csv) as tmp:
        table.to_csv(tmp, index=False)
    with atomic_path(out_csv.with_name(out_csv.stem + "_probes.csv")) as tmp:
        pd.DataFrame(probes).to_csv(tmp, index=False)
    return table


def cuda_fits(
    encoder_name: str, precision: str, n_tiles: int, tile_px: int, device: str, budget_bytes: int
) -> tuple[bool, float | None]:
    """In-process CUDA probe (the GPU script: no spawn, no pandas): (fits, peak GiB).

    A miss is any allocation failure, not only torch's OutOfMemoryError: near the limit cuDNN and
    cuBLAS fail to get their workspaces with errors of their own (`is_alloc_failure`). Any other
    error is a bug and is raised.
    """
    dev = with_index(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(dev)
    try:
        forward_backward(encoder_name, precision, n_tiles, tile_px, str(dev), threads=torch.get_num_threads())
    except RuntimeError as err:
        if not is_alloc_failure(err):
            raise
        return False, None
    finally:
        torch.cuda.empty_cache()
    peak = torch.cuda.max_memory_allocated(dev)
    return peak <= budget_bytes, peak / 2**30

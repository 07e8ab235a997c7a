"""Forward throughput of registered encoders at random init on CPU: tiles/s and peak memory per architecture.

    slidetrain bench-encoders-cpu --models resnet34 uni --batch 4 --threads 2 --repeats 2 \\
        --out results/bench/encoders_cpu.csv

(rule bench_encoders_cpu, config `bench.encoders_cpu`; without --models every registered ResNet and
every published foundation-model entry). Each encoder runs in its own process, so that its peak RSS
is its own and not the largest of the ones before it, on a batch of 224-px tiles (ImageNet-normalised
noise; a foundation model's transform resizes them to its card's input size, 448 px for CONCH v1.5):
one warm-up forward, then `repeats` timed forwards under inference mode. The ViT-g entries
(H-optimus-0/1, Prov-GigaPath, 1.13B parameters) hold 4.5 GB of fp32 weights; before building, the
child checks that the weights fit in the memory available now and stops with an error naming the
model otherwise, so that a shared machine's out-of-memory killer does not pick another job.

Columns: model, params (exact) and params_m (millions), dim (embedding), input_px (what the encoder
sees after its transform), tile_px (what it is given), batch, threads, build_s (building at random
init), tiles_per_s (batch / mean timed forward seconds), import_rss_gb (the process after importing
torch, before building), peak_rss_gb (the process' peak RSS), cpu (lscpu's model name). GB = 1e9 bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

from slidetrain.errors import SlidetrainError

COLUMNS = (
    "model",
    "params",
    "params_m",
    "dim",
    "input_px",
    "tile_px",
    "batch",
    "threads",
    "build_s",
    "tiles_per_s",
    "import_rss_gb",
    "peak_rss_gb",
    "cpu",
)
# Building at random init holds the fp32 weights plus what the timm/torch import and the forward's
# activations take (a few hundred MB at batch 4): weights x 1.2 + 1 GB must be available.
MEMORY_FACTOR = 1.2
MEMORY_MARGIN_BYTES = 1e9


def default_models() -> list[str]:
    """Every registered ResNet and every foundation-model entry except slidetrain's test architectures."""
    from slidetrain.models.encoders import ENCODER_NAMES
    from slidetrain.models.foundation import FOUNDATION_NAMES, TEST_ONLY_NAMES

    return [*ENCODER_NAMES, *(n for n in FOUNDATION_NAMES if n not in TEST_ONLY_NAMES)]


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _available_bytes() -> float:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return float("inf")  # not Linux: no check


def _check_memory(name: str, params: int) -> None:
    need = params * 4 * MEMORY_FACTOR + MEMORY_MARGIN_BYTES
    available = _available_bytes()
    if need > available:
        raise SlidetrainError(
            f"bench-encoders-cpu: {name} ({params / 1e6:.0f}M parameters) needs about {need / 1e9:.1f} GB to build "
            f"at random init, {available / 1e9:.1f} GB is available now; leave it out of bench.encoders_cpu.models "
            f"or run it when the machine is free"
        )


def time_one(name: str, batch: int = 4, tile_px: int = 224, repeats: int = 2, threads: int = 1) -> dict:
    """One encoder in this process: build at random init, one warm-up forward, `repeats` timed forwards."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # random init only: nothing may be fetched
    import torch

    from slidetrain.models.encoders import build_encoder
    from slidetrain.models.foundation import FOUNDATION_SPECS

    torch.set_num_threads(threads)
    import_rss = _peak_rss_bytes()
    with torch.device("meta"):  # the parameter count without allocating, for the memory check
        params = sum(p.numel() for p in build_encoder(name, "none", 0).parameters())
    _check_memory(name, params)
    t0 = time.perf_counter()
    encoder = build_encoder(name, "none", 0).eval()
    build_s = time.perf_counter() - t0
    x = torch.randn(batch, 3, tile_px, tile_px, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        out = encoder(x)  # warm-up: first-call allocations and kernel selection are not timed
        t0 = time.perf_counter()
        for _ in range(repeats):
            encoder(x)
        seconds = (time.perf_counter() - t0) / repeats
    return {
        "model": name,
        "params": params,
        "params_m": round(params / 1e6, 2),
        "dim": int(out.shape[1]),
        "input_px": FOUNDATION_SPECS[name].input_size if name in FOUNDATION_SPECS else tile_px,
        "tile_px": tile_px,
        "batch": batch,
        "threads": threads,
        "build_s": round(build_s, 2),
        "tiles_per_s": round(batch / seconds, 3),
        "import_rss_gb": round(import_rss / 1e9, 3),
        "peak_rss_gb": round(_peak_rss_bytes() / 1e9, 3),
    }


def _in_fresh_process(name: str, batch: int, tile_px: int, repeats: int, threads: int) -> dict:
    args = ["--one", name, "--batch", str(batch), "--tile-px", str(tile_px), "--repeats", str(repeats)]
    proc = subprocess.run(
        [sys.executable, "-m", "slidetrain.bench.encoders_cpu", *args, "--threads", str(threads)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        killed = " (killed: out of memory?)" if proc.returncode == -9 else ""
        raise SlidetrainError(
            f"bench-encoders-cpu: {name} failed in its process, exit {proc.returncode}{killed}:\n{proc.stderr[-2000:]}"
        )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_encoders_cpu(
    models: list[str] | None,
    out: str | None = None,
    batch: int = 4,
    tile_px: int = 224,
    repeats: int = 2,
    threads: int = 1,
):
    """The table of `models` (None: `default_models()`), one fresh process each, written to `out` if given."""
    import pandas as pd

    from slidetrain.docs.benchmarks import cpu_model
    from slidetrain.io import atomic_path

    cpu = cpu_model()
    rows = []
    for name in models or default_models():
        rows.append({**_in_fresh_process(name, batch, tile_px, repeats, threads), "cpu": cpu})
        print({k: rows[-1][k] for k in ("model", "params_m", "tiles_per_s", "peak_rss_gb")}, file=sys.stderr)
    table = pd.DataFrame(rows, columns=list(COLUMNS))
    if out:
        with atomic_path(out) as tmp:
            table.to_csv(tmp, index=False)
    return table


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", nargs="+", help="encoder names (default: every ResNet and published foundation model)")
    p.add_argument("--batch", type=int, default=4, help="tiles per forward")
    p.add_argument("--tile-px", type=int, default=224, help="tile side given to every encoder")
    p.add_argument("--repeats", type=int, default=2, help="timed forwards after one warm-up")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each encoder's process")


def add_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("bench-encoders-cpu", help="forward tiles/s and peak RSS per encoder at random init (CPU)")
    _add_arguments(s)
    s.add_argument("--out", required=True, help="CSV to write")
    s.set_defaults(func=_cmd)


def _cmd(a: argparse.Namespace) -> None:
    bench_encoders_cpu(a.models, a.out, a.batch, a.tile_px, a.repeats, a.threads)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    _add_arguments(p)
    p.add_argument("--out", help="CSV to write (else printed)")
    p.add_argument("--one", help=argparse.SUPPRESS)  # child process: time this encoder, print JSON
    a = p.parse_args(argv)
    if a.one:
        print(json.dumps(time_one(a.one, a.batch, a.tile_px, a.repeats, a.threads)))
        return
    table = bench_encoders_cpu(a.models, a.out, a.batch, a.tile_px, a.repeats, a.threads)
    if not a.out:
        print(table.to_string(index=False))


if __name__ == "__main__":
    main()

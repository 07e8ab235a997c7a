"""Forward throughput of registered encoders at random init on CPU: tiles/s and peak memory per architecture.

Each encoder runs in its own process (peak RSS is per process), on a batch of 224-px tiles
(ImageNet-normalised noise; the encoder's transform resizes to its card's input size). ViT-g/ViT-H
at random init take GBs of RAM and minutes on a small CPU, so the default list is small; name the
big ones with --models.

    python -m slidetrain.bench.encoders_cpu --models resnet34 vit_tiny_test uni --batch 4 \\
        --out results/bench/encoders_cpu.csv
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

DEFAULT_MODELS = ("resnet34", "vit_tiny_test", "uni")


def time_one(name: str, batch: int = 4, tile_px: int = 224, repeats: int = 2, threads: int = 1) -> dict:
    """One encoder in this process: build at random init, one warm-up forward, `repeats` timed forwards."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from slidetrain.models.encoders import build_encoder

    torch.set_num_threads(threads)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    encoder = build_encoder(name, "none", 0).eval()
    build_s = time.perf_counter() - t0
    x = torch.randn(batch, 3, tile_px, tile_px)
    with torch.inference_mode():
        out = encoder(x)  # warm-up
        t0 = time.perf_counter()
        for _ in range(repeats):
            encoder(x)
        seconds = (time.perf_counter() - t0) / repeats
    params = sum(p.numel() for p in encoder.parameters())
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    return {
        "encoder": name,
        "params_m": round(params / 1e6, 2),
        "dim": int(out.shape[1]),
        "batch": batch,
        "tile_px": tile_px,
        "threads": threads,
        "build_s": round(build_s, 2),
        "forward_s": round(seconds, 4),
        "tiles_per_s": round(batch / seconds, 2),
        "peak_rss_mb": round(peak_mb, 1),
        "start_rss_mb": round(rss0 / 1024, 1),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--tile-px", type=int, default=224)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", help="CSV to write (else printed)")
    p.add_argument("--one", help=argparse.SUPPRESS)  # child process: time this encoder, print JSON
    a = p.parse_args(argv)
    if a.one:
        print(json.dumps(time_one(a.one, a.batch, a.tile_px, a.repeats, a.threads)))
        return
    rows = []
    for name in a.models:
        cmd = [
            sys.executable,
            "-m",
            "slidetrain.bench.encoders_cpu",
            "--one",
            name,
            "--batch",
            str(a.batch),
            "--tile-px",
            str(a.tile_px),
            "--repeats",
            str(a.repeats),
            "--threads",
            str(a.threads),
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(rows[-1], file=sys.stderr)
    import pandas as pd

    table = pd.DataFrame(rows)
    if a.out:
        from slidetrain.io import atomic_path

        with atomic_path(a.out) as tmp:
            table.to_csv(tmp, index=False)
    else:
        print(table.to_string(index=False))


if __name__ == "__main__":
    main()

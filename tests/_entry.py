"""Test-only entry point: `python tests/_entry.py SUBCOMMAND ...` is `slidetrain SUBCOMMAND ...` with
the tests' fault hooks installed. The hooks are read from environment variables that only the tests
set, so they never appear in the user's command line or in production modules:

- SLIDETRAIN_STOP_AFTER_EPOCH=N: exit hard (137, as a kill would) once the checkpoint of N epochs
  is on disk (replaces `slidetrain.train.common.after_epoch_checkpoint`);
- SLIDETRAIN_RANK_FAULT=kill|hang:RANK:STEP: kill or hang one rank before a training step, in a
  ranked tile-bag run (`slidetrain.train.tilebag.ranked.before_step`) and in the distributed
  benchmark (`ParallelOptions.step_hook` of `slidetrain distributed-parallel`);
- SLIDETRAIN_PSEUDO_LOSS_FACTOR=F: a (wrong) pseudo-loss factor for `distributed-parallel`;
- SLIDETRAIN_GPU_BENCH_FAULT=SECTION:fail|hang[:ROWS],...: a section of the GPU script fails, or hangs
  until its cap stops it, after ROWS rows (replaces `slidetrain.bench.gpu.section_rows`).

Under torchrun: `python -m torch.distributed.run ... tests/_entry.py distributed-parallel ...`.
The GPU script, which is no `slidetrain` subcommand: `python tests/_entry.py gpu-bench ARGS` is
`python -m slidetrain.bench.gpu ARGS` (what bench/gpu.sh runs).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

STOP_AFTER_EPOCH_ENV = "SLIDETRAIN_STOP_AFTER_EPOCH"
RANK_FAULT_ENV = "SLIDETRAIN_RANK_FAULT"
PSEUDO_LOSS_FACTOR_ENV = "SLIDETRAIN_PSEUDO_LOSS_FACTOR"
GPU_BENCH_FAULT_ENV = "SLIDETRAIN_GPU_BENCH_FAULT"
GPU_BENCH = "gpu-bench"
ENTRY = str(Path(__file__).resolve())  # for the tests' subprocess command lines

log = logging.getLogger("slidetrain.tests")


@dataclass
class Fault:
    """A deliberate failure: `kill` exits, `hang` sleeps, on `rank` at `step`."""

    kind: str
    rank: int
    step: int

    @classmethod
    def parse(cls, text: str | None) -> Fault | None:
        if not text:
            return None
        kind, rank, step = text.split(":")
        return cls(kind, int(rank), int(step))

    def maybe_fire(self, rank: int, step: int) -> None:
        if rank != self.rank or step != self.step:
            return
        log.error("rank %d: injected fault %s at step %d", rank, self.kind, step)
        if self.kind == "kill":
            os._exit(17)
        time.sleep(3600)


def faulty_rows(rows: Iterable[dict], kind: str, after: int) -> Iterator[dict]:
    """`rows`, then after `after` of them a failure (kind "fail") or a sleep past any cap ("hang")."""
    rows = iter(rows)
    try:
        for _ in range(after):
            row = next(rows, None)
            if row is None:
                return
            yield row
        if kind == "hang":
            time.sleep(3600)  # until the section's cap stops it
        raise RuntimeError(f"injected failure after {after} rows ({GPU_BENCH_FAULT_ENV})")
    finally:
        if hasattr(rows, "close"):
            rows.close()


def section_faults(text: str) -> Callable[[str, Iterable[dict]], Iterable[dict]]:
    """A replacement for `slidetrain.bench.gpu.section_rows` from "SECTION:fail|hang[:ROWS],..."."""
    faults = {}
    for item in filter(None, text.split(",")):
        section, kind, *after = item.split(":")
        if kind not in ("fail", "hang"):
            raise ValueError(f"{GPU_BENCH_FAULT_ENV}: {item!r}; expected SECTION:fail|hang[:ROWS]")
        faults[section] = (kind, int(after[0]) if after else 0)

    def rows_with_faults(name: str, rows: Iterable[dict]) -> Iterable[dict]:
        return faulty_rows(rows, *faults[name]) if name in faults else rows

    return rows_with_faults


def install_hooks(environ: dict | os._Environ = os.environ) -> None:
    stop = environ.get(STOP_AFTER_EPOCH_ENV)
    if stop:
        import slidetrain.train.common as common

        def stop_after(epochs_done: int) -> None:
            if epochs_done == int(stop):
                os._exit(137)

        common.after_epoch_checkpoint = stop_after
    fault = Fault.parse(environ.get(RANK_FAULT_ENV))
    factor = environ.get(PSEUDO_LOSS_FACTOR_ENV)
    if fault is not None:
        import slidetrain.train.tilebag.ranked as ranked

        ranked.before_step = fault.maybe_fire
    if fault is not None or factor:
        import slidetrain.bench.distributed_equivalence as bench

        run_parallel = bench.run_parallel

        def run_parallel_with_hooks(spec, opts):
            if fault is not None:
                opts.step_hook = fault.maybe_fire
            if factor:
                opts.pseudo_loss_factor = float(factor)
            return run_parallel(spec, opts)

        bench.run_parallel = run_parallel_with_hooks
    gpu_faults = environ.get(GPU_BENCH_FAULT_ENV)
    if gpu_faults:
        import slidetrain.bench.gpu as gpu

        gpu.section_rows = section_faults(gpu_faults)


if __name__ == "__main__":
    install_hooks()
    if sys.argv[1:2] == [GPU_BENCH]:
        from slidetrain.bench.gpu import main as gpu_main

        sys.exit(gpu_main(sys.argv[2:]))
    from slidetrain.cli import main

    sys.exit(main(sys.argv[1:]))

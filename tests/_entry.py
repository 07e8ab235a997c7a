"""Test-only entry point: `python tests/_entry.py SUBCOMMAND ...` is `slidetrain SUBCOMMAND ...` with
the tests' fault hooks installed. The hooks are read from environment variables that only the tests
set, so they never appear in the user's command line or in production modules:

- SLIDETRAIN_STOP_AFTER_EPOCH=N: exit hard (137, as a kill would) once the checkpoint of N epochs
  is on disk (replaces `slidetrain.train.common.after_epoch_checkpoint`);
- SLIDETRAIN_RANK_FAULT=kill|hang:RANK:STEP: kill or hang one rank before a training step, in a
  ranked tile-bag run (`slidetrain.train.tilebag.ranked.before_step`) and in the distributed
  benchmark (`ParallelOptions.step_hook` of `slidetrain distributed-parallel`);
- SLIDETRAIN_PSEUDO_LOSS_FACTOR=F: a (wrong) pseudo-loss factor for `distributed-parallel`.

Under torchrun: `python -m torch.distributed.run ... tests/_entry.py distributed-parallel ...`.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

STOP_AFTER_EPOCH_ENV = "SLIDETRAIN_STOP_AFTER_EPOCH"
RANK_FAULT_ENV = "SLIDETRAIN_RANK_FAULT"
PSEUDO_LOSS_FACTOR_ENV = "SLIDETRAIN_PSEUDO_LOSS_FACTOR"
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


if __name__ == "__main__":
    install_hooks()
    from slidetrain.cli import main

    sys.exit(main(sys.argv[1:]))

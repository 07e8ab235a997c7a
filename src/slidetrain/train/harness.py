"""The epoch loop every trainer shares: checkpoint and exact resume, history, selection, run files.

A trainer (MIL on frozen features, whole-image, tile-bag) supplies two
callbacks and the objects whose state must survive a kill:

    result = run_epochs(
        out_dir, tag, epochs,
        train_epoch=lambda epoch: {"train_loss": ...},     # one epoch of training (epoch counts from 0)
        validate=lambda epoch: {"val_loss": ..., ...},     # validation part only; steps epoch schedules
        stateful={"model": model, "optimizers": [opt], "schedulers": [sch]},
        snapshot=lambda: cpu_copy(model.state_dict()),     # what model.pt keeps of the selected epoch
        selection=Selection(metric="val_auroc"),
    )
    model_pt = write_run_files(out_dir, method, cfg, seed, result, provenance={...},
                               model_payload=lambda best_state: {...})

Per epoch: train_epoch, validate, a history row {epoch (1-based), the
train_epoch keys, the validate keys, seconds, selected}, selection (the row's
`selection.metric`; loss-like metrics improve downwards; NaN never improves;
only epochs >= `selection.start_epoch` and only while `selectable()` holds),
then an atomic checkpoint (`stateful` state dicts, the torch / numpy / python
RNG states and the CUDA one on a CUDA device, history, best, best state,
epochs without improvement, whether training stops here), history.csv, `common.after_epoch_checkpoint`
(a no-op extension point that the tests replace to kill a run there), then the stop itself.
Early stopping (`selection.patience` epochs without a selection, once `selection.min_epochs`
epochs have run) is decided before the checkpoint is written and recorded in it: a run killed
right after its stopping epoch's checkpoint finishes on resume without training further.

A rerun with the same `tag` (config_hash of method, config, seed and split)
and the same `inputs` (fingerprint.input_fingerprint of the files it reads and the settings
beside the config) resumes after the last finished epoch and ends exactly where an
uninterrupted run ends, provided the callbacks draw their randomness from the
global generators or from generators seeded by (seed, epoch, ...). A
checkpoint of another tag, or of changed inputs, is ignored with a warning that says why. `write_run_files`
writes run.json (provenance) and model.pt atomically and deletes the
checkpoint: a finished run has nothing left to resume.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from slidetrain.io import atomic_path
from slidetrain.train import common
from slidetrain.train.common import (
    is_better,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    write_history,
    write_provenance,
)
from slidetrain.train.fingerprint import fingerprint_changes

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
#: bumped when the checkpoint layout changes, so an old checkpoint is ignored instead of misread
CHECKPOINT_FORMAT = 2  # 2: input fingerprint and the early-stopping decision


@dataclass(frozen=True)
class Selection:
    """Which epoch's state model.pt keeps, and when training stops early."""

    metric: str = "val_loss"  # a history column (validate's keys)
    start_epoch: int = 0  # 0-based first epoch that may be selected (DTFD: the last 20% of epochs)
    patience: int = 0  # 0 = no early stopping; else epochs without a selection
    min_epochs: int = 0  # early stopping only once this many epochs have run


@dataclass
class RunResult:
    history: list[dict]
    best: float | None  # the selected epoch's metric value (None: no epoch was selected)
    best_state: Any  # snapshot() of the selected epoch (the last epoch's when none was selected)
    selection: Selection


def cpu_copy(obj: Any) -> Any:
    """A detached CPU deep copy of a (nested) state dict: the best state must not follow later updates."""
    if isinstance(obj, Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(cpu_copy(v) for v in obj)
    return copy.deepcopy(obj)


def _state_of(obj: Any) -> Any:
    if isinstance(obj, list | tuple):
        return [o.state_dict() for o in obj]
    return obj.state_dict()


def _load_into(obj: Any, state: Any) -> None:
    if isinstance(obj, list | tuple):
        for o, s in zip(obj, state, strict=True):
            o.load_state_dict(s)
    else:
        obj.load_state_dict(state)


def _rounded(row: dict) -> dict:
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}


def run_epochs(
    out_dir: Path,
    tag: str,
    epochs: int,
    train_epoch: Callable[[int], dict],
    validate: Callable[[int], dict],
    stateful: dict[str, Any],
    snapshot: Callable[[], Any],
    selection: Selection,
    selectable: Callable[[], bool] = lambda: True,
    device: torch.device | None = None,
    clock: Callable[[], float] = time.perf_counter,
    trailing: tuple[str, ...] = (),
    logger: logging.Logger = log,
    stop_hook: Callable[[int], None] | None = None,
    primary: bool = True,
    *,
    inputs: dict,
) -> RunResult:
    """Train `epochs` epochs (resuming from out_dir/checkpoint.pt when its tag matches); see the module docstring.

    `stateful` values are objects with state_dict/load_state_dict, or lists of
    them; `clock` times an epoch (pass one that synchronises CUDA for GPU work);
    `trailing` names callback columns that go after "selected" in history.csv;
    `logger` is the trainer's (its messages carry the trainer's name);
    `stop_hook(epochs_done)` runs after each checkpoint (default:
    `common.after_epoch_checkpoint`, looked up at call time). `primary=False` (ranks 1..N of a distributed run) resumes
    from the checkpoint the primary rank wrote but writes nothing: every rank still calls the
    callbacks, `snapshot` and the stateful objects' state_dict (collectives in a distributed
    trainer), so the callbacks must return the same metrics on every rank (broadcast them).
    `inputs` (required, so that no trainer forgets it): the run's input fingerprint.
    """
    # one piece: resume, the epoch loop and the checkpoint share one state (epoch, history, best,
    # best_state, stale) whose save -> stop hook -> early-stop order is what resuming relies on.
    out_dir = Path(out_dir)
    ckpt_path = out_dir / CHECKPOINT
    state = _resumable(load_checkpoint(ckpt_path), ckpt_path, tag, inputs, logger)
    cuda = device is not None and torch.device(device).type == "cuda"
    if state is None:
        start, history, best, best_state, stale = 0, [], None, None, 0
    else:
        for name, obj in stateful.items():
            _load_into(obj, state["state"][name])
        set_rng_state(state["rng"])
        if cuda and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"], device)
        start, history, best = state["epoch"], state["history"], state["best"]
        best_state, stale = state["best_state"], state["stale"]
        if state["stopped"]:  # killed after the stopping epoch's checkpoint: nothing left to train
            logger.info("%s stopped early after epoch %d (checkpoint); not training further", out_dir, start)
            epochs = start
        else:
            logger.info("resuming %s from epoch %d", out_dir, start)

    for epoch in range(start, epochs):
        t0 = clock()
        row = {"epoch": epoch + 1, **train_epoch(epoch)}
        row.update(validate(epoch))
        row["seconds"] = clock() - t0
        tail = {k: row.pop(k) for k in trailing if k in row}
        if selection.metric not in row:
            raise KeyError(f"selection metric {selection.metric!r} is not among the epoch's columns {sorted(row)}")
        value = row[selection.metric]
        eligible = epoch >= selection.start_epoch and selectable()
        if eligible and is_better(value, best, selection.metric):
            best, best_state, stale = value, cpu_copy(snapshot()), 0
            row["selected"] = True
        else:
            stale += 1
            row["selected"] = False
        row.update(tail)
        history.append(row)
        stop = bool(selection.patience) and epoch + 1 >= selection.min_epochs and stale >= selection.patience
        payload = {  # built on every rank: a distributed trainer's state_dict is a collective
            "format": CHECKPOINT_FORMAT,
            "tag": tag,
            "inputs": inputs,
            "epoch": epoch + 1,
            "stopped": stop,
            "state": {name: _state_of(obj) for name, obj in stateful.items()},
            "rng": rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(device) if cuda else None,
            "history": history,
            "best": best,
            "best_state": best_state,
            "stale": stale,
        }
        if primary:
            logger.info("epoch %d: %s", epoch + 1, _rounded(row))
            save_checkpoint(ckpt_path, payload)
            write_history(out_dir / "history.csv", history)
        (stop_hook or common.after_epoch_checkpoint)(epoch + 1)
        if stop:
            logger.info("early stopping after epoch %d (%d epochs without improvement)", epoch + 1, stale)
            break

    if best is None:  # every eligible validation value was NaN: keep the last model, say so
        logger.warning("no epoch improved %s; keeping the last model", selection.metric)
        best_state = cpu_copy(snapshot())
    return RunResult(history, best, best_state, selection)


def _resumable(state: dict | None, ckpt_path: Path, tag: str, inputs: dict, logger: logging.Logger) -> dict | None:
    """The checkpoint if this run may resume from it, else None with a warning saying why it starts over."""
    if state is None:
        return None
    if state.get("format") != CHECKPOINT_FORMAT:
        logger.warning(
            "ignoring %s: checkpoint format %s, expected %d; starting over",
            ckpt_path,
            state.get("format"),
            CHECKPOINT_FORMAT,
        )
        return None
    if state.get("tag") != tag:
        logger.warning("ignoring %s: it was written for another config/seed/split; starting over", ckpt_path)
        return None
    changes = fingerprint_changes(state.get("inputs"), inputs)
    if changes:
        logger.warning(
            "ignoring %s: the run's inputs changed since it was written (%s); starting over",
            ckpt_path,
            "; ".join(changes),
        )
        return None
    return state


def write_run_files(
    out_dir: Path,
    method: str,
    cfg: Any,
    seed: int,
    result: RunResult,
    provenance: dict,
    model_payload: Callable[[Any], dict],
) -> Path:
    """run.json (config, seed, commit, `provenance`, epochs run, training seconds) and model.pt; returns model.pt.

    `model_payload(best_state)` is what model.pt holds. The checkpoint goes
    last: a kill before this point still resumes.
    """
    out_dir = Path(out_dir)
    write_provenance(
        out_dir / "run.json",
        method,
        cfg,
        seed,
        {
            **provenance,
            "train_seconds": float(sum(r["seconds"] for r in result.history)),
            "epochs_run": len(result.history),
            "selection": {
                "metric": result.selection.metric,
                "start_epoch": result.selection.start_epoch,
                "patience": result.selection.patience,
                "best": result.best,
            },
        },
    )
    model_path = out_dir / "model.pt"
    with atomic_path(model_path) as tmp:
        torch.save(model_payload(result.best_state), tmp)
    (out_dir / CHECKPOINT).unlink(missing_ok=True)  # the run is complete: nothing left to resume
    return model_path

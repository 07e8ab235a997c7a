"""Time-boxed sections for the GPU script: hard caps, rows on disk as they come, settings restored.

A GPU is lent once, for minutes, and returns only what its output folder holds at most 8 files of
at most 16 MiB. So each section of `bench/gpu.py`:

- runs under a hard cap (`hard_cap`): a timer raises `SectionCapped` inside it, wherever it is;
- hands its rows over one at a time (a generator), and each is on disk before the next is
  measured (`RowTable` rewrites the section's CSV atomically), so a cap, a crash or the outer
  `timeout` keeps every row measured so far;
- gets back the process-wide settings it found (`Settings`: cuDNN flags, threads, default dtype,
  grad mode, the CUDA memory fraction), so it cannot skew the sections after it;
- ends with a status in summary.json (`Summary`), written as the run goes.

`check_output` lists the output folder at the end against the limits of what comes back.
Nothing here needs a GPU: the CPU rehearsal (`--tiny`) and the tests drive all of it.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

#: what the device tool brings back from its output folder
MAX_FILES = 8
MAX_FILE_BYTES = 16 * 2**20


class SectionCapped(BaseException):
    """Raised inside a section when its cap is reached.

    A BaseException, so that a section's own `except Exception` (an error recorded as a row, the
    sweep going on after a failure) cannot swallow it.
    """


class Terminated(BaseException):
    """SIGTERM (the outer `timeout` of bench/gpu.sh): stop the run, but write the summary first."""


def raise_on_sigterm() -> None:
    def on_term(signum, frame):
        raise Terminated("SIGTERM (the outer time limit of bench/gpu.sh?)")

    signal.signal(signal.SIGTERM, on_term)


class SectionSkipped(Exception):
    """A section that cannot run here (a missing API or package): recorded with its reason."""


@contextlib.contextmanager
def hard_cap(seconds: float, what: str) -> Iterator[None]:
    """Raise SectionCapped inside the block after `seconds` of wall time (SIGALRM; main thread only).

    The signal reaches Python code between bytecodes, so a section stuck inside one long C call
    (a CUDA synchronize) is stopped when that call returns; the outer `timeout` of bench/gpu.sh is
    the last resort for a call that never returns.
    """

    def on_alarm(signum, frame):
        raise SectionCapped(f"{what}: stopped at its cap of {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, max(float(seconds), 0.001))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _descendants(pid: int) -> list[int]:
    """Every process below `pid`, from /proc (Linux; empty elsewhere)."""
    children: dict[int, list[int]] = {}
    try:
        entries = [e for e in os.listdir("/proc") if e.isdigit()]
    except OSError:
        return []
    for entry in entries:
        try:
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])  # the name in () may hold spaces
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def stop_process_tree(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """Stop a child started with start_new_session=True, and every process it started.

    torchrun starts each rank in a session of its own, so killing torchrun's process group alone
    would leave the ranks running (and holding the GPU): the descendants are listed first, torchrun
    is asked to stop them (SIGTERM to its group, which it forwards), and whatever is left after
    `grace_s` is killed, group by group.
    """
    pids = _descendants(proc.pid)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(grace_s)
    for pid in [proc.pid, *pids]:
        try:
            os.killpg(pid, signal.SIGKILL)  # a rank leads its own session and group
        except (ProcessLookupError, PermissionError):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)


def error_text(err: BaseException, limit: int = 500) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text[:limit]}" if text else type(err).__name__


class RowTable:
    """A section's CSV, rewritten whole at each row (a temporary file, then a rename).

    Rewriting rather than appending lets a later row add columns (an error row has other columns
    than a measurement); the rename means a reader, or a kill, never sees half a file.
    """

    def __init__(self, path: Path):
        self.path = path
        self.rows: list[dict] = []

    def add(self, row: dict) -> None:
        self.rows.append(row)
        self.write()

    def write(self) -> None:
        if not self.rows:
            return
        keys: list[str] = []
        for row in self.rows:
            keys += [k for k in row if k not in keys]
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=keys)
            writer.writeheader()
            writer.writerows(self.rows)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)


class Summary:
    """summary.json, rewritten (atomically) at every change: the preflight first, then each
    section's entry as it starts ("running") and as it ends (ok, capped, skipped or failed)."""

    def __init__(self, path: Path, header: dict):
        self.path = path
        self.data: dict = {**header, "preflight": None, "sections": []}
        self.write()

    def write(self) -> None:
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(tmp, self.path)

    def start(self, section: str, cap_s: float) -> dict:
        entry = {"section": section, "status": "running", "cap_s": round(cap_s, 1)}
        self.data["sections"].append(entry)
        self.write()
        return entry


@dataclass
class Settings:
    """Process-wide settings a section may change, to put back after it (in `finally`)."""

    cudnn_benchmark: bool
    cudnn_deterministic: bool
    cudnn_enabled: bool
    threads: int
    default_dtype: torch.dtype
    grad_enabled: bool

    @classmethod
    def capture(cls) -> Settings:
        cudnn = torch.backends.cudnn
        return cls(
            cudnn.benchmark,
            cudnn.deterministic,
            cudnn.enabled,
            torch.get_num_threads(),
            torch.get_default_dtype(),
            torch.is_grad_enabled(),
        )

    def restore(self, device: torch.device) -> list[str]:
        """Put every setting back; returns what could not be (recorded, never raised)."""
        cudnn = torch.backends.cudnn
        cudnn.benchmark, cudnn.deterministic, cudnn.enabled = (
            self.cudnn_benchmark,
            self.cudnn_deterministic,
            self.cudnn_enabled,
        )
        torch.set_num_threads(self.threads)
        torch.set_default_dtype(self.default_dtype)
        torch.set_grad_enabled(self.grad_enabled)
        problems = []
        if device.type == "cuda":
            try:  # a section stopped inside its own `finally` may not have lifted its memory fraction
                torch.cuda.empty_cache()
                torch.cuda.set_per_process_memory_fraction(1.0, device)
            except Exception as err:  # noqa: BLE001 - recorded in the section's entry
                problems.append(f"memory fraction not reset: {error_text(err)}")
        return problems


def run_section(name: str, rows_of, cap_s: float, table: RowTable, summary: Summary, device: torch.device) -> dict:
    """Run one section under its cap: rows to `table` as they come, its entry in `summary`.

    rows_of: a callable returning the section's rows (an iterable; a generator yields each row as
    it is measured). The entry ends as ok, capped, skipped or failed (with the error and its
    traceback); only a signal to stop the whole run (Terminated, KeyboardInterrupt) leaves this
    function, with the entry marked "stopped".
    """
    import traceback

    entry = summary.start(name, cap_s)
    settings = Settings.capture()
    started = time.perf_counter()
    rows = None
    try:
        with hard_cap(cap_s, name):
            rows = rows_of()
            for row in rows:
                table.add(row)
        entry["status"] = "ok"
    except SectionCapped as err:
        entry.update(status="capped", error=str(err))
    except SectionSkipped as err:
        entry.update(status="skipped", error=str(err))
    except Exception as err:  # noqa: BLE001 - recorded; the next section still runs
        entry.update(status="failed", error=error_text(err), traceback=traceback.format_exc(limit=8))
    except BaseException as err:  # SIGTERM from the outer timeout, ^C: recorded, and the run stops
        entry.update(status="stopped", error=error_text(err))
        raise
    finally:
        # the generator's own `finally` blocks (memory fraction, temporary files) run now, not at
        # garbage collection; the cap is off by now, so they run to the end
        with contextlib.suppress(Exception):
            if hasattr(rows, "close"):
                rows.close()
        table.write()
        problems = settings.restore(device)
        if problems:
            entry["restore_problems"] = problems
        entry.update(
            rows=len(table.rows),
            seconds=round(time.perf_counter() - started, 2),
            file=table.path.name if table.rows else None,
        )
        summary.write()
    return entry


def check_output(out_dir: Path, max_files: int = MAX_FILES, max_bytes: int = MAX_FILE_BYTES) -> dict:
    """The output folder against what the device tool brings back: files, sizes, no sub-folders."""
    files = sorted(p for p in out_dir.rglob("*") if p.is_file())
    folders = sorted(p.relative_to(out_dir).as_posix() for p in out_dir.rglob("*") if p.is_dir())
    listing = [{"name": p.relative_to(out_dir).as_posix(), "bytes": p.stat().st_size} for p in files]
    problems = []
    if len(files) > max_files:
        problems.append(f"{len(files)} files; at most {max_files} come back")
    problems += [
        f"{f['name']}: {f['bytes']} bytes; at most {max_bytes} come back" for f in listing if f["bytes"] > max_bytes
    ]
    if folders:
        problems.append(f"folders {folders}: intermediates belong in the temporary directory")
    return {"ok": not problems, "problems": problems, "files": listing}

"""The GPU script rehearsed on CPU (--tiny), so that it works the first time a GPU is lent.

The device machine runs it once, for minutes, and returns at most 8 files of at most 16 MiB: these
tests drive the bookkeeping that does not need CUDA (caps, rows written as they come, statuses,
the output folder's limits, the device index, allocation failures as misses) here.

Test-only hook: SLIDETRAIN_GPU_BENCH_FAULT="SECTION:fail|hang[:ROWS],..." makes a section fail, or
hang until its cap stops it, after ROWS rows. tests/_entry.py reads it (`python tests/_entry.py
gpu-bench ARGS` is the script's command line with the hook installed); no production module does.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from _entry import ENTRY, GPU_BENCH, GPU_BENCH_FAULT_ENV, section_faults
from slidetrain.bench import gpu
from slidetrain.bench.section_runner import MAX_FILE_BYTES, MAX_FILES, check_output

REPO = Path(__file__).resolve().parents[1]


def _env(**extra) -> dict:
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        **extra,
        "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""),
    }


def _run_script(out: Path, *args: str, timeout: float = 2000, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(REPO / "bench" / "gpu.sh"), str(out), "--tiny", *args],
        capture_output=True,
        text=True,
        env=_env(**env),
        timeout=timeout,
    )


def _run_entry(out: Path, *args: str, timeout: float, **env) -> subprocess.CompletedProcess:
    """The GPU script's Python command line (`python -m slidetrain.bench.gpu`, as bench/gpu.sh runs it)
    through the tests' entry point, which installs the hooks set in `env`."""
    return subprocess.run(
        [sys.executable, ENTRY, GPU_BENCH, "--out", str(out), "--tiny", *args],
        capture_output=True,
        text=True,
        env=_env(**env),
        timeout=timeout,
    )


def _sections(out: Path) -> dict[str, dict]:
    return {e["section"]: e for e in json.loads((out / "summary.json").read_text())["sections"]}


def _assert_within_limits(out: Path) -> None:
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= MAX_FILES, sorted(p.name for p in files)
    assert all(p.stat().st_size <= MAX_FILE_BYTES for p in files)
    assert not [p for p in out.rglob("*") if p.is_dir()], "intermediates belong in the temporary directory"


def test_gpu_script_runs_every_section_in_tiny_mode(tmp_path):
    before = set(Path(os.environ.get("TMPDIR", "/tmp")).glob("slidetrain-gpu-*"))
    proc = _run_script(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [e["section"] for e in summary["sections"]] == [s.name for s in gpu.SECTIONS]
    for entry in summary["sections"]:
        assert entry["status"] == "ok", entry
        assert (tmp_path / f"{entry['section']}.csv").exists(), entry["section"]
    preflight = summary["preflight"]
    assert preflight["device"]["value"]["device"] == "cpu"
    assert all(v == "ok" for v in preflight["imports"].values()), preflight["imports"]
    assert {"ddp_buffer_sync_keyword", "differentiable_all_reduce", "memory_fraction"} <= set(preflight["apis"])
    assert summary["output_check"]["ok"], summary["output_check"]
    assert (tmp_path / "log.txt").exists()
    _assert_within_limits(tmp_path)
    # the temporary directory (checkpoints, features) is gone
    assert set(Path(os.environ.get("TMPDIR", "/tmp")).glob("slidetrain-gpu-*")) <= before
    tilebag = pd.read_csv(tmp_path / "tilebag.csv")
    resnets = (tilebag.kind == "max_tiles") & tilebag.encoder.str.startswith("resnet")
    assert tilebag.loc[resnets, "paper_tiles_per_gb"].notna().all()
    # issue 27: the foundation-model rows are in the existing files (the test ViT in --tiny)
    vit = tilebag[(tilebag.kind == "max_tiles") & (tilebag.encoder == "vit_tiny_test")]
    assert sorted(vit.precision) == ["amp", "fp32"] and (vit.max_tiles >= 1).all()
    features = pd.read_csv(tmp_path / "features_throughput.csv")
    fm = features[features.encoder == "vit_tiny_test"].iloc[0]
    assert fm.status == "ok" and fm.tiles_per_s_end_to_end > 0 and fm.reference_tiles_per_s > 0


def test_sections_fit_the_output_limit():
    # one CSV per section, summary.json and log.txt: merge tables before adding a ninth file
    assert len(gpu.SECTIONS) + 2 <= MAX_FILES
    assert sum(s.share for s in gpu.SECTIONS) == pytest.approx(1.0)


def test_forced_failure_and_overrun_keep_the_other_sections(tmp_path):
    """Through the script's command line: a section failing after one row keeps that row and records its
    error; a section hanging is stopped at its cap; the section between them is untouched."""
    fault = "offload_sweep:fail:1,local_learning:hang:0"
    t0 = time.perf_counter()
    proc = _run_entry(
        tmp_path,
        "--only",
        "offload_sweep",
        "features_throughput",
        "local_learning",
        "--budget-s",
        "60",
        timeout=300,
        **{GPU_BENCH_FAULT_ENV: fault},
    )
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]  # a section failed
    assert time.perf_counter() - t0 < 200
    sections = _sections(tmp_path)
    assert list(sections) == ["offload_sweep", "features_throughput", "local_learning"]
    assert sections["offload_sweep"]["status"] == "failed"
    assert "injected failure after 1 rows" in sections["offload_sweep"]["error"]
    assert len(pd.read_csv(tmp_path / "offload_sweep.csv")) == 1  # the row measured before the failure
    assert sections["features_throughput"]["status"] == "ok"
    assert len(pd.read_csv(tmp_path / "features_throughput.csv")) == 2  # ResNet18, then the test ViT (issue 27)
    capped = sections["local_learning"]
    assert capped["status"] == "capped" and "cap" in capped["error"]
    assert capped["seconds"] < capped["cap_s"] + 15
    _assert_within_limits(tmp_path)


def test_every_section_forced_to_fail_is_recorded(tmp_path, monkeypatch):
    """Each real section, forced to fail at its start: every one has its own failed entry with the
    error, the run goes on to the end and the output check still runs."""
    monkeypatch.setattr(gpu, "section_rows", section_faults(",".join(f"{s.name}:fail" for s in gpu.SECTIONS)))
    summary = gpu.run_all(tmp_path, tiny=True)
    assert [e["section"] for e in summary["sections"]] == [s.name for s in gpu.SECTIONS]
    for entry in summary["sections"]:
        assert entry["status"] == "failed" and "injected failure" in entry["error"], entry
        assert entry["rows"] == 0
    assert summary["output_check"]["ok"]
    assert json.loads((tmp_path / "summary.json").read_text())["sections"] == summary["sections"]


def _fake_sections(monkeypatch, *sections: gpu.Section) -> None:
    monkeypatch.setattr(gpu, "SECTIONS", list(sections))
    monkeypatch.setattr(gpu, "preflight", lambda device, modules, tmp: {"apis": {}})


def test_a_section_past_its_cap_is_stopped_with_its_rows_and_settings_restored(tmp_path, monkeypatch):
    seen = {}

    def slow(ctx):
        seen["tmp"] = ctx.tmp_dir
        (ctx.tmp_dir / "checkpoint.pt").write_bytes(b"x" * 1000)  # an intermediate: not in the output
        torch.backends.cudnn.benchmark = not torch.backends.cudnn.benchmark
        torch.set_num_threads(torch.get_num_threads() + 1)
        yield {"k": 1, "seconds": 0.1}
        time.sleep(60)  # past the cap
        yield {"k": 2}

    def fine(ctx):
        yield {"k": 1, "benchmark": torch.backends.cudnn.benchmark, "threads": torch.get_num_threads()}

    benchmark, threads = torch.backends.cudnn.benchmark, torch.get_num_threads()
    _fake_sections(monkeypatch, gpu.Section("slow", slow, 0.5), gpu.Section("fine", fine, 0.5))
    t0 = time.perf_counter()
    summary = gpu.run_all(tmp_path, tiny=True, budget_s=4.0)
    assert time.perf_counter() - t0 < 30
    slow_entry, fine_entry = summary["sections"]
    assert slow_entry["status"] == "capped" and slow_entry["cap_s"] == 2.0 and slow_entry["rows"] == 1
    assert pd.read_csv(tmp_path / "slow.csv").k.tolist() == [1]
    assert fine_entry["status"] == "ok"
    row = pd.read_csv(tmp_path / "fine.csv").iloc[0]
    assert bool(row.benchmark) == benchmark and row.threads == threads  # the slow section's settings undone
    assert (torch.backends.cudnn.benchmark, torch.get_num_threads()) == (benchmark, threads)
    assert not seen["tmp"].exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fine.csv", "slow.csv", "summary.json"]


def test_rows_are_on_disk_before_the_next_is_measured(tmp_path, monkeypatch):
    def section(ctx):
        for k in range(3):
            on_disk = pd.read_csv(ctx.out_dir / "rows.csv") if k else None
            assert on_disk is None or len(on_disk) == k
            yield {"k": k, **({"extra": "column"} if k == 2 else {})}
        raise ValueError("broken after three rows")

    _fake_sections(monkeypatch, gpu.Section("rows", section, 1.0))
    summary = gpu.run_all(tmp_path, tiny=True, budget_s=60)
    entry = summary["sections"][0]
    assert entry["status"] == "failed" and entry["error"] == "ValueError: broken after three rows"
    table = pd.read_csv(tmp_path / "rows.csv")
    assert table.k.tolist() == [0, 1, 2] and table.extra.isna().tolist() == [True, True, False]


def test_a_skipped_section_records_why(tmp_path, monkeypatch):
    def needs_api(ctx):
        raise gpu.SectionSkipped("no such API here")
        yield  # a generator, as sections are

    _fake_sections(monkeypatch, gpu.Section("needs_api", needs_api, 1.0))
    assert gpu.main(["--out", str(tmp_path), "--tiny", "--budget-s", "10"]) == 0
    entry = _sections(tmp_path)["needs_api"]
    assert entry["status"] == "skipped" and entry["error"] == "no such API here"


def test_output_check_counts_files_sizes_and_folders(tmp_path, monkeypatch):
    for i in range(MAX_FILES):
        (tmp_path / f"t{i}.csv").write_text("a\n1\n")
    assert check_output(tmp_path)["ok"]
    (tmp_path / "one_too_many.csv").write_text("a\n")
    with open(tmp_path / "t0.csv", "r+b") as fh:
        fh.truncate(MAX_FILE_BYTES + 1)  # sparse: no disk spent
    (tmp_path / "runs").mkdir()
    problems = check_output(tmp_path)["problems"]
    assert len(problems) == 3, problems
    assert "9 files" in problems[0] and problems[1].startswith("t0.csv") and "runs" in problems[2]

    # a section that writes into the output folder makes the run fail its check (exit status 1)
    def litters(ctx):
        (ctx.out_dir / "distributed_equivalence_runs").mkdir()
        (ctx.out_dir / "distributed_equivalence_runs" / "equiv.pt").write_bytes(b"x")
        yield {"k": 1}

    out = tmp_path / "out"
    _fake_sections(monkeypatch, gpu.Section("litters", litters, 1.0))
    assert gpu.main(["--out", str(out), "--tiny", "--budget-s", "10"]) == 1
    check = json.loads((out / "summary.json").read_text())["output_check"]
    assert not check["ok"] and "distributed_equivalence_runs" in check["problems"][0]


def test_the_device_has_an_explicit_index(monkeypatch):
    """No CUDA here: a fake torch.cuda that, like the real one, rejects a device without an index."""
    calls = []

    def set_fraction(fraction, device=None):
        if not isinstance(device, int) and (device is None or torch.device(device).index is None):
            raise ValueError(f"Expected a torch.device with a specified index or an integer, but got:{device}")
        calls.append((fraction, torch.device(device)))

    class Props:
        total_memory = 80 * 2**30

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", device)))
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", set_fraction)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Props())
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)

    device = gpu.resolve_device(tiny=False)
    assert device == torch.device("cuda", 3) and calls == [("set_device", device)]
    assert gpu.resolve_device(tiny=True) == torch.device("cpu")

    from slidetrain.bench.memory import with_index
    from slidetrain.bench.offload_sweep import memory_fraction

    assert with_index("cuda") == torch.device("cuda", 3) and with_index("cuda:1").index == 1
    calls.clear()
    with pytest.raises(RuntimeError, match="inside the budget"):  # a section that fails under its budget...
        with memory_fraction(torch.device("cuda"), 24 * 2**30):  # ...given a bare "cuda"
            raise RuntimeError("inside the budget")
    # ...set the fraction on the indexed device and lifted it again
    assert calls == [(0.3, torch.device("cuda", 3)), (1.0, torch.device("cuda", 3))]


def test_allocation_failures_are_misses_and_other_errors_are_raised(monkeypatch):
    from slidetrain.bench import max_tiles
    from slidetrain.bench.memory import is_alloc_failure

    for text in (
        "CUDA out of memory. Tried to allocate 2.00 GiB",
        "cuDNN error: CUDNN_STATUS_ALLOC_FAILED",
        "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
    ):
        assert is_alloc_failure(RuntimeError(text)), text
    assert is_alloc_failure(torch.cuda.OutOfMemoryError("x"))
    assert not is_alloc_failure(RuntimeError("CUDNN_STATUS_BAD_PARAM"))
    assert not is_alloc_failure(ValueError("out of memory"))

    for name in ("empty_cache", "reset_peak_memory_stats", "current_device"):
        monkeypatch.setattr(torch.cuda, name, lambda *a: 0)
    errors = iter(
        [
            RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"),
            RuntimeError("CUBLAS_STATUS_ALLOC_FAILED"),
            RuntimeError("CUDNN_STATUS_BAD_PARAM"),
        ]
    )

    def forward_backward(*args, **kwargs):
        raise next(errors)

    monkeypatch.setattr(max_tiles, "forward_backward", forward_backward)
    assert max_tiles.cuda_fits("resnet50", "fp32", 900, 224, "cuda:0", 80 * 2**30) == (False, None)
    assert max_tiles.cuda_fits("resnet50", "amp", 900, 224, "cuda:0", 80 * 2**30) == (False, None)
    with pytest.raises(RuntimeError, match="BAD_PARAM"):
        max_tiles.cuda_fits("resnet50", "fp32", 900, 224, "cuda:0", 80 * 2**30)


def test_search_max_resolution_still_returns_a_fit():
    from slidetrain.bench.max_tiles import search_max

    probes = []

    def fit(n):
        probes.append(n)
        return n <= 840

    best = search_max(fit, start=64, limit=16384, resolution=1 / 64)
    assert 840 * (1 - 1 / 64) <= best <= 840 and fit(best)
    exact_probes = len(probes)
    probes.clear()
    assert search_max(fit, start=64, limit=16384) == 840
    assert exact_probes < len(probes)


def test_paper_tiles_per_gb_come_from_the_paper_csv():
    from slidetrain.paper.tables import paper_table

    table = paper_table("tilebag_memory")
    per_gb = gpu.paper_tiles_per_gb()
    fp32 = table[(table.encoder == "ResNet50") & (table.precision == "fp32")].max_tiles_h100_80gb.iloc[0]
    assert per_gb["fp32"] == pytest.approx(fp32 / 80)
    assert per_gb["amp"] > per_gb["fp32"]


def test_collective_timeouts_end_before_their_launch():
    from slidetrain.bench.distributed_equivalence import collective_timeout_s

    for launch in (40, 70, 90, 250, 600):
        # the encoders' DDP group waits twice the timeout, then a 10 s monitored barrier
        assert 2 * collective_timeout_s(launch) + 10 < launch


def test_a_launch_is_stopped_with_the_processes_it_started(tmp_path):
    """As torchrun does, the launched parent starts its child in a session of its own and ignores
    SIGTERM: stopping the launch still leaves neither running."""
    from slidetrain.bench.section_runner import stop_process_tree

    script = (
        "import signal, subprocess, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'],"
        " start_new_session=True)\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(300)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, start_new_session=True)
    child = int(proc.stdout.readline())
    stop_process_tree(proc, grace_s=0.5)
    assert proc.poll() is not None
    for _ in range(50):  # the orphaned child is reaped by init: wait until it is gone
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        if Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            break
        time.sleep(0.1)
    else:
        os.kill(child, signal.SIGKILL)
        pytest.fail("the launch's child outlived it")


def test_the_gpu_path_imports_without_the_packages_the_gpu_machine_lacks():
    blocked = ["snakemake", "openslide", "imagecodecs", "boto3"]
    modules = sorted({m for s in gpu.SECTIONS for m in s.modules} | {"slidetrain.bench.gpu"})
    code = (
        "import sys\n"
        f"for name in {blocked!r}: sys.modules[name] = None  # import fails, as on the GPU machine\n"
        f"import importlib\nfor m in {modules!r}: importlib.import_module(m)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

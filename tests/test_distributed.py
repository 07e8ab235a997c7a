"""The distributed executor against one process: gloo on CPU, 1 aggregator + 2 encoder ranks under torchrun.

Each test launches `torchrun --standalone --nproc-per-node 3` as a subprocess (ranks share the
machine's cores), and compares what rank 0 records with the same case run in this process.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from _entry import ENTRY
from slidetrain.bench.distributed_equivalence import run_single, spec_from_dict
from slidetrain.train.tilebag.distributed_executor import pick_backend, split_bag

pytestmark = pytest.mark.equivalence
REPO = Path(__file__).resolve().parents[1]
TOY = {"case": "toy", "dim": 32, "tiles": 21, "steps": 3, "momentum": 0.9, "track_all": True, "predict_tiles": 7}
TOL = 1e-5


def torchrun(
    tmp: Path, spec: dict, *extra: str, nproc: int = 3, timeout_s: float = 30, out: str = "parallel.pt", **hooks: str
) -> subprocess.CompletedProcess:
    """`slidetrain distributed-parallel` under torchrun; `hooks`: tests/_entry.py's environment variables."""
    import json

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src"), **hooks}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        ENTRY,
        "distributed-parallel",
        "--spec",
        json.dumps(spec),
        "--out",
        str(tmp / out),
        "--backend",
        "gloo",
        "--timeout-s",
        str(timeout_s),
        *extra,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp)


def side_l1(single: dict, parallel: dict, kind: str, side: str) -> list[float]:
    """Normalized L1 of all of one side's parameters (or gradients), concatenated, per step."""
    out = []
    for s, p in zip(single["records"], parallel["records"], strict=True):
        keys = [k for k in s[kind] if k.startswith(side)]
        ref = torch.cat([s[kind][k].flatten() for k in keys]).double()
        got = torch.cat([p[kind][k].flatten() for k in keys]).double()
        out.append(float((got - ref).abs().sum() / ref.abs().sum()))
    return out


def equivalent(single: dict, parallel: dict, tol: float = TOL) -> bool:
    return len(single["records"]) == len(parallel["records"]) and all(
        max(side_l1(single, parallel, kind, side)) < tol
        for kind in ("grads", "params")
        for side in ("encoder", "aggregator")
    )


def seconds_since_fault(proc: subprocess.CompletedProcess, finished: float) -> float:
    """Wall seconds from the injected fault (its log line's timestamp) to the job's end.

    Start-up under a loaded machine can take long; what the timeout bounds is the time after the fault.
    """
    from datetime import datetime

    stamp = re.search(r"^(\S+ \S+) ERROR .*injected fault", proc.stderr, re.M)
    assert stamp, proc.stderr[-3000:]
    return finished - datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()


def load(path: Path) -> dict:
    return torch.load(path, weights_only=False)


def test_split_bag_shares_differ_by_at_most_one():
    shares = split_bag(21, 2)
    assert [s.stop - s.start for s in shares] == [11, 10]
    assert shares[0].stop == shares[1].start and shares[1].stop == 21
    assert pick_backend("gloo", 3) == "gloo"


def test_toy_three_processes_match_single_process(tmp_path):
    """Uneven shares (11 + 10 tiles) in training, 4 + 3 at prediction; 3 SGD-momentum steps."""
    proc = torchrun(tmp_path, TOY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single, parallel = run_single(spec_from_dict(TOY)), load(tmp_path / "parallel.pt")
    assert parallel["backend"] == "gloo" and parallel["n_encoder_ranks"] == 2
    for side in ("encoder", "aggregator"):
        for kind in ("grads", "params"):
            assert max(side_l1(single, parallel, kind, side)) < TOL, (side, kind)
    for s, p in zip(single["records"], parallel["records"], strict=True):
        assert p["loss"] == pytest.approx(s["loss"], rel=1e-6)
    torch.testing.assert_close(parallel["predict_logits"], single["predict_logits"], rtol=1e-5, atol=1e-6)


def test_wrong_pseudo_loss_scale_is_detected(tmp_path):
    """Without the factor N the encoder gradients are 1/N of the truth: the check must fail."""
    proc = torchrun(tmp_path, TOY, SLIDETRAIN_PSEUDO_LOSS_FACTOR="1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    single, parallel = run_single(spec_from_dict(TOY)), load(tmp_path / "parallel.pt")
    assert not equivalent(single, parallel)
    assert side_l1(single, parallel, "grads", "encoder")[0] == pytest.approx(0.5, abs=1e-3)  # 1/N short
    assert max(side_l1(single, parallel, "grads", "aggregator")[:1]) < TOL  # step 1's aggregator is unaffected


def records_by_name(result: dict) -> dict:
    """Every tracked tensor of every step (parameters after it, gradients before it) by one name."""
    return {
        f"step{r['step']}.{kind}.{name}": t
        for r in result["records"]
        for kind in ("params", "grads")
        for name, t in r[kind].items()
    }


def test_resnet_gma_syncbn_three_processes_match_single_process(tmp_path):
    """ResNet18 + GMA (no dropout), BatchNorm synchronised over the encoder ranks, 2 steps.

    float64: equal to rounding (the proof). float32: as close to the float64 single run as plain
    fp32 is, on any CPU's kernels (slidetrain.bench.fidelity; a deep ReLU network over steps, so
    the jump allowance covers parameters as well as gradients).
    """
    from slidetrain.bench.fidelity import JUMP, assert_exact, fidelity

    spec = {"case": "resnet", "tile_px": 32, "tiles": 8, "steps": 2, "lr": 1e-3, "momentum": 0.9, "track_all": True}
    spec64 = {**spec, "dtype": "float64"}
    proc = torchrun(tmp_path, spec64, out="parallel64.pt")
    assert proc.returncode == 0, proc.stderr[-3000:]
    reference = run_single(spec_from_dict(spec64))
    assert torch.get_default_dtype() == torch.float32  # run_single restores it
    assert_exact(records_by_name(load(tmp_path / "parallel64.pt")), records_by_name(reference), what="parallel float64")

    proc = torchrun(tmp_path, spec)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single, parallel = run_single(spec_from_dict(spec)), load(tmp_path / "parallel.pt")
    fidelity(
        records_by_name(parallel),
        records_by_name(single),
        records_by_name(reference),
        jump=JUMP,
        jump_on=lambda name: True,
    ).check("parallel float32")


def test_a_gradient_on_one_side_only_fails_the_comparison():
    from slidetrain.bench.distributed_equivalence import compare

    record = {"step": 1, "loss": 1.0, "params": {"w": torch.ones(2)}, "grads": {"w": torch.ones(2)}}
    lost = {**record, "grads": {"w": None}}
    with pytest.raises(AssertionError, match="one side only"):
        compare("toy", {"records": [record]}, {"records": [lost]})


def test_killed_rank_fails_the_job_and_a_rerun_resumes(tmp_path):
    spec = {**TOY, "steps": 4, "predict_tiles": 0}
    ckpt = tmp_path / "checkpoint.pt"
    proc = torchrun(tmp_path, spec, "--checkpoint", str(ckpt), timeout_s=20, SLIDETRAIN_RANK_FAULT="kill:2:3")
    assert proc.returncode != 0
    assert seconds_since_fault(proc, time.time()) < 20 + 10  # within the configured timeout (+ shutdown)
    # torchrun's summary names the rank that died first
    assert re.search(r"Root Cause[\s\S]*?rank\s*:\s*2 ", proc.stderr), proc.stderr[-3000:]
    assert torch.load(ckpt, weights_only=False)["step"] == 2
    assert not (tmp_path / "parallel.pt").exists()

    proc = torchrun(tmp_path, spec, "--checkpoint", str(ckpt), timeout_s=20)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming from" in proc.stderr and "after step 2" in proc.stderr
    single, parallel = run_single(spec_from_dict(spec)), load(tmp_path / "parallel.pt")
    assert [r["step"] for r in parallel["records"]] == [1, 2, 3, 4]
    assert equivalent(single, parallel)  # exact resume: steps 3-4 continue from the saved state


def test_hung_rank_times_out_with_an_error_naming_it(tmp_path):
    proc = torchrun(tmp_path, {**TOY, "predict_tiles": 0}, timeout_s=4, SLIDETRAIN_RANK_FAULT="hang:2:2")
    assert proc.returncode != 0
    assert "size exchange (all_gather) at step 2 failed" in proc.stderr, proc.stderr[-3000:]
    report = re.search(
        r"\[rank0\]:\[E\d{4} (\d+):(\d+):(\d+\.\d+) .*Ranks? 2 failed to pass monitoredBarrier", proc.stderr
    )
    assert report, proc.stderr[-3000:]
    fault = re.search(r"^\S+ (\d+):(\d+):(\d+),(\d+) ERROR .*injected fault", proc.stderr, re.M)
    to_s = lambda h, m, sec: 3600 * int(h) + 60 * int(m) + float(sec)  # noqa: E731
    named_after = (to_s(*report.groups()) - to_s(*fault.groups()[:2], f"{fault[3]}.{fault[4]}")) % 86400
    # rank 0 names rank 2 after the collective timeout plus the monitored barrier's (min(10 s, timeout))
    assert 4 <= named_after < 4 + 4 + 3, named_after
    assert seconds_since_fault(proc, time.time()) < 4 + 4 + 60  # and the job ends (teardown on a loaded machine)


def test_slurm_profile_gives_a_torchrun_rule_one_task_with_n_gpus():
    """What the installed SLURM executor plugin submits for distributed_parallel with 5 processes on GPUs."""
    import yaml
    from snakemake_executor_plugin_slurm.submit_string import get_submit_command
    from snakemake_executor_plugin_slurm.utils import set_gres_string
    from snakemake_executor_plugin_slurm_jobstep import get_gpu_setting, get_node_setting

    class Resources(dict):
        __getattr__ = dict.__getitem__

    class Job:
        def __init__(self, resources: dict):
            self.resources, self.threads = Resources(resources), 2

    profile = yaml.safe_load((REPO / "profiles" / "slurm" / "config.yaml").read_text())
    rule = {"gpu": 5, "nproc": 5, "mem_mb": 10000, "runtime": 30}  # the rule's resources with device: cuda
    job = Job({**profile["default-resources"], **profile["set-resources"]["distributed_parallel"], **rule})
    params = {
        "run_uuid": "u",
        "slurm_logfile": "log",
        "comment_str": "c",
        "account": "",
        "partition": "-p gpu",
        "workdir": "/w",
    }
    sbatch = get_submit_command(job, params) + set_gres_string(job)
    assert "--gpus=5" in sbatch and "ntasks" not in sbatch  # one task (SLURM's default), five GPUs
    assert (get_gpu_setting(job), get_node_setting(job)) == ("--gpus=5", "--nodes=1")  # srun -n1 inside
    # the trap the profile avoids: `tasks` becomes --ntasks-per-gpu on GPU jobs
    trap = Job({**job.resources, "tasks": 5})
    assert "--ntasks-per-gpu=5" in get_submit_command(trap, params)


def test_half_strategy_runs_and_stays_close_to_single_process_amp(tmp_path):
    """AMP ("half"; bf16 autocast on CPU): same recipe in one process and on 3 ranks, bf16-close."""
    spec = {**TOY, "amp": True, "steps": 2, "predict_tiles": 0}
    proc = torchrun(tmp_path, spec)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single, parallel = run_single(spec_from_dict(spec)), load(tmp_path / "parallel.pt")
    for side in ("encoder", "aggregator"):
        assert max(side_l1(single, parallel, "grads", side)) < 2e-2, side


def test_slurm_profile_names_only_rules_the_workflow_has():
    """A renamed rule must not leave its cluster resources behind under the old name (they would silently not apply)."""
    import re

    import yaml

    profile = yaml.safe_load((REPO / "profiles" / "slurm" / "config.yaml").read_text())
    rules = set()
    for smk in (REPO / "workflow").rglob("*.smk"):
        rules |= set(re.findall(r"^rule (\w+)", smk.read_text(), flags=re.M))
    missing = sorted(set(profile["set-resources"]) - rules)
    assert not missing, f"profiles/slurm/config.yaml sets resources for rules that do not exist: {missing}"

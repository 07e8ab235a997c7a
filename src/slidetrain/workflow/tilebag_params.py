"""Parameters of the tile-bag runs (workflow/rules/tilebag.smk) and of the distributed benchmark
(workflow/rules/distributed.smk): run names, TileBagConfig keys, process counts, slides."""

from __future__ import annotations

import json
import re
import shlex
from typing import Any

from slidetrain.configs.tilebag import FOUNDATION_ENCODERS
from slidetrain.errors import ConfigError
from slidetrain.workflow.plan import Plan
from slidetrain.workflow.slide_files import slide_file

_RUN_NAME = re.compile(r"tilebag(?:_(half|parallel))?_k(\d+)")

#: encoders of the max-tiles probe (slidetrain.bench.max_tiles, which imports torch): Figure 1's ResNets and
#: ViT-base, and every foundation model of the registry by name
MAX_TILES_ENCODERS = ("resnet18", "resnet34", "resnet50", "vit_b_16", *FOUNDATION_ENCODERS)


def tilebag_cfg(plan: Plan, key: str, default: Any = None) -> Any:
    return plan.config.get("tilebag", {}).get(key, default)


def tilebag_data_args(plan: Plan, dataset: str) -> str:
    """Sheet, slide and tile folders of the dataset's source, its classes (and --ordinal)."""
    base = plan.base_dataset(dataset)
    ds = plan.dataset_cfg(dataset)
    args = (
        f"--sheet {plan.dataset_cfg(base)['sheet']} --slides-dir resources/{base}/slides"
        f" --tiles-dir results/{base}/tiles --classes {' '.join(ds['classes'])}"
    )
    return args + (" --ordinal" if ds.get("ordinal") else "")


def tilebag_threads(plan: Plan) -> int:
    # one torch thread for the step, plus the reader worker processes
    return 1 + int(tilebag_cfg(plan, "params", {}).get("workers", 2))


def tilebag_strategy(run: str) -> tuple[str, int]:
    """(strategy, K) of a run directory name: tilebag_k16 -> (single, 16), tilebag_half_k16 -> (half, 16)."""
    m = _RUN_NAME.fullmatch(run)
    if m is None:
        raise ConfigError(f"tile-bag run {run!r}: expected tilebag_k<K>, tilebag_half_k<K> or tilebag_parallel_k<K>")
    return m[1] or "single", int(m[2])


def tilebag_run_params(plan: Plan, run: str) -> str:
    """The run's TileBagConfig keys as JSON: tilebag.params, the strategy's keys (tilebag.strategies), its K."""
    strategy, k = tilebag_strategy(run)
    return json.dumps(
        {**tilebag_cfg(plan, "params", {}), **tilebag_cfg(plan, "strategies", {}).get(strategy, {}), "k": k}
    )


def tilebag_emulated_amp(plan: Plan) -> dict[str, str]:
    """{run: reason} of the tile-bag runs left out on this machine: their strategy asks for AMP on a CPU
    whose bf16 autocast is emulated (an AVX2-only CPU: 729 s against 42 s in fp32 per run). Their rows
    stay in tilebag_table1 with the reason; no run trains in fp32 under the strategy's name.

    Asked only when some strategy has `amp: true` on a CPU device, so that torch is imported at
    parse time only then (slidetrain.train.cpu_bf16 probes the CPU through torch)."""
    base = tilebag_cfg(plan, "params", {})
    amp_on_cpu = [
        name
        for name, keys in tilebag_cfg(plan, "strategies", {}).items()
        if {**base, **keys}.get("amp") and str({**base, **keys}.get("device", "cpu")).startswith("cpu")
    ]
    if not amp_on_cpu:
        return {}
    from slidetrain.train import cpu_bf16

    found = cpu_bf16.cpu_bf16()
    if found.native:
        return {}
    reason = f"bf16 autocast (amp) is emulated on this CPU: {found.detail}"
    return {f"tilebag_{s}_k{k}": reason for s in amp_on_cpu for k in tilebag_cfg(plan, "strategy_k", [])}


def tilebag_not_run_args(plan: Plan) -> str:
    """tilebag-table1's --not-run RUN=REASON arguments, shell-quoted."""
    return " ".join(f"--not-run {shlex.quote(f'{run}={why}')}" for run, why in tilebag_emulated_amp(plan).items())


def tilebag_nproc(plan: Plan) -> int:
    return int(tilebag_cfg(plan, "parallel", {}).get("n_encoder_ranks", 2)) + 1  # rank 0 aggregates, ranks 1..N encode


def tilebag_cuda(plan: Plan) -> bool:
    return str(tilebag_cfg(plan, "params", {}).get("device", "cpu")).startswith("cuda")


def step_slides(plan: Plan) -> dict[str, str]:
    """{slide: file} of the first tilebag.step.slides slides that the tile-bag step benchmark times."""
    dataset = plan.base_dataset(tilebag_cfg(plan, "datasets", ["synthetic"])[0])
    count = tilebag_cfg(plan, "step", {}).get("slides", 8)
    return {s: slide_file(plan, dataset, s) for s in plan.slide_ids(dataset)[:count]}


def distributed_bench(plan: Plan) -> dict[str, Any]:
    return plan.config.get("distributed_benchmark", {})


def distributed_float32_cases(plan: Plan) -> list[str]:
    """Equivalence cases in float32: they get a float64 single run beside them (the reference's own rounding)."""
    cases = distributed_bench(plan).get("equivalence", {})
    return [c for c, spec in cases.items() if spec.get("dtype", "float32") == "float32"]


def distributed_spec(plan: Plan, case: str) -> dict[str, Any]:
    bench = distributed_bench(plan)
    return {**bench["equivalence"][case], "device": bench.get("device", "cpu")}


def distributed_nproc(plan: Plan, case: str) -> int:
    return distributed_bench(plan)["ranks"][case] + 1  # rank 0 aggregates, ranks 1..N encode


def scaling_spec(plan: Plan, n_ranks: int | str) -> dict[str, Any]:
    """The scaling benchmark's spec at `n_ranks` encoder ranks: scaling.k_per_rank tiles per rank."""
    bench = distributed_bench(plan)
    scaling = bench.get("scaling", {})
    return {**scaling["spec"], "tiles": int(n_ranks) * scaling["k_per_rank"], "device": bench.get("device", "cpu")}


def distributed_gpus(plan: Plan, nproc: int) -> int:
    """GPUs a distributed job asks for: one per process on CUDA, none on CPU."""
    return nproc if distributed_bench(plan).get("device", "cpu") == "cuda" else 0

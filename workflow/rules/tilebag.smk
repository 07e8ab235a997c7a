# Tile-bag end-to-end training (Campanella et al.): encoder + aggregator trained together on K tiles
# per slide, read on the fly from the slides. Not part of the main job: `snakemake --cores all tilebag`.
# Runs live beside the MIL runs: results/{dataset}/runs/{tilebag_run}/{split}/{seed}/, tilebag_run =
# tilebag_k{K} (strategy single), tilebag_half_k{K} (AMP) or tilebag_parallel_k{K} (torchrun ranks).


wildcard_constraints:
    tilebag_run=r"tilebag(_half|_parallel)?_k\d+",

# _tilebag_strategy, tilebag_run_params, _tilebag_nproc, _tilebag_cuda and the other helpers are in common.smk.


rule train_tilebag:
    # strategies single and half (one process; half = AMP)
    input:
        split="results/{dataset}/splits/{split}.csv",
        # every slide's tile coordinates exist (or the slide is excluded) once the QC status table does
        status=lambda w: f"results/{base_dataset(w.dataset)}/qc/status.csv",
        slides=tilebag_slides,
        weights=lambda w: weights_files(tilebag_run_params(w)),
    output:
        model="results/{dataset}/runs/{tilebag_run}/{split}/{seed}/model.pt",
        history="results/{dataset}/runs/{tilebag_run}/{split}/{seed}/history.csv",
        provenance="results/{dataset}/runs/{tilebag_run}/{split}/{seed}/run.json",
    wildcard_constraints:
        tilebag_run=r"tilebag(_half)?_k\d+",
    params:
        method_params=tilebag_run_params,
        data=tilebag_data_args,
        tile_px=config["preprocess"]["tile_px"],
        magnification=config["preprocess"]["target_magnification"],
        mpp=mpp_arg,
    conda:
        "../../envs/slidetrain.yaml"
    log:
        "logs/{dataset}/runs/{tilebag_run}/{split}/{seed}/train.log",
    benchmark:
        "benchmarks/{dataset}/runs/{tilebag_run}/{split}/{seed}/train.tsv"
    threads: _tilebag_threads()
    resources:
        mem_mb=8000,
        runtime=24 * 60,
        gpu=1 if _tilebag_cuda() else 0,
    shell:
        "slidetrain train-tilebag --params '{params.method_params}' --split {input.split} {params.data}"
        " --tile-px {params.tile_px} --target-magnification {params.magnification} {params.mpp}"
        " --out $(dirname {output.model}) --seed {wildcards.seed} > {log} 2>&1"


rule train_tilebag_parallel:
    # strategy parallel: the same trainer on torchrun's ranks (executor: distributed; rank 0 aggregator,
    # ranks 1..N encoders in DDP, k = K / N tiles each). nproc = N + 1 from the resources; on SLURM
    # (profiles/slurm) one task with `gpu` = nproc GPUs when tilebag.params.device is cuda.
    input:
        split="results/{dataset}/splits/{split}.csv",
        status=lambda w: f"results/{base_dataset(w.dataset)}/qc/status.csv",
        slides=tilebag_slides,
        weights=lambda w: weights_files(tilebag_run_params(w)),
    output:
        model="results/{dataset}/runs/{tilebag_run}/{split}/{seed}/model.pt",
        history="results/{dataset}/runs/{tilebag_run}/{split}/{seed}/history.csv",
        provenance="results/{dataset}/runs/{tilebag_run}/{split}/{seed}/run.json",
    wildcard_constraints:
        tilebag_run=r"tilebag_parallel_k\d+",
    params:
        method_params=tilebag_run_params,
        data=tilebag_data_args,
        tile_px=config["preprocess"]["tile_px"],
        magnification=config["preprocess"]["target_magnification"],
        mpp=mpp_arg,
        backend=DISTRIBUTED_BENCH.get("backend", "auto"),
        timeout_s=DISTRIBUTED_BENCH.get("timeout_s", 300),
    conda:
        "../../envs/slidetrain.yaml"
    log:
        "logs/{dataset}/runs/{tilebag_run}/{split}/{seed}/train.log",
    benchmark:
        "benchmarks/{dataset}/runs/{tilebag_run}/{split}/{seed}/train.tsv"
    threads: _tilebag_cfg("parallel", {}).get("threads", 2)  # cores the ranks share (one torch thread per rank)
    resources:
        nproc=_tilebag_nproc(),
        gpu=_tilebag_nproc() if _tilebag_cuda() else 0,
        mem_mb=3000 * _tilebag_nproc(),
        runtime=24 * 60,
    shell:
        "torchrun --standalone --nproc-per-node {resources.nproc} --no-python"
        " slidetrain train-tilebag --params '{params.method_params}' --split {input.split} {params.data}"
        " --tile-px {params.tile_px} --target-magnification {params.magnification} {params.mpp}"
        " --backend {params.backend} --timeout-s {params.timeout_s} --threads 1"
        " --out $(dirname {output.model}) --seed {wildcards.seed} > {log} 2>&1"


rule evaluate_tilebag:
    # every strategy's model is a plain TileBagModel: the test part is scored in one process
    input:
        model="results/{dataset}/runs/{tilebag_run}/{split}/{seed}/model.pt",
        split="results/{dataset}/splits/{split}.csv",
        status=lambda w: f"results/{base_dataset(w.dataset)}/qc/status.csv",
    output:
        predictions="results/{dataset}/runs/{tilebag_run}/{split}/{seed}/predictions.csv",
        metrics="results/{dataset}/runs/{tilebag_run}/{split}/{seed}/metrics.json",
        attention="results/{dataset}/runs/{tilebag_run}/{split}/{seed}/attention.h5",
    params:
        data=tilebag_data_args,
        n_bootstrap=config.get("evaluation", {}).get("n_bootstrap", 1000),
    conda:
        "../../envs/slidetrain.yaml"
    log:
        "logs/{dataset}/runs/{tilebag_run}/{split}/{seed}/evaluate.log",
    benchmark:
        "benchmarks/{dataset}/runs/{tilebag_run}/{split}/{seed}/evaluate.tsv"
    threads: _tilebag_threads()
    resources:
        mem_mb=8000,
        runtime=120,
    shell:
        "slidetrain evaluate-tilebag --model {input.model} --split {input.split} {params.data}"
        " --predictions {output.predictions} --metrics {output.metrics} --attention {output.attention}"
        " --n-bootstrap {params.n_bootstrap} --seed {wildcards.seed} > {log} 2>&1"


rule tilebag_table1:
    # runs whose bf16 autocast would be emulated on this CPU are left out; their rows keep the reason
    input:
        lambda w: _tilebag_runs("metrics"),
    output:
        csv=report("results/tables/tilebag_table1.csv", caption="../report/tilebag_table1.rst", category="Tables"),
        md="results/tables/tilebag_table1.md",
    params:
        paper_k=" ".join(f"{k}={p}" for k, p in zip(_tilebag_cfg("k_sweep", []), _tilebag_cfg("paper_k", []))),
        not_run=_tilebag_not_run_args,
    conda:
        "../../envs/slidetrain.yaml"
    log:
        "logs/tables/tilebag_table1.log",
    benchmark:
        "benchmarks/tables/tilebag_table1.tsv"
    shell:
        "slidetrain tilebag-table1 --metrics {input} --paper-k {params.paper_k} {params.not_run} --out {output.csv}"
        " --markdown {output.md} > {log} 2>&1"


rule tilebag_figure4:
    input:
        lambda w: _tilebag_runs("history"),
    output:
        figure=report("results/figures/tilebag_figure4.png", caption="../report/tilebag_figure4.rst", category="Figures"),
        data="results/figures/tilebag_figure4.csv",  # the plotted points, panels a-d
    conda:
        "../../envs/slidetrain.yaml"
    log:
        "logs/figures/tilebag_figure4.log",
    benchmark:
        "benchmarks/figures/tilebag_figure4.tsv"
    shell:
        "slidetrain tilebag-figure4 --histories {input} --out {output.figure} --out-data {output.data} > {log} 2>&1"


rule bench_max_tiles:
    output:
        table="results/bench/max_tiles/{encoder}.csv",
        probes="results/bench/max_tiles/{encoder}_probes.csv",
    wildcard_constraints:
        encoder="|".join(_tilebag.MAX_TILES_ENCODERS),
    params:
        precisions=" ".join(_tilebag_cfg("max_tiles", {}).get("precisions", ["fp32", "amp"])),
        tile_px=_tilebag_cfg("max_tiles", {}).get("tile_px", 224),
        device=_tilebag_cfg("max_tiles", {}).get("device", "cpu"),
        budget=(
            f"--memory-budget-gb {_tilebag_cfg('max_tiles', {})['memory_budget_gb']}"
            if _tilebag_cfg("max_tiles", {}).get("memory_budget_gb")
            else ""
        ),
    conda:
        "../../envs/slidetrain.yaml"
    log:
        "logs/bench/max_tiles/{encoder}.log",
    benchmark:
        "benchmarks/bench/max_tiles/{encoder}.tsv"
    resources:
        mem_mb=int(1024 * (_tilebag_cfg("max_tiles", {}).get("memory_budget_gb") or 4) * 1.5),
        runtime=60,
        gpu=1 if str(_tilebag_cfg("max_tiles", {}).get("device", "cpu")).startswith("cuda") else 0,
    shell:
        "slidetrain -v bench-max-tiles --encoders {wildcards.encoder} --precisions {params.precisions}"
        " --tile-px {params.tile_px} --device {params.device} {params.budget} --out {output.table} > {log} 2>&1"


rule tilebag_figure1:
    input:
        expand("results/bench/max_tiles/{encoder}.csv", encoder=_tilebag_cfg("max_tiles", {}).get("encoders", [])),
    output:
        table="results/bench/tilebag_max_tiles.csv",
        figure=report("results/figures/tilebag_figure1.png", caption="../report/tilebag_figure1.rst", category="Figures"),
        data="results/figures/tilebag_figure1.csv",  # the plotted bars, panels a and b
    conda:
        "../../envs/slidetrain.yaml"
    log:
        "logs/figures/tilebag_figure1.log",
    benchmark:
        "benchmarks/figures/tilebag_figure1.tsv"
    shell:
        "slidetrain tilebag-figure1 --tables {input} --out-table {output.table} --out {output.figure}"
        " --out-data {output.data} > {log} 2>&1"


rule bench_tilebag_step:
    input:
        slides=lambda w: slides_ready(base_dataset(_tilebag_cfg('datasets', ['synthetic'])[0]), list(_step_slides())),
        status=lambda w: f"results/{base_dataset(_tilebag_cfg('datasets', ['synthetic'])[0])}/qc/status.csv",
        weights=weights_files(_tilebag_cfg("params", {})),
    output:
        report("results/bench/tilebag_step.csv", caption="../report/tilebag_step.rst", category="Benchmarks"),
    params:
        method_params=lambda w: json.dumps({**_tilebag_cfg("params", {}), "k": _tilebag_cfg("step", {}).get("k", max(_tilebag_cfg("k_sweep", [16])))}),
        slides=lambda w: " ".join(f"{s}={p}" for s, p in _step_slides().items()),
        tiles_dir=lambda w: f"results/{base_dataset(_tilebag_cfg('datasets', ['synthetic'])[0])}/tiles",
        tile_px=config["preprocess"]["tile_px"],
        magnification=config["preprocess"]["target_magnification"],
        steps=_tilebag_cfg("step", {}).get("steps", 16),
        workers=_tilebag_cfg("step", {}).get("workers", 1),
    conda:
        "../../envs/slidetrain.yaml"
    log:
        "logs/bench/tilebag_step.log",
    benchmark:
        "benchmarks/bench/tilebag_step.tsv"
    threads: 1 + _tilebag_cfg("step", {}).get("workers", 1)
    resources:
        mem_mb=8000,
        runtime=30,
    shell:
        "slidetrain bench-tilebag-step --params '{params.method_params}' --slides {params.slides}"
        " --tiles-dir {params.tiles_dir} --tile-px {params.tile_px} --target-magnification {params.magnification}"
        " --steps {params.steps} --workers {params.workers} --out {output} > {log} 2>&1"


rule tilebag:
    input:
        "results/tables/tilebag_table1.csv",
        "results/figures/tilebag_figure4.png",
        "results/bench/tilebag_max_tiles.csv",
        "results/figures/tilebag_figure1.png",
        "results/bench/tilebag_step.csv",


# Old target names, kept as aliases for one release (docs/tilebag.md, "Renamed").
rule e2e:  # alias of `tilebag`
    input:
        rules.tilebag.input,


rule e2e_table1:  # alias of `tilebag_table1`
    input:
        rules.tilebag_table1.output.csv,


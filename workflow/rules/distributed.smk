# The distributed tile-bag executor (Campanella et al.): gradient equivalence (Figure 3) and scaling.
# Parallel runs are launched by torchrun (--standalone: one node; nproc from the rule's resources).
# On SLURM, profiles/slurm gives such a job one task and `gpu` GPUs (docs/tilebag.md, "distributed").

# DISTRIBUTED_BENCH, DISTRIBUTED_CASES, DISTRIBUTED_SCALING and the helpers below them are in common.smk.


wildcard_constraints:
    case=r"[a-z0-9_]+",
    n_ranks=r"\d+",


rule distributed_single:
    output:
        temp("results/bench/distributed/{case}_single.pt"),  # tensors per step (100+ MB); the tables keep what matters
    params:
        spec=lambda w: json.dumps(_distributed_spec(w.case)),
    conda:
        "../../envs/slidetrain.yaml"
    log:
        "logs/bench/distributed/{case}_single.log",
    benchmark:
        "benchmarks/bench/distributed/{case}_single.tsv"
    threads: DISTRIBUTED_BENCH.get("threads", 2)
    resources:
        mem_mb=4000,
        runtime=30,
    shell:
        "slidetrain distributed-single --spec '{params.spec}' --threads 1 --out {output} > {log} 2>&1"


rule distributed_parallel:
    output:
        temp("results/bench/distributed/{case}_parallel.pt"),  # tensors per step (100+ MB); the tables keep what matters
    params:
        spec=lambda w: json.dumps(_distributed_spec(w.case)),
        backend=DISTRIBUTED_BENCH.get("backend", "auto"),
        timeout_s=DISTRIBUTED_BENCH.get("timeout_s", 300),
    conda:
        "../../envs/slidetrain.yaml"
    log:
        "logs/bench/distributed/{case}_parallel.log",
    benchmark:
        "benchmarks/bench/distributed/{case}_parallel.tsv"
    threads: DISTRIBUTED_BENCH.get("threads", 2)  # the whole (small) machine: timed runs must not overlap
    resources:
        nproc=lambda w: _distributed_nproc(w.case),
        gpu=lambda w: _gpus(_distributed_nproc(w.case)),
        mem_mb=lambda w: 2000 * _distributed_nproc(w.case),
        runtime=30,
    shell:
        "torchrun --standalone --nproc-per-node {resources.nproc} --no-python"
        " slidetrain distributed-parallel --spec '{params.spec}' --backend {params.backend}"
        " --timeout-s {params.timeout_s} --out {output} > {log} 2>&1"


rule distributed_reference:
    # a float32 case's single run in float64: how far plain fp32 itself stands from exact (fp32_noise)
    output:
        temp("results/bench/distributed/{case}_reference.pt"),
    params:
        spec=lambda w: json.dumps({**_distributed_spec(w.case), "dtype": "float64"}),
    conda:
        "../../envs/slidetrain.yaml"
    log:
        "logs/bench/distributed/{case}_reference.log",
    benchmark:
        "benchmarks/bench/distributed/{case}_reference.tsv"
    threads: DISTRIBUTED_BENCH.get("threads", 2)
    resources:
        mem_mb=4000,
        runtime=30,
    shell:
        "slidetrain distributed-single --spec '{params.spec}' --threads 1 --out {output} > {log} 2>&1"


rule distributed_equivalence:
    input:
        single=expand("results/bench/distributed/{case}_single.pt", case=DISTRIBUTED_CASES),
        parallel=expand("results/bench/distributed/{case}_parallel.pt", case=DISTRIBUTED_CASES),
        reference=expand("results/bench/distributed/{case}_reference.pt", case=DISTRIBUTED_FLOAT32_CASES),
    output:
        csv=report("results/bench/distributed_equivalence.csv", caption="../report/distributed_equivalence.rst",
                   category="Distributed end-to-end"),
        figure=report("results/figures/distributed_figure3.png", caption="../report/distributed_figure3.rst",
                      category="Distributed end-to-end"),
        figure_data="results/figures/distributed_figure3.csv",  # the plotted points per model and panel
    params:
        pairs=" ".join(f"--pair {c} results/bench/distributed/{c}_single.pt results/bench/distributed/{c}_parallel.pt"
                       for c in DISTRIBUTED_CASES),
        references=" ".join(f"--reference {c} results/bench/distributed/{c}_reference.pt" for c in DISTRIBUTED_FLOAT32_CASES),
    conda:
        "../../envs/slidetrain.yaml"
    log:
        "logs/bench/distributed_equivalence.log",
    benchmark:
        "benchmarks/bench/distributed_equivalence.tsv"
    shell:
        "slidetrain distributed-equivalence {params.pairs} {params.references} --csv {output.csv} --figure {output.figure}"
        " --figure-data {output.figure_data} > {log} 2>&1"


rule distributed_scaling_parallel:
    # `plain` at the same N * k tiles runs in the same job, just before torchrun: on a shared machine
    # only timings taken side by side compare (separate jobs saw loads differ by several times).
    output:
        parallel=temp("results/bench/distributed/scaling_n{n_ranks}.pt"),  # intermediate: the table keeps it
        plain=temp("results/bench/distributed/scaling_plain_n{n_ranks}.pt"),
    params:
        spec=lambda w: json.dumps(_scaling_spec(w.n_ranks)),
        backend=DISTRIBUTED_BENCH.get("backend", "auto"),
        timeout_s=DISTRIBUTED_BENCH.get("timeout_s", 300),
    conda:
        "../../envs/slidetrain.yaml"
    log:
        "logs/bench/distributed/scaling_n{n_ranks}.log",
    benchmark:
        "benchmarks/bench/distributed/scaling_n{n_ranks}.tsv"
    threads: DISTRIBUTED_BENCH.get("threads", 2)  # the whole (small) machine: timed runs must not overlap
    resources:
        nproc=lambda w: int(w.n_ranks) + 1,
        gpu=lambda w: _gpus(int(w.n_ranks) + 1),
        mem_mb=lambda w: 2000 * (int(w.n_ranks) + 1),
        runtime=30,
    shell:
        "(slidetrain distributed-single --spec '{params.spec}' --threads 1 --out {output.plain}"
        " && torchrun --standalone --nproc-per-node {resources.nproc} --no-python"
        " slidetrain distributed-parallel --spec '{params.spec}' --backend {params.backend}"
        " --timeout-s {params.timeout_s} --out {output.parallel}) > {log} 2>&1"


rule distributed_scaling:
    input:
        parallel=expand("results/bench/distributed/scaling_n{n_ranks}.pt", n_ranks=DISTRIBUTED_SCALING.get("n_encoder_ranks", [])),
        plain=expand("results/bench/distributed/scaling_plain_n{n_ranks}.pt", n_ranks=DISTRIBUTED_SCALING.get("n_encoder_ranks", [])),
    output:
        report("results/bench/distributed_scaling.csv", caption="../report/distributed_scaling.rst",
               category="Distributed end-to-end"),
    conda:
        "../../envs/slidetrain.yaml"
    log:
        "logs/bench/distributed_scaling.log",
    benchmark:
        "benchmarks/bench/distributed_scaling.tsv"
    shell:
        "slidetrain distributed-scaling --parallel {input.parallel} --plain {input.plain} --out {output} > {log} 2>&1"


# Old target names, kept as aliases for one release (docs/tilebag.md, "Renamed").
rule e2e_equivalence:  # alias of `distributed_equivalence`
    input:
        rules.distributed_equivalence.output,


rule e2e_scaling:  # alias of `distributed_scaling`
    input:
        rules.distributed_scaling.output,


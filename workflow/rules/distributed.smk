# The distributed tile-bag executor (Campanella et al.): gradient equivalence (Figure 3) and scaling.
# Parallel runs are launched by torchrun (--standalone: one node; nproc from the rule's resources).
# On SLURM, profiles/slurm gives such a job one task and `gpu` GPUs (docs/tilebag.md, "distributed").

# E2E, E2E_CASES, E2E_SCALING and the helpers below them are in common.smk.


wildcard_constraints:
    e2e_case=r"[a-z0-9_]+",
    n_ranks=r"\d+",


rule e2e_single:
    output:
        temp("results/bench/e2e/{e2e_case}_single.pt"),  # tensors per step (100+ MB); the tables keep what matters
    params:
        spec=lambda w: json.dumps(_e2e_spec(w.e2e_case)),
    conda:
        "../../envs/slidetrain.yaml"
    log:
        "logs/bench/e2e/{e2e_case}_single.log",
    benchmark:
        "benchmarks/bench/e2e/{e2e_case}_single.tsv"
    threads: E2E.get("threads", 2)
    resources:
        mem_mb=4000,
        runtime=30,
    shell:
        "slidetrain e2e-single --spec '{params.spec}' --threads 1 --out {output} > {log} 2>&1"


rule e2e_parallel:
    output:
        temp("results/bench/e2e/{e2e_case}_parallel.pt"),  # tensors per step (100+ MB); the tables keep what matters
    params:
        spec=lambda w: json.dumps(_e2e_spec(w.e2e_case)),
        backend=E2E.get("backend", "auto"),
        timeout_s=E2E.get("timeout_s", 300),
    conda:
        "../../envs/slidetrain.yaml"
    log:
        "logs/bench/e2e/{e2e_case}_parallel.log",
    benchmark:
        "benchmarks/bench/e2e/{e2e_case}_parallel.tsv"
    threads: E2E.get("threads", 2)  # the whole (small) machine: timed runs must not overlap
    resources:
        nproc=lambda w: _e2e_nproc(w.e2e_case),
        gpu=lambda w: _gpus(_e2e_nproc(w.e2e_case)),
        mem_mb=lambda w: 2000 * _e2e_nproc(w.e2e_case),
        runtime=30,
    shell:
        "torchrun --standalone --nproc-per-node {resources.nproc} --no-python"
        " slidetrain e2e-parallel --spec '{params.spec}' --backend {params.backend}"
        " --timeout-s {params.timeout_s} --out {output} > {log} 2>&1"


rule e2e_reference:
    # a float32 case's single run in float64: how far plain fp32 itself stands from exact (fp32_noise)
    output:
        temp("results/bench/e2e/{e2e_case}_reference.pt"),
    params:
        spec=lambda w: json.dumps({**_e2e_spec(w.e2e_case), "dtype": "float64"}),
    conda:
        "../../envs/slidetrain.yaml"
    log:
        "logs/bench/e2e/{e2e_case}_reference.log",
    benchmark:
        "benchmarks/bench/e2e/{e2e_case}_reference.tsv"
    threads: E2E.get("threads", 2)
    resources:
        mem_mb=4000,
        runtime=30,
    shell:
        "slidetrain e2e-single --spec '{params.spec}' --threads 1 --out {output} > {log} 2>&1"


rule e2e_equivalence:
    input:
        single=expand("results/bench/e2e/{e2e_case}_single.pt", e2e_case=E2E_CASES),
        parallel=expand("results/bench/e2e/{e2e_case}_parallel.pt", e2e_case=E2E_CASES),
        reference=expand("results/bench/e2e/{e2e_case}_reference.pt", e2e_case=E2E_FLOAT32_CASES),
    output:
        csv=report("results/bench/e2e_equivalence.csv", caption="../report/e2e_equivalence.rst",
                   category="Distributed end-to-end"),
        figure=report("results/figures/e2e_figure3.png", caption="../report/e2e_figure3.rst",
                      category="Distributed end-to-end"),
    params:
        pairs=" ".join(f"--pair {c} results/bench/e2e/{c}_single.pt results/bench/e2e/{c}_parallel.pt"
                       for c in E2E_CASES),
        references=" ".join(f"--reference {c} results/bench/e2e/{c}_reference.pt" for c in E2E_FLOAT32_CASES),
    conda:
        "../../envs/slidetrain.yaml"
    log:
        "logs/bench/e2e_equivalence.log",
    benchmark:
        "benchmarks/bench/e2e_equivalence.tsv"
    shell:
        "slidetrain e2e-equivalence {params.pairs} {params.references} --csv {output.csv} --figure {output.figure} > {log} 2>&1"


rule e2e_scaling_parallel:
    # `plain` at the same N * k tiles runs in the same job, just before torchrun: on a shared machine
    # only timings taken side by side compare (separate jobs saw loads differ by several times).
    output:
        parallel=temp("results/bench/e2e/scaling_n{n_ranks}.pt"),  # intermediate: the table keeps it
        plain=temp("results/bench/e2e/scaling_plain_n{n_ranks}.pt"),
    params:
        spec=lambda w: json.dumps(_scaling_spec(w.n_ranks)),
        backend=E2E.get("backend", "auto"),
        timeout_s=E2E.get("timeout_s", 300),
    conda:
        "../../envs/slidetrain.yaml"
    log:
        "logs/bench/e2e/scaling_n{n_ranks}.log",
    benchmark:
        "benchmarks/bench/e2e/scaling_n{n_ranks}.tsv"
    threads: E2E.get("threads", 2)  # the whole (small) machine: timed runs must not overlap
    resources:
        nproc=lambda w: int(w.n_ranks) + 1,
        gpu=lambda w: _gpus(int(w.n_ranks) + 1),
        mem_mb=lambda w: 2000 * (int(w.n_ranks) + 1),
        runtime=30,
    shell:
        "(slidetrain e2e-single --spec '{params.spec}' --threads 1 --out {output.plain}"
        " && torchrun --standalone --nproc-per-node {resources.nproc} --no-python"
        " slidetrain e2e-parallel --spec '{params.spec}' --backend {params.backend}"
        " --timeout-s {params.timeout_s} --out {output.parallel}) > {log} 2>&1"


rule e2e_scaling:
    input:
        parallel=expand("results/bench/e2e/scaling_n{n_ranks}.pt", n_ranks=E2E_SCALING.get("n_encoder_ranks", [])),
        plain=expand("results/bench/e2e/scaling_plain_n{n_ranks}.pt", n_ranks=E2E_SCALING.get("n_encoder_ranks", [])),
    output:
        report("results/bench/e2e_scaling.csv", caption="../report/e2e_scaling.rst",
               category="Distributed end-to-end"),
    conda:
        "../../envs/slidetrain.yaml"
    log:
        "logs/bench/e2e_scaling.log",
    benchmark:
        "benchmarks/bench/e2e_scaling.tsv"
    shell:
        "slidetrain e2e-scaling --parallel {input.parallel} --plain {input.plain} --out {output} > {log} 2>&1"

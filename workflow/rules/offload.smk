# Big-Layers: the offload engine's equivalence to plain PyTorch, and Figure 2's sweep.


OFFLOAD_BENCH = config.get("bench", {}).get("offload", {})


rule offload_equivalence:
    output:
        report("results/bench/offload_equivalence.csv", caption="../report/offload_equivalence.rst", category="Big-Layers"),
    conda:
        "../../envs/slidetrain.yaml"
    log:
        "logs/bench/offload_equivalence.log",
    benchmark:
        "benchmarks/bench/offload_equivalence.tsv"
    resources:
        mem_mb=2000,
        runtime=20,
    shell:
        "OMP_NUM_THREADS=1 slidetrain bench-offload-equivalence --out {output} > {log} 2>&1"


rule offload_sweep:
    output:
        report("results/bench/offload_sweep.csv", caption="../report/offload_sweep.rst", category="Big-Layers"),
    params:
        sides=" ".join(str(s) for s in OFFLOAD_BENCH.get("sides", [256, 384, 512, 768, 1024])),
        budget_mb=OFFLOAD_BENCH.get("budget_mb", 300),
        device=OFFLOAD_BENCH.get("device", "cpu"),
        warmup=OFFLOAD_BENCH.get("warmup", 5),
        repeats=OFFLOAD_BENCH.get("repeats", 10),
        max_transfer_mb=OFFLOAD_BENCH.get("max_transfer_mb", 256),
    threads: OFFLOAD_BENCH.get("threads", 2)
    conda:
        "../../envs/slidetrain.yaml"
    log:
        "logs/bench/offload_sweep.log",
    benchmark:
        "benchmarks/bench/offload_sweep.tsv"
    resources:
        mem_mb=OFFLOAD_BENCH.get("mem_mb", 6000),
        runtime=60,
    shell:
        "slidetrain bench-offload-sweep --sides {params.sides} --budget-mb {params.budget_mb}"
        " --device {params.device} --warmup {params.warmup} --repeats {params.repeats}"
        " --max-transfer-mb {params.max_transfer_mb} --threads {threads} --out {output} > {log} 2>&1"


rule offload_figure2:
    input:
        "results/bench/offload_sweep.csv",
    output:
        figure=report("results/figures/offload_figure2.png", caption="../report/offload_figure2.rst", category="Big-Layers"),
        data="results/figures/offload_figure2.csv",  # the plotted points, one series per kind
    conda:
        "../../envs/slidetrain.yaml"
    log:
        "logs/figures/offload_figure2.log",
    benchmark:
        "benchmarks/figures/offload_figure2.tsv"
    shell:
        "slidetrain offload-figure --sweep {input} --out {output.figure} --out-data {output.data} > {log} 2>&1"

# Slides the pipeline makes itself: the synthetic dataset (deterministic from the sheet and seed),
# drawn a shard at a time into resources/{dataset}/slides/{slide}.tiff (+ .truth.npz).


rule synthesize_shard:
    output:
        "results/{dataset}/shards/synthesize/{shard}.tsv",
    params:
        args=synthesize_shard_args,
    conda:
        "../../envs/slidetrain.yaml"
    log:
        "logs/{dataset}/synthesize/{shard}.log",
    benchmark:
        "benchmarks/{dataset}/synthesize/{shard}.tsv"
    resources:
        mem_mb=2000,
        runtime=lambda w: 10 + 2 * len(shard_members(w)),
    shell:
        "slidetrain synthesize-shard --shard {wildcards.shard} {params.args}"
        " --out-dir resources/{wildcards.dataset}/slides --manifest {output} > {log} 2>&1"

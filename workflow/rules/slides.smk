# Slides the pipeline makes itself: the synthetic dataset (deterministic from the sheet and seed).


rule synthesize_slide:
    output:
        slide="resources/{dataset}/slides/{slide}.tiff",
        truth="resources/{dataset}/slides/{slide}.truth.npz",
    params:
        args=synthesize_args,
    conda:
        "../../envs/slidetrain.yaml"
    log:
        "logs/{dataset}/synthesize/{slide}.log",
    benchmark:
        "benchmarks/{dataset}/synthesize/{slide}.tsv"
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "slidetrain synthesize --slide-id {wildcards.slide} {params.args}"
        " --out {output.slide} --truth {output.truth} > {log} 2>&1"

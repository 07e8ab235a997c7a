# Slides the pipeline makes itself: the synthetic dataset (deterministic from the sheet and seed).


rule synthesize_slide:
    output:
        slide="resources/{dataset}/slides/{slide}.tiff",
        truth="resources/{dataset}/slides/{slide}.truth.npz",
    params:
        label=lambda w: slide_row(w.dataset, w.slide).label,
        seed=lambda w: dataset_cfg(w.dataset)["synthetic_seed"],
        size=lambda w: " ".join(map(str, dataset_cfg(w.dataset)["synthetic_size_range_px"])),
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
        "slidetrain synthesize --slide-id {wildcards.slide} --label {params.label} --seed {params.seed}"
        " --size-range-px {params.size} --out {output.slide} --truth {output.truth} > {log} 2>&1"

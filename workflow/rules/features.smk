# Frozen tile features per slide and encoder. On a cluster, `group: "features"` lets the executor
# bundle many slides into one submission (--group-components features=64).


rule extract_features:
    input:
        slide=slide_input,
        tiles="results/{dataset}/tiles/{slide}.h5",
    output:
        "results/{dataset}/features/{encoder}/{slide}.h5",
    params:
        weights=config["features"]["weights"],
        batch_size=config["features"]["batch_size"],
        device=config["features"]["device"],
        mpp=lambda w: (
            f"--mpp-fallback {dataset_cfg(w.dataset)['mpp_fallback']}"
            if dataset_cfg(w.dataset).get("mpp_fallback")
            else ""
        ),
    conda:
        "../../envs/slidetrain.yaml"
    log:
        "logs/{dataset}/features/{encoder}/{slide}.log",
    benchmark:
        "benchmarks/{dataset}/features/{encoder}/{slide}.tsv"
    threads: config["features"].get("threads", 1)
    group:
        "features"
    resources:
        mem_mb=4000,
        runtime=30,
        gpu=1 if config["features"]["device"].startswith("cuda") else 0,
    shell:
        "slidetrain features --slides {wildcards.slide}={input.slide:q}"
        " --tiles-dir $(dirname {input.tiles}) --out-dir $(dirname {output})"
        " --encoder {wildcards.encoder} --weights {params.weights:q} --batch-size {params.batch_size}"
        " --device {params.device} --threads {threads} {params.mpp} > {log} 2>&1"

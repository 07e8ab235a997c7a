# Frozen tile features per slide and encoder. On a cluster, profiles/slurm groups these jobs so that
# one submission runs many slides.


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
        mpp=mpp_arg,
    conda:
        "../../envs/slidetrain.yaml"
    log:
        "logs/{dataset}/features/{encoder}/{slide}.log",
    benchmark:
        "benchmarks/{dataset}/features/{encoder}/{slide}.tsv"
    threads: config["features"].get("threads", 1)
    resources:
        mem_mb=4000,
        runtime=30,
        gpu=1 if config["features"]["device"].startswith("cuda") else 0,
    shell:
        "slidetrain features --slides {wildcards.slide}={input.slide:q}"
        " --tiles-dir $(dirname {input.tiles}) --out-dir $(dirname {output})"
        " --encoder {wildcards.encoder} --weights {params.weights:q} --batch-size {params.batch_size}"
        " --device {params.device} --threads {threads} {params.mpp} > {log} 2>&1"


rule feature_index:
    input:
        lambda w: expand(
            "results/{dataset}/features/{encoder}/{slide}.h5",
            dataset=w.dataset, encoder=w.encoder, slide=slide_ids(w.dataset),
        ),
    output:
        "results/{dataset}/features/{encoder}/index.csv",
    conda:
        "../../envs/slidetrain.yaml"
    log:
        "logs/{dataset}/features/{encoder}/index.log",
    benchmark:
        "benchmarks/{dataset}/features/{encoder}/index.tsv"
    shell:
        "slidetrain feature-index --features {input} --out {output} > {log} 2>&1"

# Frozen tile features per shard of slides and encoder: one process loads the encoder once and reads
# tiles in worker processes while it encodes. Per-slide files: results/{dataset}/features/{encoder}/{slide}.h5.


rule extract_features_shard:
    input:
        preprocess="results/{dataset}/shards/preprocess/{shard}.tsv",
        slides=shard_slide_inputs,
        weights=weights_files(config["features"]),
    output:
        "results/{dataset}/shards/features/{encoder}/{shard}.tsv",
    params:
        slides=shard_slides_arg,
        # the weights file as the job's input names it (none, imagenet or a foundation model's name otherwise)
        weights=lambda w, input: input.weights[0] if len(input.weights) else config["features"]["weights"],
        # passed only when set: an empty value would be a missing argument
        sha256=f"--weights-sha256 {config['features']['sha256']}" if config["features"].get("sha256") else "",
        batch_size=config["features"]["batch_size"],
        device=config["features"]["device"],
        workers=config["features"].get("workers", 0),
        amp="--amp" if config["features"].get("amp") else "",
        mpp=mpp_arg,
    conda:
        "../../envs/slidetrain.yaml"
    log:
        "logs/{dataset}/features/{encoder}/{shard}.log",
    benchmark:
        "benchmarks/{dataset}/features/{encoder}/{shard}.tsv"
    threads: config["features"].get("threads", 1)
    resources:
        mem_mb=4000,
        runtime=lambda w: 10 + 2 * len(shard_members(w)),
        gpu=1 if config["features"]["device"].startswith("cuda") else 0,
    shell:
        "slidetrain features --shard {wildcards.shard} --slides {params.slides}"
        " --tiles-dir results/{wildcards.dataset}/tiles --out-dir results/{wildcards.dataset}/features/{wildcards.encoder}"
        " --encoder {wildcards.encoder} --weights {params.weights:q} {params.sha256} --batch-size {params.batch_size}"
        " --device {params.device} --threads {threads} --workers {params.workers} {params.amp} {params.mpp}"
        " --manifest {output} > {log} 2>&1"


# Features other tools wrote (datasets.X.features_dir, TRIDENT's or CLAM's per-slide h5 layout): no tiling
# nor extraction job; one job checks that every slide of the sheet has a file with tiles, all of one
# dimension (an error names the slide and the folder), and the MIL runs read the folder itself.
rule external_feature_index:
    input:
        sheet=lambda w: dataset_cfg(w.dataset)["sheet"],
        features=external_features_dir,  # the folder: files added or removed rerun the check
    output:
        "results/{dataset}/external_features/index.csv",
    params:
        classes=lambda w: " ".join(dataset_cfg(w.dataset)["classes"]),
    conda:
        "../../envs/slidetrain.yaml"
    log:
        "logs/{dataset}/external_features/index.log",
    benchmark:
        "benchmarks/{dataset}/external_features/index.tsv"
    shell:
        "slidetrain external-feature-index --features-dir {input.features:q} --sheet {input.sheet}"
        " --classes {params.classes} --out {output} > {log} 2>&1"


rule feature_index:
    input:
        lambda w: manifests(w.dataset, features_step(w.encoder)),
    output:
        "results/{dataset}/features/{encoder}/index.csv",
    conda:
        "../../envs/slidetrain.yaml"
    log:
        "logs/{dataset}/features/{encoder}/index.log",
    benchmark:
        "benchmarks/{dataset}/features/{encoder}/index.tsv"
    shell:
        "slidetrain feature-index --manifests {input} --out {output} > {log} 2>&1"

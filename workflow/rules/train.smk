# Train one method on one split with one seed; score the test part once. MIL aggregators train on
# cached tile features, whole-image learners (local learning, E2E, StreamingCNN) on the slide images;
# both write the same run files, so tables need not know which is which.


rule train_mil:
    wildcard_constraints:
        method=_method_regex(MIL_METHODS),
    input:
        split="results/{dataset}/splits/{split}.csv",
        features=feature_index,
    output:
        model="results/{dataset}/runs/{method}/{split}/{seed}/model.pt",
        history="results/{dataset}/runs/{method}/{split}/{seed}/history.csv",
        provenance="results/{dataset}/runs/{method}/{split}/{seed}/run.json",
    params:
        method_params=lambda w: method_params(w.method),
        classes=lambda w: " ".join(dataset_cfg(w.dataset)["classes"]),
        features_dir=features_dir,
    conda:
        "../../envs/slidetrain.yaml"
    log:
        "logs/{dataset}/runs/{method}/{split}/{seed}/train.log",
    benchmark:
        "benchmarks/{dataset}/runs/{method}/{split}/{seed}/train.tsv"
    threads: config.get("training", {}).get("threads", 1)
    resources:
        mem_mb=8000,
        runtime=120,
    shell:
        "slidetrain train-mil --method {wildcards.method} --params '{params.method_params}'"
        " --split {input.split} --features {params.features_dir:q} --classes {params.classes}"
        " --out $(dirname {output.model}) --seed {wildcards.seed} --threads {threads} > {log} 2>&1"


rule evaluate_mil:
    wildcard_constraints:
        method=_method_regex(MIL_METHODS),
    input:
        model="results/{dataset}/runs/{method}/{split}/{seed}/model.pt",
        split="results/{dataset}/splits/{split}.csv",
        features=feature_index,
    output:
        predictions="results/{dataset}/runs/{method}/{split}/{seed}/predictions.csv",
        metrics="results/{dataset}/runs/{method}/{split}/{seed}/metrics.json",
        attention="results/{dataset}/runs/{method}/{split}/{seed}/attention.h5",
    params:
        classes=lambda w: " ".join(dataset_cfg(w.dataset)["classes"]),
        features_dir=features_dir,
        ordinal=lambda w: "--ordinal" if dataset_cfg(w.dataset).get("ordinal") else "",
        n_bootstrap=config.get("evaluation", {}).get("n_bootstrap", 1000),
    conda:
        "../../envs/slidetrain.yaml"
    log:
        "logs/{dataset}/runs/{method}/{split}/{seed}/evaluate.log",
    benchmark:
        "benchmarks/{dataset}/runs/{method}/{split}/{seed}/evaluate.tsv"
    resources:
        mem_mb=4000,
        runtime=30,
    shell:
        "slidetrain evaluate-mil --model {input.model} --split {input.split} --features {params.features_dir:q}"
        " --classes {params.classes} --predictions {output.predictions} --metrics {output.metrics}"
        " --attention {output.attention} {params.ordinal} --n-bootstrap {params.n_bootstrap}"
        " --seed {wildcards.seed} > {log} 2>&1"


rule train_image:
    wildcard_constraints:
        method=_method_regex(IMAGE_METHODS),
    input:
        split="results/{dataset}/splits/{split}.csv",
        # every slide image exists (or is listed as excluded) once the QC status table does, or (a features_dir
        # dataset, whose status comes from its feature index) once its preprocess manifests do
        status="results/{dataset}/qc/status.csv",
        weights=lambda w: weights_files(method_params(w.method)),
        preprocessed=preprocessed_for_slides,
    output:
        model="results/{dataset}/runs/{method}/{split}/{seed}/model.pt",
        history="results/{dataset}/runs/{method}/{split}/{seed}/history.csv",
        provenance="results/{dataset}/runs/{method}/{split}/{seed}/run.json",
    params:
        method_params=lambda w: method_params(w.method),
        classes=lambda w: " ".join(dataset_cfg(w.dataset)["classes"]),
        images=lambda w: images_dir(w.dataset),
        device=_image_device(),
    conda:
        "../../envs/slidetrain.yaml"
    log:
        "logs/{dataset}/runs/{method}/{split}/{seed}/train.log",
    benchmark:
        "benchmarks/{dataset}/runs/{method}/{split}/{seed}/train.tsv"
    threads: config.get("training", {}).get("threads", 1)
    resources:
        mem_mb=config.get("training", {}).get("image_mem_mb", 16000),
        runtime=24 * 60,
        gpu=1 if _image_device().startswith("cuda") else 0,
    shell:
        "slidetrain train-image --method {wildcards.method} --params '{params.method_params}'"
        " --split {input.split} --images {params.images} --classes {params.classes}"
        " --out $(dirname {output.model}) --seed {wildcards.seed} --threads {threads}"
        " --device {params.device} > {log} 2>&1"


rule evaluate_image:
    wildcard_constraints:
        method=_method_regex(IMAGE_METHODS),
    input:
        model="results/{dataset}/runs/{method}/{split}/{seed}/model.pt",
        split="results/{dataset}/splits/{split}.csv",
        status="results/{dataset}/qc/status.csv",
        preprocessed=preprocessed_for_slides,
    output:
        predictions="results/{dataset}/runs/{method}/{split}/{seed}/predictions.csv",
        metrics="results/{dataset}/runs/{method}/{split}/{seed}/metrics.json",
    params:
        classes=lambda w: " ".join(dataset_cfg(w.dataset)["classes"]),
        images=lambda w: images_dir(w.dataset),
        ordinal=lambda w: "--ordinal" if dataset_cfg(w.dataset).get("ordinal") else "",
        n_bootstrap=config.get("evaluation", {}).get("n_bootstrap", 1000),
        device=_image_device(),
    conda:
        "../../envs/slidetrain.yaml"
    log:
        "logs/{dataset}/runs/{method}/{split}/{seed}/evaluate.log",
    benchmark:
        "benchmarks/{dataset}/runs/{method}/{split}/{seed}/evaluate.tsv"
    threads: config.get("training", {}).get("threads", 1)
    resources:
        mem_mb=config.get("training", {}).get("image_mem_mb", 16000),
        runtime=60,
        gpu=1 if _image_device().startswith("cuda") else 0,
    shell:
        "slidetrain evaluate-image --model {input.model} --split {input.split} --images {params.images}"
        " --classes {params.classes} --predictions {output.predictions} --metrics {output.metrics}"
        " {params.ordinal} --n-bootstrap {params.n_bootstrap} --seed {wildcards.seed}"
        " --device {params.device} > {log} 2>&1"

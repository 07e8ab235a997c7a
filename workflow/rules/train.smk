# Train one method on one split with one seed; score the test part once.


rule train_mil:
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
        features_dir=lambda w: f"results/{w.dataset}/features/{config['features']['encoder']}",
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
        " --split {input.split} --features {params.features_dir} --classes {params.classes}"
        " --out $(dirname {output.model}) --seed {wildcards.seed} --threads {threads} > {log} 2>&1"


rule evaluate_mil:
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
        features_dir=lambda w: f"results/{w.dataset}/features/{config['features']['encoder']}",
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
        "slidetrain evaluate-mil --model {input.model} --split {input.split} --features {params.features_dir}"
        " --classes {params.classes} --predictions {output.predictions} --metrics {output.metrics}"
        " --attention {output.attention} {params.ordinal} --n-bootstrap {params.n_bootstrap}"
        " --seed {wildcards.seed} > {log} 2>&1"

# The papers' tables from run metrics, with the papers' values beside ours.



rule table1:
    input:
        metrics=table1_metrics,
        # QC of Table 1's own datasets (not results/qc/excluded.csv: that plans every dataset of the config)
        qc=expand("results/{dataset}/qc/status.csv", dataset=config["table1"]["datasets"]),
        # the excluded slides' QC pictures: in the report of Table 1 (`snakemake --report`)
        qc_pictures=expand("results/{dataset}/qc/excluded.html", dataset=config["table1"]["datasets"]),
    output:
        csv="results/tables/table1.csv",
        md="results/tables/table1.md",
        html=report("results/tables/table1.html", caption="../report/table1.rst", category="Tables"),
    params:
        paper_names=" ".join(
            f"{d}={dataset_cfg(d)['paper_name']}" for d in config["table1"]["datasets"] if dataset_cfg(d).get("paper_name")
        ),
        not_applicable=" ".join(
            f"{m}:{d}"
            for d in config["table1"]["datasets"]
            for m in config["table1"]["methods"]
            if not table1_applicable(m, d)
        ),
        order=" ".join(config["table1"]["methods"]),
    conda:
        "../../envs/slidetrain.yaml"
    log:
        "logs/tables/table1.log",
    benchmark:
        "benchmarks/tables/table1.tsv"
    shell:
        "slidetrain table1 --metrics {input.metrics} --out-csv {output.csv} --out-md {output.md}"
        " --paper-names {params.paper_names} --not-applicable {params.not_applicable}"
        " --method-order {params.order} --out-html {output.html} > {log} 2>&1"


rule attention_figure:
    input:
        table1="results/tables/table1.csv",
        attention=lambda w: expand(
            "results/{dataset}/runs/{method}/{split}/{seed}/attention.h5",
            dataset=w.dataset, method=attention_methods(w.dataset), split=SPLITS[0], seed=SEEDS[0],
        ),
        # images and tiles of every slide (the manifests name them), truth masks of synthetic slides
        preprocess=lambda w: manifests(w.dataset, "preprocess"),
        truth=lambda w: manifests(w.dataset, "synthesize") if is_synthetic(w.dataset) else [],
    output:
        figure=report(
            "results/figures/attention_{dataset}.png",
            caption="../report/attention.rst",
            category="Figures",
        ),
        # the drawn attention per tile of each shown slide (what the figure plots)
        data="results/figures/attention_{dataset}.csv",
    params:
        classes=lambda w: " ".join(dataset_cfg(w.dataset)["classes"]),
        methods=lambda w: " ".join(attention_methods(w.dataset)),
        truth=lambda w: f"--truth-dir resources/{w.dataset}/slides" if is_synthetic(w.dataset) else "",
        split=SPLITS[0],
        seed=SEEDS[0],
    conda:
        "../../envs/slidetrain.yaml"
    log:
        "logs/figures/attention_{dataset}.log",
    benchmark:
        "benchmarks/figures/attention_{dataset}.tsv"
    shell:
        "slidetrain attention-figure --dataset {wildcards.dataset} --table1 {input.table1}"
        " --runs-dir results/{wildcards.dataset}/runs --images-dir results/{wildcards.dataset}/images"
        " --tiles-dir results/{wildcards.dataset}/tiles {params.truth} --classes {params.classes}"
        " --methods {params.methods} --split {params.split} --seed {params.seed} --out {output.figure}"
        " --out-data {output.data} > {log} 2>&1"


rule table4:
    input:
        metrics=table4_metrics,
    output:
        csv="results/tables/table4.csv",
        md="results/tables/table4.md",
        html=report("results/tables/table4.html", caption="../report/table4.rst", category="Tables"),
    params:
        paper_names=" ".join(
            f"{d}={dataset_cfg(d)['paper_name']}" for d in config["table4"]["datasets"] if dataset_cfg(d).get("paper_name")
        ),
    conda:
        "../../envs/slidetrain.yaml"
    log:
        "logs/tables/table4.log",
    benchmark:
        "benchmarks/tables/table4.tsv"
    shell:
        "slidetrain table4 --metrics {input.metrics} --out-csv {output.csv} --out-md {output.md}"
        " --paper-names {params.paper_names} --out-html {output.html} > {log} 2>&1"

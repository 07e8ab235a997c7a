# The papers' tables from run metrics, with the papers' values beside ours.



rule table1:
    input:
        metrics=table1_metrics,
        qc="results/qc/excluded.csv",
    output:
        csv="results/tables/table1.csv",
        md="results/tables/table1.md",
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
        " --method-order {params.order} > {log} 2>&1"

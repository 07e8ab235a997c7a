# Per shard of slides, reading each slide once: tissue mask (+ QC picture), tile coordinates, the
# whole-slide image, at the per-slide paths results/{dataset}/{masks,tiles,images,timings,qc/status}/.


rule preprocess_shard:
    input:
        shard_slide_inputs,
    output:
        "results/{dataset}/shards/preprocess/{shard}.tsv",
    params:
        slides=shard_slides_arg,
        args=preprocess_args,
    conda:
        "../../envs/slidetrain.yaml"
    log:
        "logs/{dataset}/preprocess/{shard}.log",
    benchmark:
        "benchmarks/{dataset}/preprocess/{shard}.tsv"
    resources:
        mem_mb=4000,
        runtime=lambda w: 10 + 5 * len(shard_members(w)),
    shell:
        "slidetrain preprocess-shard --shard {wildcards.shard} --slides {params.slides}"
        " --out-root results/{wildcards.dataset} {params.args} --manifest {output} > {log} 2>&1"


rule qc_status:
    # from the preprocess shard manifests; for a dataset of features other tools wrote (features_dir), from
    # their checked index: every slide ok, nothing preprocessed
    input:
        qc_status_inputs,
    output:
        "results/{dataset}/qc/status.csv",
    params:
        source=qc_status_option,
    conda:
        "../../envs/slidetrain.yaml"
    log:
        "logs/{dataset}/qc_status.log",
    benchmark:
        "benchmarks/{dataset}/qc_status.tsv"
    shell:
        "slidetrain qc-status {params.source} {input} --out {output} > {log} 2>&1"


rule qc_table:
    input:
        expand("results/{dataset}/qc/status.csv", dataset=MAIN_SHEETS),
    output:
        "results/qc/excluded.csv",
    conda:
        "../../envs/slidetrain.yaml"
    log:
        "logs/qc_table.log",
    benchmark:
        "benchmarks/qc_table.tsv"
    shell:
        "slidetrain qc-table --status {input} --out {output} > {log} 2>&1"


# The QC pictures of a dataset's excluded slides (on_bad_slide: exclude) on one page, for the report.
rule qc_pictures:
    input:
        status="results/{dataset}/qc/status.csv",
        preprocess=qc_picture_inputs,  # the pictures: masks/{slide}.qc.jpg
    output:
        report(
            "results/{dataset}/qc/excluded.html",
            caption="../report/qc_pictures.rst",
            category="Quality control",
        ),
    conda:
        "../../envs/slidetrain.yaml"
    log:
        "logs/{dataset}/qc_pictures.log",
    benchmark:
        "benchmarks/{dataset}/qc_pictures.tsv"
    shell:
        "slidetrain qc-pictures --status {input.status} --pictures-dir results/{wildcards.dataset}/masks"
        " --dataset {wildcards.dataset} --out {output} > {log} 2>&1"

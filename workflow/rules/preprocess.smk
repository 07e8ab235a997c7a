# Per slide, reading the slide once: tissue mask (+ QC picture), tile coordinates, the whole-slide image.



rule preprocess_slide:
    input:
        slide=slide_input,
    output:
        mask="results/{dataset}/masks/{slide}.mask.png",
        qc="results/{dataset}/masks/{slide}.qc.jpg",
        tiles="results/{dataset}/tiles/{slide}.h5",
        image="results/{dataset}/images/{slide}.jpg",
        image_meta="results/{dataset}/images/{slide}.json",
        timings="results/{dataset}/timings/{slide}.json",
        status="results/{dataset}/qc/status/{slide}.json",
    params:
        args=preprocess_args,
    conda:
        "../../envs/slidetrain.yaml"
    log:
        "logs/{dataset}/preprocess/{slide}.log",
    benchmark:
        "benchmarks/{dataset}/preprocess/{slide}.tsv"
    resources:
        mem_mb=4000,
        runtime=30,
    shell:
        "slidetrain preprocess --slide {input.slide:q} --slide-id {wildcards.slide} {params.args}"
        " --mask {output.mask} --qc {output.qc} --tiles {output.tiles} --image {output.image}"
        " --image-meta {output.image_meta} --timings {output.timings} --status {output.status} > {log} 2>&1"


rule qc_status:
    input:
        lambda w: statuses(w.dataset),
    output:
        "results/{dataset}/qc/status.csv",
    conda:
        "../../envs/slidetrain.yaml"
    log:
        "logs/{dataset}/qc_status.log",
    benchmark:
        "benchmarks/{dataset}/qc_status.tsv"
    shell:
        "slidetrain qc-status --status {input} --out {output} > {log} 2>&1"


rule qc_table:
    input:
        expand("results/{dataset}/qc/status.csv", dataset=SHEETS),
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

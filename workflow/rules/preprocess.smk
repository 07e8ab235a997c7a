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
        outputs=lambda w, output: json.dumps(
            {
                "mask_png": output.mask,
                "qc_path": output.qc,
                "tiles_h5": output.tiles,
                "image_path": output.image,
                "image_meta_json": output.image_meta,
                "timings_json": output.timings,
            }
        ),
        params=preprocess_params,
        on_bad_slide=config["preprocess"]["on_bad_slide"],
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
        "slidetrain preprocess --slide {input.slide:q} --slide-id {wildcards.slide}"
        " --outputs '{params.outputs}' --params '{params.params}'"
        " --on-bad-slide {params.on_bad_slide} --status {output.status} > {log} 2>&1"


rule qc_table:
    input:
        [statuses(d) for d in SHEETS],
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

# Slides whose sheet names a remote source (gdc:, s3://, kaggle:, http(s)://) are fetched one file per
# job to resources/{dataset}/slides/{slide}.{ext}, the path slide_file() hands the per-slide rules.
# A job is resumable (the partial file survives a kill) and verified (size, md5 from the sheet).
# `--resources downloads=N` (profiles/) caps concurrent downloads; each job holds one.


# Downloads are I/O: on a cluster they run on the submit host (compute nodes often have no internet).
localrules:
    download_slide,


rule download_slide:
    wildcard_constraints:
        dataset=_method_regex(REMOTE_DATASETS),
        ext="|".join(SLIDE_EXTENSIONS),
    output:
        "resources/{dataset}/slides/{slide}.{ext}",
    params:
        args=download_args,
    conda:
        "../../envs/slidetrain.yaml"
    log:
        "logs/{dataset}/download/{slide}.{ext}.log",
    benchmark:
        "benchmarks/{dataset}/download/{slide}.{ext}.tsv"
    resources:
        downloads=1,
        mem_mb=1000,
        runtime=240,
    shell:
        "slidetrain download {params.args} --slide-id {wildcards.slide} --out {output:q} > {log} 2>&1"

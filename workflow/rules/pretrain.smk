# Self-supervised pretraining of the default encoders (slidetrain.train.pretrain): SimCLR on the tiles
# of the pretraining cohort, a dataset drawn for it alone (pretrain_only: never split, trained or tested
# on). results/pretrain/{arch}/encoder.pt is a local state dict like any other `weights:` file; a job
# whose config names it lists it as an input, so Snakemake builds it first. docs/pretraining.md.


rule pretrain_encoder:
    input:
        pretrain_cohort_manifests,
    output:
        encoder="results/pretrain/{arch}/encoder.pt",
        history="results/pretrain/{arch}/history.csv",
        qc=report("results/pretrain/{arch}/qc.png", category="Pretraining"),
        qc_data="results/pretrain/{arch}/qc.csv",
    wildcard_constraints:
        arch="resnet18|resnet34|resnet50",
    params:
        cohort=pretrain_cohort_args,
        params=lambda w: json.dumps(config["pretrain"].get("params", {})),
        max_tiles=lambda w: config["pretrain"].get("max_tiles_per_slide", 64),
    conda:
        "../../envs/slidetrain.yaml"
    log:
        "logs/pretrain/{arch}.log",
    benchmark:
        "benchmarks/pretrain/{arch}.tsv"
    threads: config.get("pretrain", {}).get("threads", 1)
    resources:
        mem_mb=4000,
        runtime=60,
    shell:
        "slidetrain pretrain --arch {wildcards.arch} {params.cohort} --max-tiles-per-slide {params.max_tiles}"
        " --params {params.params:q} --threads {threads} --out-dir results/pretrain/{wildcards.arch} > {log} 2>&1"


# Quality of the pretrained encoder: a linear probe of the slide label on mean-pooled frozen features,
# fitted on the probe split's training part and read on its validation part; random init beside it.
rule pretrain_probe:
    input:
        encoder="results/pretrain/{arch}/encoder.pt",
        split=pretrain_probe_split,
        preprocess=pretrain_probe_manifests,
    output:
        "results/pretrain/{arch}/probe.csv",
    wildcard_constraints:
        arch="resnet18|resnet34|resnet50",
    params:
        data=pretrain_probe_args,
        max_tiles=lambda w: config["pretrain"]["probe"].get("max_tiles_per_slide", 32),
    conda:
        "../../envs/slidetrain.yaml"
    log:
        "logs/pretrain/{arch}_probe.log",
    benchmark:
        "benchmarks/pretrain/{arch}_probe.tsv"
    threads: config.get("pretrain", {}).get("threads", 1)
    shell:
        "slidetrain pretrain-probe --arch {wildcards.arch} --weights {input.encoder} {params.data}"
        " --max-tiles-per-slide {params.max_tiles} --split {input.split} --threads {threads} --out {output} > {log} 2>&1"


rule pretrain:
    input:
        expand("results/pretrain/{arch}/{f}", arch=config.get("pretrain", {}).get("archs", []), f=["encoder.pt", "probe.csv"]),

# Self-supervised pretraining of the default encoders (slidetrain.train.pretrain): SimCLR on the tiles
# of the pretraining cohort, a dataset drawn for it alone (pretrain_only: never split, trained or tested
# on). results/pretrain/{arch}/encoder.pt is a local state dict like any other `weights:` file; the
# default config names it wherever the papers start from ImageNet, so Snakemake builds it first.


def pretrain_cohort():
    cohort = config["pretrain"]["cohort"]
    if not dataset_cfg(cohort).get("pretrain_only", False):
        raise ValueError(f"pretrain.cohort: dataset {cohort!r} must be marked pretrain_only: true")
    return cohort


def pretrain_cohort_args(wildcards):
    cohort = pretrain_cohort()
    return (
        f"--sheet {dataset_cfg(cohort)['sheet']} --slides-dir resources/{cohort}/slides"
        f" --tiles-dir results/{cohort}/tiles --tile-px {config['preprocess']['tile_px']}"
        f" --target-magnification {config['preprocess']['target_magnification']}"
    )


rule pretrain_encoder:
    input:
        lambda w: manifests(pretrain_cohort(), "preprocess"),
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
        max_tiles=config["pretrain"].get("max_tiles_per_slide", 64),
    conda:
        "../../envs/slidetrain.yaml"
    log:
        "logs/pretrain/{arch}.log",
    benchmark:
        "benchmarks/pretrain/{arch}.tsv"
    threads: config["pretrain"].get("threads", 1)
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
        split=lambda w: f"results/{config['pretrain']['probe']['dataset']}/splits/{config['pretrain']['probe']['split']}.csv",
        preprocess=lambda w: manifests(config["pretrain"]["probe"]["dataset"], "preprocess"),
    output:
        "results/pretrain/{arch}/probe.csv",
    params:
        sheet=lambda w: dataset_cfg(config["pretrain"]["probe"]["dataset"])["sheet"],
        dataset=config["pretrain"]["probe"]["dataset"],
        classes=lambda w: " ".join(dataset_cfg(config["pretrain"]["probe"]["dataset"])["classes"]),
        ordinal=lambda w: "--ordinal" if dataset_cfg(config["pretrain"]["probe"]["dataset"]).get("ordinal") else "",
        max_tiles=config["pretrain"]["probe"].get("max_tiles_per_slide", 32),
    conda:
        "../../envs/slidetrain.yaml"
    log:
        "logs/pretrain/{arch}_probe.log",
    benchmark:
        "benchmarks/pretrain/{arch}_probe.tsv"
    threads: config["pretrain"].get("threads", 1)
    shell:
        "slidetrain pretrain-probe --arch {wildcards.arch} --weights {input.encoder} --sheet {params.sheet}"
        " --slides-dir resources/{params.dataset}/slides --tiles-dir results/{params.dataset}/tiles"
        " --tile-px {config[preprocess][tile_px]} --target-magnification {config[preprocess][target_magnification]}"
        " --max-tiles-per-slide {params.max_tiles} --split {input.split} --classes {params.classes} {params.ordinal}"
        " --threads {threads} --out {output} > {log} 2>&1"


rule pretrain:
    input:
        expand("results/pretrain/{arch}/{f}", arch=config["pretrain"]["archs"], f=["encoder.pt", "probe.csv"]),

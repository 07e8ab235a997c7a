# Big-Layers Tables 1 (QWK) and 2 (accuracy): ABMIL, DTFD, TransMIL with the tile encoder frozen or
# trained (the `offload` executor), with and without the per-slide augmentation, on the tile-bag
# trainer; each model scored on its dataset's test part and on an external cohort (test only), on all
# tiles and on R x K sampled tiles. `snakemake --cores all offload` builds both tables, the engine's
# equivalence table and Figure 2. Not part of the main job.
include: "offload_tables_common.smk"


rule train_biglayers:
    input:
        split="results/{dataset}/splits/{split}.csv",
        status=lambda w: f"results/{base_dataset(w.dataset)}/qc/status.csv",
        slides=tilebag_slides,
        weights=lambda w: weights_files(biglayers_params(w)),
    output:
        model="results/{dataset}/runs/biglayers_{agg}_{encoder}_{aug}/{split}/{seed}/model.pt",
        history="results/{dataset}/runs/biglayers_{agg}_{encoder}_{aug}/{split}/{seed}/history.csv",
        provenance="results/{dataset}/runs/biglayers_{agg}_{encoder}_{aug}/{split}/{seed}/run.json",
    wildcard_constraints:
        agg=r"[a-z0-9]+",
        encoder=r"frozen|trained",
        aug=r"aug|noaug",
    params:
        method_params=biglayers_params,
        data=tilebag_data_args,
        tile_px=config["preprocess"]["tile_px"],
        magnification=config["preprocess"]["target_magnification"],
        mpp=mpp_arg,
    conda:
        "../../envs/slidetrain.yaml"
    log:
        "logs/{dataset}/runs/biglayers_{agg}_{encoder}_{aug}/{split}/{seed}/train.log",
    benchmark:
        "benchmarks/{dataset}/runs/biglayers_{agg}_{encoder}_{aug}/{split}/{seed}/train.tsv"
    threads: 1 + int(OFFLOAD_TABLES_CFG.get("params", {}).get("workers", 0))
    resources:
        mem_mb=4000,
        runtime=24 * 60,
        gpu=1 if str(OFFLOAD_TABLES_CFG.get("params", {}).get("device", "cpu")).startswith("cuda") else 0,
    shell:
        "slidetrain train-tilebag --params '{params.method_params}' --split {input.split} {params.data}"
        " --tile-px {params.tile_px} --target-magnification {params.magnification} {params.mpp}"
        " --out $(dirname {output.model}) --seed {wildcards.seed} > {log} 2>&1"


rule evaluate_biglayers:
    # one process per model scores every test set x protocol (imports and model load once)
    input:
        model="results/{dataset}/runs/biglayers_{agg}_{encoder}_{aug}/{split}/{seed}/model.pt",
        splits=biglayers_test_splits,
    output:
        expand(
            "results/{{dataset}}/runs/biglayers_{{agg}}_{{encoder}}_{{aug}}/{{split}}/{{seed}}/test_{testset}_{tiles}/{name}",
            testset=["internal", "external"], tiles=["all", "sampled"], name=["predictions.csv", "metrics.json"],
        ),
    wildcard_constraints:
        agg=r"[a-z0-9]+",
        encoder=r"frozen|trained",
        aug=r"aug|noaug",
    params:
        tests=biglayers_tests,
        modes=biglayers_modes,
        n_bootstrap=config.get("evaluation", {}).get("n_bootstrap", 1000),
    conda:
        "../../envs/slidetrain.yaml"
    log:
        "logs/{dataset}/runs/biglayers_{agg}_{encoder}_{aug}/{split}/{seed}/test.log",
    benchmark:
        "benchmarks/{dataset}/runs/biglayers_{agg}_{encoder}_{aug}/{split}/{seed}/test.tsv"
    resources:
        mem_mb=4000,
        runtime=120,
        gpu=1 if str(OFFLOAD_TABLES_CFG.get("params", {}).get("device", "cpu")).startswith("cuda") else 0,
    shell:
        "slidetrain -v evaluate-tilebag-sets --model {input.model} --tests '{params.tests}' --modes '{params.modes}'"
        " --out-dir $(dirname {input.model}) --n-bootstrap {params.n_bootstrap} --seed {wildcards.seed} > {log} 2>&1"


rule offload_table1:
    input:
        offload_table_metrics("offload_table1") if "offload_table1" in OFFLOAD_TABLES else [],
    output:
        csv=report("results/tables/offload_table1.csv", caption="../report/offload_table1.rst", category="Big-Layers"),
        md="results/tables/offload_table1.md",
    params:
        args=offload_table_args("offload_table1") if "offload_table1" in OFFLOAD_TABLES else "",
    conda:
        "../../envs/slidetrain.yaml"
    log:
        "logs/tables/offload_table1.log",
    benchmark:
        "benchmarks/tables/offload_table1.tsv"
    shell:
        "slidetrain offload-table --metrics {input} {params.args} --out {output.csv} --markdown {output.md} > {log} 2>&1"


rule offload_table2:
    input:
        offload_table_metrics("offload_table2") if "offload_table2" in OFFLOAD_TABLES else [],
    output:
        csv=report("results/tables/offload_table2.csv", caption="../report/offload_table2.rst", category="Big-Layers"),
        md="results/tables/offload_table2.md",
    params:
        args=offload_table_args("offload_table2") if "offload_table2" in OFFLOAD_TABLES else "",
    conda:
        "../../envs/slidetrain.yaml"
    log:
        "logs/tables/offload_table2.log",
    benchmark:
        "benchmarks/tables/offload_table2.tsv"
    shell:
        "slidetrain offload-table --metrics {input} {params.args} --out {output.csv} --markdown {output.md} > {log} 2>&1"


rule offload:
    input:
        "results/tables/offload_table1.csv",
        "results/tables/offload_table2.csv",
        "results/bench/offload_equivalence.csv",
        "results/figures/offload_figure2.png",

# Seeded, stratified, patient-grouped splits (mccv0..N-1), or a dataset's official split.
# Slides excluded during preprocessing (on_bad_slide: exclude) are left out here, on record, after
# the draw on the whole sheet: a newly excluded slide moves no other slide to another part.


rule make_split:
    input:
        sheet=lambda w: dataset_cfg(w.dataset)["sheet"],
        status=lambda w: f"results/{base_dataset(w.dataset)}/qc/status.csv",
        official=lambda w: OFFICIAL[w.dataset] if w.split == "official" else [],
    output:
        "results/{dataset}/splits/{split}.csv",
    params:
        classes=lambda w: " ".join(dataset_cfg(base_dataset(w.dataset))["classes"]),
        seed=lambda w: config["splits"]["seed"] + (0 if w.split == "official" else int(w.split[4:])),
        fractions=lambda w: " ".join(map(str, dataset_split(w.dataset).get("fractions", config["splits"]["fractions"]))),
        official=lambda w, input: f"--official {input.official}" if w.split == "official" else "",
        label_map=lambda w: f"--label-map '{json.dumps(DERIVED[w.dataset]['label_map'])}'" if w.dataset in DERIVED else "",
        paper=lambda w: paper_split_args(w.dataset, w.split),
    conda:
        "../../envs/slidetrain.yaml"
    log:
        "logs/{dataset}/splits/{split}.log",
    benchmark:
        "benchmarks/{dataset}/splits/{split}.tsv"
    shell:
        "slidetrain split --sheet {input.sheet} --classes {params.classes} --seed {params.seed}"
        " --fractions {params.fractions} {params.official} {params.label_map} {params.paper} --status {input.status} --out {output} > {log} 2>&1"


# An external test set (Big-Layers: TCGA-PRAD one slide per patient, CAMELYON16 whole): all in `test`.
rule external_split:
    input:
        sheet=lambda w: dataset_cfg(w.dataset)["sheet"],
        status=lambda w: f"results/{base_dataset(w.dataset)}/qc/status.csv",
    output:
        "results/{dataset}/splits/external.csv",
    params:
        classes=lambda w: " ".join(dataset_cfg(base_dataset(w.dataset))["classes"]),
        seed=config["splits"]["seed"],
        one=lambda w: "--one-per-patient" if dataset_split(w.dataset).get("external_one_per_patient") else "",
        # a derived dataset's external set (e.g. the binary view of an external cohort): mapped labels
        label_map=lambda w: f"--label-map '{json.dumps(DERIVED[w.dataset]['label_map'])}'" if w.dataset in DERIVED else "",
    conda:
        "../../envs/slidetrain.yaml"
    log:
        "logs/{dataset}/splits/external.log",
    benchmark:
        "benchmarks/{dataset}/splits/external.tsv"
    shell:
        "slidetrain external-split --sheet {input.sheet} --classes {params.classes} --seed {params.seed}"
        " {params.one} {params.label_map} --status {input.status} --out {output} > {log} 2>&1"

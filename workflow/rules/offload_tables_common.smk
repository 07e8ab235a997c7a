# Input functions of workflow/rules/offload_tables.smk (Big-Layers Tables 1 and 2), kept apart from the
# rules as common.smk keeps the others'.
from types import SimpleNamespace

OFFLOAD_TABLES_CFG = config.get("offload_tables", {})
OFFLOAD_TABLES = OFFLOAD_TABLES_CFG.get("tables", {})
OFFLOAD_TABLE_OF_DATASET = {block["dataset"]: name for name, block in OFFLOAD_TABLES.items()}


def _offload_table_of(dataset):
    if dataset not in OFFLOAD_TABLE_OF_DATASET:
        raise WorkflowError(
            f"offload_tables: dataset {dataset!r} is no table's `dataset`; known: {sorted(OFFLOAD_TABLE_OF_DATASET)}"
        )
    return OFFLOAD_TABLES[OFFLOAD_TABLE_OF_DATASET[dataset]]


def _check_offload_tables():
    """Every table's datasets exist and its external cohort has the training dataset's classes."""
    for name, block in OFFLOAD_TABLES.items():
        for key in ("dataset", "external"):
            ds = block.get(key)
            if ds is not None and ds not in SHEETS and ds not in DERIVED:
                raise WorkflowError(f"offload_tables.tables.{name}.{key}: {ds!r} is not a dataset or derived dataset")
        ext = block.get("external")
        if ext and dataset_cfg(ext)["classes"] != dataset_cfg(block["dataset"])["classes"]:
            raise WorkflowError(
                f"offload_tables.tables.{name}.external: {ext!r} has classes {dataset_cfg(ext)['classes']}, expected "
                f"those of {block['dataset']!r}: {dataset_cfg(block['dataset'])['classes']}"
            )
    for enc in OFFLOAD_TABLES_CFG.get("encoders", {}):
        if enc not in ("frozen", "trained"):
            raise WorkflowError(f"offload_tables.encoders: {enc!r}; expected frozen and/or trained")
    # every run's TileBagConfig is valid before any job starts (an unknown key names itself here)
    from slidetrain.configs.tilebag import tilebag_config  # torch-free: planning stays fast
    from slidetrain.errors import SlidetrainError

    for name, block in OFFLOAD_TABLES.items():
        for enc in OFFLOAD_TABLES_CFG.get("encoders", {}):
            for agg in OFFLOAD_TABLES_CFG.get("aggregators", []):
                w = SimpleNamespace(dataset=block["dataset"], encoder=enc, agg=agg, aug="aug")
                try:
                    tilebag_config(json.loads(biglayers_params(w)))
                except SlidetrainError as err:
                    raise WorkflowError(f"offload_tables ({name}, {enc}, {agg}): {err}")


def biglayers_params(wildcards):
    """The run's TileBagConfig: common keys, the table's, the encoder mode's, the aggregator and augmentation."""
    table = _offload_table_of(wildcards.dataset)
    return json.dumps({
        **OFFLOAD_TABLES_CFG.get("params", {}), **table.get("params", {}), **OFFLOAD_TABLES_CFG["encoders"][wildcards.encoder],
        **table.get("encoder_params", {}).get(wildcards.encoder, {}),
        "aggregator": wildcards.agg, "aggregator_params": OFFLOAD_TABLES_CFG.get("aggregator_params", {}).get(wildcards.agg, {}),
        "augment": wildcards.aug == "aug",
    })


def _biglayers_test_sets(wildcards):
    """(name, dataset, split file) of the model's test sets: its dataset's test part, the external cohort."""
    table = _offload_table_of(wildcards.dataset)
    return [("internal", wildcards.dataset, f"results/{wildcards.dataset}/splits/{wildcards.split}.csv"),
            ("external", table["external"], f"results/{table['external']}/splits/external.csv")]


def biglayers_test_splits(wildcards):
    return [split for _, _, split in _biglayers_test_sets(wildcards)]


def biglayers_tests(wildcards):
    """JSON list of the test sets for `slidetrain evaluate-tilebag-sets`."""
    tests = []
    for name, dataset, split in _biglayers_test_sets(wildcards):
        base = base_dataset(dataset)
        tests.append({
            "name": name, "split": split, "sheet": dataset_cfg(base)["sheet"], "slides_dir": f"resources/{base}/slides",
            "tiles_dir": f"results/{base}/tiles", "classes": dataset_cfg(dataset)["classes"],
            "ordinal": bool(dataset_cfg(dataset).get("ordinal")),
        })
    return json.dumps(tests)


def biglayers_modes(wildcards):
    """All tiles, and the table's R x K sampled tiles."""
    table = _offload_table_of(wildcards.dataset)
    return json.dumps({"all": {"eval_tiles": "all"},
                       "sampled": {"eval_tiles": "sampled", "eval_k": table["eval_k"], "eval_repeats": table["eval_repeats"]}})


def _offload_table_splits(dataset):
    """The first `offload_tables.splits` of the dataset's splits (its official split only when mccv: false)."""
    splits = SPLITS + (["official"] if dataset in OFFICIAL else [])
    if dataset_split(dataset).get("mccv") is False:
        splits = ["official"]
    return splits[: OFFLOAD_TABLES_CFG.get("splits", 1)]


def offload_table_metrics(name):
    block = OFFLOAD_TABLES[name]
    return expand(
        "results/{dataset}/runs/biglayers_{agg}_{encoder}_{aug}/{split}/{seed}/test_{testset}_{tiles}/metrics.json",
        dataset=block["dataset"], agg=OFFLOAD_TABLES_CFG.get("aggregators", []), encoder=list(OFFLOAD_TABLES_CFG.get("encoders", {})),
        aug=OFFLOAD_TABLES_CFG.get("augmentation", ["aug"]), split=_offload_table_splits(block["dataset"]), seed=SEEDS,
        testset=["internal", "external"], tiles=["all", "sampled"],
    )


def offload_table_args(name):
    block = OFFLOAD_TABLES[name]
    shown = [f"internal={block['dataset']}", f"external={block['external']}"]
    paper = " ".join(f"{k}={v}" for k, v in block.get("paper", {}).items())
    return (
        f"--metric {block['metric']} --paper-table {name} --test-datasets {' '.join(shown)}"
        f" --sampled-label {block['eval_repeats']}x{block['eval_k']}" + (f" --paper {paper}" if paper else "")
    )


_check_offload_tables()

# Input functions of workflow/rules/heatmaps.smk (per-slide heatmaps), kept apart from the rules as
# common.smk keeps the others'.

HEATMAP_SPLIT, HEATMAP_SEED = SPLITS[0], SEEDS[0]


def heatmap_methods(dataset):
    """Runs of `dataset` whose attention is drawn: Table 1's attention methods, the tile-bag runs at the
    largest K of the sweep."""
    methods = attention_methods(dataset) if dataset in config["table1"]["datasets"] else []
    if dataset in _tilebag_cfg("datasets", []) and _tilebag_cfg("k_sweep"):
        methods.append(f"tilebag_k{max(_tilebag_cfg('k_sweep'))}")
    return methods


def heatmap_data_args(dataset):
    """Where the slides of `dataset` (a derived dataset: its source's) and their masks, tiles, truth live."""
    base = base_dataset(dataset)
    args = (
        f"--sheet {dataset_cfg(base)['sheet']} --slides-dir resources/{base}/slides --tiles-dir results/{base}/tiles"
        f" --masks-dir results/{base}/masks"
    )
    return args + (f" --truth-dir resources/{base}/slides" if is_synthetic(base) else "")


def heatmap_args(w):
    mpp = dataset_cfg(base_dataset(w.dataset)).get("mpp_fallback")
    return (
        heatmap_data_args(w.dataset)
        + f" --classes {' '.join(dataset_cfg(w.dataset)['classes'])}"
        + (f" --mpp-fallback {mpp}" if mpp else "")
    )


# the benchmark times the first heatmap run of Table 1's first dataset
_BENCH_HEATMAP = (config["table1"]["datasets"][0], (heatmap_methods(config["table1"]["datasets"][0]) or [None])[0])

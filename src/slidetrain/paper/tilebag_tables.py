"""Campanella et al.'s Table 1, Figure 4 and Figure 1 from tile-bag runs and the max-tiles benchmark.

Run outputs live at results/{dataset}/runs/{method}/{split}/{seed}/: tile-bag runs are named
`tilebag_k{K}` (strategy `single`: one device; the distributed executor adds `parallel` and
`half`), frozen-feature rows come from the MIL runs on the same splits (`maxpool`, `gma`,
`transmil`). The paper's values (paper/data/tilebag_table1.csv, tilebag_memory.csv) sit beside ours:
a tile-bag row is joined to the paper's row of the K that `paper_k` maps its (scaled) K to.
"""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from slidetrain.errors import ConfigError  # noqa: E402
from slidetrain.io import atomic_path  # noqa: E402
from slidetrain.paper.figure_data import FigureData, data_path_for  # noqa: E402
from slidetrain.paper.reference import paper_row, paper_table, paper_tiles_per_gb, require_value  # noqa: E402
from slidetrain.paper.tables import collect_runs, run_key, write_table  # noqa: E402

TILEBAG_TABLE1_COLUMNS = [
    "algorithm",
    "k",
    "strategy",
    "auc_mean",
    "auc_std",
    "n_splits",
    "paper_auc_mean",
    "paper_auc_std",
    "note",  # why a row has no value (a run left out on this machine), else empty
]
TILEBAG_RUN = re.compile(r"^tilebag(?:_(?P<strategy>parallel|half))?_k(?P<k>\d+)$")

#: frozen-feature MIL method -> (the paper's algorithm, its embedding row whose values sit beside ours).
#: Our frozen features come from an ImageNet-style ResNet (random init on the CPU default), so GMA is
#: compared with the paper's "tResNet50 ImageNet" row, not its pathology-supervised embeddings.
FROZEN_ROWS = {
    "maxpool": ("Max-pool MIL", "NA"),
    "gma": ("GMA", "tResNet50 ImageNet"),
    "transmil": ("TransMIL", "supervised tumor"),
}
STRATEGY_PAPER = {"single": "single", "parallel": "parallel", "half": "parallel-half"}


def _run_kind(method: str) -> tuple[str, int | None, str] | None:
    """(algorithm, K, strategy) of a run directory name, or None when the method has no row."""
    m = TILEBAG_RUN.match(method)
    if m:
        return "Proposed", int(m["k"]), m["strategy"] or "single"
    if method in FROZEN_ROWS:
        return FROZEN_ROWS[method][0], None, ""
    return None


def _kind(method: str) -> tuple[str, int | None, str]:
    kind = _run_kind(method)
    if kind is None:
        raise ConfigError(
            f"tilebag-table1: run {method!r} is neither tilebag[_parallel|_half]_k<K> nor one of {sorted(FROZEN_ROWS)}"
        )
    return kind


def _paper_values(paper: pd.DataFrame, method: str, paper_k: dict[int, int]) -> dict:
    """The paper's row beside run `method` ({} for a K that paper_k does not map)."""
    algorithm, k, strategy = _kind(method)
    if algorithm != "Proposed":
        where = f"tilebag-table1: run {method!r}"
        return paper_row(paper, "tilebag_table1", where, algorithm=algorithm, embedding=FROZEN_ROWS[method][1])
    if k not in paper_k:  # a K the config maps to the paper's K; an unmapped K has no paper value
        return {}
    require_value(paper, "tilebag_table1", "k", paper_k[k], f"tilebag.paper_k (for K={k})")
    return paper_row(
        paper,
        "tilebag_table1",
        f"tilebag-table1: run {method!r} (K={k} -> paper K={paper_k[k]}, strategy {strategy!r})",
        algorithm="Proposed",
        gpu_strategy=STRATEGY_PAPER[strategy],
        k=paper_k[k],
    )


def tilebag_table1(
    metrics_paths: list[str | Path],
    out_csv: str | Path,
    paper_k: dict[int, int] | None = None,
    markdown: str | Path | None = None,
    not_run: dict[str, str] | None = None,
) -> pd.DataFrame:
    """Mean and std of test AUROC (in %) over splits per row, with the paper's values beside.

    `not_run`: {run name: reason} of runs the workflow left out on this machine (tilebag_half_k16 where
    bf16 autocast would be emulated); each gets its row, no value, and the reason in `note`."""
    runs = collect_runs(metrics_paths)
    paper = paper_table("tilebag_table1")
    paper_k = paper_k or {}
    rows = []
    for method, group in runs.groupby("method", sort=False):
        algorithm, k, strategy = _kind(method)
        auc = 100 * group.auroc.astype(float)
        ref = _paper_values(paper, method, paper_k)
        rows.append(
            {
                "algorithm": algorithm,
                "k": k,
                "strategy": strategy,
                "auc_mean": round(float(auc.mean()), 1),
                "auc_std": round(float(auc.std(ddof=1)), 1) if len(auc) > 1 else float("nan"),
                "n_splits": int(group.split.nunique()),
                "paper_auc_mean": float(ref.get("auc_mean", float("nan"))),
                "paper_auc_std": float(ref.get("auc_std", float("nan"))),
                "note": "",
            }
        )
    for method, reason in (not_run or {}).items():
        if method in set(runs.method):
            raise ConfigError(f"tilebag-table1: run {method!r} is listed as not run but its metrics are given")
        algorithm, k, strategy = _kind(method)
        ref = _paper_values(paper, method, paper_k)
        rows.append(
            {
                **dict.fromkeys(TILEBAG_TABLE1_COLUMNS, float("nan")),
                **{"algorithm": algorithm, "k": k, "strategy": strategy, "n_splits": 0},
                "paper_auc_mean": float(ref.get("auc_mean", float("nan"))),
                "paper_auc_std": float(ref.get("auc_std", float("nan"))),
                "note": f"not run: {reason}",
            }
        )
    table = pd.DataFrame(rows, columns=TILEBAG_TABLE1_COLUMNS)
    # the paper's order: frozen-feature baselines first, then the K sweep by strategy and K
    table["_frozen"] = table.algorithm != "Proposed"
    table = table.sort_values(["_frozen", "strategy", "k"], ascending=[False, True, True]).drop(columns="_frozen")
    table["k"] = table.k.astype("Int64")
    write_table(table, out_csv, markdown)
    return table


def bootstrap_band(curves: np.ndarray, n: int = 1000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """95% bootstrap band of the mean curve over runs: curves (R, E) -> lower (E,), upper (E,)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(curves), size=(n, len(curves)))  # (n, R)
    means = np.nanmean(curves[idx], axis=1)  # (n, E)
    return np.nanpercentile(means, 2.5, axis=0), np.nanpercentile(means, 97.5, axis=0)


def _histories(paths: list[str | Path]) -> pd.DataFrame:
    frames = []
    for path in paths:
        key = run_key(Path(path).with_name("metrics.json"))
        kind = _run_kind(key["method"])
        if kind is None or kind[0] != "Proposed":
            raise ConfigError(f"tilebag-figure4: {path} is not a tile-bag run (tilebag[_parallel|_half]_k<K>)")
        h = pd.read_csv(path)
        frames.append(h.assign(k=kind[1], strategy=kind[2], split=key["split"], seed=key["seed"]))
    return pd.concat(frames, ignore_index=True)


def tilebag_figure4(
    history_paths: list[str | Path], out_png: str | Path, out_data: str | Path | None = None
) -> pd.DataFrame:
    """(a) training loss per epoch by K with a bootstrap 95% band over splits, (b) final training loss
    against K, (c) final validation AUC against K, (d) final validation AUC per strategy.

    The plotted points go to `out_data` (default: the PNG's path with .csv), panels a-d."""
    h = _histories(history_paths)
    data = FigureData()
    final = h.sort_values("epoch").groupby(["strategy", "k", "split", "seed"], as_index=False).last()
    ks = sorted(h.k.unique())
    colours = plt.cm.viridis(np.linspace(0, 0.9, len(ks)))
    fig, axes = plt.subplots(1, 4, figsize=(17, 4))
    single = h[h.strategy == "single"]
    for k, colour in zip(ks, colours, strict=True):
        runs = single[single.k == k].pivot_table(index=["split", "seed"], columns="epoch", values="train_loss")
        if runs.empty:
            continue
        curves = runs.to_numpy()  # (R, E)
        lo, hi = bootstrap_band(curves)
        epochs = runs.columns.to_numpy()
        axes[0].plot(epochs, np.nanmean(curves, 0), color=colour, label=f"K={k}")
        axes[0].fill_between(epochs, lo, hi, color=colour, alpha=0.2)
        data.add("a", f"K={k}", epochs, np.nanmean(curves, 0), lo, hi)
    axes[0].set(xlabel="epoch", ylabel="training loss", title="(a) training loss (95% bootstrap band)")
    axes[0].legend(fontsize=8)
    fs = final[final.strategy == "single"]
    for ax, column, label, title in (
        (axes[1], "train_loss", "final training loss", "(b) final training loss"),
        (axes[2], "val_auroc", "validation AUC", "(c) validation AUC"),
    ):
        stats = fs.groupby("k")[column].agg(["mean", "std"]).reindex(ks)
        ax.errorbar(ks, stats["mean"], yerr=stats["std"].fillna(0), marker="o", capsize=3)
        panel = title[1]
        data.add(
            panel,
            "mean",
            ks,
            stats["mean"],
            stats["mean"] - stats["std"].fillna(0),
            stats["mean"] + stats["std"].fillna(0),
        )
        data.add(panel, "run", fs.k, fs[column])
        ax.scatter(fs.k, fs[column], color="grey", s=10, alpha=0.6)
        ax.set(xscale="log", xlabel="K (tiles per slide)", ylabel=label, title=title)
        ax.set_xticks(ks, [str(k) for k in ks])
    # (d) at the largest K that the other strategies ran at (the largest K when only `single` ran)
    others = final[final.strategy != "single"]
    k_top = int(others.k.max()) if len(others) else int(final.k.max())
    top = final[final.k == k_top]
    strategies = sorted(top.strategy.unique(), key=lambda s: (s != "single", s))
    axes[3].boxplot([top[top.strategy == s].val_auroc.dropna() for s in strategies], tick_labels=strategies)
    for j, s in enumerate(strategies, 1):  # the splits' points over the boxes
        values = top[top.strategy == s].val_auroc.dropna()
        axes[3].scatter(np.full(len(values), j), values, color="grey", s=10, alpha=0.6, zorder=3)
        data.add("d", s, np.full(len(values), k_top), values)
    axes[3].set(ylabel="validation AUC", title=f"(d) validation AUC per strategy (K={k_top})")
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return data.write(out_data or data_path_for(out_png))


def tilebag_figure1(
    tables: list[str | Path], out_table: str | Path, out_png: str | Path, out_data: str | Path | None = None
) -> pd.DataFrame:
    """Merge per-encoder max-tiles CSVs; bars of ours beside the paper's (80 GB H100), and per GB.

    The plotted bars go to `out_data` (default: the PNG's path with .csv), panels a and b."""
    table = pd.concat([pd.read_csv(t) for t in tables], ignore_index=True)
    with atomic_path(out_table) as tmp:
        table.to_csv(tmp, index=False)
    paper = paper_table("tilebag_memory")
    data = FigureData()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    labels = [f"{e}\n{p}" for e, p in zip(table.encoder, table.precision, strict=True)]
    x = np.arange(len(table))
    per_gb = table.max_tiles / table.memory_budget_gb
    axes[0].bar(x, table.max_tiles, color=["C0" if p == "fp32" else "C1" for p in table.precision])
    axes[0].set_xticks(x, labels, fontsize=8)
    axes[0].set(
        ylabel="max tiles per forward + backward",
        title=f"(a) here: {table.device.iloc[0]}, {table.memory_budget_gb.iloc[0]:g} GB, {table.tile_px.iloc[0]} px",
    )
    ref_per_gb = np.array(
        [paper_tiles_per_gb(e, p, paper) for e, p in zip(table.encoder, table.precision, strict=True)]
    )
    names = [label.replace("\n", " ") for label in labels]
    data.add("a", "here", names, table.max_tiles)
    data.add("b", "here", names, per_gb)
    drawn = ~np.isnan(ref_per_gb)  # no bar where the paper did not measure the encoder
    data.add("b", "paper", [n for n, d in zip(names, drawn, strict=True) if d], ref_per_gb[drawn])
    axes[1].bar(x - 0.2, per_gb, width=0.4, label="here")
    axes[1].bar(x + 0.2, ref_per_gb, width=0.4, label="paper (H100 80 GB, 224 px)")
    axes[1].set_xticks(x, labels, fontsize=8)
    axes[1].set(ylabel="tiles per GB of budget", title="(b) per GB of memory")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    data.write(out_data or data_path_for(out_png))
    return table

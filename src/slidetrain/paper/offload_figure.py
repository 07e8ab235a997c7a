"""Big-Layers Figure 2 from the sweep CSV: seconds per iteration against image side."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from slidetrain.errors import SlidetrainError  # noqa: E402
from slidetrain.io import atomic_path  # noqa: E402
from slidetrain.paper.figure_data import FigureData, data_path_for  # noqa: E402

SWEEP_COLUMNS = ("image_side", "config", "seconds_mean", "seconds_std", "peak_device_gb", "device")


def offload_figure(sweep_csv: Path, out: Path, out_data: Path | None = None) -> pd.DataFrame:
    """One line per kind (plain, save_on_cpu, offload) with a +-1 std band; the plotted points go to
    `out_data` (default: the PNG's path with .csv), panel "a", one series per kind."""
    frame = pd.read_csv(sweep_csv)
    missing = [c for c in SWEEP_COLUMNS if c not in frame.columns]
    if missing or frame.empty:
        raise SlidetrainError(
            f"{sweep_csv}: expected a non-empty sweep with columns {SWEEP_COLUMNS}, missing {missing}"
        )
    data = FigureData()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    frame = frame.sort_values("image_side")
    # one line per kind; the offload line is labelled with the stages each side needed
    kinds = {
        "plain": frame[frame.config == "plain"],
        "save_on_cpu": frame[frame.config == "save_on_cpu"],
        "offload (ours)": frame[frame.config.str.startswith("offload")],
    }
    for label, part in kinds.items():
        if part.empty:
            continue
        x, y, s = part.image_side, part.seconds_mean, part.seconds_std
        ax.plot(x, y, marker="o", label=label)
        ax.fill_between(x, y - s, y + s, alpha=0.25)
        data.add("a", label, x, y, y - s, y + s)
        if label.startswith("offload"):
            for _, row in part.iterrows():
                ax.annotate(
                    row.config.split("_")[1],
                    (row.image_side, row.seconds_mean),
                    fontsize=7,
                    textcoords="offset points",
                    xytext=(0, 6),
                    ha="center",
                )
    ax.set_xlabel("image side (px); numbers: stages offloaded after the stem")
    ax.set_ylabel("seconds per iteration (fwd + bwd + AdamW)")
    top = ax.secondary_xaxis("top", functions=(lambda s: s**2 / 1e6, lambda p: (p * 1e6) ** 0.5))
    top.set_xlabel("pixels (millions)")
    ax.set_title(str(frame.device.iloc[0]), fontsize=9)
    if str(frame.device.iloc[0]).startswith("cpu"):
        # on a CPU nothing is measured against a limit: say what "fits" means and what bounds the x axis
        fig.text(
            0.01,
            0.01,
            "CPU: host = device; fits = device bytes as accounted (not measured).\n"
            f"Offload fits by construction: {frame.image_side.max()} px is the largest side swept that fits, "
            "not a limit of the engine.",
            fontsize=7,
            ha="left",
            va="bottom",
        )
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return data.write(out_data or data_path_for(out))

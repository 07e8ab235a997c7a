"""`slidetrain` subcommands of slidetrain.paper: the papers' tables and figures.

slidetrain.cli calls `add_parsers`; imports stay inside the commands so that
`slidetrain --help` does not pay for torch.
"""

from __future__ import annotations

import argparse
from pathlib import Path

DATA_HELP = "CSV of the plotted points (default: the PNG's path with .csv)"


def cmd_table2(a: argparse.Namespace) -> None:
    from slidetrain.bench.local_memory import write_table2

    write_table2(a.measurements, a.out, a.markdown, out_html=a.out_html)


def cmd_offload_figure(a: argparse.Namespace) -> None:
    from slidetrain.paper.offload_figure import offload_figure

    offload_figure(Path(a.sweep), Path(a.out), Path(a.out_data) if a.out_data else None)


def cmd_tilebag_table1(a: argparse.Namespace) -> None:
    from slidetrain.paper.tilebag_tables import tilebag_table1

    paper_k = {int(k): int(v) for k, _, v in (x.partition("=") for x in a.paper_k or [])}
    not_run = dict(x.split("=", 1) for x in a.not_run or [])
    tilebag_table1(a.metrics, a.out, paper_k=paper_k, markdown=a.markdown, not_run=not_run)


def cmd_tilebag_figure4(a: argparse.Namespace) -> None:
    from slidetrain.paper.tilebag_tables import tilebag_figure4

    tilebag_figure4(a.histories, a.out, a.out_data)


def cmd_tilebag_figure1(a: argparse.Namespace) -> None:
    from slidetrain.paper.tilebag_tables import tilebag_figure1

    tilebag_figure1(a.tables, a.out_table, a.out, a.out_data)


def cmd_table1(a: argparse.Namespace) -> None:
    from slidetrain.paper.tables import table1

    paper_names = dict(item.split("=", 1) for item in a.paper_names)
    not_applicable = [tuple(item.split(":", 1)) for item in a.not_applicable]
    table1(a.metrics, a.out_csv, a.out_md, paper_names, not_applicable, a.method_order, out_html=a.out_html)


def cmd_table4(a: argparse.Namespace) -> None:
    from slidetrain.paper.tables import table4

    table4(a.metrics, a.out_csv, a.out_md, dict(item.split("=", 1) for item in a.paper_names), out_html=a.out_html)


def cmd_attention_figure(a: argparse.Namespace) -> None:
    from slidetrain.paper.figures import attention_figure

    attention_figure(
        a.dataset,
        Path(a.table1),
        Path(a.runs_dir),
        Path(a.images_dir),
        Path(a.tiles_dir),
        Path(a.truth_dir) if a.truth_dir else None,
        a.classes,
        a.methods,
        Path(a.out),
        a.split,
        a.seed,
        Path(a.out_data) if a.out_data else None,
    )


def cmd_offload_table(a: argparse.Namespace) -> None:
    from slidetrain.paper.offload_tables import offload_table, parse_pairs

    offload_table(
        a.metrics,
        a.metric,
        a.paper_table,
        parse_pairs(a.test_datasets, "--test-datasets"),
        a.sampled_label,
        parse_pairs(a.paper, "--paper"),
        a.out,
        markdown=a.markdown,
    )


def _add_offload_table_parser(sub: argparse._SubParsersAction) -> None:
    from slidetrain.paper.offload_tables import METRICS

    s = sub.add_parser("offload-table", help="Big-Layers Table 1 (qwk) or 2 (acc) from the biglayers_* tile-bag runs")
    s.add_argument("--metrics", nargs="+", required=True)
    s.add_argument("--metric", choices=sorted(METRICS), required=True)
    s.add_argument("--paper-table", required=True, help="offload_table1 | offload_table2 (slidetrain/paper/data)")
    s.add_argument("--test-datasets", nargs="*", help="internal=NAME external=NAME: the dataset column")
    s.add_argument("--sampled-label", default="sampled", help="test_tiles shown for sampled tiles, e.g. 10x8")
    s.add_argument("--paper", nargs="*", help="{internal|external}_{all|sampled}=paper column prefix")
    s.add_argument("--out", required=True)
    s.add_argument("--markdown")
    s.set_defaults(func=cmd_offload_table)


def _add_table2_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("table2", help="Table 2 (training memory vs E2E) from bench-train-memory JSONs")
    s.add_argument("--measurements", nargs="+", required=True)
    s.add_argument("--out", required=True, help="CSV")
    s.add_argument("--markdown", help="Markdown copy")
    s.add_argument("--out-html", help="HTML copy (Snakemake's report)")
    s.set_defaults(func=cmd_table2)


def _add_offload_figure_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("offload-figure", help="Big-Layers Figure 2 from the sweep CSV")
    s.add_argument("--sweep", required=True)
    s.add_argument("--out", required=True, help="PNG")
    s.add_argument("--out-data", help=DATA_HELP)
    s.set_defaults(func=cmd_offload_figure)


def _add_tilebag_table1_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("tilebag-table1", help="Campanella et al. Table 1: K sweep and frozen-feature rows")
    s.add_argument("--metrics", nargs="+", required=True, help="metrics.json of every run (path names the run)")
    s.add_argument("--paper-k", nargs="*", help="K=PAPER_K: the paper's K whose values a scaled K sits beside")
    s.add_argument(
        "--not-run", action="append", help="RUN=REASON: a run left out on this machine, shown as a row with the reason"
    )
    s.add_argument("--out", required=True)
    s.add_argument("--markdown")
    s.set_defaults(func=cmd_tilebag_table1)


def _add_tilebag_figure4_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("tilebag-figure4", help="Campanella et al. Figure 4: loss and AUC against K")
    s.add_argument("--histories", nargs="+", required=True, help="history.csv of every tile-bag run")
    s.add_argument("--out", required=True)
    s.add_argument("--out-data", help=DATA_HELP)
    s.set_defaults(func=cmd_tilebag_figure4)


def _add_tilebag_figure1_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("tilebag-figure1", help="Campanella et al. Figure 1: max tiles per encoder and precision")
    s.add_argument("--tables", nargs="+", required=True, help="bench-max-tiles CSVs (one per encoder)")
    s.add_argument("--out-table", required=True, help="the merged CSV")
    s.add_argument("--out", required=True, help="the figure (PNG)")
    s.add_argument("--out-data", help=DATA_HELP)
    s.set_defaults(func=cmd_tilebag_figure1)


def _add_table1_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("table1", help="Table 1 from run metrics")
    s.add_argument(
        "--metrics",
        nargs="+",
        required=True,
        help="metrics.json files under results/{dataset}/runs/{method}/{split}/{seed}/",
    )
    s.add_argument("--out-csv", required=True)
    s.add_argument("--out-md", required=True)
    s.add_argument("--paper-names", nargs="*", default=[], help="dataset=name in the paper's table")
    s.add_argument("--not-applicable", nargs="*", default=[], help="method:dataset pairs shown as '/'")
    s.add_argument("--method-order", nargs="*", default=[])
    s.add_argument("--out-html", help="HTML copy (Snakemake's report)")
    s.set_defaults(func=cmd_table1)


def _add_table4_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("table4", help="Table 4 (RFR ablation) from local-learning run metrics")
    s.add_argument("--metrics", nargs="+", required=True, help="metrics.json of local_k4/_k8(_norfr) runs")
    s.add_argument("--out-csv", required=True)
    s.add_argument("--out-md", required=True)
    s.add_argument("--paper-names", nargs="*", default=[], help="dataset=name in the paper's table")
    s.add_argument("--out-html", help="HTML copy (Snakemake's report)")
    s.set_defaults(func=cmd_table4)


def _add_attention_figure_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("attention-figure", help="heatmaps of the best attention method on test slides")
    s.add_argument("--dataset", required=True)
    s.add_argument("--table1", required=True)
    s.add_argument("--runs-dir", required=True)
    s.add_argument("--images-dir", required=True)
    s.add_argument("--tiles-dir", required=True)
    s.add_argument("--truth-dir")
    s.add_argument("--classes", nargs="+", required=True)
    s.add_argument("--methods", nargs="+", required=True, help="attention methods to choose from")
    s.add_argument("--split", default="mccv0")
    s.add_argument("--seed", default="0")
    s.add_argument("--out", required=True)
    s.add_argument("--out-data", help=DATA_HELP)
    s.set_defaults(func=cmd_attention_figure)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    _add_table2_parser(sub)
    _add_offload_figure_parser(sub)
    _add_tilebag_table1_parser(sub)
    _add_tilebag_figure4_parser(sub)
    _add_tilebag_figure1_parser(sub)
    _add_table1_parser(sub)
    _add_table4_parser(sub)
    _add_attention_figure_parser(sub)
    _add_offload_table_parser(sub)

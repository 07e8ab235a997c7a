"""Read and check every dataset's slide sheet, the derived datasets and the method blocks at parse time.

Every sheet is read (and validated) when the workflow is parsed, so every shard of slides is known
then and the DAG needs no checkpoints. A failure names the config key and what was expected.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from slidetrain.configs import check_method_config
from slidetrain.data.sheet import read_sheet
from slidetrain.errors import ConfigError, SlidetrainError

#: validate(data, schema_path): Snakemake's validator (snakemake.utils.validate), raising its usual error
RowValidator = Callable[[pd.DataFrame, str], Any]

# The keywords the column-wise check understands; a schema using others is checked row by row.
_COLUMNWISE_PROPERTY_KEYS = {"type", "pattern", "minLength", "description"}
_COLUMNWISE_SCHEMA_KEYS = {"$schema", "description", "type", "properties", "required"}


def snakemake_validator() -> RowValidator:
    from snakemake.utils import validate  # imported late: the rest of the module needs no Snakemake

    return validate


def is_columnwise(schema: Mapping) -> bool:
    """Whether `check_sheet` can check `schema` column by column (string columns, type/pattern/minLength)."""
    props = schema.get("properties", {})
    return not (
        any(set(p) - _COLUMNWISE_PROPERTY_KEYS for p in props.values())
        or any(p.get("type", "string") != "string" for p in props.values())
        or set(schema) - _COLUMNWISE_SCHEMA_KEYS
    )


def check_sheet(sheet: pd.DataFrame, schema_path: str | Path, validate_rows: RowValidator) -> None:
    """The sheet schema, checked column-wise (jsonschema per row costs ~1.5 s at 10,000 slides).

    Only rows that fail the vectorised check go through `validate_rows` (jsonschema), which then raises
    its usual error; a schema using keywords beyond type/pattern/minLength is checked row by row.
    """
    schema_path = str(schema_path)
    schema = yaml.safe_load(Path(schema_path).read_text())
    if not is_columnwise(schema):
        validate_rows(sheet, schema_path)
        return
    for column in schema.get("required", []):
        if column not in sheet.columns:
            validate_rows(sheet.head(1), schema_path)  # names the missing column
    bad = None
    for column, spec in schema.get("properties", {}).items():
        if column not in sheet.columns:
            continue
        values = sheet[column]
        ok = values.map(lambda v: isinstance(v, str))
        if "minLength" in spec:
            ok &= values.astype(str).str.len() >= spec["minLength"]
        if "pattern" in spec:
            rx = re.compile(spec["pattern"])
            ok &= values.astype(str).map(lambda v, rx=rx: rx.search(v) is not None)
        bad = ~ok if bad is None else bad | ~ok
    if bad is not None and bad.any():
        validate_rows(sheet[bad], schema_path)


def load_sheets(
    datasets: Mapping[str, Mapping], schema_path: str | Path, validate_rows: RowValidator | None = None
) -> dict[str, pd.DataFrame]:
    """Every dataset's sheet (paths relative to the working directory), checked, indexed by slide_id."""
    validate_rows = validate_rows or snakemake_validator()
    sheets = {}
    for name, ds in datasets.items():
        try:
            # features another tool wrote (features_dir) stand in for the slides: their files may be elsewhere
            sheet = read_sheet(ds["sheet"], ds["classes"], check_files=not ds.get("features_dir"))
        except SlidetrainError as err:
            raise ConfigError(f"datasets.{name}.sheet: {err}") from err
        check_sheet(sheet, schema_path, validate_rows)
        sheets[name] = sheet.set_index("slide_id", drop=False)
    return sheets


def check_derived(config: Mapping, sheets: Mapping[str, pd.DataFrame]) -> dict[str, dict]:
    """Derived datasets: a dataset's slides under a label map (binary from graded, ...), no new slides.

    They reuse the source dataset's slides, tiles, features and QC; only splits and runs are their own.
    """
    derived = config.get("derived_datasets", {}) or {}
    for name, block in derived.items():
        base = block["from"]
        if name in sheets:
            raise ConfigError(f"derived_datasets.{name}: the name is already a dataset under `datasets`")
        if base not in sheets:
            raise ConfigError(f"derived_datasets.{name}.from: {base!r} is not a dataset; known: {sorted(sheets)}")
        unmapped = sorted(set(config["datasets"][base]["classes"]) - set(block["label_map"]))
        if unmapped:
            raise ConfigError(f"derived_datasets.{name}.label_map: no target for class(es) {unmapped} of {base}")
        unknown = sorted(set(block["label_map"].values()) - set(block["classes"]))
        if unknown:
            raise ConfigError(
                f"derived_datasets.{name}.label_map: target(s) {unknown} are not among its classes {block['classes']}"
            )
    return derived


def check_pretrain_cohorts(config: Mapping, sheets: Mapping[str, pd.DataFrame]) -> None:
    """A pretraining cohort (`pretrain_only: true`) shares no slide or patient with another dataset and is
    used by no table, derived dataset or external test: what pretrains an encoder is never split,
    trained or tested on."""
    cohorts = [d for d, block in config["datasets"].items() if block.get("pretrain_only", False)]
    users = {"table1.datasets": config.get("table1", {}).get("datasets", [])}
    users["table4.datasets"] = config.get("table4", {}).get("datasets", [])
    users["tilebag.datasets"] = config.get("tilebag", {}).get("datasets", [])
    for name, block in (config.get("derived_datasets") or {}).items():
        users[f"derived_datasets.{name}.from"] = [block["from"]]
    for name, table in config.get("offload_tables", {}).get("tables", {}).items():
        users[f"offload_tables.tables.{name}"] = [table.get("dataset"), table.get("external")]
    for cohort in cohorts:
        for key, datasets in users.items():
            if cohort in datasets:
                raise ConfigError(
                    f"{key}: {cohort!r} is a pretraining cohort (pretrain_only), never trained or tested on"
                )
        for other, sheet in sheets.items():
            if other == cohort:
                continue
            shared = sorted(set(sheets[cohort].slide_id) & set(sheet.slide_id))
            shared += sorted(set(sheets[cohort].patient_id) & set(sheet.patient_id))
            if shared:
                raise ConfigError(
                    f"datasets.{cohort}: the pretraining cohort shares slides or patients with {other}: {shared[:5]}"
                )


def check_methods(config: Mapping) -> None:
    """Every method a table asks for has a config block that its dataclass accepts (fail before any job runs).

    slidetrain.configs holds the config dataclasses without torch: planning stays cheap."""
    for table in ("table1", "table4"):
        for method in config.get(table, {}).get("methods", []):
            if method not in config["methods"]:
                raise ConfigError(
                    f"{table}.methods names {method!r}, which has no block under `methods`;"
                    f" known: {sorted(config['methods'])}"
                )
    for method, params in config["methods"].items():
        try:
            check_method_config(method, params)
        except SlidetrainError as err:
            raise ConfigError(f"config: {err}") from err

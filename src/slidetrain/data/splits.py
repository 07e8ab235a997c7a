"""Train/val/test splits: seeded, stratified by label, grouped by patient.

A split is a table with one row per slide and the columns `slide_id`,
`patient_id`, `label` and `part` (one of PARTS). All slides of a patient sit
in one part, so no patient is seen in training and tested on.

    split = make_split(sheet, seed=0)                  # one seeded split
    folds = mccv_splits(sheet, n_folds=20, seed=0)     # Monte-Carlo CV: seeds 0..19
    split = read_official_split("splits_0.csv", sheet) # a dataset's published split
    split = drop_excluded(split, excluded)             # QC exclusions, after the draw
    write_split(split, "results/x/splits/split0.csv"); read_split(...)

Splits are drawn on the whole sheet and slides excluded in preprocessing are
removed from their part afterwards: a newly excluded slide then moves no other
slide to another part (drawn on the remaining slides, one exclusion would
reshuffle every part of every seed).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Collection, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from slidetrain.errors import ConfigError, SheetError, SplitError
from slidetrain.io import atomic_path

PARTS = ("train", "val", "test")
SPLIT_COLUMNS = ("slide_id", "patient_id", "label", "part")
DEFAULT_FRACTIONS = (0.6, 0.15, 0.25)

# Spellings of the part names found in published split files.
_PART_ALIASES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}
log = logging.getLogger(__name__)
_MAX_NAMED = 10  # how many offending ids an error message lists


def _name_some(values: Sequence) -> str:
    """`a, b, c` for at most _MAX_NAMED values, then how many more."""
    values = list(values)
    shown = ", ".join(str(v) for v in values[:_MAX_NAMED])
    if len(values) > _MAX_NAMED:
        shown += f" ... ({len(values) - _MAX_NAMED} more)"
    return shown


def _check_sheet(sheet: pd.DataFrame) -> pd.DataFrame:
    """Return the sheet's slide_id, patient_id, label as strings; SheetError if unusable."""
    missing = [c for c in ("slide_id", "patient_id", "label") if c not in sheet.columns]
    if missing:
        raise SheetError(
            f"slide sheet lacks column(s) {missing}; expected slide_id, patient_id, label"
            f" (and source), got {list(sheet.columns)}"
        )
    if len(sheet) == 0:
        raise SheetError("slide sheet is empty; expected at least one slide")
    out = sheet[["slide_id", "patient_id", "label"]].copy()
    for col in out.columns:
        bad = out[col].isna() | (out[col].astype(str).str.strip() == "")
        if bad.any():
            rows = [str(i) for i in out.index[bad]]
            raise SheetError(f"slide sheet has empty {col} in row(s) {_name_some(rows)}")
        out[col] = out[col].astype(str)
    dup = out["slide_id"][out["slide_id"].duplicated()].unique()
    if len(dup):
        raise SheetError(f"slide sheet has duplicate slide_id(s): {_name_some(dup)}")
    return out.reset_index(drop=True)


def _check_fractions(fractions: Sequence[float]) -> np.ndarray:
    f = np.asarray(fractions, dtype=float)
    if f.shape != (3,) or not np.all(np.isfinite(f)) or np.any(f <= 0):
        raise ConfigError(f"split fractions = {tuple(fractions)}; expected three positive numbers (train, val, test)")
    if abs(f.sum() - 1.0) > 1e-3:
        raise ConfigError(f"split fractions = {tuple(fractions)} sum to {f.sum():.4g}; expected them to sum to 1")
    return f / f.sum()


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ConfigError(f"split seed = {seed!r}; expected a non-negative integer")
    return int(seed)


def _patient_labels(slides: pd.DataFrame, class_order: Sequence[str] | None) -> pd.Series:
    """One stratification label per patient (index: patient_id, sorted).

    A patient whose slides disagree is stratified by the most severe label
    (last in `class_order`) when an order is given, else by its first slide's
    label in sheet order. The slides keep their own labels either way.
    """
    if class_order is None:
        labels = slides.groupby("patient_id", sort=True)["label"].first()
    else:
        rank = {str(c): i for i, c in enumerate(class_order)}
        unknown = sorted(set(slides["label"]) - set(rank))
        if unknown:
            raise SheetError(f"slide sheet label(s) {unknown} are not in class_order {list(class_order)}")
        severity = slides["label"].map(rank)
        worst = severity.groupby(slides["patient_id"], sort=True).max()
        labels = worst.map({i: c for c, i in rank.items()})
    return labels


def _allocate(n_per_class: pd.Series, fractions: np.ndarray) -> dict[str, np.ndarray]:
    """Patients per part for each class: >= 1 everywhere, each near n * fraction.

    Each part gets n * fraction rounded down (at least 1); the patients left
    over round up parts whose target is not yet met, first those furthest
    behind counting the classes allocated before. Per class a part is then
    within one patient of its target (unless the minimum of one patient per
    part forces more), and rounding does not pile up on one part across
    classes.
    """
    carry = np.zeros(3)  # target minus allocation summed over earlier classes, per part
    out = {}
    for cls, n in n_per_class.items():
        target = np.round(n * fractions, 9)  # (3,); rounded so 0.6 * 5 is 3, not 3 + 4e-16
        alloc = np.maximum(np.floor(target).astype(int), 1)
        while alloc.sum() > n:  # minima forced: take from the part most above target
            spare = np.where(alloc > 1, alloc - target, -np.inf)
            alloc[int(np.argmax(spare))] -= 1
        while alloc.sum() < n:  # round up a part still below its target
            need = np.where(alloc < target, target - alloc + carry, -np.inf)
            alloc[int(np.argmax(need))] += 1
        carry += target - alloc
        out[cls] = alloc
    return out


def make_split(
    sheet: pd.DataFrame,
    seed: int,
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
    *,
    class_order: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Split a slide sheet into train/val/test, seeded, stratified, grouped by patient.

    Patients (not slides) are allocated: within each class, a seeded
    permutation of the class's patients is cut at counts near
    n_patients * fractions, with at least one patient of every class in every
    part. A class with fewer than 3 patients cannot be in all three parts and
    raises SplitError. The result does not depend on the order of the sheet's
    rows (patients are sorted by id before shuffling).

    Returns one row per slide, in sheet order, with string columns
    slide_id, patient_id, label (the slide's own label) and part.
    """
    seed = _check_seed(seed)
    f = _check_fractions(fractions)
    slides = _check_sheet(sheet)

    patient_label = _patient_labels(slides, class_order)
    n_per_class = patient_label.value_counts().sort_index()
    too_small = n_per_class[n_per_class < 3]
    if len(too_small):
        detail = ", ".join(f"{c!r} ({n} patient{'s' * (n != 1)})" for c, n in too_small.items())
        raise SplitError(
            f"class(es) {detail} have fewer than 3 patients; every class needs at least one"
            " patient in each of train, val and test"
        )

    rng = np.random.default_rng(seed)
    part_of_patient: dict[str, str] = {}
    for cls, alloc in _allocate(n_per_class, f).items():
        patients = patient_label.index[patient_label == cls].to_numpy()  # sorted ids
        patients = patients[rng.permutation(len(patients))]
        bounds = np.cumsum(alloc)
        for part, chunk in zip(PARTS, np.split(patients, bounds[:-1]), strict=True):
            part_of_patient.update(dict.fromkeys(chunk, part))

    split = slides.assign(part=slides["patient_id"].map(part_of_patient))
    check_split(split)
    return split[list(SPLIT_COLUMNS)]


def mccv_splits(
    sheet: pd.DataFrame,
    n_folds: int,
    seed: int,
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
    *,
    class_order: Sequence[str] | None = None,
) -> list[pd.DataFrame]:
    """Monte-Carlo cross-validation: `n_folds` independent splits, fold i seeded `seed + i`."""
    if isinstance(n_folds, bool) or not isinstance(n_folds, int | np.integer) or n_folds < 1:
        raise ConfigError(f"n_folds = {n_folds!r}; expected a positive integer")
    seed = _check_seed(seed)
    return [make_split(sheet, seed + i, fractions, class_order=class_order) for i in range(n_folds)]


def _normalise_part(value: str) -> str | None:
    return _PART_ALIASES.get(str(value).strip().lower())


def _read_table(path: str | os.PathLike) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise SplitError(f"split file {path} does not exist")
    sep = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    # Strings throughout: slide ids such as "001" must not become numbers.
    table = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)
    return table.apply(lambda col: col.str.strip())


def _parse_long(table: pd.DataFrame, part_col: str, path: Path) -> pd.DataFrame:
    slides = table["slide_id"]
    parts = table[part_col].map(_normalise_part)
    bad = sorted(set(table[part_col][parts.isna()]))
    if bad:
        raise SplitError(
            f"split file {path}: unknown {part_col} value(s) {bad}; expected one of {sorted(_PART_ALIASES)}"
        )
    if (slides == "").any():
        raise SplitError(f"split file {path}: empty slide_id in row(s) {_name_some(list(table.index[slides == '']))}")
    return pd.DataFrame({"slide_id": slides, "part": parts})


def _parse_wide(table: pd.DataFrame, part_cols: dict[str, str], path: Path) -> pd.DataFrame:
    """CLAM layouts: columns train/val/test holding slide ids (padded with blanks),
    or (splits_*_bool.csv) booleans with the slide ids in the first column."""
    values = pd.concat([table[c] for c in part_cols.values()])
    if len(values) and values.str.lower().isin(["true", "false"]).all():
        id_col = table.columns[0]
        if id_col in part_cols.values():
            raise SplitError(f"split file {path}: boolean train/val/test columns but no slide id column before them")
        flags = table[list(part_cols.values())].apply(lambda c: c.str.lower() == "true")
        n_true = flags.sum(axis=1)
        if (n_true != 1).any():
            rows = table[id_col][n_true != 1]
            raise SplitError(
                f"split file {path}: slide(s) {_name_some(rows)} are marked in"
                " none or several of train/val/test; expected exactly one"
            )
        names = list(part_cols)
        parts = flags.to_numpy().argmax(axis=1)
        return pd.DataFrame({"slide_id": table[id_col], "part": [names[i] for i in parts]})
    rows = []
    for part, col in part_cols.items():
        ids = table[col][table[col] != ""]
        rows.append(pd.DataFrame({"slide_id": ids, "part": part}))
    return pd.concat(rows, ignore_index=True)


def read_official_split(path: str | os.PathLike, sheet: pd.DataFrame, allow_subset: bool = False) -> pd.DataFrame:
    """Read a published split and join it to the sheet.

    Layouts accepted (CSV, or TSV when the file ends in .tsv):
    - long: columns slide_id and part (or split), one row per slide; part
      values train/val/test, also training/valid/validation/testing, any case;
    - CLAM wide: columns train, val, test (same aliases), each a list of slide
      ids padded with blanks, optionally after an index column;
    - CLAM boolean: slide ids in the first column, True/False under train,
      val, test.
    Every slide of the split must be in the sheet and vice versa. Returns the
    same columns as make_split, in sheet order; SplitError otherwise.
    With `allow_subset` the split may leave sheet slides out (Song et al.'s PANDA split drops
    1,061 noisy slides): they are in no part, and the log says how many.
    """
    path = Path(path)
    sheet_slides = _check_sheet(sheet)
    table = _read_table(path)
    table.columns = [str(c).strip() for c in table.columns]
    lower = {c.lower(): c for c in table.columns}

    part_col = next((lower[c] for c in ("part", "split") if c in lower), None)
    wide_cols = {}
    for col in table.columns:
        part = _normalise_part(col)
        if part is not None and part not in wide_cols:
            wide_cols[part] = col
    id_col = next((lower[c] for c in ("slide_id", "image_id", "slide") if c in lower), None)
    if id_col is not None and part_col is not None:
        table = table.rename(columns={id_col: "slide_id"})
        parsed = _parse_long(table, part_col, path)
    elif set(wide_cols) == set(PARTS):
        parsed = _parse_wide(table, {p: wide_cols[p] for p in PARTS}, path)
    else:
        raise SplitError(
            f"split file {path} has columns {list(table.columns)}; expected either slide_id"
            " and part (one row per slide) or CLAM's train, val, test columns"
        )

    dup = parsed["slide_id"][parsed["slide_id"].duplicated()].unique()
    if len(dup):
        raise SplitError(f"split file {path} lists slide(s) more than once: {_name_some(dup)}")
    known = set(sheet_slides["slide_id"])
    unknown = [s for s in parsed["slide_id"] if s not in known]
    if unknown:
        raise SplitError(f"split file {path}: {len(unknown)} slide(s) not in the slide sheet: {_name_some(unknown)}")
    listed = set(parsed["slide_id"])
    absent = [s for s in sheet_slides["slide_id"] if s not in listed]
    if absent and allow_subset:
        log.warning("split file %s leaves %d sheet slide(s) out, e.g. %s", path, len(absent), _name_some(absent[:5]))
        sheet_slides = sheet_slides[sheet_slides.slide_id.isin(listed)]
    elif absent:
        raise SplitError(
            f"split file {path}: {len(absent)} slide(s) of the slide sheet are in no part: {_name_some(absent)}"
        )
    split = sheet_slides.merge(parsed, on="slide_id", how="left", validate="one_to_one")
    check_split(split)
    return split[list(SPLIT_COLUMNS)]


def check_split(split: pd.DataFrame) -> None:
    """SplitError if the split is inconsistent.

    Checks: columns slide_id, patient_id, part present; part values in PARTS;
    no duplicate slide ids; no patient in two parts; no part empty.
    """
    missing = [c for c in ("slide_id", "patient_id", "part") if c not in split.columns]
    if missing:
        raise SplitError(f"split lacks column(s) {missing}; got {list(split.columns)}")
    bad = sorted({str(p) for p in split["part"] if p not in PARTS})
    if bad:
        raise SplitError(f"split has unknown part value(s) {bad}; expected one of {list(PARTS)}")
    dup = split["slide_id"][split["slide_id"].duplicated()].unique()
    if len(dup):
        raise SplitError(f"split lists slide(s) more than once: {_name_some(dup)}")
    parts_of = split.groupby("patient_id", sort=True)["part"].unique()
    leaky = parts_of[parts_of.map(len) > 1]
    if len(leaky):

        def where(patient) -> str:  # "train: slide_a; test: slide_b"
            rows = split[split["patient_id"] == patient]
            return "; ".join(
                f"{q}: {', '.join(rows.slide_id[rows.part == q].astype(str))}" for q in PARTS if (rows.part == q).any()
            )

        named = [f"{p} ({where(p)})" for p in leaky.index]
        raise SplitError(f"split puts {len(leaky)} patient(s) in more than one part: {_name_some(named)}")
    empty = [p for p in PARTS if not (split["part"] == p).any()]
    if empty:
        raise SplitError(f"split part(s) {empty} are empty; every part needs a slide")


def drop_excluded(split: pd.DataFrame, excluded: Collection[str]) -> pd.DataFrame:
    """The split without the `excluded` slides (ids; a dict slide -> reason works too); the rest stay put.

    Call it on a split drawn on the whole sheet. Ids absent from the split are ignored (another
    dataset's, or a slide an official split leaves out). SplitError when the exclusions empty a
    part, naming the part and the slides excluded from it.
    """
    gone = split["slide_id"].isin(set(excluded))
    if not gone.any():
        return split
    kept = split[~gone].reset_index(drop=True)
    emptied = [p for p in PARTS if (split["part"] == p).any() and not (kept["part"] == p).any()]
    if emptied:
        detail = "; ".join(f"{p}: {_name_some(split.slide_id[gone & (split.part == p)])}" for p in emptied)
        raise SplitError(f"excluded slides leave split part(s) {emptied} empty ({detail}); every part needs a slide")
    for part in PARTS:  # a drawn part lost a whole class: allowed (the others stay put), but said
        lost = sorted(set(split.label[split.part == part]) - set(kept.label[kept.part == part]))
        if lost:
            log.warning("split part %s has no %s slide left after the exclusions", part, " or ".join(lost))
    by_part = split.part[gone].value_counts().reindex(list(PARTS), fill_value=0).to_dict()
    log.info(
        "left out %d excluded slide(s) after drawing the split: %s per part (%s)",
        int(gone.sum()),
        by_part,
        _name_some(split.slide_id[gone]),
    )
    return kept


def write_split(split: pd.DataFrame, path: str | os.PathLike) -> None:
    """Check the split and write it as CSV (atomically)."""
    missing = [c for c in SPLIT_COLUMNS if c not in split.columns]
    if missing:
        raise SplitError(f"cannot write split to {path}: lacks column(s) {missing}")
    check_split(split)
    with atomic_path(path) as tmp:
        split[list(SPLIT_COLUMNS)].to_csv(tmp, index=False)


def read_split(path: str | os.PathLike, allow_external: bool = False) -> pd.DataFrame:
    """Read a split written by write_split; SplitError if it is malformed.

    `allow_external`: also accept an external test set (write_external_split: every slide in part
    `test`, no train/val), for readers of the test part only (evaluation).
    """
    path = Path(path)
    if not path.is_file():
        raise SplitError(f"split file {path} does not exist")
    split = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [c for c in SPLIT_COLUMNS if c not in split.columns]
    if missing:
        raise SplitError(f"split file {path} lacks column(s) {missing}; expected {list(SPLIT_COLUMNS)}")
    external = allow_external and len(split) > 0 and set(split["part"]) == {"test"}
    if external and split.slide_id.duplicated().any():
        raise SplitError(f"split file {path}: duplicate slides in an external test set")
    try:
        if not external:
            check_split(split)
    except SplitError as err:
        raise SplitError(f"split file {path}: {err}") from None
    return split[list(SPLIT_COLUMNS)]


# ------------------------------------------------------------------------ the papers' splits

# The local-learning paper's slide counts per part are data: slidetrain.paper.reference.paper_split_counts.


def make_split_counts(
    sheet: pd.DataFrame,
    seed: int,
    counts: Sequence[int],
    *,
    test_slides: Sequence[str] | None = None,
    class_order: Sequence[str] | None = None,
) -> pd.DataFrame:
    """A seeded, label-stratified, patient-grouped split aiming at slide counts per part.

    Per class, the slides are shared out in proportion to `counts` (rounded as make_split rounds
    patients), then the class's patients, in a seeded order, fill train, then val, then test.
    With one slide per patient the parts get exactly the rounded counts; with more, a part may
    overshoot by a patient's slides. Counts that do not sum to the number of slides are scaled.
    `test_slides` fixes the test part (a dataset's own test set): train and val are drawn from
    the other slides in the ratio counts[0]:counts[1].
    """
    seed = _check_seed(seed)
    if len(counts) != 3 or any(int(c) < 1 for c in counts):
        raise ConfigError(f"split counts = {list(counts)}; expected three positive slide counts (train, val, test)")
    slides = _check_sheet(sheet)
    fixed = pd.Series(False, index=slides.index)
    if test_slides is not None:
        unknown = sorted(set(test_slides) - set(slides.slide_id))
        if unknown:
            raise SplitError(f"test slide(s) {_name_some(unknown)} are not in the slide sheet")
        fixed = slides.slide_id.isin(set(test_slides))
        fixed_patients = set(slides.patient_id[fixed])
        mixed = sorted(fixed_patients & set(slides.patient_id[~fixed]))
        if mixed:
            raise SplitError(f"patient(s) {_name_some(mixed)} have slides in the fixed test set and outside it")
    free = slides[~fixed]
    n_parts = 2 if test_slides is not None else 3
    fractions = np.asarray(counts[:n_parts], dtype=float)
    fractions = (
        np.concatenate([fractions / fractions.sum(), np.zeros(3 - n_parts)])
        if n_parts == 2
        else fractions / fractions.sum()
    )

    patient_label = _patient_labels(free, class_order)
    n_slides = free.groupby("patient_id", sort=True).size()
    slides_per_class = n_slides.groupby(patient_label).sum().sort_index()
    rng = np.random.default_rng(seed)
    part_of_patient: dict[str, str] = dict.fromkeys(set(slides.patient_id[fixed]), "test")
    for cls, alloc in _allocate_slides(slides_per_class, fractions, n_parts).items():
        patients = patient_label.index[patient_label == cls].to_numpy()
        patients = patients[rng.permutation(len(patients))]
        bounds = np.cumsum(alloc)
        assigned = 0
        for patient in patients:
            part = PARTS[min(int(np.searchsorted(bounds, assigned, side="right")), n_parts - 1)]
            part_of_patient[patient] = part
            assigned += int(n_slides[patient])
    split = slides.assign(part=slides["patient_id"].map(part_of_patient))
    check_split(split)
    return split[list(SPLIT_COLUMNS)]


def _allocate_slides(per_class: pd.Series, fractions: np.ndarray, n_parts: int) -> dict[str, np.ndarray]:
    """_allocate over the first n_parts parts (the others get none)."""
    if n_parts == 3:
        return _allocate(per_class, fractions)
    out = {}
    carry = 0.0
    for cls, n in per_class.items():  # two parts: round train, the rest to val, carrying the error
        target = n * fractions[0] + carry
        train = int(min(max(round(target), 1), n - 1)) if n > 1 else n
        carry = target - train
        out[cls] = np.array([train, n - train])
    return out


def official_from_sheet(
    sheet: pd.DataFrame, seed: int, n_val_slides: int, part_column: str = "official_part"
) -> pd.DataFrame:
    """A challenge's train/test split (sheet column `part_column`) with a seeded validation part
    drawn from the training patients until it holds at least `n_val_slides` slides (Big-Layers:
    50 CAMELYON17 training slides; whole patients, 5 slides each, so no patient is in two parts)."""
    seed = _check_seed(seed)
    if part_column not in sheet.columns:
        raise SheetError(f"slide sheet has no {part_column!r} column (train/test); build it with `slidetrain sheet`")
    slides = _check_sheet(sheet)
    given = sheet[part_column].astype(str).str.strip().str.lower().reset_index(drop=True)
    bad = sorted(set(given) - {"train", "test"})
    if bad:
        raise SheetError(f"slide sheet {part_column} value(s) {bad}; expected train or test")
    train_patients = np.array(sorted(set(slides.patient_id[given == "train"])))
    per_patient = slides[given == "train"].groupby("patient_id").size()
    rng = np.random.default_rng(seed)
    val, n = set(), 0
    for patient in train_patients[rng.permutation(len(train_patients))]:
        if n >= n_val_slides:
            break
        val.add(patient)
        n += int(per_patient[patient])
    part = np.where(given == "test", "test", np.where(slides.patient_id.isin(val), "val", "train"))
    split = slides.assign(part=part)
    check_split(split)
    return split[list(SPLIT_COLUMNS)]


def external_test_split(
    sheet: pd.DataFrame, seed: int, one_per_patient: bool, excluded: Collection[str] = ()
) -> pd.DataFrame:
    """An external test set: every slide in part `test`, or (Big-Layers' TCGA-PRAD) one slide per
    patient drawn with the seed. Written with write_external_split (no train/val parts).

    `excluded` slides (QC) are left out after the draw, as in drop_excluded: each patient's slides
    are put in a seeded order drawn on the whole sheet, and the patient is represented by its first
    slide not excluded, so an exclusion changes no other patient's slide. A patient whose slides
    are all excluded is left out (logged).
    """
    seed = _check_seed(seed)
    slides = _check_sheet(sheet)
    excluded = set(excluded)
    if one_per_patient:
        rng = np.random.default_rng(seed)
        keep, lost = [], []
        for patient, rows in slides.groupby("patient_id", sort=True):
            usable = [i for i in rows.index[rng.permutation(len(rows))] if slides.slide_id[i] not in excluded]
            if usable:
                keep.append(usable[0])
            else:
                lost.append(patient)
        if lost:
            log.warning("external test set: %d patient(s) have every slide excluded: %s", len(lost), _name_some(lost))
        slides = slides.loc[sorted(keep)]
    slides = slides[~slides.slide_id.isin(excluded)]
    if slides.empty:
        raise SplitError("external test set: every slide is excluded; expected at least one usable slide")
    return slides.assign(part="test")[list(SPLIT_COLUMNS)].reset_index(drop=True)


def write_external_split(split: pd.DataFrame, path: str | os.PathLike) -> None:
    bad = sorted(set(split["part"]) - {"test"})
    if bad or split.slide_id.duplicated().any():
        raise SplitError(f"external test split for {path}: parts {bad} / duplicate slides; expected test only")
    with atomic_path(path) as tmp:
        split[list(SPLIT_COLUMNS)].to_csv(tmp, index=False)

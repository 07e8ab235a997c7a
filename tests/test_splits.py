"""Splits: disjoint by patient, stratified, seeded; official split files; checks."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slidetrain.data.splits import (
    PARTS,
    check_split,
    make_split,
    mccv_splits,
    read_official_split,
    read_split,
    write_split,
)
from slidetrain.errors import ConfigError, SheetError, SplitError


def make_sheet(patients_per_class: list[int], slides_per_patient=1, seed: int = 0) -> pd.DataFrame:
    """A sheet with classes c0, c1, ...; slides_per_patient an int or a (lo, hi) range."""
    rng = np.random.default_rng(seed)
    rows = []
    for c, n_patients in enumerate(patients_per_class):
        for p in range(n_patients):
            if isinstance(slides_per_patient, int):
                n_slides = slides_per_patient
            else:
                n_slides = int(rng.integers(slides_per_patient[0], slides_per_patient[1] + 1))
            for s in range(n_slides):
                rows.append((f"c{c}-p{p}-s{s}", f"c{c}-p{p}", f"c{c}", "synthetic"))
    return pd.DataFrame(rows, columns=["slide_id", "patient_id", "label", "source"])


def patient_counts(split: pd.DataFrame) -> pd.DataFrame:
    """Patients per (label, part); rows labels, columns PARTS."""
    patients = split.drop_duplicates("patient_id")
    table = pd.crosstab(patients["label"], patients["part"])
    return table.reindex(columns=list(PARTS), fill_value=0)


# ---------------------------------------------------------------- make_split


@settings(max_examples=60, deadline=None)
@given(
    patients_per_class=st.lists(st.integers(3, 25), min_size=1, max_size=4),
    max_slides=st.integers(1, 4),
    seed=st.integers(0, 2**31),
    fractions=st.sampled_from([(0.6, 0.15, 0.25), (0.8, 0.1, 0.1), (1 / 3, 1 / 3, 1 / 3)]),
)
def test_split_properties(patients_per_class, max_slides, seed, fractions):
    sheet = make_sheet(patients_per_class, (1, max_slides), seed=seed % 1000)
    split = make_split(sheet, seed, fractions)

    assert list(split.columns) == ["slide_id", "patient_id", "label", "part"]
    # every slide exactly once, in sheet order, with its own label
    assert split["slide_id"].tolist() == sheet["slide_id"].tolist()
    assert split["label"].tolist() == sheet["label"].tolist()
    # disjoint by patient
    assert (split.groupby("patient_id")["part"].nunique() == 1).all()
    check_split(split)
    # every class in every part
    counts = patient_counts(split)
    assert (counts.to_numpy() >= 1).all(), counts
    # stratified: a class's patients per part within 1 of n * fraction; within 2 of it (or
    # of the minimum 1) when the minimum of one patient per part forces the allocation
    n_class = counts.sum(axis=1).to_numpy()[:, None]
    target = n_class * np.asarray(fractions)[None, :]
    dev = np.abs(counts.to_numpy() - target)
    unforced = (target >= 1).all(axis=1)
    assert (dev[unforced] < 1 + 1e-9).all(), (counts, target)
    assert (np.abs(counts.to_numpy() - np.maximum(target, 1)) < 2).all(), (counts, target)
    # part sizes (patients) near the fractions: off by at most the forced minima + 1
    n = n_class.sum()
    forced = np.maximum(1 - n_class * np.asarray(fractions)[None, :], 0).sum()
    size_dev = np.abs(counts.sum(axis=0).to_numpy() - n * np.asarray(fractions))
    assert size_dev.max() <= forced + 1, (counts, fractions)


def test_part_sizes_and_class_proportions_on_a_large_sheet():
    sheet = make_sheet([100, 60, 40])  # one slide per patient: slide == patient proportions
    split = make_split(sheet, seed=3)
    sizes = split["part"].value_counts()
    for part, f in zip(PARTS, (0.6, 0.15, 0.25), strict=True):
        assert abs(sizes[part] - 200 * f) <= 1
    overall = sheet["label"].value_counts(normalize=True)
    for part in PARTS:
        prop = split.loc[split["part"] == part, "label"].value_counts(normalize=True)
        # rounding one patient per class: at most 1/30 of the smallest part (val, 30 slides)
        assert (prop - overall).abs().max() <= 1 / 30 + 1e-9, (part, prop)


def test_split_is_deterministic_and_independent_of_row_order():
    sheet = make_sheet([20, 15, 9], (1, 3))
    a = make_split(sheet, seed=7)
    b = make_split(sheet, seed=7)
    pd.testing.assert_frame_equal(a, b)
    shuffled = sheet.sample(frac=1.0, random_state=1)
    c = make_split(shuffled, seed=7)
    assert c.set_index("slide_id")["part"].to_dict() == a.set_index("slide_id")["part"].to_dict()


def test_different_seeds_give_different_splits():
    sheet = make_sheet([20, 15, 9])
    assignments = {tuple(make_split(sheet, seed=s)["part"]) for s in range(5)}
    assert len(assignments) == 5


def test_class_with_fewer_than_three_patients_is_named():
    sheet = make_sheet([10, 2])
    with pytest.raises(SplitError, match=r"'c1' \(2 patients\)"):
        make_split(sheet, seed=0)


def test_patient_with_mixed_labels_stays_together_and_keeps_slide_labels():
    sheet = make_sheet([6, 6, 6])
    # patient c0-p0 gets a second slide labelled c2
    extra = pd.DataFrame([("extra", "c0-p0", "c2", "synthetic")], columns=sheet.columns)
    sheet = pd.concat([sheet, extra], ignore_index=True)
    split = make_split(sheet, seed=1)
    rows = split[split["patient_id"] == "c0-p0"]
    assert rows["part"].nunique() == 1
    assert sorted(rows["label"]) == ["c0", "c2"]
    # stratified by the first label by default: c0 then has 6 patients, c2 has 6
    assert patient_counts(split).sum(axis=1).to_dict() == {"c0": 6, "c1": 6, "c2": 6}


def test_class_order_stratifies_a_patient_by_its_most_severe_label():
    sheet = make_sheet([3, 3, 3])
    extra = pd.DataFrame([("extra", "c0-p0", "c2", "synthetic")], columns=sheet.columns)
    sheet = pd.concat([extra, sheet], ignore_index=True)  # first slide of c0-p0 is the c2 one
    # without an order, c0-p0 is stratified as c2 and c0 keeps 2 patients
    with pytest.raises(SplitError, match="'c0'"):
        make_split(sheet, seed=0)
    # with an order where c0 is the most severe, c0 keeps its 3 patients
    split = make_split(sheet, seed=0, class_order=["c2", "c1", "c0"])
    check_split(split)
    with pytest.raises(SheetError, match="class_order"):
        make_split(sheet, seed=0, class_order=["c0", "c1"])


def test_integer_ids_become_strings():
    sheet = pd.DataFrame(
        {
            "slide_id": range(12),
            "patient_id": range(12),
            "label": [0, 1] * 6,
            "source": "x",
        }
    )
    split = make_split(sheet, seed=0)
    assert split["slide_id"].tolist() == [str(i) for i in range(12)]
    assert set(split["label"]) == {"0", "1"}


@pytest.mark.parametrize("fractions", [(0.6, 0.4, 0.0), (0.5, 0.5, 0.5), (0.7, 0.3), (-0.1, 0.6, 0.5)])
def test_bad_fractions(fractions):
    with pytest.raises(ConfigError, match="fractions"):
        make_split(make_sheet([5, 5]), seed=0, fractions=fractions)


def test_bad_seed():
    with pytest.raises(ConfigError, match="seed"):
        make_split(make_sheet([5, 5]), seed=-1)


def test_bad_sheets():
    sheet = make_sheet([5, 5])
    with pytest.raises(SheetError, match="patient_id"):
        make_split(sheet.drop(columns="patient_id"), seed=0)
    dup = pd.concat([sheet, sheet.iloc[:1]], ignore_index=True)
    with pytest.raises(SheetError, match="duplicate slide_id.*c0-p0-s0"):
        make_split(dup, seed=0)
    holes = sheet.copy()
    holes.loc[3, "label"] = None
    with pytest.raises(SheetError, match="empty label"):
        make_split(holes, seed=0)


def test_mccv_splits_are_seeded_per_fold():
    sheet = make_sheet([12, 8])
    folds = mccv_splits(sheet, n_folds=4, seed=10)
    assert len(folds) == 4
    for i, fold in enumerate(folds):
        pd.testing.assert_frame_equal(fold, make_split(sheet, seed=10 + i))
        check_split(fold)
    assert len({tuple(f["part"]) for f in folds}) == 4
    with pytest.raises(ConfigError, match="n_folds"):
        mccv_splits(sheet, n_folds=0, seed=0)


# ---------------------------------------------------------------- check_split


def good_split() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "slide_id": ["a1", "a2", "b1", "c1"],
            "patient_id": ["A", "A", "B", "C"],
            "label": ["x", "x", "y", "x"],
            "part": ["train", "train", "val", "test"],
        }
    )


def test_check_split_accepts_a_good_split():
    check_split(good_split())


def test_check_split_names_a_patient_in_two_parts():
    split = good_split()
    split.loc[1, "part"] = "test"
    with pytest.raises(SplitError, match=r"A \(train: a1; test: a2\)"):
        check_split(split)


def test_check_split_catches_duplicates_empty_parts_and_unknown_parts():
    split = good_split()
    split.loc[1, "slide_id"] = "a1"
    with pytest.raises(SplitError, match="more than once: a1"):
        check_split(split)
    split = good_split()
    split.loc[2, "part"] = "train"
    with pytest.raises(SplitError, match=r"\['val'\] are empty"):
        check_split(split)
    split = good_split()
    split.loc[2, "part"] = "validation"
    with pytest.raises(SplitError, match="unknown part value.*validation"):
        check_split(split)
    with pytest.raises(SplitError, match="patient_id"):
        check_split(good_split().drop(columns="patient_id"))


# ---------------------------------------------------------------- write / read


def test_write_read_round_trip_keeps_string_ids(tmp_path):
    sheet = make_sheet([5, 4])
    sheet["slide_id"] = [f"{i:03d}" for i in range(len(sheet))]  # leading zeros
    split = make_split(sheet, seed=2)
    path = tmp_path / "splits" / "split0.csv"
    write_split(split, path)
    assert [p.name for p in path.parent.iterdir()] == ["split0.csv"]  # no temp file left
    back = read_split(path)
    pd.testing.assert_frame_equal(back, split)
    assert back["slide_id"].iloc[0] == "000"


def test_write_split_refuses_a_bad_split(tmp_path):
    split = good_split()
    split.loc[1, "part"] = "val"
    with pytest.raises(SplitError, match="patient"):
        write_split(split, tmp_path / "s.csv")
    assert not (tmp_path / "s.csv").exists()


def test_read_split_rejects_a_leaky_file(tmp_path):
    path = tmp_path / "s.csv"
    split = good_split()
    split.loc[1, "part"] = "val"
    split.to_csv(path, index=False)
    with pytest.raises(SplitError, match=r"s\.csv.*A \(train: a1; val: a2\)"):
        read_split(path)
    good_split().drop(columns="label").to_csv(path, index=False)
    with pytest.raises(SplitError, match="label"):
        read_split(path)
    with pytest.raises(SplitError, match="does not exist"):
        read_split(tmp_path / "nope.csv")


# ---------------------------------------------------------------- official splits


def official_sheet() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "slide_id": ["s1", "s2", "s3", "s4", "s5", "s6"],
            "patient_id": ["P1", "P1", "P2", "P3", "P4", "P5"],
            "label": ["a", "a", "b", "a", "b", "a"],
            "source": "x",
        }
    )


EXPECTED_PARTS = {
    "s1": "train",
    "s2": "train",
    "s3": "train",
    "s4": "val",
    "s5": "test",
    "s6": "test",
}


def test_official_long_layout_with_aliases(tmp_path):
    path = tmp_path / "official.csv"
    path.write_text("slide_id,part\ns1,Training\ns2,train\ns3, TRAIN \ns4,Validation\ns5,testing\ns6,Test\n")
    split = read_official_split(path, official_sheet())
    assert list(split.columns) == ["slide_id", "patient_id", "label", "part"]
    assert split.set_index("slide_id")["part"].to_dict() == EXPECTED_PARTS
    assert split["patient_id"].tolist() == ["P1", "P1", "P2", "P3", "P4", "P5"]
    assert split["label"].tolist() == ["a", "a", "b", "a", "b", "a"]


def test_official_long_layout_tsv_with_split_column_and_valid(tmp_path):
    path = tmp_path / "official.tsv"
    rows = [f"{s}\t{'valid' if p == 'val' else p}" for s, p in EXPECTED_PARTS.items()]
    path.write_text("slide_id\tsplit\n" + "\n".join(rows) + "\n")
    split = read_official_split(path, official_sheet())
    assert split.set_index("slide_id")["part"].to_dict() == EXPECTED_PARTS


def test_official_clam_wide_layout(tmp_path):
    # as CLAM's create_splits writes splits_0.csv: an index column, blanks as padding
    path = tmp_path / "splits_0.csv"
    path.write_text(",train,val,test\n0,s1,s4,s5\n1,s2,,s6\n2,s3,,\n")
    split = read_official_split(path, official_sheet())
    assert split.set_index("slide_id")["part"].to_dict() == EXPECTED_PARTS


def test_official_clam_wide_layout_without_index_and_aliases(tmp_path):
    path = tmp_path / "splits.csv"
    path.write_text("training,validation,testing\ns1,s4,s5\ns2,,s6\ns3,,\n")
    split = read_official_split(path, official_sheet())
    assert split.set_index("slide_id")["part"].to_dict() == EXPECTED_PARTS


def test_official_clam_boolean_layout(tmp_path):
    path = tmp_path / "splits_0_bool.csv"
    lines = [",train,val,test"]
    for s, p in EXPECTED_PARTS.items():
        lines.append(",".join([s] + [str(p == q) for q in PARTS]))
    path.write_text("\n".join(lines) + "\n")
    split = read_official_split(path, official_sheet())
    assert split.set_index("slide_id")["part"].to_dict() == EXPECTED_PARTS


def write_long(path, parts: dict[str, str]) -> None:
    path.write_text("slide_id,part\n" + "".join(f"{s},{p}\n" for s, p in parts.items()))


def test_official_split_errors(tmp_path):
    path = tmp_path / "official.csv"
    sheet = official_sheet()

    write_long(path, {**EXPECTED_PARTS, "ghost": "test"})
    with pytest.raises(SplitError, match="1 slide.*not in the slide sheet: ghost"):
        read_official_split(path, sheet)

    write_long(path, {s: p for s, p in EXPECTED_PARTS.items() if s not in ("s3", "s6")})
    with pytest.raises(SplitError, match="2 slide.*in no part: s3, s6"):
        read_official_split(path, sheet)

    write_long(path, {**EXPECTED_PARTS, "s4": "holdout"})
    with pytest.raises(SplitError, match="unknown part value.*holdout"):
        read_official_split(path, sheet)

    write_long(path, {**EXPECTED_PARTS, "s2": "test"})  # patient P1 in train and test
    with pytest.raises(SplitError, match=r"P1 \(train: s1; test: s2\)"):
        read_official_split(path, sheet)

    path.write_text("train,val,test\ns1,s4,s5\ns2,s1,s6\ns3,,\n")  # s1 in two parts
    with pytest.raises(SplitError, match="more than once: s1"):
        read_official_split(path, sheet)

    path.write_text("slide,fold\ns1,0\n")
    with pytest.raises(SplitError, match="expected either slide_id and part"):
        read_official_split(path, sheet)

    with pytest.raises(SplitError, match="does not exist"):
        read_official_split(tmp_path / "missing.csv", sheet)


def test_official_split_names_only_the_first_ten_missing(tmp_path):
    sheet = make_sheet([30])
    path = tmp_path / "official.csv"
    write_long(path, {"c0-p0-s0": "train", "c0-p1-s0": "val", "c0-p2-s0": "test"})
    with pytest.raises(SplitError, match=r"27 slide.*c0-p12-s0 \.\.\. \(17 more\)") as err:
        read_official_split(path, sheet)
    assert "c0-p13-s0" not in str(err.value)


# ---------------------------------------------------------------- exclusions after the draw


def _split_with_status(tmp_path, sheet, excluded, extra=()):
    """`slidetrain split` (the rule's command) on `sheet` with `excluded` slides in the QC status table."""
    from slidetrain.cli import main

    sheet_path, status = tmp_path / "sheet.tsv", tmp_path / f"status_{len(excluded)}.csv"
    sheet.to_csv(sheet_path, sep="\t", index=False)
    pd.DataFrame(
        {
            "slide_id": sheet.slide_id,
            "status": ["excluded" if s in excluded else "ok" for s in sheet.slide_id],
            "reason": ["unreadable" if s in excluded else "" for s in sheet.slide_id],
        }
    ).to_csv(status, index=False)
    out = tmp_path / f"split_{len(excluded)}.csv"
    assert main(
        [
            "split",
            "--sheet",
            str(sheet_path),
            "--classes",
            *sorted(sheet.label.unique()),
            "--seed",
            "5",
            *extra,
            "--status",
            str(status),
            "--out",
            str(out),
        ]
    ) in (0, None)
    return read_split(out)


@pytest.mark.parametrize("extra", [(), ("--counts", "30", "10", "14")])
def test_excluding_one_slide_changes_no_other_slides_part(tmp_path, extra):
    sheet = make_sheet([9, 9], slides_per_patient=(1, 4), seed=2)
    before = _split_with_status(tmp_path, sheet, set(), extra).set_index("slide_id").part
    for victim in sheet.slide_id[::2]:  # slides of every part, one at a time
        after = _split_with_status(tmp_path, sheet, {victim}, extra).set_index("slide_id").part
        assert victim not in after.index
        pd.testing.assert_series_equal(after, before.drop(victim))


def test_exclusions_that_empty_a_part_name_it():
    from slidetrain.data.splits import drop_excluded

    split = make_split(make_sheet([3, 3]), seed=0)
    val = split.slide_id[split.part == "val"].tolist()
    with pytest.raises(SplitError, match=r"\['val'\] empty.*" + val[0]):
        drop_excluded(split, set(val))
    assert drop_excluded(split, {"not-a-slide"}) is split


def test_external_one_per_patient_keeps_other_patients_slide_when_one_is_excluded():
    from slidetrain.data.splits import external_test_split

    sheet = make_sheet([6, 6], slides_per_patient=(2, 3), seed=1)
    before = external_test_split(sheet, seed=0, one_per_patient=True)
    victim = before.slide_id.iloc[3]
    after = external_test_split(sheet, seed=0, one_per_patient=True, excluded={victim})
    assert len(after) == len(before)  # the patient is kept, with another of its slides
    others = before.slide_id != victim
    assert set(before.slide_id[others]) <= set(after.slide_id) and victim not in set(after.slide_id)

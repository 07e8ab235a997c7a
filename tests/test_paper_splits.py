"""The papers' splits: local-learning slide counts, CAMELYON's official split with a validation part
from CAMELYON17 train, PANDA's user-provided subset split, a one-slide-per-patient external test set."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from slidetrain.cli import main
from slidetrain.data.sheet import read_sheet
from slidetrain.data.splits import (
    check_split,
    external_test_split,
    make_split_counts,
    official_from_sheet,
    read_official_split,
)
from slidetrain.errors import SheetError, SplitError
from slidetrain.paper.reference import paper_split_counts


def _sheet(n_patients: int, labels: list[str], seed: int = 0, two_slide_every: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        label = labels[int(rng.integers(len(labels)))]
        for k in range(2 if two_slide_every and p % two_slide_every == 0 else 1):
            rows.append({"slide_id": f"s{p:04d}_{k}", "patient_id": f"p{p:04d}", "label": label, "source": "x.svs"})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("dataset,labels", [("TCGA-NSCLC", ["LUAD", "LUSC"]), ("TCGA-RCC", ["KICH", "KIRC", "KIRP"])])
def test_local_learning_counts_one_slide_per_patient_are_met(dataset, labels):
    counts = paper_split_counts(dataset)
    sheet = _sheet(sum(counts), labels)
    split = make_split_counts(sheet, seed=3, counts=counts)
    got = tuple(int((split.part == p).sum()) for p in ("train", "val", "test"))
    assert all(abs(g - c) <= 1 for g, c in zip(got, counts, strict=True)) and sum(got) == sum(counts)
    for label in labels:  # stratified: each class near its share in every part
        share = (sheet.label == label).mean()
        assert abs((split[split.part == "test"].label == label).mean() - share) < 0.03
    assert make_split_counts(sheet, seed=3, counts=counts).equals(split)  # seeded
    assert not make_split_counts(sheet, seed=4, counts=counts).equals(split)


def test_counts_keep_patients_whole():
    sheet = _sheet(900, ["LUAD", "LUSC"], two_slide_every=7)
    counts = paper_split_counts("TCGA-NSCLC")
    split = make_split_counts(sheet, seed=0, counts=counts)
    check_split(split)  # no patient in two parts
    got = [int((split.part == p).sum()) for p in ("train", "val", "test")]
    assert all(abs(g - c) / c < 0.05 for g, c in zip(got, [c * len(sheet) / sum(counts) for c in counts], strict=True))


def test_lks_fixed_test_set_and_counts_for_the_rest(tmp_path):
    counts = paper_split_counts("LKS")
    sheet = _sheet(sum(counts), ["negative", "AMA", "SMA-V", "SMA-T"])
    sheet["official_part"] = ["test" if i < counts[2] else "train" for i in range(len(sheet))]
    path = tmp_path / "lks.tsv"
    sheet.assign(source="synthetic").to_csv(path, sep="\t", index=False)
    out = tmp_path / "split.csv"
    assert (
        main(
            [
                "split",
                "--sheet",
                str(path),
                "--classes",
                "negative",
                "AMA",
                "SMA-V",
                "SMA-T",
                "--seed",
                "0",
                "--counts",
                *map(str, counts),
                "--fixed-test",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    split = pd.read_csv(out)
    assert set(split.slide_id[split.part == "test"]) == set(sheet.slide_id[: counts[2]])
    assert abs((split.part == "train").sum() - counts[0]) <= 2 and abs((split.part == "val").sum() - counts[1]) <= 2


def test_camelyon_official_split_draws_whole_patients_for_validation():
    rows = [
        {
            "slide_id": f"patient_{p:03d}_node_{n}",
            "patient_id": f"patient_{p:03d}",
            "label": "tumor" if (p + n) % 3 == 0 else "normal",
            "source": "s3://b/k",
            "official_part": "train" if p < 100 else "test",
        }
        for p in range(200)
        for n in range(5)
    ]
    sheet = pd.DataFrame(rows)
    split = official_from_sheet(sheet, seed=0, n_val_slides=50)
    assert (split.part == "val").sum() == 50 and split[split.part == "val"].patient_id.nunique() == 10
    assert (split.part == "test").sum() == 500 and (split.part == "train").sum() == 450
    check_split(split)
    assert official_from_sheet(sheet, seed=0, n_val_slides=50).equals(split)


def test_external_test_set_one_slide_per_patient(tmp_path):
    sheet = _sheet(394, ["isup1", "isup3"], two_slide_every=14)  # TCGA-PRAD: 421 slides of 394 patients
    split = external_test_split(sheet, seed=0, one_per_patient=True)
    assert len(split) == 394 and split.patient_id.is_unique and (split.part == "test").all()
    path = tmp_path / "prad.tsv"
    sheet.assign(source="synthetic").to_csv(path, sep="\t", index=False)
    out = tmp_path / "external.csv"
    assert (
        main(
            [
                "external-split",
                "--sheet",
                str(path),
                "--classes",
                "isup1",
                "isup3",
                "--one-per-patient",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    written = pd.read_csv(out, dtype=str)
    assert written.slide_id.tolist() == split.slide_id.tolist() and (written.part == "test").all()


def test_panda_user_split_may_leave_noisy_slides_out(tmp_path):
    sheet = _sheet(40, ["isup0", "isup5"])
    listed = sheet.iloc[:30]
    parts = ["train"] * 20 + ["val"] * 5 + ["test"] * 5
    path = tmp_path / "song_split.csv"
    pd.DataFrame({"image_id": listed.slide_id, "split": parts}).to_csv(path, index=False)
    with pytest.raises(SplitError, match="10 slide.*in no part"):
        read_official_split(path, sheet)
    split = read_official_split(path, sheet, allow_subset=True)
    assert len(split) == 30 and split.part.tolist() == parts


def test_patient_in_two_parts_of_an_official_split_is_named_with_its_slides(tmp_path):
    sheet = _sheet(10, ["a", "b"], two_slide_every=5)
    path = tmp_path / "official.csv"
    parts = ["train"] * len(sheet)
    parts[1], parts[-1], parts[-2] = "test", "val", "test"  # s0000_1 (patient p0000's second slide) in test
    pd.DataFrame({"slide_id": sheet.slide_id, "part": parts}).to_csv(path, index=False)
    with pytest.raises(SplitError, match=r"p0000 \(train: s0000_0; test: s0000_1\)"):
        read_official_split(path, sheet)


def test_sheet_with_a_missing_label_names_the_row(tmp_path):
    path = tmp_path / "s.tsv"
    path.write_text("slide_id\tpatient_id\tlabel\tsource\tmd5\na\tp\tLUAD\tgdc:1\t\nb\tq\t\tgdc:2\t\n")
    with pytest.raises(SheetError, match=r"empty 'label' in row\(s\) \[3\]"):
        read_sheet(path, ["LUAD", "LUSC"])
    path.write_text("slide_id\tpatient_id\tlabel\tsource\tmd5\na\tp\tLUAD\tgdc:1\tnot-an-md5\n")
    with pytest.raises(SheetError, match=r"bad 'md5' in row\(s\) \[2\]"):
        read_sheet(path, ["LUAD", "LUSC"])

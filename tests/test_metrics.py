"""Metrics: hand-computed values, agreement with sklearn, bootstrap CIs, prediction tables."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    cohen_kappa_score,
    f1_score,
    roc_auc_score,
)

from slidetrain.errors import SheetError
from slidetrain.evaluate.metrics import (
    _metrics_on_resamples,
    bootstrap_ci,
    classification_metrics,
    evaluate_predictions,
)


def one_hot_probs(pred: list[int], n_classes: int, confidence: float = 0.9) -> np.ndarray:
    """Probabilities whose argmax is `pred`."""
    probs = np.full((len(pred), n_classes), (1 - confidence) / (n_classes - 1))
    probs[np.arange(len(pred)), pred] = confidence
    return probs


def noisy_classifier(n: int, n_classes: int, signal: float, seed: int):
    """Labels and softmax probabilities of a classifier with some skill."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n)
    logits = rng.normal(size=(n, n_classes))
    logits[np.arange(n), y] += signal
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return y, probs


# ---------------------------------------------------------------- hand-computed values


def test_binary_example_by_hand():
    # positives score 0.4, 0.8; negatives 0.1, 0.6. Of the 4 (pos, neg) pairs, 3 are
    # ordered right (0.4 > 0.6 is not): AUROC = 3/4. Argmax predicts [0, 1, 0, 1]:
    # 2 of 4 right; each class has recall 1/2 and F1 = 2*1 / (2 + 2) = 1/2.
    y = np.array([0, 0, 1, 1])
    p1 = np.array([0.1, 0.6, 0.4, 0.8])
    m = classification_metrics(y, np.stack([1 - p1, p1], axis=1))
    assert m == pytest.approx({"accuracy": 0.5, "balanced_accuracy": 0.5, "auroc": 0.75, "f1_macro": 0.5})
    assert "qwk" not in m


def test_tied_scores_count_half():
    # one positive and one negative tied: AUROC = 1/2
    y = np.array([0, 1])
    probs = np.array([[0.5, 0.5], [0.5, 0.5]])
    assert classification_metrics(y, probs)["auroc"] == pytest.approx(0.5)


def test_qwk_perfect_reversed_and_by_hand():
    y = np.array([0, 1, 2, 3])
    assert classification_metrics(y, one_hot_probs([0, 1, 2, 3], 4), ordinal=True)["qwk"] == pytest.approx(1.0)
    # fully reversed: sum w*O = 9+1+1+9 = 20, sum w*E = sum_ij (i-j)^2 / 4 = 40/4 = 10,
    # kappa = 1 - 20/10 = -1
    reversed_ = classification_metrics(y, one_hot_probs([3, 2, 1, 0], 4), ordinal=True)
    assert reversed_["qwk"] == pytest.approx(-1.0)
    # y = [0,0,1,2], pred = [0,1,1,2]: one disagreement of weight 1; true counts (2,1,1),
    # predicted (1,2,1), sum w*E = 20/4 = 5, kappa = 1 - 1/5 = 0.8
    m = classification_metrics(np.array([0, 0, 1, 2]), one_hot_probs([0, 1, 1, 2], 3), True)
    assert m["qwk"] == pytest.approx(0.8)


def test_qwk_penalises_far_errors_more_than_near_ones():
    y = np.array([0, 1, 2, 3, 4] * 4)
    near = np.clip(y + np.tile([1, 0, 0, 0, 0], 4), 0, 4)
    far = np.clip(y + np.tile([4, 0, 0, 0, 0], 4), 0, 4)
    q_near = classification_metrics(y, one_hot_probs(list(near), 5), True)["qwk"]
    q_far = classification_metrics(y, one_hot_probs(list(far), 5), True)["qwk"]
    # same accuracy, different QWK
    assert q_far < q_near < 1


# ---------------------------------------------------------------- agreement with sklearn


@pytest.mark.parametrize("n_classes", [2, 3, 5])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_agrees_with_sklearn(n_classes, seed):
    y, probs = noisy_classifier(120, n_classes, signal=1.0, seed=seed)
    probs = np.round(probs, 2)  # ties in scores, to test their handling
    probs = probs / probs.sum(axis=1, keepdims=True)
    pred = probs.argmax(axis=1)
    m = classification_metrics(y, probs, ordinal=True)
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert m["f1_macro"] == pytest.approx(f1_score(y, pred, average="macro"))
    if n_classes == 2:
        expected_auc = roc_auc_score(y, probs[:, 1])
    else:
        expected_auc = roc_auc_score(y, probs, multi_class="ovr", average="macro")
    assert m["auroc"] == pytest.approx(expected_auc)
    expected_qwk = cohen_kappa_score(y, pred, labels=range(n_classes), weights="quadratic")
    assert m["qwk"] == pytest.approx(expected_qwk)


def test_f1_and_balanced_accuracy_follow_sklearn_when_a_class_is_never_predicted():
    y = np.array([0, 0, 1, 1, 2, 2])
    pred = [0, 0, 1, 0, 1, 1]  # class 2 never predicted
    m = classification_metrics(y, one_hot_probs(pred, 3))
    assert m["f1_macro"] == pytest.approx(f1_score(y, pred, average="macro", zero_division=0))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))


# ---------------------------------------------------------------- undefined AUROC


def test_missing_class_gives_nan_auroc_not_a_crash():
    y = np.array([0, 1, 0, 1])  # class 2 absent from y_true
    m = classification_metrics(y, one_hot_probs([0, 1, 2, 1], 3), ordinal=True)
    assert math.isnan(m["auroc"])
    assert m["accuracy"] == pytest.approx(0.75)
    assert not math.isnan(m["qwk"])
    # balanced accuracy averages recall over classes in y_true: (1/2 + 1) / 2; macro F1
    # averages over classes true or predicted: (2/3 + 1 + 0) / 3; both as sklearn does
    pred = [0, 1, 2, 1]
    assert m["balanced_accuracy"] == pytest.approx(0.75)
    assert m["f1_macro"] == pytest.approx(5 / 9)
    with pytest.warns(UserWarning):  # sklearn warns about the class missing from y_true
        assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert m["f1_macro"] == pytest.approx(f1_score(y, pred, average="macro"))
    # binary with a single class
    m = classification_metrics(np.array([1, 1, 1]), one_hot_probs([1, 0, 1], 2))
    assert math.isnan(m["auroc"])
    assert m["accuracy"] == pytest.approx(2 / 3)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="shape"):
        classification_metrics(np.array([0, 1]), np.array([0.2, 0.8]))
    with pytest.raises(ValueError, match="class indices"):
        classification_metrics(np.array([0, 3]), one_hot_probs([0, 1], 2))
    with pytest.raises(ValueError, match="match probs"):
        classification_metrics(np.array([0, 1, 1]), one_hot_probs([0, 1], 2))
    with pytest.raises(ValueError, match="NaN"):
        classification_metrics(np.array([0, 1]), np.array([[np.nan, 1.0], [0.0, 1.0]]))


# ---------------------------------------------------------------- bootstrap


def test_vectorised_resamples_equal_metrics_of_each_resample():
    y, probs = noisy_classifier(40, 3, signal=1.0, seed=5)
    rng = np.random.default_rng(0)
    idx = rng.integers(0, 40, size=(25, 40))
    idx[0] = 0  # a resample with a single slide: AUROC NaN, QWK NaN
    first_zero = np.flatnonzero(y == 0)[0]
    idx[1] = np.where(y[idx[1]] == 2, first_zero, idx[1])  # class 2 missing: AUROC NaN
    times = np.stack([np.bincount(row, minlength=40) for row in idx])  # (25, 40) slide multiplicities
    batch = _metrics_on_resamples(y, probs, times, ordinal=True)
    for b in range(len(idx)):
        single = classification_metrics(y[idx[b]], probs[idx[b]], ordinal=True)
        for name, value in single.items():
            np.testing.assert_equal(np.isnan(batch[name][b]), np.isnan(value))
            if not np.isnan(value):
                assert batch[name][b] == pytest.approx(value), (name, b)


@pytest.mark.parametrize("ordinal", [False, True])
def test_bootstrap_ci_contains_point_estimate(ordinal):
    y, probs = noisy_classifier(200, 3, signal=1.5, seed=1)
    point = classification_metrics(y, probs, ordinal=ordinal)
    ci = bootstrap_ci(y, probs, ordinal=ordinal, n_bootstrap=500, seed=0, patients=None)
    assert set(ci) == set(point)
    for name, (lo, hi) in ci.items():
        assert lo < point[name] < hi, (name, lo, point[name], hi)
        assert hi - lo < 0.3


def test_bootstrap_ci_narrows_with_more_slides():
    small = noisy_classifier(60, 2, signal=1.0, seed=2)
    large = noisy_classifier(960, 2, signal=1.0, seed=2)
    ci_small = bootstrap_ci(*small, n_bootstrap=400, seed=0, patients=None)
    ci_large = bootstrap_ci(*large, n_bootstrap=400, seed=0, patients=None)
    for name in ci_small:
        width_small = ci_small[name][1] - ci_small[name][0]
        width_large = ci_large[name][1] - ci_large[name][0]
        # 16x the slides: about 1/4 the width
        assert width_large < 0.5 * width_small, name


def test_bootstrap_is_seeded_and_alpha_sets_the_width():
    y, probs = noisy_classifier(100, 3, signal=1.0, seed=3)
    a = bootstrap_ci(y, probs, n_bootstrap=200, seed=4, patients=None)
    assert a == bootstrap_ci(y, probs, n_bootstrap=200, seed=4, patients=None)
    assert a != bootstrap_ci(y, probs, n_bootstrap=200, seed=5, patients=None)
    wide = bootstrap_ci(y, probs, n_bootstrap=200, seed=4, alpha=0.01, patients=None)
    narrow = bootstrap_ci(y, probs, n_bootstrap=200, seed=4, alpha=0.5, patients=None)
    for name in a:
        assert wide[name][0] <= a[name][0] <= narrow[name][0]
        assert narrow[name][1] <= a[name][1] <= wide[name][1]


def test_bootstrap_skips_undefined_auroc_only():
    # 1 positive in 8 slides: about 1/3 of resamples miss it, AUROC undefined there
    y = np.array([0, 0, 0, 0, 0, 0, 0, 1])
    p1 = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.9])
    ci = bootstrap_ci(y, np.stack([1 - p1, p1], axis=1), n_bootstrap=300, seed=0, patients=None)
    assert ci["auroc"] == (1.0, 1.0)  # every resample with the positive ranks it first
    for name, (lo, hi) in ci.items():
        assert np.isfinite(lo) and np.isfinite(hi), name
    # AUROC undefined on every resample: (nan, nan), the rest still computed
    ci = bootstrap_ci(np.zeros(5, int), one_hot_probs([0, 0, 1, 0, 0], 2), n_bootstrap=50, patients=None)
    assert all(math.isnan(v) for v in ci["auroc"])
    assert np.isfinite(ci["accuracy"]).all()


def test_bootstrap_chunks_give_the_same_answer(monkeypatch):
    import slidetrain.evaluate.metrics as metrics

    y, probs = noisy_classifier(50, 3, signal=1.0, seed=6)
    whole = bootstrap_ci(y, probs, ordinal=True, n_bootstrap=100, seed=1, patients=None)
    monkeypatch.setattr(metrics, "_RESAMPLE_ELEMENTS", 50 * 7)  # chunks of 7 resamples
    assert bootstrap_ci(y, probs, ordinal=True, n_bootstrap=100, seed=1, patients=None) == whole


# ---------------------------------------------------------------- prediction tables


def prediction_table(y: np.ndarray, probs: np.ndarray, names: list[str]) -> pd.DataFrame:
    table = pd.DataFrame({"slide_id": [f"s{i}" for i in range(len(y))]})
    table["label"] = [names[i] for i in y]
    for c, name in enumerate(names):
        table[f"prob_{name}"] = probs[:, c]
    return table


def test_evaluate_predictions():
    names = ["benign", "low", "high"]
    y, probs = noisy_classifier(90, 3, signal=1.5, seed=7)
    table = prediction_table(y, probs, names)
    table["extra"] = "ignored"
    out = evaluate_predictions(table, names, ordinal=True, n_bootstrap=200, seed=0, patient_of=None)
    assert set(out) == {
        "n_slides",
        "n_patients",
        "bootstrap_unit",
        "metrics",
        "ci95",
        "confusion_matrix",
        "class_names",
    }
    assert out["bootstrap_unit"] == "slide" and out["n_patients"] == 90
    assert out["n_slides"] == 90
    assert out["class_names"] == names
    assert out["metrics"] == pytest.approx(classification_metrics(y, probs, ordinal=True))
    assert out["ci95"] == {
        k: list(v) for k, v in bootstrap_ci(y, probs, True, n_bootstrap=200, seed=0, patients=None).items()
    }
    cm = np.array(out["confusion_matrix"])
    pred = probs.argmax(axis=1)
    for t in range(3):
        for p in range(3):
            assert cm[t, p] == np.sum((y == t) & (pred == p))


def test_evaluate_predictions_errors():
    names = ["a", "b"]
    y, probs = noisy_classifier(10, 2, signal=1.0, seed=8)
    table = prediction_table(y, probs, names)
    with pytest.raises(SheetError, match="prob_b"):
        evaluate_predictions(table.drop(columns="prob_b"), names, ordinal=False, patient_of=None)
    bad = table.copy()
    bad.loc[3, "label"] = "c"
    with pytest.raises(SheetError, match=r"s3 \(c\)"):
        evaluate_predictions(bad, names, ordinal=False, patient_of=None)
    bad = table.copy()
    bad.loc[4, "prob_a"] = np.nan
    with pytest.raises(SheetError, match="s4"):
        evaluate_predictions(bad, names, ordinal=False, patient_of=None)
    bad = pd.concat([table, table.iloc[:1]], ignore_index=True)
    with pytest.raises(SheetError, match="more than once"):
        evaluate_predictions(bad, names, ordinal=False, patient_of=None)


# ---------------------------------------------------------------- patient bootstrap


def test_a_patient_bootstrap_of_repeated_slides_is_the_slide_bootstrap_of_one_each():
    """Each patient's k identical slides: resampling patients must weigh them as one unit (the
    metrics are ratios, so k copies of a drawn patient count as one); resampling slides would not."""
    y, probs = noisy_classifier(40, 3, signal=1.0, seed=9)
    k = 3
    y_rep, probs_rep = np.repeat(y, k), np.repeat(probs, k, axis=0)
    patients = np.repeat([f"p{i:02d}" for i in range(40)], k)
    one_each = bootstrap_ci(y, probs, ordinal=True, n_bootstrap=300, seed=2, patients=None)
    by_patient = bootstrap_ci(y_rep, probs_rep, ordinal=True, n_bootstrap=300, seed=2, patients=patients)
    for name in one_each:
        assert by_patient[name] == pytest.approx(one_each[name], abs=1e-12), name
    by_slide = bootstrap_ci(y_rep, probs_rep, ordinal=True, n_bootstrap=300, seed=2, patients=None)
    assert by_slide["accuracy"][1] - by_slide["accuracy"][0] < one_each["accuracy"][1] - one_each["accuracy"][0]


def test_patients_whose_slides_agree_widen_the_interval():
    rng = np.random.default_rng(4)
    right = rng.random(20) < 0.7  # per patient: all 10 of its slides right, or all wrong
    y = np.zeros(200, int)
    probs = one_hot_probs(np.where(np.repeat(right, 10), 0, 1), 2)
    patients = np.repeat(np.arange(20), 10)
    by_patient = bootstrap_ci(y, probs, n_bootstrap=400, seed=0, patients=patients)["accuracy"]
    by_slide = bootstrap_ci(y, probs, n_bootstrap=400, seed=0, patients=None)["accuracy"]
    assert by_patient[1] - by_patient[0] > 2 * (by_slide[1] - by_slide[0])


def test_evaluate_predictions_resamples_the_splits_patients():
    names = ["a", "b"]
    y, probs = noisy_classifier(30, 2, signal=1.0, seed=8)
    table = prediction_table(y, probs, names)
    patient_of = {f"s{i}": f"p{i // 3}" for i in range(30)}
    out = evaluate_predictions(table, names, ordinal=False, n_bootstrap=100, seed=0, patient_of=patient_of)
    assert out["bootstrap_unit"] == "patient" and out["n_patients"] == 10 and out["n_slides"] == 30
    patients = [patient_of[s] for s in table.slide_id]
    assert out["ci95"] == {
        k: list(v) for k, v in bootstrap_ci(y, probs, n_bootstrap=100, seed=0, patients=patients).items()
    }
    del patient_of["s7"]
    with pytest.raises(SheetError, match="s7.*no patient id"):
        evaluate_predictions(table, names, ordinal=False, patient_of=patient_of)
    with pytest.raises(TypeError, match="patients"):  # no silent slide bootstrap: the caller must choose
        bootstrap_ci(y, probs)

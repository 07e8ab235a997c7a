"""Slide-level classification metrics with bootstrap confidence intervals.

The bootstrap resamples patients, not slides: slides of one patient are not
independent, and a slide bootstrap would give intervals too narrow whenever
patients have several slides. A resample draws the test part's patients with
replacement and takes every slide of each drawn patient; it is held as a row
of slide multiplicities (B, N) (slide i counted as often as its patient was
drawn). Every metric is computed from a batch of such rows at once: the
confusion matrices of all rows come from one weighted bincount, AUROC from
a weighted Mann-Whitney U over tie groups of the scores. The point estimate
is the batch of one row of ones, so point estimates and bootstrap replicates
share one code path. With one slide per patient it is the slide bootstrap.

Definitions (argmax of the probabilities is the predicted class):
- accuracy: fraction correct.
- balanced_accuracy: mean recall over the classes present in y_true
  (sklearn's balanced_accuracy_score).
- f1_macro: mean F1 over the classes present in y_true or predicted
  (sklearn's f1_score(average="macro") default).
- auroc: binary, AUROC of class 1's probability; multi-class, the macro mean
  of one-vs-rest AUROCs. NaN when a class is missing from y_true.
- qwk (only when ordinal): Cohen's kappa with quadratic weights over all C
  classes (sklearn's cohen_kappa_score(labels=range(C), weights="quadratic")).
  NaN when undefined (every slide true and predicted in one class).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from slidetrain.errors import SheetError

_RESAMPLE_ELEMENTS = 4_000_000  # slides x resamples per chunk: bounds memory


def _check_inputs(y_true: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true)
    p = np.asarray(probs, dtype=float)
    if p.ndim != 2 or p.shape[1] < 2:
        raise ValueError(f"probs has shape {p.shape}; expected (N, C) with C >= 2 classes")
    if y.ndim != 1 or len(y) != len(p):
        raise ValueError(f"y_true has shape {y.shape}; expected ({len(p)},) to match probs")
    if len(y) == 0:
        raise ValueError("no slides to evaluate: y_true is empty")
    if not np.issubdtype(y.dtype, np.integer):
        if not (np.issubdtype(y.dtype, np.floating) and np.all(y == np.round(y))):
            raise ValueError(f"y_true has dtype {y.dtype}; expected integer class indices")
    y = y.astype(np.int64)
    if y.min() < 0 or y.max() >= p.shape[1]:
        raise ValueError(f"y_true holds class indices {sorted(set(y.tolist()))}; expected 0..{p.shape[1] - 1}")
    if not np.all(np.isfinite(p)):
        raise ValueError("probs holds NaN or infinite values")
    return y, p


def _confusion_batch(y: np.ndarray, pred: np.ndarray, n_classes: int, weights: np.ndarray | None = None) -> np.ndarray:
    """Confusion matrices (B, C, C), rows true, columns predicted, of (N,) labels and predictions,
    each slide counted weights[b, i] times in row b (weights (B, N); None: once, B = 1)."""
    w = np.ones((1, len(y))) if weights is None else weights
    n_rows = w.shape[0]
    cell = y * n_classes + pred  # (N,)
    flat = np.arange(n_rows)[:, None] * (n_classes * n_classes) + cell[None, :]  # (B, N)
    counts = np.bincount(flat.ravel(), weights=w.ravel(), minlength=n_rows * n_classes * n_classes)
    counts = counts.reshape(n_rows, n_classes, n_classes)
    return counts.astype(np.int64) if weights is None else counts


def _auroc_batch(positive: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """One-vs-rest AUROC per row of slide multiplicities weights (B, N); NaN where a side is empty.

    positive (N,) bool, scores (N,). Mann-Whitney U with multiplicities: every (positive,
    negative) pair counts w_pos * w_neg, in full when the positive scores higher, half on a tie.
    """
    _, group = np.unique(scores, return_inverse=True)  # (N,) tie group, in increasing score
    n_groups = int(group.max()) + 1
    n_rows = weights.shape[0]
    w_pos = weights * positive  # (B, N)
    w_neg = weights * ~positive  # (B, N)
    flat = (np.arange(n_rows)[:, None] * n_groups + group[None, :]).ravel()
    neg_in = np.bincount(flat, weights=w_neg.ravel(), minlength=n_rows * n_groups).reshape(n_rows, n_groups)
    neg_below = np.cumsum(neg_in, axis=1) - neg_in  # (B, G) negative weight scoring strictly lower
    u = (w_pos * (neg_below[:, group] + 0.5 * neg_in[:, group])).sum(axis=1)  # (B,)
    n_pos, n_neg = w_pos.sum(axis=1), w_neg.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        auc = u / (n_pos * n_neg)
    return np.where((n_pos > 0) & (n_neg > 0), auc, np.nan)


def _metrics_from_confusion(cm: np.ndarray, ordinal: bool) -> dict[str, np.ndarray]:
    """accuracy, balanced_accuracy, f1_macro (and qwk) of (B, C, C) confusion matrices."""
    n_classes = cm.shape[1]
    cm = cm.astype(float)
    n = cm.sum(axis=(1, 2))  # (B,)
    tp = np.diagonal(cm, axis1=1, axis2=2)  # (B, C)
    true_count = cm.sum(axis=2)  # (B, C)
    pred_count = cm.sum(axis=1)  # (B, C)
    out = {"accuracy": tp.sum(axis=1) / n}

    present = true_count > 0
    recall = np.divide(tp, true_count, out=np.zeros_like(tp), where=present)
    out["balanced_accuracy"] = recall.sum(axis=1) / present.sum(axis=1)

    # F1 = 2TP / (2TP + FP + FN) = 2TP / (true count + predicted count)
    seen = (true_count + pred_count) > 0
    f1 = np.divide(2 * tp, true_count + pred_count, out=np.zeros_like(tp), where=seen)
    out["f1_macro"] = f1.sum(axis=1) / seen.sum(axis=1)

    if ordinal:
        grid = np.arange(n_classes)
        weights = (grid[:, None] - grid[None, :]) ** 2  # (C, C)
        expected = true_count[:, :, None] * pred_count[:, None, :] / n[:, None, None]
        observed_disagreement = (weights * cm).sum(axis=(1, 2))
        expected_disagreement = (weights * expected).sum(axis=(1, 2))
        with np.errstate(divide="ignore", invalid="ignore"):
            qwk = 1.0 - observed_disagreement / expected_disagreement
        out["qwk"] = np.where(expected_disagreement > 0, qwk, np.nan)
    return out


def _metrics_on_resamples(
    y: np.ndarray, probs: np.ndarray, weights: np.ndarray, ordinal: bool
) -> dict[str, np.ndarray]:
    """Every metric for each row of slide multiplicities weights (B, N); arrays of shape (B,)."""
    n_classes = probs.shape[1]
    out = _metrics_from_confusion(_confusion_batch(y, probs.argmax(axis=1), n_classes, weights), ordinal)
    if n_classes == 2:
        auroc = _auroc_batch(y == 1, probs[:, 1], weights)
    else:
        per_class = [_auroc_batch(y == c, probs[:, c], weights) for c in range(n_classes)]
        auroc = np.mean(per_class, axis=0)  # NaN when any class is missing
    out["auroc"] = auroc
    order = ["accuracy", "balanced_accuracy", "auroc", "f1_macro", "qwk"]
    return {k: out[k] for k in order if k in out}


def classification_metrics(y_true: np.ndarray, probs: np.ndarray, ordinal: bool = False) -> dict[str, float]:
    """accuracy, balanced_accuracy, auroc, f1_macro (+ qwk when ordinal) of one prediction set.

    y_true (N,) integer class indices; probs (N, C) class probabilities (or any
    scores: only their ranks and argmax matter). AUROC is NaN, not an error,
    when a class is missing from y_true.
    """
    y, p = _check_inputs(y_true, probs)
    once = np.ones((1, len(y)))  # (1, N): every slide once
    return {k: float(v[0]) for k, v in _metrics_on_resamples(y, p, once, ordinal).items()}


def _patient_index(patients: Sequence | None, n: int) -> np.ndarray:
    """(N,) index of each slide's patient in 0..P-1; None: every slide its own patient."""
    if patients is None:
        return np.arange(n)
    ids = np.asarray(patients, dtype=object)
    if ids.shape != (n,):
        raise ValueError(f"patients has shape {ids.shape}; expected ({n},), one patient id per slide")
    missing = [i for i, v in enumerate(ids) if v is None or str(v).strip() == ""]
    if missing:
        raise ValueError(f"patients: slide position(s) {missing[:10]} have no patient id")
    _, index = np.unique(ids.astype(str), return_inverse=True)
    return index


def bootstrap_ci(
    y_true: np.ndarray,
    probs: np.ndarray,
    ordinal: bool = False,
    n_bootstrap: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    *,
    patients: Sequence | None,
) -> dict[str, tuple[float, float]]:
    """Percentile (1 - alpha) confidence interval per metric, resampling patients with replacement.

    `patients` (N,): each slide's patient id; a resample draws as many patients as there are,
    with replacement, and takes all their slides. Required, so that no caller bootstraps slides
    by default: `patients=None` resamples slides, a choice for a caller that has no patient ids.
    A resample on which a metric is undefined (AUROC with a class missing,
    QWK on a single class) is left out for that metric only; a metric
    undefined on every resample gets (nan, nan).
    """
    y, p = _check_inputs(y_true, probs)
    if n_bootstrap < 1:
        raise ValueError(f"n_bootstrap = {n_bootstrap}; expected a positive integer")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha = {alpha}; expected a number between 0 and 1")
    n = len(y)
    patient = _patient_index(patients, n)  # (N,)
    n_patients = int(patient.max()) + 1
    rng = np.random.default_rng(seed)
    chunk = max(1, _RESAMPLE_ELEMENTS // n)
    batches: list[dict[str, np.ndarray]] = []
    for start in range(0, n_bootstrap, chunk):
        rows = min(chunk, n_bootstrap - start)
        drawn = rng.integers(0, n_patients, size=(rows, n_patients))  # (B, P) patient draws
        flat = (np.arange(rows)[:, None] * n_patients + drawn).ravel()
        times = np.bincount(flat, minlength=rows * n_patients).reshape(rows, n_patients)  # (B, P)
        batches.append(_metrics_on_resamples(y, p, times[:, patient], ordinal))  # (B, N) multiplicities
    ci = {}
    for name in batches[0]:
        values = np.concatenate([b[name] for b in batches])
        values = values[np.isfinite(values)]
        if len(values) == 0:
            ci[name] = (float("nan"), float("nan"))
        else:
            lo, hi = np.quantile(values, [alpha / 2, 1 - alpha / 2])
            ci[name] = (float(lo), float(hi))
    return ci


def evaluate_predictions(
    pred: pd.DataFrame,
    class_names: list[str],
    ordinal: bool,
    n_bootstrap: int = 1000,
    seed: int = 0,
    *,
    patient_of: Mapping[str, str] | None,
) -> dict:
    """Metrics, 95% bootstrap CIs and confusion matrix of a predictions table.

    pred: one row per slide with columns slide_id, label (a class name) and
    prob_<class> for every class in class_names (whose order defines the class
    indices). `patient_of`: slide_id -> patient_id (the split's), so the CIs
    resample patients; every predicted slide must be in it. Required: None
    resamples slides, a choice for a caller without patient ids, recorded as
    bootstrap_unit "slide". Returns {"n_slides", "n_patients", "bootstrap_unit",
    "metrics", "ci95": {metric: [lo, hi]}, "confusion_matrix" (rows true,
    columns predicted, class_names order), "class_names"}. Undefined metrics are NaN.
    """
    class_names = [str(c) for c in class_names]
    if len(class_names) < 2 or len(set(class_names)) != len(class_names):
        raise SheetError(f"class_names = {class_names}; expected two or more distinct names")
    prob_cols = [f"prob_{c}" for c in class_names]
    missing = [c for c in ["slide_id", "label", *prob_cols] if c not in pred.columns]
    if missing:
        raise SheetError(
            f"predictions lack column(s) {missing}; expected slide_id, label and {prob_cols}, got {list(pred.columns)}"
        )
    if len(pred) == 0:
        raise SheetError("predictions table is empty; expected one row per test slide")
    slides = pred["slide_id"].astype(str)
    dup = slides[slides.duplicated()].unique()
    if len(dup):
        raise SheetError(f"predictions list slide(s) more than once: {list(dup[:10])}")
    labels = pred["label"].astype(str)
    index_of = {c: i for i, c in enumerate(class_names)}
    unknown = ~labels.isin(index_of)
    if unknown.any():
        bad = [f"{s} ({lab})" for s, lab in zip(slides[unknown], labels[unknown], strict=True)]
        raise SheetError(f"predictions have label(s) not in class_names {class_names}: slide(s) {bad[:10]}")
    probs = pred[prob_cols].to_numpy(dtype=float)  # (N, C)
    bad_rows = ~np.isfinite(probs).all(axis=1)
    if bad_rows.any():
        raise SheetError(f"predictions have NaN or infinite probabilities for slide(s) {list(slides[bad_rows])[:10]}")
    y = labels.map(index_of).to_numpy(dtype=np.int64)  # (N,)
    patients = None
    if patient_of is not None:
        unknown = [s for s in slides if s not in patient_of]
        if unknown:
            raise SheetError(
                f"predictions list slide(s) {unknown[:10]} that have no patient id in the split;"
                " expected every predicted slide in the split"
            )
        patients = [str(patient_of[s]) for s in slides]

    metrics = classification_metrics(y, probs, ordinal=ordinal)
    ci = bootstrap_ci(y, probs, ordinal=ordinal, n_bootstrap=n_bootstrap, seed=seed, patients=patients)
    cm = _confusion_batch(y, probs.argmax(axis=1), len(class_names))[0]
    return {
        "n_slides": len(y),
        "n_patients": len(set(patients)) if patients is not None else len(y),
        "bootstrap_unit": "patient" if patients is not None else "slide",
        "metrics": metrics,
        "ci95": {k: [lo, hi] for k, (lo, hi) in ci.items()},
        "confusion_matrix": cm.tolist(),
        "class_names": class_names,
    }

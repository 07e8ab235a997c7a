"""Slide-level classification metrics with bootstrap confidence intervals.

Every metric is computed from a batch of resamples at once: a resample is a
row of slide indices, the confusion matrices of all rows come from one
bincount, and AUROC from row-wise ranks (Mann-Whitney U). The point estimate
is the batch of one resample that is the identity, so point estimates and
bootstrap replicates share one code path.

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

import numpy as np
import pandas as pd
from scipy.stats import rankdata

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
        raise ValueError(
            f"y_true holds class indices {sorted(set(y.tolist()))}; expected 0..{p.shape[1] - 1}"
        )
    if not np.all(np.isfinite(p)):
        raise ValueError("probs holds NaN or infinite values")
    return y, p


def _confusion_batch(yb: np.ndarray, pb: np.ndarray, n_classes: int) -> np.ndarray:
    """Confusion matrices (B, C, C), rows true, columns predicted, of (B, N) labels."""
    n_rows = yb.shape[0]
    flat = (np.arange(n_rows)[:, None] * n_classes + yb) * n_classes + pb  # (B, N)
    counts = np.bincount(flat.ravel(), minlength=n_rows * n_classes * n_classes)
    return counts.reshape(n_rows, n_classes, n_classes)


def _auroc_batch(yb: np.ndarray, scores: np.ndarray, positive: int) -> np.ndarray:
    """One-vs-rest AUROC per row of (B, N) labels and scores; NaN where a side is empty."""
    n = yb.shape[1]
    pos = yb == positive  # (B, N)
    n_pos = pos.sum(axis=1)
    n_neg = n - n_pos
    ranks = rankdata(scores, axis=1)  # (B, N), ties get their average rank
    u = (ranks * pos).sum(axis=1) - n_pos * (n_pos + 1) / 2
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
    y: np.ndarray, probs: np.ndarray, idx: np.ndarray, ordinal: bool
) -> dict[str, np.ndarray]:
    """Every metric for each row of slide indices idx (B, N); arrays of shape (B,)."""
    n_classes = probs.shape[1]
    yb = y[idx]  # (B, N)
    pb = probs.argmax(axis=1)[idx]  # (B, N)
    out = _metrics_from_confusion(_confusion_batch(yb, pb, n_classes), ordinal)
    if n_classes == 2:
        auroc = _auroc_batch(yb, probs[idx, 1], positive=1)
    else:
        per_class = [_auroc_batch(yb, probs[idx, c], positive=c) for c in range(n_classes)]
        auroc = np.mean(per_class, axis=0)  # NaN when any class is missing
    out["auroc"] = auroc
    order = ["accuracy", "balanced_accuracy", "auroc", "f1_macro", "qwk"]
    return {k: out[k] for k in order if k in out}


def classification_metrics(
    y_true: np.ndarray, probs: np.ndarray, ordinal: bool = False
) -> dict[str, float]:
    """accuracy, balanced_accuracy, auroc, f1_macro (+ qwk when ordinal) of one prediction set.

    y_true (N,) integer class indices; probs (N, C) class probabilities (or any
    scores: only their ranks and argmax matter). AUROC is NaN, not an error,
    when a class is missing from y_true.
    """
    y, p = _check_inputs(y_true, probs)
    identity = np.arange(len(y))[None, :]  # (1, N)
    return {k: float(v[0]) for k, v in _metrics_on_resamples(y, p, identity, ordinal).items()}


def bootstrap_ci(
    y_true: np.ndarray,
    probs: np.ndarray,
    ordinal: bool = False,
    n_bootstrap: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, tuple[float, float]]:
    """Percentile (1 - alpha) confidence interval per metric, resampling slides with replacement.

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
    rng = np.random.default_rng(seed)
    chunk = max(1, _RESAMPLE_ELEMENTS // n)
    batches: list[dict[str, np.ndarray]] = []
    for start in range(0, n_bootstrap, chunk):
        idx = rng.integers(0, n, size=(min(chunk, n_bootstrap - start), n))  # (B, N)
        batches.append(_metrics_on_resamples(y, p, idx, ordinal))
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
) -> dict:
    """Metrics, 95% bootstrap CIs and confusion matrix of a predictions table.

    pred: one row per slide with columns slide_id, label (a class name) and
    prob_<class> for every class in class_names (whose order defines the class
    indices). Returns {"n_slides", "metrics", "ci95": {metric: [lo, hi]},
    "confusion_matrix" (rows true, columns predicted, class_names order),
    "class_names"}. Undefined metrics are NaN.
    """
    class_names = [str(c) for c in class_names]
    if len(class_names) < 2 or len(set(class_names)) != len(class_names):
        raise SheetError(f"class_names = {class_names}; expected two or more distinct names")
    prob_cols = [f"prob_{c}" for c in class_names]
    missing = [c for c in ["slide_id", "label", *prob_cols] if c not in pred.columns]
    if missing:
        raise SheetError(
            f"predictions lack column(s) {missing}; expected slide_id, label and"
            f" {prob_cols}, got {list(pred.columns)}"
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
        raise SheetError(
            f"predictions have label(s) not in class_names {class_names}: slide(s) {bad[:10]}"
        )
    probs = pred[prob_cols].to_numpy(dtype=float)  # (N, C)
    bad_rows = ~np.isfinite(probs).all(axis=1)
    if bad_rows.any():
        raise SheetError(
            f"predictions have NaN or infinite probabilities for slide(s)"
            f" {list(slides[bad_rows])[:10]}"
        )
    y = labels.map(index_of).to_numpy(dtype=np.int64)  # (N,)

    metrics = classification_metrics(y, probs, ordinal=ordinal)
    ci = bootstrap_ci(y, probs, ordinal=ordinal, n_bootstrap=n_bootstrap, seed=seed)
    cm = _confusion_batch(y[None, :], probs.argmax(axis=1)[None, :], len(class_names))[0]
    return {
        "n_slides": len(y),
        "metrics": metrics,
        "ci95": {k: [lo, hi] for k, (lo, hi) in ci.items()},
        "confusion_matrix": cm.tolist(),
        "class_names": class_names,
    }

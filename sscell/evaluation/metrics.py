"""Evaluation metrics on numpy arrays: F1, explained variance, correlations of predicted
modalities, PCA baselines (the highly-variable genes: `sscell.data.genes`)."""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd
import scipy.sparse as sp
import scipy.stats
from sklearn.decomposition import PCA
from sklearn.metrics import f1_score

from sscell.errors import SscellError
from sscell.evaluation.ontology import corrected_predictions

ArrayLike = np.ndarray | sp.spmatrix | sp.sparray


def f1_scores(true: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """Macro and micro F1 of single-label predictions (docs/metrics.md).

    macro_f1 (the headline, the study's: scikit-learn's classification_report) averages over
    the classes that are true or predicted, so a type predicted but absent from the query
    cells adds an F1 of 0. macro_f1_true_classes averages over the true classes only (wrong
    predictions of an absent type still lower the recall of the true ones). micro_f1 counts
    every prediction: for single-label data it equals accuracy.
    """
    true, pred = np.asarray(true), np.asarray(pred)
    if true.shape != pred.shape or true.ndim != 1 or len(true) == 0:
        raise SscellError(
            f"f1_scores needs two non-empty 1-D label arrays of equal length, got {true.shape} "
            f"and {pred.shape}"
        )
    return {"macro_f1": float(f1_score(true, pred, average="macro", zero_division=0)),
            "micro_f1": float(f1_score(true, pred, average="micro", zero_division=0)),
            "macro_f1_true_classes": float(f1_score(true, pred, labels=np.unique(true), average="macro",
                                                    zero_division=0))}


def f1_columns(prefix: str, true: np.ndarray, pred: np.ndarray, descendants: Mapping[object, set] | None = None
               ) -> dict[str, float]:
    """`f1_scores` as columns `{prefix}_macro_f1`, ... and, given the Cell Ontology's
    `descendants` (sscell.evaluation.ontology), the same scores of the ontology-corrected
    predictions as `{prefix}_..._ontology`."""
    columns = {f"{prefix}_{name}": value for name, value in f1_scores(true, pred).items()}
    if descendants is not None:
        corrected = corrected_predictions(true, pred, descendants)
        columns.update({f"{prefix}_{name}_ontology": value for name, value in f1_scores(true, corrected).items()})
    return columns


def per_class_f1(true: np.ndarray, pred: np.ndarray) -> pd.DataFrame:
    """F1 and support (true cells) of each class present in `true`, indexed by class, sorted."""
    true, pred = np.asarray(true), np.asarray(pred)
    classes, support = np.unique(true, return_counts=True)
    scores = f1_score(true, pred, labels=classes, average=None, zero_division=0)
    return pd.DataFrame({"support": support, "f1": scores}, index=pd.Index(classes, name="class"))


class ExplainedVariance:
    """Streaming explained variance of a reconstruction, one chunk of cells at a time.

    Keeps per-gene counts, means and sums of squared deviations (M2) of x and of the residual
    x - x_hat in float64, merged chunk by chunk with Chan et al.'s parallel update, so the
    result does not depend on chunking and does not suffer the cancellation of sum(x^2) - n*mean^2.
    A `mask` (cells x genes) restricts every statistic to its True entries (e.g. the genes a
    cell's dataset measured, or the genes hidden from the model), so each gene is scored over
    its own cells.
    """

    def __init__(self) -> None:
        self._sq_err = 0.0
        self._n = self._mean_x = self._m2_x = self._mean_r = self._m2_r = None

    def update(self, x: ArrayLike, x_hat: ArrayLike, mask: np.ndarray | None = None) -> None:
        """Add a chunk: `x` the true values and `x_hat` the reconstruction, both (cells, genes),
        and optionally the boolean `mask` of entries to score (default: all)."""
        x, x_hat = _dense64(x), _dense64(x_hat)
        if x.ndim != 2 or x_hat.shape != x.shape or (mask is not None and np.shape(mask) != x.shape):
            raise SscellError(
                f"ExplainedVariance.update needs x, x_hat (and mask) of one (cells, genes) shape, got "
                f"{x.shape}, {x_hat.shape}{'' if mask is None else f' and {np.shape(mask)}'}"
            )
        if self._n is not None and x.shape[1] != self._n.shape[0]:
            raise SscellError(
                f"ExplainedVariance got {x.shape[1]} genes after {self._n.shape[0]}: every "
                "chunk must have the same genes"
            )
        if x.shape[0] == 0:
            return
        weight = np.ones_like(x) if mask is None else np.asarray(mask, np.float64)
        r = (x - x_hat) * weight
        self._sq_err += float(np.einsum("ij,ij->", r, r))
        n_b = weight.sum(axis=0)
        mean_x, m2_x = _moments(x, weight, n_b)
        mean_r, m2_r = _moments(r, weight, n_b)
        if self._n is None:
            self._n, self._mean_x, self._m2_x, self._mean_r, self._m2_r = n_b, mean_x, m2_x, mean_r, m2_r
        else:
            self._mean_x, self._m2_x = _merge(self._n, self._mean_x, self._m2_x, n_b, mean_x, m2_x)
            self._mean_r, self._m2_r = _merge(self._n, self._mean_r, self._m2_r, n_b, mean_r, m2_r)
            self._n = self._n + n_b

    def result(self) -> dict[str, float]:
        """{"ev_weighted", "ev_uniform", "mse"} over all chunks seen (masked entries only; docs/metrics.md).

        With Var over each gene's scored entries and G the scored genes whose Var(x_g) > 0,
        ev_weighted = 1 - sum_{g in G} Var(x_g - xhat_g) / sum_{g in G} Var(x_g), torchmetrics'
        ExplainedVariance(multioutput="variance_weighted") as the study computed it (and
        scikit-learn's): a gene constant over its scored cells has weight 0, whatever its
        reconstruction. ev_uniform = mean over G of 1 - Var(x_g - xhat_g) / Var(x_g) (torchmetrics
        and scikit-learn also average the constant genes in, as 1 if reconstructed exactly, else 0).
        Both are NaN when no gene varies. mse is over every scored entry.
        """
        if self._n is None or not self._n.any():
            raise SscellError("ExplainedVariance.result called before any update with scored cells")
        scored = self._n > 0
        n = np.maximum(self._n, 1)
        var_x, var_r = self._m2_x / n, self._m2_r / n
        # A constant gene's mean is rounded, leaving M2 ~ 1e-30 instead of 0: treat a relative
        # spread below 1e-12 as constant.
        varies = scored & (var_x > (1e-12 * self._mean_x) ** 2)
        mse = self._sq_err / self._n.sum()
        if not varies.any():
            return {"ev_weighted": np.nan, "ev_uniform": np.nan, "mse": float(mse)}
        weighted = 1.0 - var_r[varies].sum() / var_x[varies].sum()
        uniform = np.mean(1.0 - var_r[varies] / var_x[varies])
        return {"ev_weighted": float(weighted), "ev_uniform": float(uniform), "mse": float(mse)}


def _moments(values: np.ndarray, weight: np.ndarray, n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-column mean and M2 of `values` over the entries where `weight` is 1."""
    mean = (values * weight).sum(axis=0) / np.maximum(n, 1)
    return mean, (((values - mean) * weight) ** 2).sum(axis=0)


def _merge(n_a: np.ndarray, mean_a: np.ndarray, m2_a: np.ndarray, n_b: np.ndarray, mean_b: np.ndarray,
           m2_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and M2 of the union of two groups (Chan, Golub and LeVeque)."""
    n = np.maximum(n_a + n_b, 1)  # per gene; a gene neither group scored keeps mean 0, M2 0
    delta = mean_b - mean_a
    return mean_a + delta * (n_b / n), m2_a + m2_b + delta**2 * (n_a * n_b / n)


def _dense64(a: ArrayLike) -> np.ndarray:
    return np.asarray(a.toarray() if sp.issparse(a) else a, dtype=np.float64)


def explained_variance(x: ArrayLike, x_hat: ArrayLike, mask: np.ndarray | None = None) -> dict[str, float]:
    """{"ev_weighted", "ev_uniform", "mse"} of a reconstruction (on `mask`'s entries); see ExplainedVariance."""
    ev = ExplainedVariance()
    ev.update(x, x_hat, mask)
    return ev.result()


def fit_pca(fit_x: ArrayLike, n_components: int = 64, seed: int = 0) -> PCA:
    """PCA baseline fitted on `fit_x` (log1p-normalised cells x genes); `.transform` embeds,
    `.inverse_transform` reconstructs.

    Sparse input is centred implicitly by scikit-learn (never densified). `n_components` is
    capped at min(n_cells, n_genes) - 1.
    """
    n_cells, n_genes = fit_x.shape
    n = min(n_components, n_cells - 1, n_genes - 1)
    if n < 1:
        raise SscellError(
            f"fit_pca needs at least 2 cells and 2 genes to fit on, got {fit_x.shape}"
        )
    # arpack is the solver that takes sparse input in every supported scikit-learn (>= 1.4).
    solver = "arpack" if sp.issparse(fit_x) else "auto"
    return PCA(n_components=n, svd_solver=solver, random_state=seed).fit(fit_x)


def pearson_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of each row of `a` with the same row of `b` (NaN for a constant row);
    columns: `pearson_rows(a.T, b.T)`."""
    a, b = a - a.mean(1, keepdims=True), b - b.mean(1, keepdims=True)
    norm = np.sqrt((a * a).sum(1) * (b * b).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(norm > 0, (a * b).sum(1) / norm, np.nan)


def correlation_scores(true: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    """How well `predicted` matches `true` (cells x features, e.g. log1p protein counts).

    pearson_cell / spearman_cell: mean over cells of the correlation across features (the
    study's headline is pearson_cell); *_feature: mean over features of the correlation across
    cells; *_all: one correlation over every entry; mse: mean squared error. Rows or columns
    that are constant have no correlation and are left out of the means.
    """
    true, predicted = np.asarray(true, np.float64), np.asarray(predicted, np.float64)
    if true.shape != predicted.shape or true.ndim != 2 or not true.size:
        raise SscellError(f"correlation_scores needs two equal, non-empty cells x features arrays; got {true.shape} "
                          f"and {predicted.shape}")
    ranks = [scipy.stats.rankdata(m, axis=1) for m in (true, predicted)]
    col_ranks = [scipy.stats.rankdata(m, axis=0) for m in (true, predicted)]
    flat = [m.reshape(1, -1) for m in (true, predicted)]
    flat_ranks = [scipy.stats.rankdata(m).reshape(1, -1) for m in flat]
    with np.errstate(all="ignore"):  # all-NaN means stay NaN
        return {
            "pearson_cell": float(np.nanmean(pearson_rows(true, predicted))),
            "spearman_cell": float(np.nanmean(pearson_rows(*ranks))),
            "pearson_feature": float(np.nanmean(pearson_rows(true.T, predicted.T))),
            "spearman_feature": float(np.nanmean(pearson_rows(col_ranks[0].T, col_ranks[1].T))),
            "pearson_all": float(pearson_rows(*flat)[0]),
            "spearman_all": float(pearson_rows(*flat_ranks)[0]),
            "mse": float(np.mean(np.square(true - predicted))),
        }

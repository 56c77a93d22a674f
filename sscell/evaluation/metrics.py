"""Evaluation metrics on numpy arrays: zero-shot kNN, F1, explained variance, PCA baseline."""
from __future__ import annotations


import numpy as np
import scipy.sparse as sp
from sklearn.decomposition import PCA
from sklearn.metrics import f1_score
from sklearn.neighbors import KNeighborsClassifier

from sscell.errors import SscellError

ArrayLike = np.ndarray | sp.spmatrix | sp.sparray


def knn_predict(
    ref_emb: np.ndarray, ref_labels: np.ndarray, query_emb: np.ndarray, k: int = 5
) -> np.ndarray:
    """Label each query cell by majority vote among its `k` nearest reference cells (Euclidean).

    The study's zero-shot protocol: reference = validation cells, query = test cells. The sets
    are disjoint, so no 'self' neighbour is dropped: a query equal to a reference point counts
    that point's label. Ties break as scikit-learn's KNeighborsClassifier breaks them (the
    smallest label among the tied classes).
    """
    ref_emb, query_emb = np.asarray(ref_emb), np.asarray(query_emb)
    ref_labels = np.asarray(ref_labels)
    if ref_emb.ndim != 2 or query_emb.ndim != 2 or ref_emb.shape[1] != query_emb.shape[1]:
        raise SscellError(
            f"knn_predict needs 2-D embeddings of equal width, got {ref_emb.shape} and "
            f"{query_emb.shape}: pass (cells, dims) arrays from the same encoder"
        )
    if len(ref_labels) != len(ref_emb):
        raise SscellError(
            f"knn_predict got {len(ref_labels)} labels for {len(ref_emb)} reference cells: "
            "pass one label per reference cell"
        )
    if not 1 <= k <= len(ref_emb):
        raise SscellError(f"knn_predict needs 1 <= k <= {len(ref_emb)} reference cells, got k={k}")
    classifier = KNeighborsClassifier(n_neighbors=k, algorithm="auto")
    return classifier.fit(ref_emb, ref_labels).predict(query_emb)


def f1_scores(true: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """Macro and micro F1 of single-label predictions.

    Macro F1 averages over the classes present in `true` only: a class that is predicted but
    never true (e.g. a reference type absent from the query set) adds no zero to the average,
    though its wrong predictions still lower the recall of the true classes. Micro F1 counts
    every prediction, so for single-label data it equals accuracy.
    """
    true, pred = np.asarray(true), np.asarray(pred)
    if true.shape != pred.shape or true.ndim != 1 or len(true) == 0:
        raise SscellError(
            f"f1_scores needs two non-empty 1-D label arrays of equal length, got {true.shape} "
            f"and {pred.shape}"
        )
    macro = f1_score(true, pred, labels=np.unique(true), average="macro", zero_division=0)
    micro = f1_score(true, pred, average="micro", zero_division=0)
    return {"macro_f1": float(macro), "micro_f1": float(micro)}


class ExplainedVariance:
    """Streaming explained variance of a reconstruction, one chunk of cells at a time.

    Keeps per-gene counts, means and sums of squared deviations (M2) of x and of the residual
    x - x_hat in float64, merged chunk by chunk with Chan et al.'s parallel update, so the
    result does not depend on chunking and does not suffer the cancellation of sum(x^2) - n*mean^2.
    """

    def __init__(self) -> None:
        self._n = 0
        self._sq_err = 0.0
        self._mean_x = self._m2_x = self._mean_r = self._m2_r = None

    def update(self, x: ArrayLike, x_hat: ArrayLike) -> None:
        """Add a chunk: `x` the true values and `x_hat` the reconstruction, both (cells, genes)."""
        x, x_hat = _dense64(x), _dense64(x_hat)
        if x.ndim != 2 or x_hat.shape != x.shape:
            raise SscellError(
                f"ExplainedVariance.update needs x and x_hat of one (cells, genes) shape, got "
                f"{x.shape} and {x_hat.shape}"
            )
        if self._mean_x is not None and x.shape[1] != self._mean_x.shape[0]:
            raise SscellError(
                f"ExplainedVariance got {x.shape[1]} genes after {self._mean_x.shape[0]}: every "
                "chunk must have the same genes"
            )
        n_b = x.shape[0]
        if n_b == 0:
            return
        r = x - x_hat
        self._sq_err += float(np.einsum("ij,ij->", r, r))
        mean_x, mean_r = x.mean(axis=0), r.mean(axis=0)
        m2_x, m2_r = ((x - mean_x) ** 2).sum(axis=0), ((r - mean_r) ** 2).sum(axis=0)
        if self._mean_x is None:
            self._mean_x, self._m2_x, self._mean_r, self._m2_r = mean_x, m2_x, mean_r, m2_r
        else:
            self._mean_x, self._m2_x = _merge(self._n, self._mean_x, self._m2_x, n_b, mean_x, m2_x)
            self._mean_r, self._m2_r = _merge(self._n, self._mean_r, self._m2_r, n_b, mean_r, m2_r)
        self._n += n_b

    def result(self) -> dict[str, float]:
        """{"ev_weighted", "ev_uniform", "mse"} over all chunks seen.

        ev_weighted = 1 - sum_g Var(x_g - xhat_g) / sum_g Var(x_g) over all genes, so a gene that
        never varies but is reconstructed with variance still counts against it (scikit-learn's
        and torchmetrics' 'variance_weighted' skip genes whose variance is exactly zero; the
        two agree whenever every gene varies). ev_uniform = mean of 1 - Var(x_g - xhat_g) /
        Var(x_g) over the genes with Var(x_g) > 0. Both are NaN when no gene varies.
        """
        if self._n == 0:
            raise SscellError("ExplainedVariance.result called before any update with cells")
        # A constant gene's mean is rounded, leaving M2 ~ 1e-30 instead of 0: treat a relative
        # spread below 1e-12 as constant.
        varies = self._m2_x > self._n * (1e-12 * self._mean_x) ** 2
        mse = self._sq_err / (self._n * self._m2_x.shape[0])
        if not varies.any():
            return {"ev_weighted": np.nan, "ev_uniform": np.nan, "mse": float(mse)}
        weighted = 1.0 - self._m2_r.sum() / self._m2_x[varies].sum()
        uniform = np.mean(1.0 - self._m2_r[varies] / self._m2_x[varies])
        return {"ev_weighted": float(weighted), "ev_uniform": float(uniform), "mse": float(mse)}


def _merge(
    n_a: int, mean_a: np.ndarray, m2_a: np.ndarray, n_b: int, mean_b: np.ndarray, m2_b: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Mean and M2 of the union of two groups (Chan, Golub and LeVeque)."""
    n = n_a + n_b
    delta = mean_b - mean_a
    return mean_a + delta * (n_b / n), m2_a + m2_b + delta**2 * (n_a * n_b / n)


def _dense64(a: ArrayLike) -> np.ndarray:
    return np.asarray(a.toarray() if sp.issparse(a) else a, dtype=np.float64)


def explained_variance(x: ArrayLike, x_hat: ArrayLike) -> dict[str, float]:
    """{"ev_weighted", "ev_uniform", "mse"} of a reconstruction; see ExplainedVariance.result."""
    ev = ExplainedVariance()
    ev.update(x, x_hat)
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

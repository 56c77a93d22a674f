"""Evaluation metrics, kNN and report writing against numpy / scikit-learn / scanpy references."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from sklearn.metrics import classification_report, explained_variance_score, f1_score, mean_squared_error
from sklearn.neighbors import KNeighborsClassifier, NearestNeighbors

from sscell.data.genes import highly_variable_genes
from sscell.errors import SscellError
from sscell.evaluation.metrics import (
    ExplainedVariance,
    explained_variance,
    f1_scores,
    fit_pca,
    per_class_f1,
)
from sscell.evaluation.neighbors import (
    knn_predict,
    nearest_neighbors,
    resolve_method,
    vote,
)
from sscell.evaluation.report import plot_loss_curves, read_losses, write_results


def brute_force_knn(ref, labels, query, k):
    """Majority labels of the k nearest references, and whether each vote was tied."""
    dist = ((query[:, None, :] - ref[None, :, :]) ** 2).sum(-1)
    nearest = labels[np.argsort(dist, axis=1)[:, :k]]
    preds, tied = [], []
    for row in nearest:
        values, counts = np.unique(row, return_counts=True)
        preds.append(values[counts.argmax()])
        tied.append((counts == counts.max()).sum() > 1)
    return np.array(preds), np.array(tied)


def test_knn_matches_brute_force_majority_vote():
    rng = np.random.default_rng(0)
    ref, query = rng.normal(size=(80, 6)), rng.normal(size=(40, 6))
    labels = rng.integers(0, 4, size=80)
    expected, tied = brute_force_knn(ref, labels, query, k=5)
    assert (~tied).sum() >= 20
    pred = knn_predict(ref, labels, query, k=5)
    np.testing.assert_array_equal(pred[~tied], expected[~tied])


def test_knn_tie_breaks_to_smallest_label():
    ref = np.array([[0.0], [1.0], [10.0], [11.0]])
    pred = knn_predict(ref, np.array(["b", "b", "a", "a"]), np.array([[5.5]]), k=4)
    assert pred.tolist() == ["a"]


def test_knn_keeps_identical_reference_point():
    # Distances from the query are 0, 1, 2, 3: counting itself the vote is x, x, y -> x;
    # dropping it would give x, y, y -> y.
    ref = np.array([[0.0], [1.0], [-2.0], [3.0]])
    labels = np.array(["x", "x", "y", "y"])
    assert knn_predict(ref, labels, np.array([[0.0]]), k=3).tolist() == ["x"]


def test_knn_rejects_bad_input():
    ref = np.zeros((3, 2))
    with pytest.raises(SscellError, match=r"needs 1 <= k <= 3 reference cells, got k=4"):
        knn_predict(ref, np.arange(3), np.zeros((1, 2)), k=4)
    with pytest.raises(SscellError, match=r"2-D embeddings of equal width, got \(3, 2\) and \(1, 5\)"):
        knn_predict(ref, np.arange(3), np.zeros((1, 5)), k=1)


def test_f1_scores_match_per_class_counts():
    rng = np.random.default_rng(1)
    true = rng.integers(0, 5, size=300)
    pred = np.where(rng.random(300) < 0.6, true, rng.integers(0, 7, size=300))  # 5, 6 never true
    per_class = []
    for c in np.union1d(true, pred):
        tp = np.sum((pred == c) & (true == c))
        fp = np.sum((pred == c) & (true != c))
        fn = np.sum((pred != c) & (true == c))
        per_class.append(2 * tp / (2 * tp + fp + fn))
    scores = f1_scores(true, pred)
    assert scores["macro_f1"] == pytest.approx(np.mean(per_class), abs=1e-12)  # 7 classes, 5 and 6 score 0
    assert scores["macro_f1_true_classes"] == pytest.approx(np.mean(per_class[:5]), abs=1e-12)
    assert scores["micro_f1"] == pytest.approx(np.mean(true == pred), abs=1e-12)


def test_f1_scores_tiny_example():
    # a: P=1, R=1/2 -> F1 2/3; b: P=1/2, R=1/2 -> 1/2; c is predicted, never true: F1 0.
    true, pred = np.array(["a", "a", "b", "b"]), np.array(["a", "b", "b", "c"])
    scores = f1_scores(true, pred)
    assert scores["macro_f1"] == pytest.approx(7 / 18)  # the study's: over a, b and c
    assert scores["macro_f1"] == pytest.approx(classification_report(true, pred, output_dict=True,
                                                                     zero_division=0)["macro avg"]["f1-score"])
    assert scores["macro_f1_true_classes"] == pytest.approx(7 / 12)  # over a and b only
    assert scores["micro_f1"] == pytest.approx(0.5)


def reconstruction_pair(seed=2, n=120, g=25):
    rng = np.random.default_rng(seed)
    x = rng.gamma(2.0, size=(n, g)) * rng.uniform(0.2, 3.0, size=g)
    x_hat = 0.7 * x + rng.normal(scale=0.5, size=(n, g)) + 0.3
    return x, x_hat


def test_explained_variance_matches_sklearn():
    x, x_hat = reconstruction_pair()
    ev = explained_variance(x, x_hat)
    assert ev["ev_weighted"] == pytest.approx(
        explained_variance_score(x, x_hat, multioutput="variance_weighted"), abs=1e-12
    )
    assert ev["ev_uniform"] == pytest.approx(
        explained_variance_score(x, x_hat, multioutput="uniform_average"), abs=1e-12
    )
    assert ev["mse"] == pytest.approx(mean_squared_error(x, x_hat), rel=1e-12)


def test_explained_variance_with_a_constant_gene():
    x, x_hat = reconstruction_pair()
    x[:, 3], x_hat[:, 3] = 2.7, np.linspace(0, 1, len(x))  # never varies, badly reconstructed
    ev = explained_variance(x, x_hat)
    varies = np.arange(x.shape[1]) != 3
    weighted = 1 - np.var(x - x_hat, axis=0)[varies].sum() / np.var(x, axis=0).sum()
    assert ev["ev_weighted"] == pytest.approx(weighted, abs=1e-12)
    per_gene = explained_variance_score(x, x_hat, multioutput="raw_values")
    assert ev["ev_uniform"] == pytest.approx(np.delete(per_gene, 3).mean(), abs=1e-12)


def torchmetrics_variance_weighted(target: np.ndarray, preds: np.ndarray) -> float:
    """torchmetrics' ExplainedVariance(multioutput="variance_weighted") (functional
    _explained_variance_update/_compute, v1.x) in numpy: per-output scores from sums over cells,
    weighted by each output's target variance."""
    n = len(target)
    diff = target - preds
    numerator = (diff**2).sum(0) / n - (diff.sum(0) / n) ** 2
    denominator = (target**2).sum(0) / n - (target.sum(0) / n) ** 2
    nonzero_numerator, nonzero_denominator = numerator != 0, denominator != 0
    valid = nonzero_numerator & nonzero_denominator
    scores = np.ones_like(numerator)
    scores[valid] = 1.0 - numerator[valid] / denominator[valid]
    scores[nonzero_numerator & ~nonzero_denominator] = 0.0
    return float(np.sum(denominator / denominator.sum() * scores))


def test_weighted_explained_variance_follows_torchmetrics_on_constant_genes():
    rng = np.random.default_rng(8)
    x = rng.gamma(2.0, size=(200, 50))
    x[:, :10] = 0.0  # 10 of 50 genes never expressed in these cells (exactly 0, as log1p of no counts)
    x_hat = 0.6 * x + rng.normal(scale=0.6, size=x.shape)  # the constant genes are reconstructed with noise
    expected = torchmetrics_variance_weighted(x, x_hat)
    kept_all = 1 - np.var(x - x_hat, axis=0).sum() / np.var(x, axis=0).sum()
    assert expected - kept_all > 0.04  # the definitions differ here: the test tells them apart
    assert explained_variance(x, x_hat)["ev_weighted"] == pytest.approx(expected, abs=1e-9)
    assert expected == pytest.approx(explained_variance_score(x, x_hat, multioutput="variance_weighted"), abs=1e-9)


def test_explained_variance_perfect_and_mean_predictions():
    x, _ = reconstruction_pair()
    perfect = explained_variance(x, x)
    assert perfect == {"ev_weighted": 1.0, "ev_uniform": 1.0, "mse": 0.0}
    mean = explained_variance(x, np.broadcast_to(x.mean(axis=0), x.shape))
    assert mean["ev_weighted"] == pytest.approx(0.0, abs=1e-12)
    assert mean["ev_uniform"] == pytest.approx(0.0, abs=1e-12)


def test_explained_variance_streaming_equals_one_shot_and_is_stable():
    x, x_hat = reconstruction_pair()
    one_shot = explained_variance(x, x_hat)
    for offset in (0.0, 1e6):  # a naive sum-of-squares variance loses ~4 digits at 1e6
        stream = ExplainedVariance()
        for lo, hi in [(0, 1), (1, 18), (18, 18), (18, 70), (70, len(x))]:
            stream.update(sp.csr_matrix(x[lo:hi] + offset), x_hat[lo:hi] + offset)
        result = stream.result()
        assert result["ev_weighted"] == pytest.approx(one_shot["ev_weighted"], abs=1e-9)
        assert result["ev_uniform"] == pytest.approx(one_shot["ev_uniform"], abs=1e-9)
    assert ExplainedVariance().update(x, x_hat) is None


def test_explained_variance_rejects_mismatched_chunks():
    stream = ExplainedVariance()
    with pytest.raises(SscellError, match="result called before any update"):
        stream.result()
    stream.update(np.ones((2, 3)), np.ones((2, 3)))
    with pytest.raises(SscellError, match="got 4 genes after 3"):
        stream.update(np.ones((2, 4)), np.ones((2, 4)))
    with pytest.raises(SscellError, match="of one \\(cells, genes\\) shape"):
        stream.update(np.ones((2, 3)), np.ones((3, 3)))


def low_rank_data(seed=4, n=90, g=40):
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=(n, 4)) * np.array([8.0, 5.0, 3.0, 2.0])
    data = scores @ np.linalg.qr(rng.normal(size=(g, 4)))[0].T + rng.normal(scale=0.1, size=(n, g))
    return np.abs(data)  # non-negative, like log1p values


def test_pca_matches_svd_of_centred_data():
    x = low_rank_data()
    test = low_rank_data(seed=5, n=30)
    pca = fit_pca(x, n_components=3)
    fit_emb, test_emb = pca.transform(x), pca.transform(test)
    assert fit_emb.shape == (90, 3) and test_emb.shape == (30, 3)
    u, s, vt = np.linalg.svd(x - x.mean(axis=0), full_matrices=False)
    np.testing.assert_allclose(np.abs(fit_emb), np.abs(u[:, :3] * s[:3]), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(
        np.abs(test_emb), np.abs((test - x.mean(axis=0)) @ vt[:3].T), rtol=1e-6, atol=1e-8
    )
    variances = fit_emb.var(axis=0)
    assert np.all(np.diff(variances) < 0)
    reconstruction = x.mean(axis=0) + (x - x.mean(axis=0)) @ vt[:3].T @ vt[:3]
    np.testing.assert_allclose(pca.inverse_transform(fit_emb), reconstruction, rtol=1e-6, atol=1e-8)


def test_pca_sparse_caps_components_and_is_deterministic():
    x = low_rank_data(n=30, g=12)
    x[x < 1.0] = 0.0
    dense = fit_pca(x, n_components=64).transform(x)
    assert dense.shape == (30, 11)  # capped at min(30, 12) - 1
    first = fit_pca(sp.csr_matrix(x), n_components=5, seed=7).transform(sp.csr_matrix(x))
    again = fit_pca(sp.csr_matrix(x), n_components=5, seed=7).transform(sp.csr_matrix(x))
    np.testing.assert_array_equal(first, again)
    # Implicit centring of sparse input gives the dense projection (up to sign).
    np.testing.assert_allclose(np.abs(first), np.abs(dense[:, :5]), rtol=1e-5, atol=1e-8)


def test_write_results_round_trips(tmp_path):
    rows = [
        {"method": "sscell (masked)", "representation": "embedding", "knn_macro_f1": 0.81234,
         "n_cells": 1000},
        {"method": "PCA | 64", "representation": "pca", "knn_macro_f1": 0.5, "ev_weighted": 0.37},
    ]
    markdown = write_results(rows, tmp_path / "run", name="eval")
    read_back = pd.read_csv(tmp_path / "run" / "eval.csv")
    pd.testing.assert_frame_equal(read_back, pd.DataFrame(rows))
    assert (tmp_path / "run" / "eval.md").read_text() == markdown
    lines = markdown.strip().split("\n")
    assert len(lines) == 2 + len(rows)
    assert lines[0] == "| method | representation | knn_macro_f1 | n_cells | ev_weighted |"
    assert lines[2] == "| sscell (masked) | embedding | 0.812 | 1000 | - |"
    assert lines[3] == "| PCA \\| 64 | pca | 0.500 | - | 0.370 |"
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["eval.csv", "eval.md"]


def test_plot_loss_curves_writes_png_and_keeps_last_duplicate(tmp_path):
    records = [
        {"step": 0, "train/loss": 9.0, "lr": 1e-3},
        {"step": 10, "train/loss": 4.0},
        {"step": 10, "val/loss": 5.0},
        {"step": 20, "train/loss": 2.0},
        {"step": 10, "train/loss": 3.5},  # resumed from step 10: this value wins
        {"step": 20, "train/loss": 0.5},
        {"step": 20, "val/loss": 1.0, "val/ev_weighted": 0.3},
    ]
    jsonl = tmp_path / "metrics.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    assert read_losses(jsonl) == {
        "train/loss": {0: 9.0, 10: 3.5, 20: 0.5},
        "val/loss": {10: 5.0, 20: 1.0},
    }
    out = tmp_path / "loss.png"
    plot_loss_curves(jsonl, out)
    data = out.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss.png", "metrics.jsonl"]


def test_plot_loss_curves_rejects_file_without_losses(tmp_path):
    jsonl = tmp_path / "metrics.jsonl"
    jsonl.write_text(json.dumps({"step": 1, "lr": 0.1}) + "\n")
    with pytest.raises(SscellError, match="has no train/loss or val/loss values to plot"):
        plot_loss_curves(jsonl, tmp_path / "loss.png")


def clustered(seed, n_ref, n_query, dims=16, classes=8, spread=1.0):
    """Reference and query points around shared class centres, with their labels."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dims)) * 2
    ref_labels, query_labels = rng.integers(0, classes, n_ref), rng.integers(0, classes, n_query)
    ref = (centres[ref_labels] + spread * rng.normal(size=(n_ref, dims))).astype(np.float32)
    query = (centres[query_labels] + spread * rng.normal(size=(n_query, dims))).astype(np.float32)
    return ref, ref_labels, query, query_labels


def test_exact_knn_equals_scikit_learn_across_blocks(monkeypatch):
    from sscell.evaluation import neighbors

    monkeypatch.setattr(neighbors, "_QUERY_BLOCK", 64)  # several query and reference blocks, ragged ends
    monkeypatch.setattr(neighbors, "_REF_BLOCK", 100)
    ref, labels, query, _ = clustered(0, 1050, 300)
    indices, distances = nearest_neighbors(ref, query, 7, method="exact")
    ref_distances, ref_indices = NearestNeighbors(n_neighbors=7).fit(ref.astype(np.float64)).kneighbors(query)
    np.testing.assert_array_equal(indices, ref_indices)
    np.testing.assert_allclose(distances, ref_distances, rtol=1e-6, atol=1e-6)
    names = np.array([f"type {i}" for i in range(8)])[labels]
    expected = KNeighborsClassifier(n_neighbors=5).fit(ref, names).predict(query)
    np.testing.assert_array_equal(knn_predict(ref, names, query, 5, method="exact"), expected)


@pytest.mark.parametrize("offset, separation", [(1e4, 0.0), (1e3, 300.0)])
def test_exact_knn_equals_scikit_learn_on_non_centred_embeddings(offset, separation):
    # Far from the origin, float32 squared distances round by ~eps * |x|^2: (1e4, 0) needs the
    # search to centre the embeddings; (1e3, 300), two clusters 600 apart, also needs the float64
    # re-ranking of a candidate margin (near-ties within a cluster swap in float32).
    rng = np.random.default_rng(9)
    side = rng.integers(0, 2, 800) * 2 - 1
    points = (rng.normal(size=(800, 8)) + offset + separation * side[:, None]).astype(np.float32)
    ref, query = points[:600], points[600:]
    labels = rng.integers(0, 4, 600)
    indices, distances = nearest_neighbors(ref, query, 5, method="exact")
    ref_distances, ref_indices = NearestNeighbors(n_neighbors=5).fit(ref.astype(np.float64)).kneighbors(query)
    np.testing.assert_array_equal(indices, ref_indices)
    np.testing.assert_allclose(distances, ref_distances, rtol=1e-9)
    expected = KNeighborsClassifier(n_neighbors=5).fit(ref.astype(np.float64), labels).predict(query)
    np.testing.assert_array_equal(knn_predict(ref, labels, query, 5, method="exact"), expected)


def overlapping(seed, n_ref, n_query, dims=64, classes=20):
    """Cell types that overlap like a model's (exact 5-NN accuracy ~0.8): unit-normal centres,
    spreads of 1-2 (docs/scale.md's kNN embeddings, smaller)."""
    rng = np.random.default_rng(seed)
    centres, spread = rng.normal(size=(classes, dims)), rng.uniform(1, 2, classes)
    labels = rng.integers(0, classes, n_ref + n_query)
    points = (centres[labels] + spread[labels, None] * rng.normal(size=(len(labels), dims))).astype(np.float32)
    return points[:n_ref], labels[:n_ref], points[n_ref:]


def test_approximate_knn_agrees_with_exact_on_overlapping_types():
    # HNSW (M 32, efSearch 64), the search before, agreed on 96.5% of these labels (recall 0.956)
    ref, labels, query = overlapping(1, 10_000, 1000)
    found, distances = nearest_neighbors(ref, query, 5, method="approximate")
    truth, _ = nearest_neighbors(ref, query, 5, method="exact")
    assert np.mean(vote(labels[found]) == vote(labels[truth])) >= 0.99
    assert np.mean([len(set(a) & set(b)) / 5 for a, b in zip(found, truth)]) >= 0.99
    exact = np.linalg.norm(ref[found].astype(np.float64) - query[:, None, :].astype(np.float64), axis=-1)
    np.testing.assert_allclose(distances, exact, rtol=1e-12)  # re-ranked in float64, nearest first
    assert np.all(np.diff(distances, axis=1) >= 0)


def test_vote_and_method_choice():
    votes = np.array([[2, 2, 1, 1, 0], [3, 0, 3, 0, 3], [4, 4, 4, 4, 4]])
    assert vote(votes).tolist() == [1, 3, 4]  # the first row ties 1 and 2: the smaller wins
    assert resolve_method("auto", 1000, 1000) == "exact"
    assert resolve_method("auto", 10**6, 10**6, exact_max_pairs=1e10) == "approximate"
    assert resolve_method("approximate", 10, 10) == "approximate"
    with pytest.raises(SscellError, match="unknown kNN method"):
        resolve_method("faiss", 10, 10)


def test_per_class_f1_matches_scikit_learn():
    rng = np.random.default_rng(3)
    true = rng.integers(0, 6, size=400)
    pred = np.where(rng.random(400) < 0.7, true, rng.integers(0, 8, size=400))
    table = per_class_f1(true, pred)
    classes = np.unique(true)
    assert table.index.tolist() == classes.tolist()
    np.testing.assert_array_equal(table["support"], np.bincount(true)[classes])
    np.testing.assert_allclose(table["f1"], f1_score(true, pred, labels=classes, average=None), atol=1e-12)
    assert table["f1"].mean() == pytest.approx(f1_scores(true, pred)["macro_f1_true_classes"], abs=1e-12)


def test_masked_explained_variance_scores_each_gene_on_its_own_cells():
    x, x_hat = reconstruction_pair()
    mask = np.random.default_rng(5).random(x.shape) < 0.6
    mask[:, 4] = False  # a gene never scored
    stream = ExplainedVariance()
    for lo, hi in [(0, 7), (7, 50), (50, len(x))]:
        stream.update(x[lo:hi], x_hat[lo:hi], mask[lo:hi])
    result = stream.result()
    scored = [g for g in range(x.shape[1]) if mask[:, g].any()]
    var_x = np.array([np.var(x[mask[:, g], g]) for g in scored])
    var_r = np.array([np.var((x - x_hat)[mask[:, g], g]) for g in scored])
    assert result["ev_weighted"] == pytest.approx(1 - var_r.sum() / var_x.sum(), abs=1e-12)
    assert result["ev_uniform"] == pytest.approx(np.mean(1 - var_r / var_x), abs=1e-12)
    assert result["mse"] == pytest.approx(np.mean((x - x_hat)[mask] ** 2), rel=1e-12)
    # Values outside the mask (e.g. unmeasured genes read as 0) change nothing.
    x_other = np.where(mask, x, 0.0)
    assert explained_variance(x_other, np.where(mask, x_hat, 5.0), mask) == pytest.approx(result, abs=1e-12)
    assert explained_variance(x, x_hat, np.ones_like(mask)) == explained_variance(x, x_hat)


def test_highly_variable_genes_match_scanpy_seurat():
    sc = pytest.importorskip("scanpy")
    import anndata

    rng = np.random.default_rng(6)
    counts = rng.negative_binomial(2, 0.5, size=(300, 120)) * (rng.random((300, 120)) < 0.4)
    counts[:, :10] *= rng.integers(1, 6, size=(300, 1))  # a few genes vary much more
    x = np.log1p(counts / np.maximum(counts.sum(1, keepdims=True), 1) * 1e4)
    chosen = highly_variable_genes(sp.csr_matrix(x), n_top=25)
    adata = anndata.AnnData(sp.csr_matrix(x))
    expected = sc.pp.highly_variable_genes(adata, n_top_genes=25, flavor="seurat", inplace=False)
    assert chosen.tolist() == np.flatnonzero(expected["highly_variable"].to_numpy()).tolist()
    np.testing.assert_array_equal(chosen, highly_variable_genes(x, n_top=25))  # dense input too
    assert len(highly_variable_genes(x, n_top=500)) == 120

"""`eval.protocol="study"` scores as the study's own code does (theislab/ssl_in_scg), checked
against functions re-implemented here from that code: its kNN searches k + 1 neighbours with
faiss and drops the nearest (self_supervision/tester/classifier/kNN.py:40-49), PCA embeddings
are labelled by the 2nd-nearest neighbour alone (evaluation_utils.py:44-56), and PCA is fitted
on each split by itself (notebooks/data/PCA.ipynb, cells 6 and 8)."""
import faiss
import numpy as np
import pytest
from conftest import train_tiny_run  # tests/ is on sys.path (rootdir conftest)
from sklearn.decomposition import PCA
from sklearn.metrics import f1_score

from sscell.config import load_config
from sscell.errors import SscellError
from sscell.evaluation.cells import Evaluator
from sscell.evaluation.evaluate import eval_settings, evaluate
from sscell.evaluation.neighbors import knn_predict, study_knn_predict
from sscell.evaluation.run import open_run


def study_perform_knn(reference, reference_labels, test, k=5):
    """kNN.py's perform_knn on the CPU: IndexFlatL2, k + 1 searched, column 0 dropped, bincount vote."""
    index = faiss.IndexFlatL2(reference.shape[1])
    index.add(reference.astype(np.float32))
    _, neighbours = index.search(test.astype(np.float32), k + 1)
    return np.array([np.argmax(np.bincount(reference_labels[row[1:]])) for row in neighbours])


def study_knn_from_file(reference, reference_labels, test, k=5):
    """evaluation_utils.py's evaluate_knn_from_file: the 2nd-nearest neighbour's label."""
    index = faiss.IndexFlatL2(reference.shape[1])
    index.add(reference.astype(np.float32))
    _, neighbours = index.search(test.astype(np.float32), k + 1)
    return reference_labels[neighbours[:, 1]]


def clustered(rng, n, centres):
    labels = rng.integers(0, len(centres), n)
    return (centres[labels] + rng.normal(0, 1.0, (n, centres.shape[1]))).astype(np.float32), labels


def test_study_knn_equals_the_study_functions_and_differs_from_sscell_s():
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 1.5, (6, 12))
    ref, ref_labels = clustered(rng, 700, centres)
    query, _ = clustered(rng, 400, centres)
    for method in ("exact", "approximate"):
        voted = study_knn_predict(ref, ref_labels, query, 5, method=method)
        second = study_knn_predict(ref, ref_labels, query, 5, second_only=True, method=method)
        agreement = 1.0 if method == "exact" else 0.99  # the approximate search may miss a neighbour now and then
        assert np.mean(voted == study_perform_knn(ref, ref_labels, query)) >= agreement
        assert np.mean(second == study_knn_from_file(ref, ref_labels, query)) >= agreement
    # the study's rules are not sscell's: dropping the nearest neighbour changes labels here
    assert np.any(voted != knn_predict(ref, ref_labels, query, 5, "exact"))


def test_study_knn_names_the_mismatch_of_labels_and_cells():
    with pytest.raises(SscellError, match="3 labels for 4 reference cells"):
        study_knn_predict(np.zeros((4, 2)), np.zeros(3, int), np.zeros((2, 2)))


@pytest.fixture(scope="module")
def run_dir(tiny_store, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("study_protocol")
    train_tiny_run(tiny_store, workdir)
    return workdir


def test_the_study_protocol_scores_what_the_study_functions_score_on_the_same_embeddings(run_dir):
    rows = evaluate(str(run_dir), tasks=("knn",), baselines=("pca",), protocol="study")
    by_method = {r["method"]: r for r in rows}
    run = open_run(run_dir)
    settings = eval_settings(load_config(run_dir))
    settings.update(baselines=("pca", "pca_per_split"), protocol="study")
    evaluator = Evaluator(run, run.store, settings, "model", reconstruct=False)
    val, test = evaluator.cells("val", 0), evaluator.cells("test", 0)
    truth, reference_labels = test.labels["cell_type"], val.labels["cell_type"]

    # the per-split PCA of the validation cells is their own PCA (column signs are arbitrary)
    own = PCA(settings.pca_components, svd_solver="full").fit_transform(evaluator.fit_data.val_x.toarray())
    per_split = [m for m in val.embeddings if m.endswith("per split")][0]
    np.testing.assert_allclose(np.abs(val.embeddings[per_split]), np.abs(own), rtol=1e-3, atol=1e-3)

    expected = {
        "model": study_perform_knn(val.embeddings["model"], reference_labels, test.embeddings["model"]),
        per_split: study_knn_from_file(val.embeddings[per_split], reference_labels, test.embeddings[per_split]),
        "PCA(8) log1p": study_knn_from_file(val.embeddings["PCA(8) log1p"], reference_labels,
                                            test.embeddings["PCA(8) log1p"])}
    model_row = next(r for r in rows if r["method"].startswith("sscell"))
    assert model_row["knn_macro_f1"] == pytest.approx(f1_score(truth, expected["model"], average="macro"))
    for method in (per_split, "PCA(8) log1p"):
        assert by_method[method]["knn_macro_f1"] == pytest.approx(f1_score(truth, expected[method], average="macro"))


def test_the_study_protocol_refuses_another_reference_and_unknown_protocols(run_dir):
    with pytest.raises(SscellError, match="the study's protocol takes the validation cells as kNN reference"):
        evaluate(str(run_dir), tasks=("knn",), baselines=(), protocol="study", knn_reference="train")
    with pytest.raises(SscellError, match="unknown evaluation protocol 'paper'; choose from sscell, study"):
        evaluate(str(run_dir), tasks=("knn",), baselines=(), protocol="paper")

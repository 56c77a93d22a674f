"""Ontology-aware scoring, linear probe and integration scores against hand-made and scikit-learn references."""
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import silhouette_score
from sklearn.preprocessing import StandardScaler

from sscell.data.synthetic import CELL_TYPES
from sscell.errors import SscellError
from sscell.evaluation.metrics import f1_scores
from sscell.evaluation.ontology import cell_ontology_descendants, corrected_predictions
from sscell.evaluation.probe import linear_probe

# A hand-made hierarchy: immune > {T > {CD4, CD8}, B}; stromal is its own root.
HIERARCHY = {"immune": {"immune", "T", "CD4", "CD8", "B"}, "T": {"T", "CD4", "CD8"}, "CD4": {"CD4"},
             "CD8": {"CD8"}, "B": {"B"}, "stromal": {"stromal"}}


def test_descendant_predictions_count_as_correct():
    true = np.array(["T", "T", "T", "CD4", "CD4", "immune", "B", "stromal"])
    pred = np.array(["CD4", "CD8", "B", "T", "CD4", "CD8", "T", "T"])
    corrected = corrected_predictions(true, pred, HIERARCHY)
    # Below the true type: correct. Above it (CD4 -> T), beside it (T -> B) or elsewhere: still wrong.
    assert corrected.tolist() == ["T", "T", "B", "T", "CD4", "immune", "T", "T"]
    assert f1_scores(true, corrected)["micro_f1"] == pytest.approx(np.mean(corrected == true))
    assert f1_scores(true, corrected)["micro_f1"] > f1_scores(true, pred)["micro_f1"]
    # A label missing from the mapping counts exact predictions only.
    assert corrected_predictions(np.array(["x", "x"]), np.array(["x", "CD4"]), HIERARCHY).tolist() == ["x", "CD4"]
    with pytest.raises(SscellError, match=r"labels of one shape, got \(8,\) and \(3,\)"):
        corrected_predictions(true, pred[:3], HIERARCHY)


def test_cell_ontology_descendants_follow_the_shipped_ontology():
    pytest.importorskip("cellxgene_ontology_guide")
    names = [t.name for t in CELL_TYPES]
    below = cell_ontology_descendants(names, [t.ontology_id for t in CELL_TYPES])
    # CELL_TYPES lists each type's nearest listed ancestor, checked against the ontology in test_synthetic.
    for cell_type in CELL_TYPES:
        ancestors, parent = set(), cell_type.parent
        while parent:
            ancestors.add(parent)
            parent = next(t.parent for t in CELL_TYPES if t.name == parent)
        for ancestor in ancestors:
            assert cell_type.name in below[ancestor], (cell_type.name, ancestor)
        assert cell_type.name in below[cell_type.name]
    assert below["T cell"] == {"T cell", "CD4-positive, alpha-beta T cell", "CD8-positive, alpha-beta T cell"}
    assert below["B cell"] == {"B cell"}
    with pytest.raises(SscellError, match="not a Cell Ontology id"):
        cell_ontology_descendants(["B cell"], ["B"])


def probe_data(seed=0, n=600, dims=6, classes=4):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dims)) * 1.5
    labels = rng.integers(0, classes, 3 * n)
    emb = centres[labels] + rng.normal(size=(3 * n, dims)) + 10.0  # off-centre: the probe standardises
    return (emb[:n], labels[:n]), (emb[n:2 * n], labels[n:2 * n]), (emb[2 * n:], labels[2 * n:])


def test_linear_probe_is_the_scikit_learn_model_chosen_on_validation():
    (train_x, train_y), (val_x, val_y), (test_x, test_y) = probe_data()
    predicted, chosen = linear_probe(train_x, train_y, val_x, val_y, test_x, c_grid=(1.0, 0.001))
    scaler = StandardScaler().fit(train_x)
    scores = {}
    for c in (0.001, 1.0):  # cold fits: the warm-started path reaches the same optima
        model = LogisticRegression(C=c, class_weight="balanced", max_iter=1000, tol=1e-8)
        model.fit(scaler.transform(train_x), train_y)
        scores[c] = (f1_scores(val_y, model.predict(scaler.transform(val_x)))["macro_f1"],
                     model.predict(scaler.transform(test_x)))
    best = max(scores, key=lambda c: scores[c][0])
    assert chosen == best
    assert np.mean(predicted == scores[best][1]) > 0.99
    assert f1_scores(test_y, predicted)["macro_f1"] > 0.8
    with pytest.raises(SscellError, match="at least 2 cell types"):
        linear_probe(train_x, np.zeros(len(train_x)), val_x, val_y, test_x)


@pytest.mark.slow
def test_integration_scores_reward_mixed_batches():
    pytest.importorskip("scib_metrics")
    from sscell.evaluation.integration import AGGREGATES, integration_scores

    rng = np.random.default_rng(0)
    n, classes = 200, 2
    labels, batch = rng.integers(0, classes, n), rng.integers(0, 2, n)
    centres = rng.normal(size=(classes, 8)) * 4
    mixed = centres[labels] + rng.normal(size=(n, 8))
    separated = mixed + 6.0 * batch[:, None]  # every cell type split by batch
    scores = integration_scores({"mixed": mixed, "separated": separated}, labels, batch, "separated")
    assert list(scores.index) == ["mixed", "separated"] and set(AGGREGATES) <= set(scores.columns)
    assert scores.loc["mixed", "Batch correction"] > scores.loc["separated", "Batch correction"] + 0.2
    for name in ("mixed", "separated"):  # scib's label silhouette is scikit-learn's, rescaled to [0, 1]
        expected = (silhouette_score({"mixed": mixed, "separated": separated}[name], labels) + 1) / 2
        assert scores.loc[name, "Silhouette label"] == pytest.approx(expected, abs=1e-4)
        total = 0.6 * scores.loc[name, "Bio conservation"] + 0.4 * scores.loc[name, "Batch correction"]
        assert scores.loc[name, "Total"] == pytest.approx(total)
    with pytest.raises(SscellError, match="at least 2 batches"):
        integration_scores({"mixed": mixed}, labels, np.zeros(n), "mixed")

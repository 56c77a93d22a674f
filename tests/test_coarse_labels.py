"""Cells labelled at several Cell Ontology levels (AtlasSpec.coarse_labels: some T cells labelled
"T cell", some monocytes "monocyte"), so the ontology correction changes scores: a finer
prediction of a coarse label counts as right, a coarser prediction of a fine label does not,
in zero-shot kNN and in transfer."""
import dataclasses

import numpy as np
import pytest
from conftest import TINY_ATLAS, train_tiny_run  # tests/ is on sys.path (rootdir conftest)

from sscell.data.convert import convert
from sscell.data.store import open_store
from sscell.data.synthetic import CELL_TYPES, AtlasSpec, generate_atlas, write_atlas
from sscell.errors import SscellError
from sscell.evaluation.evaluate import evaluate
from sscell.evaluation.finetune import finetune, finetune_config
from sscell.evaluation.metrics import f1_columns
from sscell.evaluation.ontology import corrected_predictions, store_descendants

COARSE_ATLAS = dataclasses.replace(TINY_ATLAS, coarse_labels=0.5)
PARENT = {"CD4-positive, alpha-beta T cell": "T cell", "CD8-positive, alpha-beta T cell": "T cell",
          "classical monocyte": "monocyte", "non-classical monocyte": "monocyte"}
ONTOLOGY_ID = {t.name: t.ontology_id for t in CELL_TYPES}


@pytest.fixture(scope="module")
def coarse_store(tmp_path_factory):
    folder = tmp_path_factory.mktemp("coarse")
    write_atlas(COARSE_ATLAS, folder / "atlas.h5ad")
    convert([str(folder / "atlas.h5ad")], str(folder / "store"), seed=0)
    return open_store(str(folder / "store"))


def test_coarse_labels_relabel_a_share_of_t_cells_and_monocytes_by_their_parent_and_nothing_else():
    fine, coarse = generate_atlas(TINY_ATLAS), generate_atlas(COARSE_ATLAS)
    assert (fine.X != coarse.X).nnz == 0  # the same cells: only their labels differ
    assert fine.obs.drop(columns=["cell_type", "cell_type_ontology_term_id"]).equals(
        coarse.obs.drop(columns=["cell_type", "cell_type_ontology_term_id"]))
    was, now = fine.obs.cell_type.astype(str), coarse.obs.cell_type.astype(str)
    changed = was != now
    assert set(was[changed]) == set(PARENT)  # every leaf with a non-root parent, no other type
    assert (now[changed] == was[changed].map(PARENT)).all()
    assert (coarse.obs.cell_type_ontology_term_id.astype(str) == now.map(ONTOLOGY_ID)).all()
    share = changed[was.isin(list(PARENT))].mean()
    assert 0.4 < share < 0.6
    for bad in (float("nan"), -0.1, 1.5):
        with pytest.raises(SscellError, match="coarse_labels"):
            generate_atlas(dataclasses.replace(TINY_ATLAS, coarse_labels=bad))
    assert AtlasSpec().coarse_labels == 0.0  # the default atlas keeps leaf labels


def test_the_correction_counts_a_finer_prediction_of_a_coarse_label_and_not_the_reverse(coarse_store):
    descendants = store_descendants(coarse_store)
    code = {name: i for i, name in enumerate(coarse_store.labels["cell_type"].cat.categories)}
    true = np.array([code[n] for n in ("T cell", "CD4-positive, alpha-beta T cell", "monocyte",
                                       "classical monocyte")])
    pred = np.array([code[n] for n in ("CD4-positive, alpha-beta T cell", "T cell", "classical monocyte",
                                       "monocyte")])
    np.testing.assert_array_equal(corrected_predictions(true, pred, descendants),
                                  [code["T cell"], code["T cell"], code["monocyte"], code["monocyte"]])
    scores = f1_columns("knn", true, pred, descendants)
    assert scores["knn_micro_f1"] == 0.0 and scores["knn_micro_f1_ontology"] == 0.5


def test_zero_shot_and_transfer_ontology_scores_rise_on_coarse_labels(coarse_store, tmp_path):
    train_tiny_run(coarse_store, tmp_path)
    for row in evaluate(str(tmp_path), tasks=("knn",), baselines=("pca",)):
        assert row["knn_macro_f1_ontology"] > row["knn_macro_f1"], row
    base = finetune_config()
    base.train.update(steps=10, batch_size=64, log_every=5, val_every=5, val_batches=2, checkpoint_every=5)
    base.eval.batch_size = 256
    rows = finetune(str(tmp_path), coarse_store.path, [1.0], base=base, arms=("pretrained",))
    assert rows and all(r["finetune_knn_macro_f1_ontology"] > r["finetune_knn_macro_f1"] for r in rows)

"""Real cells end to end: scanpy's 700 PBMCs (shipped in its wheel) as a single-donor, symbols-only
CELLxGENE-like file -> store split by cell -> tiny pretraining -> embeddings -> kNN vs PCA ->
fine-tuning -> predicted cell types."""
import csv
import importlib.util
import os
import subprocess
import sys
import warnings

import anndata
import numpy as np
import pytest
import scanpy
import scipy.sparse as sp

from sscell.data.examples import pbmc68k, recovered_counts, write_example
from sscell.embed import OBSM_KEY
from sscell.errors import SscellError

SOURCE = os.path.join(os.path.dirname(scanpy.__file__), "datasets", "10x_pbmc68k_reduced.h5ad")
REPO = os.path.dirname(os.path.dirname(__file__))


def sscell(*args, module):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=env, cwd=REPO,
                            timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def source():
    with warnings.catch_warnings():  # an old file: anndata warns of its layout
        warnings.simplefilter("ignore")
        return anndata.read_h5ad(SOURCE)


def test_pbmc68k_holds_the_counts_behind_scanpys_normalised_values(source):
    built = pbmc68k()
    normalised = source.raw.X.toarray().astype(np.float64)
    n_counts = source.obs["n_counts"].to_numpy(np.float64)[:, None]
    exact = np.expm1(normalised) * n_counts / 1e4
    assert np.abs(exact - np.rint(exact)).max() < 0.1
    assert sp.isspmatrix_csr(built.X) and built.X.dtype == np.float32
    np.testing.assert_array_equal(built.X.toarray(), np.rint(exact))
    # and the counts normalise back to scanpy's values
    np.testing.assert_allclose(np.log1p(built.X.toarray() / n_counts * 1e4), normalised, atol=2e-3)
    assert built.var_names.tolist() == source.raw.var_names.tolist() and "CD3D" in built.var_names
    assert built.obs_names.tolist() == source.obs_names.tolist()
    assert built.obs.columns.tolist() == ["cell_type"]  # one donor: no donor_id
    assert built.obs["cell_type"].astype(str).tolist() == source.obs["bulk_labels"].astype(str).tolist()
    assert built.obs["cell_type"].nunique() == 10


def test_counts_are_recovered_and_non_integers_refused():
    counts = np.array([[2.0, 0.0, 5.0], [1.0, 1.0, 0.0]])
    library = counts.sum(axis=1)
    normalised = sp.csr_matrix(np.log1p(counts / library[:, None] * 1e4))
    np.testing.assert_array_equal(recovered_counts(normalised, library).toarray(), counts)
    with pytest.raises(SscellError, match=r"up to 0\.250 from an integer .* not log1p of library-size"):
        recovered_counts(normalised, library * [1, 1.25])


def test_write_example_refuses_unknown_names(tmp_path):
    with pytest.raises(SscellError, match="unknown example 'pbmc3k'; choose from pbmc68k"):
        write_example("pbmc3k", tmp_path / "x.h5ad")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_pbmc68k_converts_pretrains_embeds_finetunes_and_predicts(tmp_path):
    """The user's commands in docs/real_data.md, at a tiny scale."""
    h5ad, store, workdir = tmp_path / "new" / "pbmc68k.h5ad", tmp_path / "store", tmp_path / "run"
    sscell("pbmc68k", f"--output={h5ad}", module="sscell.data.examples")
    assert [p.name for p in h5ad.parent.iterdir()] == ["pbmc68k.h5ad"]  # its folder made, no temporary left
    sscell(f"--output={store}", "--split=cells", str(h5ad), module="sscell.data.convert")
    run = sscell("--config=experiments/pbmc68k.py", f"--workdir={workdir}", f"--config.data.store={store}",
                 "--config.train.steps=400", "--config.train.val_every=200", "--config.train.checkpoint_every=200",
                 "--config.eval.tasks=('knn',)", module="sscell.main")
    assert "reference = " in run.stdout and "(eval.knn_reference=train+val)" in run.stdout
    with open(workdir / "results.csv") as f:
        rows = {r["method"].split()[0]: r for r in csv.DictReader(f)}
    baselines = {"PCA(32)", "HVG(765)"} | ({"scVI(30)"} if importlib.util.find_spec("scvi") else set())
    assert set(rows) == {"sscell"} | baselines  # keyed by the first word: both PCAs are "PCA(32)"
    n_types = pbmc68k().obs["cell_type"].nunique()
    for name in ("sscell", "PCA(32)"):  # well above chance (1 / 10 types) for the model and for PCA (~0.6 measured)
        row = rows[name]
        assert 3 / n_types < float(row["knn_macro_f1"]) <= 1, name
        assert int(row["knn_reference_cells"]) > 500  # ~85% of 700 cells: the train and val splits

    embedded = tmp_path / "embedded.h5ad"
    sscell(f"--workdir={workdir}", f"--input={h5ad}", f"--output={embedded}", module="sscell.embed")
    cells = anndata.read_h5ad(embedded)
    assert cells.obsm[OBSM_KEY].shape == (700, 32) and np.isfinite(cells.obsm[OBSM_KEY]).all()
    assert cells.obs["cell_type"].astype(str).tolist() == pbmc68k().obs["cell_type"].astype(str).tolist()

    # fine-tune for cell types on the same cells, then label the file with the fine-tuned run
    sscell(f"--workdir={workdir}", f"--store={store}", "--fractions=1", "--steps=150", "--config.train.batch_size=64",
           "--config.train.val_every=50", "--config.train.checkpoint_every=50", module="sscell.evaluation.finetune")
    labelled = tmp_path / "labelled.h5ad"
    arm = workdir / "finetune" / "pretrained_1"
    sscell(f"--workdir={arm}", f"--input={h5ad}", f"--output={labelled}", module="sscell.predict")
    predicted = anndata.read_h5ad(labelled).obs
    true = pbmc68k().obs["cell_type"].astype(str).to_numpy()
    assert set(predicted["sscell_cell_type"].astype(str)) <= set(true)
    assert ((predicted["sscell_confidence"] > 0) & (predicted["sscell_confidence"] <= 1)).all()
    accuracy = np.mean(predicted["sscell_cell_type"].astype(str).to_numpy() == true)
    assert accuracy > 3 / n_types  # trained on 70% of these cells: far above chance

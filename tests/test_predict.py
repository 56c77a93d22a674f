"""Cell types of any AnnData with a supervised run: the predict command, the Python API and bundles."""
import os
import shutil
import subprocess
import sys

import anndata
import jax
import numpy as np
import pandas as pd
import pytest
from test_api import bare, train_run

import sscell
from sscell.data.loader import label_names, select_rows
from sscell.data.store import open_store
from sscell.embed import OBSM_KEY
from sscell.evaluation.run import open_run
from sscell.predict import predict
from sscell.training.train import build

PREDICTED = ["sscell_cell_type", "sscell_confidence", "sscell_cell_type_ontology_term_id"]


@pytest.fixture(scope="module")
def classifier_run(tiny_store, tmp_path_factory):
    return train_run(tiny_store, tmp_path_factory.mktemp("supervised"), loss="supervised")


@pytest.fixture(scope="module")
def atlas(tiny_h5ad):
    return anndata.read_h5ad(tiny_h5ad)


def predict_cli(*args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "sscell.predict", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=240)


@pytest.mark.slow
def test_predicted_labels_are_the_argmax_of_the_models_logits(classifier_run, tiny_store, atlas, tiny_h5ad, tmp_path):
    workdir, config = classifier_run
    summary = predict(workdir, tiny_h5ad, str(tmp_path / "out.h5ad"))
    out = anndata.read_h5ad(tmp_path / "out.h5ad")
    assert summary["classes"] == len(label_names(tiny_store, "cell_type"))
    assert out.obs.columns.tolist() == atlas.obs.columns.tolist() + PREDICTED  # the input's obs kept
    pd.testing.assert_frame_equal(out.obs[atlas.obs.columns], atlas.obs)

    # Independent reference: the full training restore, its model's logits on numpy-built inputs.
    counts = atlas.X.toarray().astype(np.float64)
    x = np.log1p(counts / counts.sum(1, keepdims=True) * 1e4).astype(np.float32)
    run = open_run(workdir)
    logits = np.asarray(build(config, tiny_store).model.apply({"params": run.params}, x))  # the training-time model
    names = np.asarray(label_names(tiny_store, "cell_type"))  # the training store's codes
    assert out.obs["sscell_cell_type"].cat.categories.tolist() == names.tolist()
    np.testing.assert_array_equal(out.obs["sscell_cell_type"].astype(str), names[logits.argmax(1)])
    np.testing.assert_allclose(out.obs["sscell_confidence"], np.asarray(jax.nn.softmax(logits)).max(1), rtol=1e-5)
    ontology = atlas.obs.groupby("cell_type", observed=True)["cell_type_ontology_term_id"].first().astype(str)
    np.testing.assert_array_equal(out.obs["sscell_cell_type_ontology_term_id"].astype(str),
                                  ontology[out.obs["sscell_cell_type"].astype(str)].to_numpy())
    assert (out.obs["sscell_cell_type"] == atlas.obs["cell_type"]).mean() > 0.5  # it learnt something
    assert out.obsm[OBSM_KEY].shape == (atlas.n_obs, 8)

    # Predicting on a file that already holds predictions replaces them.
    stale = atlas.copy()
    stale.obs["sscell_confidence"] = "stale"
    stale.write_h5ad(tmp_path / "stale.h5ad")
    predict(workdir, str(tmp_path / "stale.h5ad"), str(tmp_path / "again.h5ad"))
    pd.testing.assert_frame_equal(anndata.read_h5ad(tmp_path / "again.h5ad").obs, out.obs)


@pytest.mark.slow
def test_the_command_the_run_and_its_bundle_agree_bit_for_bit_after_the_run_is_deleted(
        tiny_store, atlas, tiny_h5ad, tmp_path):
    store = open_store(shutil.copytree(tiny_store.path, tmp_path / "store"))
    workdir, config = train_run(store, tmp_path / "run", loss="supervised")
    symbols = bare(atlas, atlas.var["feature_name"].astype(str))  # no obs columns, genes by symbol
    symbols.write_h5ad(tmp_path / "symbols.h5ad")
    result = predict_cli(f"--workdir={workdir}", f"--input={tmp_path / 'symbols.h5ad'}",
                         f"--output={tmp_path / 'by_cli.h5ad'}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "96 of the input's 96 genes matched by var['feature_name']" in result.stdout
    by_cli = anndata.read_h5ad(tmp_path / "by_cli.h5ad")

    model = sscell.load(workdir)
    by_run = model.predict(symbols.copy())
    model.export(tmp_path / "bundle")
    shutil.rmtree(workdir)
    shutil.rmtree(store.path)
    loaded = sscell.load(tmp_path / "bundle")
    predicted = symbols.copy()
    by_bundle = loaded.predict(predicted)
    for frame in (by_run, by_bundle):
        pd.testing.assert_frame_equal(frame, by_cli.obs[PREDICTED], check_exact=True)
    np.testing.assert_array_equal(predicted.obsm[OBSM_KEY], by_cli.obsm[OBSM_KEY])
    np.testing.assert_array_equal(loaded.embed(symbols.copy()), by_cli.obsm[OBSM_KEY])
    result = predict_cli(f"--workdir={tmp_path / 'bundle'}", f"--input={tmp_path / 'symbols.h5ad'}",
                         f"--output={tmp_path / 'by_bundle_cli.h5ad'}")
    assert result.returncode == 0, result.stderr[-2000:]
    by_bundle_cli = anndata.read_h5ad(tmp_path / "by_bundle_cli.h5ad")
    pd.testing.assert_frame_equal(by_bundle_cli.obs, by_cli.obs, check_exact=True)
    np.testing.assert_array_equal(by_bundle_cli.obsm[OBSM_KEY], by_cli.obsm[OBSM_KEY])

    assert loaded.classes["cell_type"].tolist() == label_names(tiny_store, "cell_type")
    card = (tmp_path / "bundle" / "README.md").read_text()
    trained = len(select_rows(tiny_store, "train", seed=config.seed))
    assert "cell-type classifier over 10 classes" in card and f"({trained:,} trained on)" in card

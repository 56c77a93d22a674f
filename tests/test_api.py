"""sscell.load and embeddings of any AnnData, from Python and from the command line, and bundles."""
import hashlib
import json
import os
import shutil
import subprocess
import sys

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse

import sscell
from sscell.bundle import flatten
from sscell.config import default_config, save_config
from sscell.data.store import open_store
from sscell.embed import OBSM_KEY, embed, main
from sscell.errors import SscellError
from sscell.evaluation.run import open_run
from sscell.predict import predict
from sscell.training.train import build, train


def train_run(store, workdir, loss="masked"):
    """A tiny run (30 steps, float32 compute so independent references match tightly) on `store`."""
    config = default_config()
    config.data.store = str(store.path)
    config.loss.name = loss
    config.model.update(hidden=(32, 32), latent=8, dtype="float32")
    config.train.update(steps=30, batch_size=64, log_every=5, val_every=10, val_batches=2, checkpoint_every=10,
                        lr_decay_epochs=100)
    config.eval.update(batch_size=128)
    os.makedirs(workdir, exist_ok=True)
    save_config(config, workdir)
    train(config, str(workdir), store)
    return str(workdir), config


@pytest.fixture(scope="module")
def masked_run(tiny_store, tmp_path_factory):
    return train_run(tiny_store, tmp_path_factory.mktemp("masked"))


@pytest.fixture(scope="module")
def atlas(tiny_h5ad):
    return anndata.read_h5ad(tiny_h5ad)


def bare(atlas, var_names=None, var=None):
    """The atlas's counts with no obs columns and the given var (default: the gene ids only)."""
    var = pd.DataFrame(index=pd.Index(atlas.var_names if var_names is None else var_names)) if var is None else var
    return anndata.AnnData(X=atlas.X.copy(), obs=pd.DataFrame(index=atlas.obs_names), var=var)


def run_cli(*args):
    main([str(a) for a in args])


def test_importing_sscell_loads_nothing_heavy():
    code = "import sys, sscell; print(sorted({m.split('.')[0] for m in sys.modules} & {'jax', 'numpy', 'anndata'}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.slow
def test_an_h5ad_without_obs_columns_is_embedded_as_the_encoder_computes(masked_run, atlas, tiny_store, tmp_path):
    workdir, config = masked_run
    cells = bare(atlas)
    cells.write_h5ad(tmp_path / "bare.h5ad")
    run_cli("--workdir", workdir, "--input", tmp_path / "bare.h5ad", "--output", tmp_path / "out.h5ad")
    written = anndata.read_h5ad(tmp_path / "out.h5ad")
    assert written.obs.columns.empty and written.obs_names.equals(atlas.obs_names)
    assert written.uns["sscell"]["step"] == 30 and "96 of the run's 96 genes measured" in written.uns["sscell"]["genes"]

    model = sscell.load(workdir)
    embedding = model.embed(cells)
    np.testing.assert_array_equal(embedding, written.obsm[OBSM_KEY])  # the command and the API, bit for bit
    assert cells.obsm[OBSM_KEY] is embedding and embedding.dtype == np.float32
    assert model.genes.index.equals(tiny_store.var.index) and model.config.loss.name == "masked"

    # Independent reference: the full training restore and log1p(counts per 10k) built with numpy.
    assert tiny_store.var.index.equals(atlas.var_names)
    counts = atlas.X.toarray().astype(np.float64)
    x = np.log1p(counts / counts.sum(1, keepdims=True) * 1e4).astype(np.float32)
    model = build(config, tiny_store).model  # the training-time model
    expected = np.asarray(model.apply({"params": open_run(workdir).params}, x, method="encode"))
    np.testing.assert_allclose(embedding, expected, rtol=1e-5, atol=1e-5)


def test_symbols_match_through_the_runs_feature_name(masked_run, atlas, tmp_path):
    workdir, _ = masked_run
    by_id = sscell.load(workdir).embed(bare(atlas))
    # Symbols as the var index, genes in another order, plus genes the run does not know.
    order = np.random.default_rng(0).permutation(atlas.n_vars)
    extra = anndata.AnnData(X=scipy.sparse.csr_matrix(np.ones((atlas.n_obs, 4), np.float32)),
                            obs=pd.DataFrame(index=atlas.obs_names),
                            var=pd.DataFrame(index=[f"NOTAGENE{i}" for i in range(4)]))
    symbols = anndata.concat([bare(atlas, atlas.var["feature_name"].astype(str))[:, order], extra], axis=1)
    symbols.write_h5ad(tmp_path / "symbols.h5ad")
    summary = embed(workdir, str(tmp_path / "symbols.h5ad"), str(tmp_path / "out.h5ad"))
    assert (summary["genes_matched_by"], summary["genes_used"], summary["genes_dropped"],
            summary["genes_not_measured"]) == ("var['feature_name']", 96, 4, 0)
    np.testing.assert_array_equal(anndata.read_h5ad(tmp_path / "out.h5ad").obsm[OBSM_KEY], by_id)
    np.testing.assert_array_equal(sscell.load(workdir).embed(symbols), by_id)


def test_gene_column_names_the_input_var_column_with_the_ids(masked_run, atlas, tmp_path, capsys):
    workdir, _ = masked_run
    model = sscell.load(workdir)
    by_id = model.embed(bare(atlas))
    var = pd.DataFrame({"ensembl": atlas.var_names}, index=[f"probe_{i}" for i in range(atlas.n_vars)])
    probes = bare(atlas, var=var)
    probes.write_h5ad(tmp_path / "probes.h5ad")
    run_cli("--workdir", workdir, "--input", tmp_path / "probes.h5ad", "--output", tmp_path / "out.h5ad",
            "--gene-column", "ensembl")
    assert ("96 of the input's 96 genes matched by gene id; 96 of the run's 96 genes measured (100%)"
            in capsys.readouterr().out)
    np.testing.assert_array_equal(anndata.read_h5ad(tmp_path / "out.h5ad").obsm[OBSM_KEY], by_id)
    np.testing.assert_array_equal(model.embed(probes, gene_column="ensembl"), by_id)
    with pytest.raises(SscellError, match=r"measures 0 of the run's 96 genes .*\(gene_column\)"):  # probe names alone
        model.embed(probes)


def test_an_input_measuring_too_few_of_the_runs_genes_is_refused(masked_run, atlas, tmp_path, capsys):
    workdir, _ = masked_run
    few = bare(atlas)[:, :40].copy()
    few.write_h5ad(tmp_path / "few.h5ad")
    message = (r"the input measures 40 of the run's 96 genes \(42%\), under {overlap}=0.5 \(40 of its 40 genes "
               r"matched by gene id; .*\({genes}\), or lower {overlap}$")
    with pytest.raises(SscellError, match=message.format(overlap="--min-gene-overlap", genes="--gene-column")):
        embed(workdir, str(tmp_path / "few.h5ad"), str(tmp_path / "out.h5ad"))
    with pytest.raises(SscellError, match=message.format(overlap="min_overlap", genes="gene_column")):
        sscell.load(workdir).embed(few)  # the API names its keywords
    with pytest.raises(SystemExit) as exit_code:
        run_cli("--workdir", workdir, "--input", tmp_path / "few.h5ad", "--output", tmp_path / "out.h5ad")
    assert exit_code.value.code == 2 and capsys.readouterr().err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["few.h5ad"]  # nothing written

    run_cli("--workdir", workdir, "--input", tmp_path / "few.h5ad", "--output", tmp_path / "out.h5ad",
            "--min-gene-overlap", "0.4")
    assert "40 of the run's 96 genes measured (42%)" in capsys.readouterr().out
    np.testing.assert_array_equal(anndata.read_h5ad(tmp_path / "out.h5ad").obsm[OBSM_KEY],
                                  sscell.load(workdir).embed(few, min_overlap=0.4))


def test_counts_are_found_in_layers_raw_or_x_and_rounded_on_request(masked_run, atlas, tmp_path):
    model = sscell.load(masked_run[0])
    by_id = model.embed(bare(atlas))
    normalised = bare(atlas)
    normalised.layers["counts"] = normalised.X.copy()
    normalised.X = normalised.X.log1p()
    np.testing.assert_array_equal(model.embed(normalised), by_id)
    with_raw = bare(atlas)
    with_raw.raw = with_raw.copy()
    with_raw.X = with_raw.X.log1p()
    np.testing.assert_array_equal(model.embed(with_raw), by_id)

    fractional = bare(atlas)
    fractional.X.data = fractional.X.data + np.float32(0.25)
    with pytest.raises(SscellError, match=r"non-integer values .*pass --round-counts"):
        model.embed(fractional)
    np.testing.assert_array_equal(model.embed(fractional, round_counts=True), by_id)
    fractional.write_h5ad(tmp_path / "fractional.h5ad")
    run_cli("--workdir", masked_run[0], "--input", tmp_path / "fractional.h5ad", "--output", tmp_path / "out.h5ad",
            "--round-counts")
    np.testing.assert_array_equal(anndata.read_h5ad(tmp_path / "out.h5ad").obsm[OBSM_KEY], by_id)


def test_predict_on_a_run_without_a_classifier_head_is_refused(masked_run, atlas, tiny_h5ad, tmp_path):
    workdir, _ = masked_run
    message = r"trained with loss 'masked' and has no cell-type classifier head; fine-tune one"
    with pytest.raises(SscellError, match=message):
        sscell.load(workdir).predict(bare(atlas))
    with pytest.raises(SscellError, match=message):
        predict(workdir, tiny_h5ad, str(tmp_path / "out.h5ad"))
    assert not list(tmp_path.iterdir())


def test_a_bundle_embeds_bit_for_bit_like_the_run_after_the_run_and_its_store_are_deleted(
        tiny_store, atlas, tiny_h5ad, tmp_path):
    store = open_store(shutil.copytree(tiny_store.path, tmp_path / "store"))
    workdir, config = train_run(store, tmp_path / "run")
    run_cli("--workdir", workdir, "--input", tiny_h5ad, "--output", tmp_path / "by_run.h5ad")
    model = sscell.load(workdir)
    from_run = model.embed(bare(atlas))
    model.export(tmp_path / "bundle")
    shutil.rmtree(workdir)
    shutil.rmtree(store.path)

    loaded = sscell.load(tmp_path / "bundle")
    np.testing.assert_array_equal(loaded.embed(bare(atlas)), from_run)
    np.testing.assert_array_equal(anndata.read_h5ad(tmp_path / "by_run.h5ad").obsm[OBSM_KEY], from_run)
    run_cli("--workdir", tmp_path / "bundle", "--input", tiny_h5ad, "--output", tmp_path / "by_bundle.h5ad")
    np.testing.assert_array_equal(anndata.read_h5ad(tmp_path / "by_bundle.h5ad").obsm[OBSM_KEY], from_run)
    for key, value in flatten(model.params).items():
        np.testing.assert_array_equal(flatten(loaded.params)[key], value)
    assert flatten(loaded.params).keys() == flatten(model.params).keys()
    assert loaded.genes.index.tolist() == tiny_store.var.index.tolist()
    assert loaded.genes["feature_name"].tolist() == tiny_store.var["feature_name"].astype(str).tolist()
    assert loaded.config.to_dict() == model.config.to_dict() and loaded.step == 30 and loaded.classes is None
    card = (tmp_path / "bundle" / "README.md").read_text()
    assert "self-supervised encoder (loss `masked`)" in card and "30 of 30 steps" in card
    assert f"{tiny_store.n_cells:,} cells" in card and "96 genes" in card

    # Loading a bundle runs none of its code: a loss.module it names is never imported.
    saved = json.loads((tmp_path / "bundle" / "config.json").read_text())
    saved["loss"]["module"] = "sscell_test_module_that_does_not_exist"
    (tmp_path / "bundle" / "config.json").write_text(json.dumps(saved))
    meta = json.loads((tmp_path / "bundle" / "bundle.json").read_text())  # re-signed: past the checksum
    meta["sha256"]["config.json"] = hashlib.sha256((tmp_path / "bundle" / "config.json").read_bytes()).hexdigest()
    (tmp_path / "bundle" / "bundle.json").write_text(json.dumps(meta))
    np.testing.assert_array_equal(sscell.load(tmp_path / "bundle").embed(bare(atlas)), from_run)


def test_export_creates_missing_folders_and_a_model_prints_as_one_short_line(masked_run, atlas, tmp_path):
    workdir, _ = masked_run
    model = sscell.load(workdir)
    path = model.export(tmp_path / "bundles" / "mine")  # as in the README, with no bundles/ yet
    assert sscell.load(path).embed(bare(atlas)).shape == (atlas.n_obs, 8)
    assert repr(model) == (f"sscell.Model({workdir!r}: best checkpoint, step 30, loss masked, 96 genes -> [32, 32] "
                           "-> 8)")
    with pytest.raises(SscellError, match="cannot create .*; choose another path"):
        model.export(tmp_path / "bundles" / "mine" / "README.md" / "inside")  # a file where a folder would go

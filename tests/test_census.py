"""Census path: SOMA experiments (built here with tiledbsoma.io, Census-shaped) streamed into stores."""
from __future__ import annotations

import subprocess
import sys

import anndata as ad
import jax
import numpy as np
import pandas as pd
import pytest
import scipy.sparse
from test_convert_streaming import build_dir, kill_when, same_store
from test_store import dense, input_rows, make_adata

from sscell.config import default_config
from sscell.data.convert import convert
from sscell.data.store import open_store
from sscell.errors import SscellError
from sscell.training.train import train

pytest.importorskip("tiledbsoma", reason="the census tests need tiledbsoma (pip install 'sscell[census]')")

from sscell.data.census import convert_census, load_recipe
from sscell.data.soma import write_census_like

ASSAYS = ["10x 3' v3", "10x 5' v2", "Smart-seq2"]


def census_adata(n_cells: int = 400, n_genes: int = 30, seed: int = 0, primary: bool = True) -> ad.AnnData:
    """Three datasets, their donors, three assays and (with `primary`) non-primary cells."""
    adata = make_adata(n_cells=n_cells, n_genes=n_genes, n_donors=8, seed=seed)
    rng = np.random.default_rng(seed)
    adata.obs["dataset_id"] = pd.Categorical(rng.choice(["ds-a", "ds-b", "ds-c"], n_cells))
    adata.obs["assay"] = pd.Categorical(rng.choice(ASSAYS, n_cells))
    adata.obs["cell_type_ontology_term_id"] = adata.obs["cell_type"].map(
        {"T cell": "CL:0000084", "B cell": "CL:0000236", "NK cell": "CL:0000623"}).astype("category")
    if primary:
        adata.obs["is_primary_data"] = rng.random(n_cells) < 0.7
    return adata


def presence(adata: ad.AnnData, seed: int = 0) -> pd.DataFrame:
    """Datasets x genes: each dataset measured a different ~80% of the genes."""
    rng = np.random.default_rng(seed)
    names = sorted(adata.obs["dataset_id"].unique())
    return pd.DataFrame(rng.random((len(names), adata.n_vars)) < 0.8, index=names, columns=adata.var_names)


def test_store_equals_the_h5ad_twins_cell_for_cell(tmp_path):
    adata = census_adata(primary=False)  # the .h5ad path keeps no is_primary_data column
    adata.write_h5ad(tmp_path / "twin.h5ad")
    write_census_like(adata, str(tmp_path / "census"))
    convert([tmp_path / "twin.h5ad"], tmp_path / "from_h5ad", seed=3, block_cells=64)
    report = convert_census(str(tmp_path / "from_soma"), uri=str(tmp_path / "census"), seed=3, block_cells=64)

    h5ad_store, soma_store = open_store(tmp_path / "from_h5ad"), open_store(tmp_path / "from_soma")
    same_store(h5ad_store, soma_store)
    np.testing.assert_array_equal(soma_store.measured, h5ad_store.measured)
    pd.testing.assert_frame_equal(soma_store.var[["feature_name"]], h5ad_store.var[["feature_name"]])
    np.testing.assert_array_equal(dense(soma_store.read_rows(0, soma_store.n_cells)),
                                  dense(adata.X[input_rows(soma_store, adata)]))
    assert report["cells"] == adata.n_obs and sum(report["split_cells"].values()) == adata.n_obs

    # ... so a run trains on it exactly as on its .h5ad twin
    params = []
    for name, store in (("from_h5ad", h5ad_store), ("from_soma", soma_store)):
        config = default_config()
        config.data.store = store.path
        config.model.update(hidden=(16,), latent=4)
        config.train.update(steps=4, batch_size=32, log_every=2, val_every=4, val_batches=1, checkpoint_every=4)
        params.append(jax.device_get(train(config, str(tmp_path / f"run_{name}"), store).state["params"]))
    for a, b in zip(jax.tree.leaves(params[0]), jax.tree.leaves(params[1]), strict=True):
        np.testing.assert_array_equal(a, b)


def test_obs_filter_selects_the_cells_a_pandas_query_selects(tmp_path):
    adata = census_adata(seed=1)
    write_census_like(adata, str(tmp_path / "census"))
    expression = "is_primary_data == True and assay in [\"10x 3' v3\", \"10x 5' v2\"] and donor_id != 'donor2'"
    convert_census(str(tmp_path / "store"), uri=str(tmp_path / "census"), obs_filter=expression, block_cells=5)

    store = open_store(tmp_path / "store")
    expected = adata.obs.query(expression)
    obs = store.read_obs()
    assert sorted(obs.index) == sorted(expected.index) and 0 < len(expected) < adata.n_obs
    np.testing.assert_array_equal(dense(store.read_rows(0, store.n_cells)), dense(adata.X[input_rows(store, adata)]))
    for column in ("cell_type", "cell_type_ontology_term_id", "donor_id", "dataset_id", "assay", "is_primary_data"):
        assert (obs[column].astype(str) == expected.loc[obs.index, column].astype(str)).all(), column


def test_measured_mask_equals_the_presence_matrix(tmp_path):
    adata = census_adata(seed=2)
    measured = presence(adata, seed=2)
    write_census_like(adata, str(tmp_path / "census"), measured)
    genes = list(adata.var_names[::-1][:20]) + ["ENSG99999"]  # reordered, subset, one gene var lacks
    (tmp_path / "genes.txt").write_text("\n".join(genes))
    convert_census(str(tmp_path / "store"), uri=str(tmp_path / "census"), vocabulary=str(tmp_path / "genes.txt"))

    store = open_store(tmp_path / "store")
    expected = measured.reindex(columns=genes, fill_value=False).loc[store.datasets].to_numpy()
    np.testing.assert_array_equal(store.measured, expected)
    assert not expected.all(axis=0).all()  # datasets measured different genes
    rows = input_rows(store, adata)
    np.testing.assert_array_equal(dense(store.read_rows(0, store.n_cells))[:, :20],
                                  dense(adata[:, genes[:20]].X[rows]))


def test_sctab_recipe_filters_select_what_pandas_selects(tmp_path):
    """The recipe's obs filter and cell-type rules on cells sized to them: 'T cell' keeps (5,000+
    cells in 31 units), 'B cell' has one cell too few, 'NK cell' one donor unit too few."""
    recipe = load_recipe("sctab")
    rng = np.random.default_rng(0)
    parts = []
    for cell_type, n, units in [("T cell", 5000, 31), ("B cell", 4999, 40), ("NK cell", 6000, 30)]:
        unit = np.r_[np.arange(units), rng.integers(0, units, n - units)]
        parts.append(pd.DataFrame({"cell_type": cell_type, "dataset_id": [f"ds{u % 3}" for u in unit],
                                   "donor_id": [f"donor{u}" for u in unit], "assay": "10x 3' v3",
                                   "is_primary_data": True}))
    extra = parts[0].iloc[:600].copy()  # T cells the obs filter drops: not primary, or not 10x
    extra["is_primary_data"] = np.arange(600) % 2 == 0
    extra.loc[extra["is_primary_data"], "assay"] = "Smart-seq2"
    obs = pd.concat(parts + [extra], ignore_index=True)
    obs.index = [f"cell{i}" for i in range(len(obs))]
    counts = scipy.sparse.random(len(obs), 8, density=0.3, format="csr", random_state=0,
                                 data_rvs=lambda k: rng.integers(1, 9, k)).astype(np.float32)
    var = pd.DataFrame({"feature_name": [f"G{j}" for j in range(8)]}, index=[f"ENSG{j:05d}" for j in range(8)])
    write_census_like(ad.AnnData(counts, obs=obs.astype({c: "category" for c in obs if c != "is_primary_data"}),
                                 var=var), str(tmp_path / "census"))
    (tmp_path / "genes.txt").write_text("\n".join(var.index))
    with pytest.raises(SscellError, match="needs a gene vocabulary"):
        convert_census(str(tmp_path / "store"), uri=str(tmp_path / "census"), recipe="sctab")
    convert_census(str(tmp_path / "store"), uri=str(tmp_path / "census"), recipe="sctab",
                   vocabulary=str(tmp_path / "genes.txt"))

    selected = obs.query(recipe.obs_filter)
    per_type = selected.groupby("cell_type").agg(cells=("donor_id", "size"),
                                                 units=("donor_id", lambda d: (selected.loc[d.index, "dataset_id"]
                                                                               + "/" + d).nunique()))
    kept = per_type.query(f"cells >= {recipe.min_cells_per_cell_type} and "
                          f"units >= {recipe.min_donor_units_per_cell_type}").index
    expected = selected[selected["cell_type"].isin(kept)]
    store = open_store(tmp_path / "store")
    assert list(kept) == ["T cell"] and sorted(store.read_obs().index) == sorted(expected.index)


@pytest.mark.slow
def test_sigkill_mid_stream_leaves_nothing_and_a_rerun_finishes(tmp_path):  # multi-process, ~10 s
    adata = census_adata(n_cells=1500, n_genes=100, seed=4)
    write_census_like(adata, str(tmp_path / "census"))
    output = tmp_path / "store"
    args = [sys.executable, "-m", "sscell.data.census", f"--output={output}", f"--uri={tmp_path / 'census'}",
            "--block-cells=8", "--bucket-nonzeros=4000"]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert kill_when(process, build_dir(output, process.pid) / "buckets" / "0")
    assert not output.exists()
    with pytest.raises(SscellError, match="not an sscell store"):
        open_store(build_dir(output, process.pid) / "store")

    finish = subprocess.run(args, capture_output=True, text=True, check=False)
    assert finish.returncode == 0, finish.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["census", "store"]
    convert_census(str(tmp_path / "reference"), uri=str(tmp_path / "census"))
    same_store(open_store(tmp_path / "reference"), open_store(output))


@pytest.mark.parametrize("case, match", [
    ("missing layer", "has no X layer 'counts'"),
    ("non-integer", "non-integer values"),
    ("no matching cells", "no cells match"),
    ("not soma", "cannot open it as a SOMA experiment"),
])
@pytest.mark.slow
def test_malformed_experiment_one_line_and_nothing_left(tmp_path, case, match):
    adata = census_adata(n_cells=60, seed=5)
    if case == "non-integer":
        adata.X = adata.X.copy()
        adata.X.data[7] = 2.5
    uri = tmp_path / "census"
    if case == "not soma":
        uri.mkdir()
    else:
        write_census_like(adata, str(uri))
    before = sorted(p.name for p in tmp_path.iterdir())
    layer = "counts" if case == "missing layer" else "raw"
    obs_filter = "assay == 'Drop-seq'" if case == "no matching cells" else None
    result = subprocess.run([sys.executable, "-m", "sscell.data.census", f"--output={tmp_path / 'store'}",
                             f"--uri={uri}", f"--layer={layer}"] + ([f"--obs-filter={obs_filter}"] if obs_filter else []),
                            capture_output=True, text=True, check=False)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ") and match in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_census_like_collection_at_a_relative_path(tmp_path, monkeypatch):
    adata = census_adata(n_cells=60, seed=6, primary=False)
    monkeypatch.chdir(tmp_path)
    write_census_like(adata, "census")
    convert_census("store", uri="census")
    assert sorted(open_store("store").read_obs().index) == sorted(adata.obs_names)

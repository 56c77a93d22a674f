"""Tests for the count-matrix store (sscell.data.store) and the h5ad converter (sscell.data.convert)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse

from sscell.data.convert import convert, split_by_unit
from sscell.data.store import LABEL_OBS_COLUMNS, SPLITS, StoreWriter, open_store
from sscell.errors import SscellError


def make_adata(n_cells: int = 300, n_genes: int = 40, n_donors: int = 12, seed: int = 0,
               prefix: str = "c") -> ad.AnnData:
    """Random integer counts (float32, as in CELLxGENE files) in X with CELLxGENE-style obs/var."""
    rng = np.random.default_rng(seed)
    counts = scipy.sparse.random(n_cells, n_genes, density=0.3, format="csr", random_state=seed,
                                 data_rvs=lambda k: rng.integers(1, 50, k)).astype(np.float32)
    obs = pd.DataFrame({
        "cell_type": pd.Categorical(rng.choice(["T cell", "B cell", "NK cell"], n_cells)),
        "donor_id": [f"donor{d}" for d in rng.integers(0, n_donors, n_cells)],
        "assay": "10x 3' v3",
    }, index=[f"{prefix}{i}" for i in range(n_cells)])
    var = pd.DataFrame({"feature_name": [f"GENE{j}" for j in range(n_genes)]},
                       index=[f"ENSG{j:05d}" for j in range(n_genes)])
    return ad.AnnData(X=counts, obs=obs, var=var)


def dense(m: scipy.sparse.spmatrix) -> np.ndarray:
    return np.asarray(m.toarray(), dtype=np.float64)


def input_rows(store, adata: ad.AnnData) -> np.ndarray:
    """Row of `adata` holding each store row's cell."""
    rows = adata.obs_names.get_indexer(store.read_obs().index)
    assert (rows >= 0).all()
    return rows


def leftovers(directory: Path, inputs: list[Path]) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p not in inputs)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """One input converted once: (adata, store path, report)."""
    tmp = tmp_path_factory.mktemp("converted")
    adata = make_adata()
    adata.write_h5ad(tmp / "pbmc.h5ad")
    report = convert([tmp / "pbmc.h5ad"], tmp / "store", block_cells=64)
    return adata, tmp / "store", report


@pytest.mark.parametrize("source", ["X", "layers['counts']", "raw.X"])
def test_round_trip(tmp_path, source):
    adata = make_adata()
    counts = adata.X.copy()
    counts.data[0] = 70_000  # beyond uint16: the store must switch to uint32
    if source != "X":
        adata.X = counts
        if source == "raw.X":
            adata.raw = adata
        else:
            adata.layers["counts"] = counts
        adata.X = counts.multiply(1 / (counts.sum(axis=1) + 1)).tocsr()  # normalised, not counts
    else:
        adata.X = counts
    adata.write_h5ad(tmp_path / "in.h5ad")
    report = convert([tmp_path / "in.h5ad"], tmp_path / "store", block_cells=50)
    store = open_store(tmp_path / "store")
    got = store.read_rows(0, store.n_cells)

    assert report["counts_source"] == {str(tmp_path / "in.h5ad"): source}
    assert got.dtype == np.uint32 and got.shape == (adata.n_obs, adata.n_vars)
    np.testing.assert_array_equal(dense(got), dense(counts[input_rows(store, adata)]))
    np.testing.assert_array_equal(store.indptr, got.indptr)
    assert (report["cells"], report["genes"], report["nonzeros"]) == (adata.n_obs, adata.n_vars, counts.nnz)


def test_obs_var_and_blocks(converted):
    adata, path, report = converted
    store = open_store(path)
    rows = input_rows(store, adata)
    got = store.read_rows(0, store.n_cells)

    assert got.dtype == np.uint16
    np.testing.assert_array_equal(dense(got), dense(adata.X[rows]))
    for column in ["cell_type", "donor_id", "assay"]:
        assert list(store.read_obs()[column].astype(str)) == list(adata.obs[column].astype(str).iloc[rows])
    assert (store.read_obs()["dataset_id"] == "pbmc").all()
    assert list(store.read_obs()["split"].cat.categories) == list(SPLITS)
    pd.testing.assert_frame_equal(store.var, adata.var)
    ranges = [(0, 7), (5, 5), (40, 130), (store.n_cells - 3, store.n_cells)]
    for (start, stop), block in zip(ranges, store.read_blocks(ranges)):
        np.testing.assert_array_equal(dense(block), dense(got[start:stop]))
    assert report["bytes_on_disk"] > 0 and report["cells_per_s"] > 0


def test_anndata_reads_store(converted):
    _, path, _ = converted
    store = open_store(path)
    via_anndata = ad.read_zarr(path)
    np.testing.assert_array_equal(dense(via_anndata.X), dense(store.read_rows(0, store.n_cells)))
    pd.testing.assert_frame_equal(via_anndata.obs, store.read_obs())
    pd.testing.assert_frame_equal(via_anndata.var, store.var)


def test_store_rejects_bad_requests(converted):
    store = open_store(converted[1])
    with pytest.raises(SscellError, match="unknown split"):
        store.split_range("holdout")
    with pytest.raises(SscellError, match="outside"):
        store.read_rows(0, store.n_cells + 1)


def reference_split(sizes: np.ndarray, fractions, perm: np.ndarray) -> np.ndarray:
    """The study's walk, written plainly: train until >= f0 of cells, val until >= f0 + f1."""
    total, done, out = sizes.sum(), 0, np.empty(len(sizes), int)
    for u in perm:
        out[u] = 0 if done < fractions[0] * total else 1 if done < (fractions[0] + fractions[1]) * total else 2
        done += sizes[u]
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_split_by_unit_matches_reference_walk(seed):
    rng = np.random.default_rng(100 + seed)
    unit = rng.integers(0, 40, 5000)
    sizes = np.bincount(unit, minlength=40)
    expected = reference_split(sizes, (0.7, 0.15, 0.15), np.random.default_rng(seed).permutation(40))
    got = split_by_unit(unit, (0.7, 0.15, 0.15), np.random.default_rng(seed))
    np.testing.assert_array_equal(got, expected[unit])


def test_split_by_unit_gives_every_split_a_unit():
    unit = np.repeat([0, 1, 2], [1000, 5, 5])  # one donor holds almost every cell
    for seed in range(6):
        split = split_by_unit(unit, (0.7, 0.15, 0.15), np.random.default_rng(seed))
        assert sorted(set(split)) == [0, 1, 2]


def test_split_by_donor_unit_contiguous_and_deterministic(tmp_path):
    rng = np.random.default_rng(7)
    paths = []
    for k, name in enumerate(["lung", "blood"]):
        adata = make_adata(n_cells=400, n_donors=30, seed=k, prefix=f"{name}-")
        adata.obs["donor_id"] = [f"donor{d}" for d in rng.zipf(1.5, 400) % 30]  # uneven donor sizes
        adata.write_h5ad(tmp_path / f"{name}.h5ad")
        paths.append(tmp_path / f"{name}.h5ad")
    convert(paths, tmp_path / "a", seed=3)
    convert(paths, tmp_path / "b", seed=3)
    convert(paths, tmp_path / "c", seed=4)
    a, b, c = (open_store(tmp_path / s) for s in "abc")

    units = a.read_obs().groupby(["dataset_id", "donor_id"], observed=True)["split"]
    assert (units.nunique() == 1).all()  # no donor unit straddles splits
    unit_share = units.size().max() / a.n_cells
    share = np.cumsum([np.diff(a.split_range(s))[0] for s in SPLITS]) / a.n_cells
    assert 0.70 <= share[0] < 0.70 + unit_share and 0.85 <= share[1] < 0.85 + unit_share
    bounds = [a.split_range(s) for s in SPLITS]
    assert bounds[0][0] == 0 and bounds[0][1] == bounds[1][0] and bounds[1][1] == bounds[2][0]
    assert bounds[2][1] == a.n_cells
    for s, (start, stop) in zip(SPLITS, bounds):
        assert (a.read_obs()["split"].iloc[start:stop] == s).all()

    assert a.read_obs().index.equals(b.read_obs().index)
    np.testing.assert_array_equal(dense(a.read_rows(0, a.n_cells)), dense(b.read_rows(0, b.n_cells)))
    assert not a.read_obs().index.equals(c.read_obs().index)


def test_cells_shuffled_within_split(converted):
    adata, path, _ = converted
    store = open_store(path)
    rows = input_rows(store, adata)
    for split in SPLITS:
        start, stop = store.split_range(split)
        in_split = rows[start:stop]
        assert len(in_split) > 5 and not (np.diff(in_split) > 0).all()


def test_two_inputs_with_reordered_genes(tmp_path):
    first = make_adata(seed=0, prefix="a")
    second = make_adata(n_cells=120, seed=1, prefix="b")
    second = second[:, np.random.default_rng(0).permutation(second.n_vars)].copy()
    first.write_h5ad(tmp_path / "first.h5ad")
    second.write_h5ad(tmp_path / "second.h5ad")
    report = convert([tmp_path / "first.h5ad", tmp_path / "second.h5ad"], tmp_path / "store")
    store = open_store(tmp_path / "store")

    both = ad.concat([first, second[:, first.var_names]])
    np.testing.assert_array_equal(dense(store.read_rows(0, store.n_cells)), dense(both.X[input_rows(store, both)]))
    assert report["cells"] == first.n_obs + second.n_obs
    assert store.var.index.equals(first.var_names)
    assert store.read_obs()["dataset_id"].value_counts().to_dict() == {"first": first.n_obs, "second": second.n_obs}


def test_duplicated_cell_ids_across_inputs_rejected(tmp_path):
    make_adata(prefix="a").write_h5ad(tmp_path / "first.h5ad")
    make_adata(seed=1, prefix="a").write_h5ad(tmp_path / "dupes.h5ad")
    inputs = list(tmp_path.iterdir())
    with pytest.raises(SscellError, match="'a0' appears more than once.*first.h5ad, .*dupes.h5ad"):
        convert([tmp_path / "first.h5ad", tmp_path / "dupes.h5ad"], tmp_path / "store")
    assert leftovers(tmp_path, inputs) == []


def spoil(adata: ad.AnnData, problem: str) -> None:
    if problem == "missing donor_id":
        del adata.obs["donor_id"]
    else:
        adata.X.data[5] = {"negative": -3.0, "NaN": np.nan, "non-integer": 2.5}[problem]


@pytest.mark.parametrize("problem", ["negative", "NaN", "non-integer", "missing donor_id"])
def test_bad_input_leaves_nothing(tmp_path, problem):
    adata = make_adata()
    spoil(adata, problem)
    adata.write_h5ad(tmp_path / "bad.h5ad")
    with pytest.raises(SscellError, match=rf"bad\.h5ad.*{problem.split()[-1]}") as error:
        convert([tmp_path / "bad.h5ad"], tmp_path / "store", block_cells=64)
    assert "\n" not in str(error.value)
    assert leftovers(tmp_path, [tmp_path / "bad.h5ad"]) == []


def test_output_exists_or_input_missing(tmp_path, converted):
    _, path, _ = converted
    with pytest.raises(SscellError, match="exists; remove it"):
        convert([path.parent / "pbmc.h5ad"], path)
    with pytest.raises(SscellError, match="nowhere.h5ad"):
        convert([tmp_path / "nowhere.h5ad"], tmp_path / "store")
    assert leftovers(tmp_path, []) == []


@pytest.mark.parametrize("shard_elements", [2**12, 2**7])  # indptr in one shard / in 4, written as rows come
def test_writer_across_many_shards(tmp_path, shard_elements):
    rng = np.random.default_rng(0)
    counts = scipy.sparse.random(500, 300, density=0.2, format="csr", random_state=1,
                                 data_rvs=lambda k: rng.integers(1, 100_000, k)).astype(np.uint32)
    counts = (scipy.sparse.diags((np.arange(500) != 17).astype(np.uint32), dtype=np.uint32) @ counts).tocsr()  # an empty row
    counts.eliminate_zeros()
    obs = pd.DataFrame({"split": pd.Categorical.from_codes(np.repeat([0, 1, 2], [300, 100, 100]), SPLITS)},
                       index=[f"c{i}" for i in range(500)])
    writer = StoreWriter(tmp_path / "store", 500, counts.nnz, 300, np.uint32, {}, shard_elements=shard_elements)
    cuts = np.sort(rng.choice(np.arange(1, 500), 30, replace=False))
    for start, stop in zip(np.r_[0, cuts], np.r_[cuts, 500]):
        writer.append(counts[start:stop])
    writer.close(obs, pd.DataFrame(index=[f"g{j}" for j in range(300)]))
    store = open_store(tmp_path / "store")

    assert len(list((tmp_path / "store/X/data/c").iterdir())) == -(-counts.nnz // shard_elements) > 5
    assert len(list((tmp_path / "store/X/indptr/c").iterdir())) == -(-501 // shard_elements)
    np.testing.assert_array_equal(store.indptr, counts.indptr)
    np.testing.assert_array_equal(dense(store.read_rows(0, 500)), dense(counts))
    np.testing.assert_array_equal(dense(ad.read_zarr(tmp_path / "store").X), dense(counts))
    assert store.split_range("val") == (300, 400)


def test_writer_refuses_rows_or_nonzeros_beyond_its_totals(tmp_path):
    counts = scipy.sparse.csr_matrix(np.arange(12, dtype=np.uint16).reshape(4, 3))  # 11 nonzeros
    obs = pd.DataFrame({"split": pd.Categorical.from_codes([0, 0, 1, 2], SPLITS)}, index=list("abcd"))
    var = pd.DataFrame(index=list("xyz"))
    for n_cells, nnz in [(4, 10), (3, 11)]:
        writer = StoreWriter(tmp_path / f"store{n_cells}{nnz}", n_cells, nnz, 3, np.uint16, {})
        writer.append(counts[:3] if n_cells == 4 else counts[:2])
        with pytest.raises(ValueError, match="appended to a matrix of"):
            writer.append(counts[3:] if n_cells == 4 else counts[2:])
    writer = StoreWriter(tmp_path / "short", 4, 11, 3, np.uint16, {})
    writer.append(counts[:3])
    with pytest.raises(ValueError, match="3 rows appended to a store of 4"):
        writer.close(obs, var)


@pytest.mark.filterwarnings("ignore::UserWarning")  # anndata's own zarr writer, used for the plain store
def test_open_store_rejects_non_stores(tmp_path):
    with pytest.raises(SscellError, match="not an sscell store: it does not exist"):
        open_store(tmp_path / "missing")
    (tmp_path / "random").mkdir()
    (tmp_path / "random" / "notes.txt").write_text("hello")
    with pytest.raises(SscellError, match="not an sscell store.*python -m sscell.data.convert"):
        open_store(tmp_path / "random")
    with ad.settings.override(zarr_write_format=3):
        make_adata().write_zarr(tmp_path / "plain.zarr")
    with pytest.raises(SscellError, match="no sscell format_version"):
        open_store(tmp_path / "plain.zarr")
    with pytest.raises(SscellError, match="local path, gs://BUCKET/PATH or s3://BUCKET/PATH, not ftp://"):
        open_store("ftp://host/store")


def test_store_holds_label_codes_and_reads_obs_on_demand(converted):
    """In RAM: the label columns as category codes (no per-cell strings); the full obs on demand."""
    store = open_store(converted[1])
    obs = store.read_obs()
    assert isinstance(store.labels.index, pd.RangeIndex) and len(store.labels) == store.n_cells
    assert list(store.labels.columns) == [c for c in LABEL_OBS_COLUMNS if c in obs] == \
        ["split", "cell_type", "donor_id", "dataset_id"]
    for column in store.labels:
        assert store.labels[column].cat.codes.dtype.itemsize <= 2
        np.testing.assert_array_equal(store.labels[column].astype(str), obs[column].astype(str))
    assert obs.index.is_unique and "assay" in obs  # read_obs has every column and the cell ids


@pytest.fixture
def s3_endpoint(monkeypatch, tmp_path):
    """A local S3 server (moto) with one empty bucket, "atlas", and the environment an s3:// store needs."""
    moto_server = pytest.importorskip("moto.server", reason="the S3 test needs moto[server]: pip install -e '.[test]'")
    pytest.importorskip("s3fs", reason="the S3 test needs s3fs: pip install -e '.[test]'")
    import boto3

    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    (tmp_path / "aws").write_text("")  # no AWS config or credentials file of the machine's
    for name, value in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                        "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": str(tmp_path / "aws"),
                        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "aws")}.items():
        monkeypatch.setenv(name, value)
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="atlas")
    yield endpoint
    server.stop()


@pytest.mark.slow
def test_store_on_s3_reads_and_trains_like_the_local_store(s3_endpoint, tiny_store, tiny_config, tmp_path):
    import boto3

    from sscell.data.loader import CellLoader
    from sscell.training.train import train

    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    local = Path(tiny_store.path)
    for file in (f for f in local.rglob("*") if f.is_file()):  # what `aws s3 sync STORE s3://...` does
        s3.upload_file(str(file), "atlas", f"stores/tiny/{file.relative_to(local).as_posix()}")
    store = open_store("s3://atlas/stores/tiny")

    assert (store.n_cells, store.n_genes, store.datasets) == (tiny_store.n_cells, tiny_store.n_genes,
                                                             tiny_store.datasets)
    np.testing.assert_array_equal(store.indptr, tiny_store.indptr)
    np.testing.assert_array_equal(dense(store.read_rows(0, store.n_cells)), dense(tiny_store.read_rows(0, store.n_cells)))
    pd.testing.assert_frame_equal(store.read_obs(), tiny_store.read_obs())
    pd.testing.assert_frame_equal(store.labels, tiny_store.labels)
    np.testing.assert_array_equal(store.measured, tiny_store.measured)
    remote, here = (CellLoader(s, "train", batch_size=64, seed=0, shards=2) for s in (store, tiny_store))
    for step in (0, remote.steps_per_epoch + 1):
        a, b = remote.batch(step), here.batch(step)
        for name in a:
            np.testing.assert_array_equal(a[name], b[name])
    tiny_config.data.store = store.path
    tiny_config.train.update(steps=4, val_every=4, checkpoint_every=4)
    state = train(tiny_config, str(tmp_path / "run"), store).state
    assert int(state["step"]) == 4
    with pytest.raises(SscellError, match="s3://atlas/nowhere is not an sscell store: no zarr.json"):
        open_store("s3://atlas/nowhere")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sscell.data.convert", *args],
                          check=False, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_cli(tmp_path):
    adata = make_adata(n_cells=100)
    adata.write_h5ad(tmp_path / "ok.h5ad")
    spoil(adata, "negative")
    adata.write_h5ad(tmp_path / "bad.h5ad")

    ok = run_cli(f"--output={tmp_path / 'store'}", str(tmp_path / "ok.h5ad"), "--seed", "1")
    assert ok.returncode == 0, ok.stderr
    report = json.loads(ok.stdout)
    assert report["cells"] == 100 and sum(report["split_cells"].values()) == 100
    assert open_store(tmp_path / "store").n_cells == 100

    bad = run_cli(f"--output={tmp_path / 'other'}", str(tmp_path / "bad.h5ad"))
    assert bad.returncode != 0 and bad.stdout == ""
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "bad.h5ad" in lines[0]
    assert not (tmp_path / "other").exists()

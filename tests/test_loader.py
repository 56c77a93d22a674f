"""The loader: exactly-once epochs, determinism, exact resume, host slices, data shards,
label alignment, subsets (datasets, fractions) that read nothing else."""
import numpy as np
import pytest
from test_preprocess import reference_dense

from sscell.data.loader import CellLoader, nnz_bucket, read_shards, select_rows, sequential_batches
from sscell.errors import SscellError
from sscell.training.train import make_loader


def epoch_rows(loader, epoch):
    steps = range(epoch * loader.steps_per_epoch, (epoch + 1) * loader.steps_per_epoch)
    return [int(c) for step in steps for c in loader.batch(step)["cell"]]


def test_each_cell_once_per_epoch_within_its_split(tiny_store):
    loader = CellLoader(tiny_store, "train", batch_size=64, seed=0, block_cells=16)
    start, stop = tiny_store.split_range("train")
    for epoch in (0, 1):
        rows = epoch_rows(loader, epoch)
        assert len(rows) == len(set(rows)) == loader.steps_per_epoch * 64
        assert min(rows) >= start and max(rows) < stop
        assert stop - start - len(rows) < 64  # only the last partial batch is dropped
    assert epoch_rows(loader, 0) != epoch_rows(loader, 1)


@pytest.mark.parametrize("shards", [1, 2])
def test_two_hosts_split_each_global_batch(tiny_store, shards):
    single = CellLoader(tiny_store, "train", batch_size=64, seed=0, block_cells=16)
    hosts = [CellLoader(tiny_store, "train", batch_size=64, seed=0, block_cells=16,
                        process_index=i, process_count=2, shards=shards) for i in range(2)]
    for step in (0, 3, single.steps_per_epoch + 1):
        batches = [h.batch(step) for h in hosts]
        for name in ("genes", "counts", "indptr"):  # global arrays need equal shapes
            assert batches[0][name].shape == batches[1][name].shape and len(batches[0][name]) == shards
        parts = [set(b["cell"].tolist()) for b in batches]
        assert len(parts[0]) == len(parts[1]) == 32 and not parts[0] & parts[1]
        assert parts[0] | parts[1] == set(single.batch(step)["cell"].tolist())
    # one padded size for the whole epoch: the bucket of the fullest shard of any host and step
    epoch = [h.batch(step) for h in hosts for step in range(single.steps_per_epoch)]
    assert {b["genes"].shape[1] for b in epoch} == {nnz_bucket(max(b["indptr"][:, -1].max() for b in epoch))}


@pytest.mark.parametrize("shards", [1, 2, 4])
def test_read_shards_places_each_run_in_its_shard(tiny_store, shards):
    """Rows in runs of uneven lengths that cross shard boundaries, read straight into the
    layout: every cell holds its own row's counts (scipy), and the padding holds zeros."""
    lengths = [5, 9, 3, 11, 4, 8]  # 40 rows: runs end at 5, 14, 17, 28, 32; shards of 10 or 20 rows
    starts = np.random.default_rng(shards).choice(tiny_store.n_cells - 11, len(lengths), replace=False)
    rows = np.concatenate([np.arange(a, a + n) for a, n in zip(starts, lengths)])
    expected = tiny_store.read_rows(0, tiny_store.n_cells)[rows].toarray()
    fullest = max(np.diff(tiny_store.indptr)[rows].reshape(shards, -1).sum(1))
    batch = read_shards(tiny_store, rows, shards, fullest + 7)
    np.testing.assert_array_equal(reference_dense(batch, tiny_store.n_genes), expected)
    for s, total in enumerate(batch["indptr"][:, -1]):
        assert not batch["genes"][s, total:].any() and not batch["counts"][s, total:].any()
    with pytest.raises(ValueError, match="does not fit size"):
        read_shards(tiny_store, rows, shards, fullest - 1)


def test_shards_change_the_layout_not_the_cells(tiny_store):
    """Any shard count yields the same cells in the same order, densified to the same counts;
    shard s holds cells [s * n / shards, (s + 1) * n / shards) of the slice."""
    one, four = (CellLoader(tiny_store, "train", batch_size=64, seed=0, block_cells=16, shards=s) for s in (1, 4))
    for step in (0, 5):
        a, b = one.batch(step), four.batch(step)
        for name in ("cell", "cell_type", "donor", "dataset"):
            np.testing.assert_array_equal(a[name], b[name])
        np.testing.assert_array_equal(reference_dense(a, tiny_store.n_genes), reference_dense(b, tiny_store.n_genes))
        assert b["indptr"].shape == (4, 17) and b["genes"].shape[1] < a["genes"].shape[1]
    with pytest.raises(SscellError, match="not divisible"):
        CellLoader(tiny_store, "train", batch_size=64, seed=0, shards=3)


def test_deterministic_and_resumes_exactly(tiny_store):
    def run(start, stop, seed=0):
        loader = CellLoader(tiny_store, "train", batch_size=64, seed=seed, block_cells=16, prefetch=3)
        return list(loader.iterate(start, stop))

    full = run(0, 30)
    resumed = run(0, 11) + run(11, 30)
    for a, b in zip(full, resumed, strict=True):
        for name in a:
            np.testing.assert_array_equal(a[name], b[name])
    other_seed = run(0, 1, seed=1)[0]
    assert set(other_seed["cell"]) != set(full[0]["cell"])


def test_counts_and_labels_travel_with_their_cells(tiny_store):
    loader = CellLoader(tiny_store, "val", batch_size=32, seed=0, block_cells=8)
    batch = loader.batch(2)
    expected = tiny_store.read_rows(0, tiny_store.n_cells)[batch["cell"]].toarray()
    np.testing.assert_array_equal(reference_dense(batch, tiny_store.n_genes), expected)
    obs = tiny_store.read_obs().iloc[batch["cell"]]
    for name, column in (("cell_type", "cell_type"), ("donor", "donor_id"), ("dataset", "dataset_id")):
        names = np.asarray(tiny_store.read_obs()[column].astype("category").cat.categories)
        np.testing.assert_array_equal(names[batch[name]], obs[column].astype(str))


@pytest.mark.parametrize("subset", [{}, {"fraction": 0.5}])
def test_batches_mix_labels_like_random_sampling(tiny_store, subset):
    """The store is shuffled at write time: a batch's cell-type mix is close to the selection's."""
    loader = CellLoader(tiny_store, "train", batch_size=128, seed=0, block_cells=16, **subset)
    n_types = int(loader.labels["cell_type"].max()) + 1
    overall = np.bincount(loader.labels["cell_type"], minlength=n_types) / loader.n_cells
    distances = [0.5 * np.abs(np.bincount(loader.batch(s)["cell_type"], minlength=n_types) / 128 - overall).sum()
                 for s in range(loader.steps_per_epoch)]
    rng = np.random.default_rng(0)
    random = [0.5 * np.abs(np.bincount(rng.choice(loader.labels["cell_type"], 128, replace=False),
                                       minlength=n_types) / 128 - overall).sum() for _ in range(200)]
    assert np.mean(distances) < 1.5 * np.mean(random)


def test_sequential_batches_cover_range_in_order(tiny_store):
    start, stop = tiny_store.split_range("test")
    seen, dense = [], []
    for batch, n_valid in sequential_batches(tiny_store, start, stop, 100, shards=2):
        assert len(batch["cell"]) == 100 and batch["indptr"].shape == (2, 51)
        seen += batch["cell"][:n_valid].tolist()
        rows = reference_dense(batch, tiny_store.n_genes)
        dense.append(rows[:n_valid])
        assert not rows[n_valid:].any()
    assert seen == list(range(start, stop))
    np.testing.assert_array_equal(np.concatenate(dense), tiny_store.read_rows(start, stop).toarray())


def test_bad_batch_sizes(tiny_store):
    with pytest.raises(SscellError, match="not divisible"):
        CellLoader(tiny_store, "train", batch_size=63, seed=0, process_count=2)
    with pytest.raises(SscellError, match="fewer than one batch"):
        CellLoader(tiny_store, "val", batch_size=100_000, seed=0)


SUBSET = {"datasets": ["dataset_1"], "fraction": 0.5}


def test_select_rows_keeps_the_datasets_and_a_nested_seeded_fraction(tiny_store):
    start, stop = tiny_store.split_range("train")
    dataset = tiny_store.read_obs()["dataset_id"].astype(str).to_numpy()
    expected = np.flatnonzero(dataset[start:stop] == "dataset_1") + start
    np.testing.assert_array_equal(select_rows(tiny_store, "train", datasets=["dataset_1"]), expected)
    half = select_rows(tiny_store, "train", **SUBSET, seed=0)
    tenth = select_rows(tiny_store, "train", datasets=["dataset_1"], fraction=0.1, seed=0)
    assert len(half) == round(0.5 * len(expected)) and len(tenth) == round(0.1 * len(expected))
    assert np.all(np.diff(half) > 0) and set(half) <= set(expected) and set(tenth) <= set(half)
    np.testing.assert_array_equal(half, select_rows(tiny_store, "train", **SUBSET, seed=0))
    assert set(half) != set(select_rows(tiny_store, "train", **SUBSET, seed=1))
    fraction = select_rows(tiny_store, "train", fraction=0.3, seed=0)
    assert len(np.unique((fraction - start) // 64)) <= np.ceil(0.3 * (stop - start) / 64) + 1  # whole windows


def test_subset_epoch_once_on_one_and_two_hosts(tiny_store):
    single = CellLoader(tiny_store, "train", batch_size=32, seed=0, block_cells=16, **SUBSET)
    selected = set(single.rows.tolist())
    for epoch in (0, 1):
        rows = epoch_rows(single, epoch)
        assert len(rows) == len(set(rows)) == single.steps_per_epoch * 32
        assert set(rows) <= selected and len(selected) - len(rows) < 32
    hosts = [CellLoader(tiny_store, "train", batch_size=32, seed=0, block_cells=16, process_index=i,
                        process_count=2, **SUBSET) for i in range(2)]
    for epoch in (0, 1):
        parts = [epoch_rows(h, epoch) for h in hosts]
        assert len(parts[0]) == len(parts[1]) and not set(parts[0]) & set(parts[1])
        assert set(parts[0]) | set(parts[1]) == set(epoch_rows(single, epoch))


def test_subset_reads_no_other_rows(tiny_store, monkeypatch):
    """Every range handed to the store lies inside the selection, and each selected cell is
    read once per epoch."""
    read = []
    original = tiny_store.read_nonzeros_into  # read_nonzeros reads through it too

    def recording(ranges, *args):
        read.extend(ranges)
        return original(ranges, *args)

    monkeypatch.setattr(tiny_store, "read_nonzeros_into", recording)
    for subset in (SUBSET, {"fraction": 0.2}, {"datasets": ["dataset_0"]}):
        read.clear()
        loader = CellLoader(tiny_store, "train", batch_size=32, seed=0, block_cells=16, **subset)
        batches = list(loader.iterate(0, loader.steps_per_epoch))
        rows = [r for a, b in read for r in range(a, b)]
        assert len(rows) == len(set(rows)) == loader.steps_per_epoch * 32
        assert set(rows) <= set(loader.rows.tolist())
        assert sorted(rows) == sorted(c for batch in batches for c in batch["cell"].tolist())


def test_subset_deterministic_and_resumes_exactly(tiny_store):
    def run(start, stop):
        loader = CellLoader(tiny_store, "train", batch_size=32, seed=0, block_cells=16, prefetch=2, **SUBSET)
        return list(loader.iterate(start, stop))

    full = run(0, 20)  # crosses epoch boundaries (9 steps per epoch)
    for a, b in zip(full, run(0, 5) + run(5, 13) + run(13, 20), strict=True):
        for name in a:
            np.testing.assert_array_equal(a[name], b[name])


def test_subset_counts_and_labels_travel_with_their_cells(tiny_store):
    loader = CellLoader(tiny_store, "train", batch_size=32, seed=0, block_cells=16, **SUBSET)
    batch = loader.batch(3)
    expected = tiny_store.read_rows(0, tiny_store.n_cells)[batch["cell"]].toarray()
    np.testing.assert_array_equal(reference_dense(batch, tiny_store.n_genes), expected)
    names = np.asarray(tiny_store.read_obs()["dataset_id"].cat.categories)
    assert set(names[batch["dataset"]]) == {"dataset_1"}
    types = np.asarray(tiny_store.read_obs()["cell_type"].cat.categories)
    np.testing.assert_array_equal(types[batch["cell_type"]], tiny_store.read_obs()["cell_type"].iloc[batch["cell"]])


def test_config_selects_the_train_subset(tiny_config, tiny_store):
    tiny_config.data.train_datasets = ("dataset_1",)
    tiny_config.data.train_fraction = 0.5
    train = make_loader(tiny_config, tiny_store, "train")
    np.testing.assert_array_equal(train.rows, select_rows(tiny_store, "train", **SUBSET, seed=tiny_config.seed))
    start, stop = tiny_store.split_range("val")
    assert make_loader(tiny_config, tiny_store, "val").n_cells == stop - start  # validation stays whole


def test_bad_subsets(tiny_store):
    with pytest.raises(SscellError, match="dataset_9"):
        select_rows(tiny_store, "train", datasets=["dataset_9"])
    for fraction in (0.0, 1.5):
        with pytest.raises(SscellError, match="not in"):
            select_rows(tiny_store, "train", fraction=fraction)
    with pytest.raises(SscellError, match="fewer than one batch"):
        CellLoader(tiny_store, "train", batch_size=512, seed=0, datasets=["dataset_1"], fraction=0.1)

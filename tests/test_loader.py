"""The loader: exactly-once epochs, determinism, exact resume, host slices, label alignment."""
import numpy as np
import pytest

from sscell.data.loader import CellLoader, sequential_batches
from sscell.errors import SscellError


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


def test_two_hosts_split_each_global_batch(tiny_store):
    single = CellLoader(tiny_store, "train", batch_size=64, seed=0, block_cells=16)
    hosts = [CellLoader(tiny_store, "train", batch_size=64, seed=0, block_cells=16,
                        process_index=i, process_count=2) for i in range(2)]
    for step in (0, 3, single.steps_per_epoch + 1):
        batches = [h.batch(step) for h in hosts]
        assert batches[0]["genes"].shape == batches[1]["genes"].shape  # global arrays need equal shapes
        parts = [set(b["cell"].tolist()) for b in batches]
        assert len(parts[0]) == len(parts[1]) == 32 and not parts[0] & parts[1]
        assert parts[0] | parts[1] == set(single.batch(step)["cell"].tolist())


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


def dense_rows(batch, n_genes):
    dense = np.zeros((len(batch["genes"]), n_genes), np.float32)
    np.add.at(dense, (np.arange(len(dense))[:, None], batch["genes"]), batch["counts"])
    return dense


def test_counts_and_labels_travel_with_their_cells(tiny_store):
    loader = CellLoader(tiny_store, "val", batch_size=32, seed=0, block_cells=8)
    batch = loader.batch(2)
    expected = tiny_store.read_rows(0, tiny_store.n_cells)[batch["cell"]].toarray()
    np.testing.assert_array_equal(dense_rows(batch, tiny_store.n_genes), expected)
    obs = tiny_store.obs.iloc[batch["cell"]]
    for name, column in (("cell_type", "cell_type"), ("donor", "donor_id"), ("dataset", "dataset_id")):
        names = np.asarray(tiny_store.obs[column].astype("category").cat.categories)
        np.testing.assert_array_equal(names[batch[name]], obs[column].astype(str))


def test_batches_mix_labels_like_random_sampling(tiny_store):
    """The store is shuffled at write time: a batch's cell-type mix is close to the split's."""
    loader = CellLoader(tiny_store, "train", batch_size=128, seed=0, block_cells=16)
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
    for batch, n_valid in sequential_batches(tiny_store, start, stop, 100):
        assert batch["genes"].shape[0] == 100
        seen += batch["cell"][:n_valid].tolist()
        dense.append(dense_rows(batch, tiny_store.n_genes)[:n_valid])
        assert not batch["counts"][n_valid:].any()
    assert seen == list(range(start, stop))
    np.testing.assert_array_equal(np.concatenate(dense), tiny_store.read_rows(start, stop).toarray())


def test_bad_batch_sizes(tiny_store):
    with pytest.raises(SscellError, match="not divisible"):
        CellLoader(tiny_store, "train", batch_size=63, seed=0, process_count=2)
    with pytest.raises(SscellError, match="fewer than one batch"):
        CellLoader(tiny_store, "val", batch_size=100_000, seed=0)

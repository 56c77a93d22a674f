"""Fine-tuning from a pretrained encoder (train.init_from) and the transfer evaluation."""
import importlib.util
import json
import os
import shutil

import anndata
import jax
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import f1_score
from sklearn.neighbors import KNeighborsClassifier, NearestNeighbors

from sscell.config import default_config, load_config, save_config
from sscell.data.convert import convert
from sscell.data.loader import select_rows
from sscell.data.store import open_store
from sscell.data.synthetic import CELL_TYPES
from sscell.embed import embed
from sscell.errors import SscellError
from sscell.evaluation.evaluate import evaluate
from sscell.evaluation.finetune import (
    MAX_DECAYS,
    arm_config,
    arm_dir,
    finetune,
    finetune_config,
    predict_test,
)
from sscell.evaluation.ontology import cell_ontology_descendants
from sscell.evaluation.report import read_results
from sscell.training import checkpoint
from sscell.training.mesh import make_mesh, replicated
from sscell.training.optimizer import learning_rate, make_schedule, schedule_warning
from sscell.training.state import abstract_state
from sscell.training.train import build, make_loader, train

CELL_TYPE_IDS = {t.name: t.ontology_id for t in CELL_TYPES}
TINY_TRAIN = {"batch_size": 64, "log_every": 5, "val_every": 10, "val_batches": 2, "checkpoint_every": 10}


def assert_trees_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def pretrained(tiny_store, tmp_path_factory):
    """A tiny masked-autoencoder run (30 steps) and its config."""
    config = default_config()
    config.data.store = tiny_store.path
    config.model.update(hidden=(32, 32), latent=8)
    config.train.update(steps=30, lr_decay_epochs=100, **TINY_TRAIN)
    config.eval.update(batch_size=128, pca_components=8)
    workdir = tmp_path_factory.mktemp("pretrained")
    save_config(config, workdir)
    train(config, str(workdir), tiny_store)
    return str(workdir), config


def pretrained_params(workdir, config, store):
    """The pretrained run's final params, restored whole through the ordinary checkpoint path."""
    setup = build(config, store)
    layout = abstract_state(setup.model, setup.optimizer, replicated(make_mesh(config.mesh)))
    manager = checkpoint.checkpoint_manager(workdir, 10, 3)
    state, _ = checkpoint.restore(manager, layout)
    manager.close()
    return state["params"]


def classifier_config(store, init_from="", steps=0):
    config = finetune_config()
    config.data.store = store.path
    config.model.update(hidden=(32, 32), latent=8)
    config.train.update(steps=steps, init_from=init_from, **TINY_TRAIN)
    config.eval.batch_size = 128
    return config


def test_the_default_schedule_keeps_a_learning_rate_on_a_small_target(pretrained, tiny_store):
    """The README's finetune of a few hundred cells: the study's batch caps at the target's cells, so
    its x0.9 every 2 epochs was x0.9 every 2 steps (lr x 1e-23 after 1,000 steps)."""
    workdir, _ = pretrained
    for fraction in (1.0, 0.1):
        config = arm_config(finetune_config(), workdir, tiny_store, "pretrained", fraction, (), seed=0)
        assert config.train.batch_size < 16_384 and config.train.lr_decay_steps == 1_000 // MAX_DECAYS
        schedule = make_schedule(config.train, steps_per_epoch=1)
        assert learning_rate(schedule, config.train, config.train.steps) >= 0.9 ** MAX_DECAYS * config.train.lr
        assert schedule_warning(config.train, steps_per_epoch=1) is None


@pytest.mark.slow
def test_init_from_copies_the_encoder_bit_for_bit_and_starts_a_fresh_head(pretrained, tiny_store, tmp_path):
    workdir, config = pretrained
    # train.steps = 0: train() returns the freshly created state
    tuned = train(classifier_config(tiny_store, init_from=workdir), str(tmp_path / "tuned"), tiny_store).state
    scratch = train(classifier_config(tiny_store), str(tmp_path / "scratch"), tiny_store).state
    expected = pretrained_params(workdir, config, tiny_store)["encoder"]
    assert_trees_equal(tuned["params"]["encoder"], expected)
    assert not np.array_equal(scratch["params"]["encoder"]["dense_0"]["kernel"], expected["dense_0"]["kernel"])
    assert_trees_equal(tuned["params"]["head"], scratch["params"]["head"])  # the same fresh head
    assert_trees_equal(tuned["opt_state"], scratch["opt_state"])  # optimiser state fresh (zero moments)


@pytest.mark.slow
def test_a_resumed_fine_tune_continues_exactly_from_its_own_checkpoint(pretrained, tiny_store, tmp_path):
    workdir, _ = pretrained
    straight = train(classifier_config(tiny_store, workdir, steps=14), str(tmp_path / "straight"), tiny_store).state
    train(classifier_config(tiny_store, workdir, steps=10), str(tmp_path / "resumed"), tiny_store)
    # The run's own checkpoint wins: train.init_from is not even read on resume.
    resumed = train(classifier_config(tiny_store, str(tmp_path / "gone"), steps=14), str(tmp_path / "resumed"),
                    tiny_store).state
    assert int(resumed["step"]) == 14
    assert_trees_equal(resumed["params"], straight["params"])


def test_an_encoder_of_other_widths_is_refused_naming_the_difference(pretrained, tiny_store, tmp_path):
    config = classifier_config(tiny_store, init_from=pretrained[0])
    config.model.latent = 16
    with pytest.raises(SscellError, match=r"dense_2/kernel is \(32, 8\) there, \(32, 16\) here.*latent=8"):
        train(config, str(tmp_path), tiny_store)


def test_a_store_with_other_gene_order_is_refused(pretrained, tiny_h5ad, tiny_store, tmp_path):
    vocabulary = tmp_path / "genes.txt"
    vocabulary.write_text("\n".join(reversed(tiny_store.var.index.astype(str))) + "\n")
    convert([tiny_h5ad], tmp_path / "reversed", vocabulary=str(vocabulary))
    with pytest.raises(SscellError, match="orders its genes unlike the pretrained run.*96 positions differ"):
        finetune(pretrained[0], str(tmp_path / "reversed"), [1.0])
    config = classifier_config(open_store(tmp_path / "reversed"), init_from=pretrained[0])
    with pytest.raises(SscellError, match="orders its genes unlike"):
        train(config, str(tmp_path / "run"), open_store(tmp_path / "reversed"))


@pytest.mark.slow
def test_finetune_trains_both_arms_on_nested_fractions_and_scores_the_test_cells(pretrained, tiny_store, capsys,
                                                                                 tmp_path):
    workdir, _ = pretrained
    base = classifier_config(tiny_store, steps=10)
    rows = finetune(workdir, tiny_store.path, [0.1, 1.0], datasets=("dataset_1",), base=base)
    assert capsys.readouterr().out.count(f"encoder initialised from {workdir} (step 30") == 2  # the pretrained arms

    selected = {f: select_rows(tiny_store, "train", datasets=("dataset_1",), fraction=f) for f in (0.1, 1.0)}
    assert set(selected[0.1]) < set(selected[1.0])  # nested
    assert (tiny_store.labels["dataset_id"].iloc[selected[1.0]] == "dataset_1").all()
    assert [(r["method"].split()[0], r["label_fraction"], r["train_cells"]) for r in rows] == [
        ("fine-tuned", 0.1, len(selected[0.1])), ("supervised", 0.1, len(selected[0.1])),
        ("fine-tuned", 1.0, len(selected[1.0])), ("supervised", 1.0, len(selected[1.0]))]
    for row in rows:
        assert 0 < row["finetune_macro_f1"] <= 1 and 0 < row["finetune_micro_f1"] <= 1
    arms = {}
    for fraction in (0.1, 1.0):
        for arm in ("pretrained", "scratch"):
            run = arm_dir(workdir, arm, fraction)
            saved = load_config(run)
            assert list(saved.data.train_datasets) == ["dataset_1"] and saved.data.train_fraction == fraction
            assert saved.train.init_from == (workdir if arm == "pretrained" else "")
            np.testing.assert_array_equal(make_loader(saved, tiny_store, "train").rows, selected[fraction])
            with open(f"{run}/metrics.jsonl") as f:
                assert json.loads(f.readlines()[-1])["step"] == 10
            arms[(arm, fraction)] = (saved, run)

    # Scores come from each arm's predictions on dataset_1's test cells, in store order.
    true, predicted = predict_test(arms, tiny_store, ("dataset_1",), 128)
    labels = tiny_store.labels
    split, in_dataset = labels["split"].to_numpy(), (labels["dataset_id"] == "dataset_1").to_numpy()
    test = (split == "test") & in_dataset
    assert not ((split == "val") & in_dataset).any()  # dataset_1 has no validation cells: the reference is its train
    np.testing.assert_array_equal(true, labels["cell_type"].cat.codes.to_numpy()[test])
    types = labels["cell_type"].cat.categories
    below = cell_ontology_descendants(list(types), [CELL_TYPE_IDS[t] for t in types])
    _, all_datasets = predict_test(arms, tiny_store, (), 128)  # every dataset: the validation cells are the reference
    for (_, run), row, prediction, unselected in zip(arms.values(), rows, predicted.values(), all_datasets.values()):
        assert row["finetune_macro_f1"] == pytest.approx(f1_score(true, prediction["head"], average="macro",
                                                                  zero_division=0))
        assert row["finetune_micro_f1"] == pytest.approx(np.mean(true == prediction["head"]))
        # The study's transfer score: kNN from the target's reference cells to its test cells on the
        # fine-tuned encoder's embeddings (saved by sscell.embed), ontology-corrected.
        embed(run, tiny_store.path, str(tmp_path / "embedded.h5ad"), which="best")
        embedded = anndata.read_h5ad(tmp_path / "embedded.h5ad")
        z, names = embedded.obsm["X_sscell"].astype(np.float64), embedded.obs["cell_type"].astype(str).to_numpy()
        codes = labels["cell_type"].cat.codes.to_numpy()  # votes tie to the smallest code, in sklearn too
        for reference, query, found in (((split == "train") & in_dataset, test, prediction["knn"]),
                                        (split == "val", split == "test", unselected["knn"])):
            knn = KNeighborsClassifier(n_neighbors=5).fit(z[reference], codes[reference]).predict(z[query])
            # bfloat16 embeddings of a 10-step model coincide: compare where the 5 nearest are unambiguous
            distances, _ = NearestNeighbors(n_neighbors=6).fit(z[reference]).kneighbors(z[query])
            clear = distances[:, 4] < distances[:, 5]
            assert clear.mean() > 0.75
            np.testing.assert_array_equal(found[clear], knn[clear])
        knn = types[prediction["knn"]].to_numpy()
        true_names = names[test]
        corrected = np.array([t if p in below[t] else p for t, p in zip(true_names, knn)])
        assert row["finetune_knn_macro_f1"] == pytest.approx(f1_score(true_names, knn, average="macro",
                                                                      zero_division=0))
        assert row["finetune_knn_macro_f1_ontology"] == pytest.approx(f1_score(true_names, corrected,
                                                                               average="macro", zero_division=0))

    # The written table feeds the run's main evaluation (its `finetune` task, in the default eval.tasks).
    pd.testing.assert_frame_equal(pd.DataFrame(read_results(workdir, "finetune")), pd.DataFrame(rows))
    assert "finetune" in default_config().eval.tasks
    methods = [row["method"] for row in evaluate(workdir, tasks="knn,finetune")]
    baselines = 3 + (importlib.util.find_spec("scvi") is not None)  # PCA, PCA of the HVGs, the HVGs (, scVI)
    assert methods[-4:] == [row["method"] for row in rows] and len(methods) == 1 + baselines + 4
    assert [row["method"] for row in evaluate(workdir, tasks="knn")] == methods[:-4]  # not selected: not appended


def test_a_dataset_selection_narrows_validation_and_the_class_weights(tiny_store, tiny_config):
    """Fine-tuning on one dataset of a store: validation batches hold only its cells (all
    validation cells when it has none there) and the 'balanced' class weights count only the
    cells trained on (dataset and fraction)."""
    from sscell.training.task_setup import setup_task

    labels = tiny_store.labels
    datasets = labels["dataset_id"].astype(str).to_numpy()
    val_start, val_stop = tiny_store.split_range("val")
    with_val = datasets[val_start]
    without_val = sorted(set(datasets) - set(datasets[val_start:val_stop]))
    tiny_config.loss.name = "supervised"
    tiny_config.data.train_fraction = 0.5
    tiny_config.data.train_datasets = (with_val,)
    val = make_loader(tiny_config, tiny_store, "val")
    assert set(datasets[val.rows]) == {with_val}
    assert len(val.rows) == int((datasets[val_start:val_stop] == with_val).sum())
    if without_val:  # the tiny atlas's donor split leaves one dataset out of validation
        tiny_config.data.train_datasets = tuple(without_val)
        assert len(make_loader(tiny_config, tiny_store, "val").rows) == val_stop - val_start
        tiny_config.data.train_datasets = (with_val,)

    _, info = setup_task(tiny_config, tiny_store)
    rows = select_rows(tiny_store, "train", datasets=(with_val,), fraction=0.5, seed=tiny_config.seed)
    types = labels["cell_type"].cat.codes.to_numpy()[rows]
    expected = np.bincount(types, minlength=len(labels["cell_type"].cat.categories))
    np.testing.assert_array_equal(info.class_counts, expected)
    assert info.class_counts.sum() == len(rows)


def pretrained_copy(pretrained, tmp_path):
    """A copy of the pretrained run, without the fine-tuning runs other tests added to it."""
    workdir = str(tmp_path / "pretrained")
    shutil.copytree(pretrained[0], workdir, ignore=shutil.ignore_patterns("finetune*"))
    return workdir


def test_every_arm_is_checked_before_the_first_trains(pretrained, tiny_store, tmp_path):
    """A fraction too small to hold a batch is refused before the valid fraction's arms train."""
    workdir = pretrained_copy(pretrained, tmp_path)
    with pytest.raises(SscellError, match="label fraction 0.0001 selects 0 train cells"):
        finetune(workdir, tiny_store.path, [1.0, 0.0001], base=classifier_config(tiny_store, steps=2))
    assert not os.path.exists(os.path.join(workdir, "finetune"))


@pytest.mark.slow
def test_a_batch_larger_than_the_validation_split_validates_on_all_its_cells(pretrained, tiny_store, tmp_path):
    """experiments/finetune_cpu.py's batch of 256 on a small target: dataset_1 has fewer validation
    cells than the batch at fraction 1 (the run failed there, after training the smaller fractions)."""
    workdir = pretrained_copy(pretrained, tmp_path)
    base = classifier_config(tiny_store, steps=2)
    base.train.update(batch_size=256, val_every=2)
    rows = finetune(workdir, tiny_store.path, [1.0], datasets=("dataset_1",), base=base)
    assert [r["label_fraction"] for r in rows] == [1.0, 1.0]
    saved = load_config(arm_dir(workdir, "scratch", 1.0))
    val = make_loader(saved, tiny_store, "val")
    assert saved.train.batch_size == 256 > len(val.rows) == val.batch_size

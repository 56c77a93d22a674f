"""Every experiments/*.py config loads and trains 3 steps on the tiny store; the README's example task runs."""
import importlib.util
import pathlib
import subprocess
import sys

import anndata
import ml_collections
import pytest

from sscell.config import save_config
from sscell.data.gmt import read_gmt
from sscell.data.synthetic import programmes_path, tf_targets_path
from sscell.data.task_data import gene_programmes
from sscell.errors import SscellError
from sscell.evaluation.evaluate import evaluate
from sscell.losses import load_task
from sscell.training.train import train

EXPERIMENTS = sorted((pathlib.Path(__file__).parent.parent / "experiments").glob("*.py"))


def load_config(path):
    spec = importlib.util.spec_from_file_location(f"experiment_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def test_tf_programmes_of_a_generated_atlas(tiny_h5ad):
    """The atlas's TF -> targets .gmt becomes programmes whose target is the TF, not among its inputs."""
    atlas = anndata.read_h5ad(tiny_h5ad)
    ids = atlas.var.index.tolist()
    membership, names, tfs = gene_programmes(str(tf_targets_path(tiny_h5ad)), ids, tf_from_name=True)
    sets = read_gmt(tf_targets_path(tiny_h5ad))
    assert list(names) == list(sets)
    for row, name, tf in zip(membership, names, tfs):
        assert ids[tf] == name and atlas.var["is_tf"].iloc[tf]
        assert sorted(ids[i] for i in row.nonzero()[0]) == sorted(set(sets[name]) - {name})


@pytest.mark.parametrize("path", EXPERIMENTS, ids=[p.stem for p in EXPERIMENTS])
@pytest.mark.slow
def test_config_trains_three_steps(path, tiny_store, tiny_protein_store, tiny_atac_store, tiny_h5ad, tmp_path):
    config = load_config(path)
    if "pretrain" in config:  # a study (sscell.reproduce): its pretraining runs here, the rest in test_reproduce.py
        config = config.pretrain
    if config.data.modality:  # cross-modality: the tiny store with proteins (or peaks), all its datasets
        stores = {"protein_counts": tiny_protein_store, "atac_counts": tiny_atac_store}
        tiny_store, config.data.train_datasets = stores[config.data.modality], ()
    config.data.store = tiny_store.path
    config.data.synthetic.n_cells = 0
    config.loss.gmt = str((tf_targets_path if config.loss.name == "gp_to_tf" else programmes_path)(tiny_h5ad))
    config.model.hidden = (32, 32)
    config.loss.update(projector=(32, 16), predictor=(32, 16))  # the study's 4096-wide heads compile slowly on CPU
    config.train.update(steps=3, batch_size=64, log_every=3, val_every=3, val_batches=1, checkpoint_every=3)
    state = train(config, str(tmp_path), tiny_store).state
    assert int(state["step"]) == 3
    if config.loss.name == "byol":  # a model without a decoder: embeddings evaluated, no reconstruction
        save_config(config, tmp_path)
        row = evaluate(str(tmp_path), tasks=("knn", "reconstruction"))[0]
        assert 0 <= row["knn_macro_f1"] <= 1 and not any(k.startswith("recon_") for k in row)


def test_loss_module_is_imported_by_a_fresh_process():
    """A task from `loss.module` is found without the config file (as evaluation from a workdir needs)."""
    code = ("import ml_collections; from sscell.losses import load_task; "
            "print(load_task(ml_collections.ConfigDict(dict(name='denoise', module='sscell.losses.example'))).name)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "denoise", result.stderr[-2000:]


def test_unknown_loss_module():
    with pytest.raises(SscellError, match="cannot import loss.module 'no.such.module'"):
        load_task(ml_collections.ConfigDict(dict(name="x", module="no.such.module")))

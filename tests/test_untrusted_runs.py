"""Reading someone else's run or bundle runs none of its code and contacts nothing unless asked.

Each run here names, in its config.json, modules that would write a marker file if imported (one
in the current folder, one in the run's own folder, both on sys.path): every entry point
(evaluation, embed, predict, finetune, load) must leave the marker unwritten.
"""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_api import train_run
from test_finetune import classifier_config

import sscell
from sscell.embed import embed
from sscell.errors import SscellError
from sscell.evaluation.evaluate import evaluate
from sscell.evaluation.finetune import finetune
from sscell.predict import predict

ROOT = Path(__file__).resolve().parents[1]
MODULES = {"eval": "sscell_marker_tasks", "loss": "sscell_marker_loss"}


def name_marker_modules(workdir: str, marker: Path) -> None:
    """Make `workdir`'s config.json name marker modules (shipped inside the run's folder) as eval.module and loss.module."""
    config = json.loads((Path(workdir) / "config.json").read_text())
    for section, module in MODULES.items():
        (Path(workdir) / f"{module}.py").write_text(f"open({str(marker)!r}, 'a').write({module!r})\n")
        config[section]["module"] = module
    (Path(workdir) / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def runs(tiny_store, tmp_path_factory):
    """(masked run, supervised run): tiny runs trained normally, then made to name marker modules."""
    return (train_run(tiny_store, tmp_path_factory.mktemp("masked"))[0],
            train_run(tiny_store, tmp_path_factory.mktemp("supervised"), "supervised")[0])


@pytest.fixture
def marker(runs, tmp_path, monkeypatch):
    """The marker file (absent) and the runs on sys.path, naming their marker modules."""
    path = tmp_path / "imported"
    for workdir in runs:
        name_marker_modules(workdir, path)
        monkeypatch.syspath_prepend(workdir)
    yield path
    for module in MODULES.values():
        sys.modules.pop(module, None)


def test_evaluation_imports_no_module_the_run_names(runs, marker, tmp_path):
    with pytest.raises(SscellError, match=r"names eval.module 'sscell_marker_tasks'.*--eval_module=sscell_marker_tasks"):
        evaluate(runs[0], tasks="knn")
    with pytest.raises(SscellError, match=r"names loss.module 'sscell_marker_loss'.*--loss_module=sscell_marker_loss"):
        evaluate(runs[0], tasks="knn", eval_module="")
    assert not marker.exists()
    # named by the user: imported (loss.module here; evaluation runs on)
    evaluate(runs[0], tasks="knn", baselines="pca", outdir=str(tmp_path / "out"), eval_module="",
             loss_module=MODULES["loss"])
    assert marker.read_text() == MODULES["loss"]


def test_the_evaluation_command_refuses_in_one_line_with_the_module_in_the_current_folder(runs, marker, tmp_path):
    for module in MODULES.values():  # where `python -m` finds it first
        (tmp_path / f"{module}.py").write_text(f"open({str(marker)!r}, 'a').write({module!r})\n")
    done = subprocess.run([sys.executable, "-m", "sscell.evaluation", f"--workdir={runs[0]}", "--tasks=knn"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"})
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "--eval_module=" in done.stderr, done.stderr
    assert not marker.exists()


def test_embed_and_load_import_nothing(runs, marker, tiny_h5ad, tmp_path):
    embed(runs[0], tiny_h5ad, str(tmp_path / "embedded.h5ad"))
    bundle = sscell.load(runs[0]).export(tmp_path / "bundle")
    name_marker_modules(bundle, marker)  # a bundle naming them, and shipping them
    bundle_config = (Path(bundle) / "config.json").read_text()
    meta = json.loads((Path(bundle) / "bundle.json").read_text())
    meta["sha256"]["config.json"] = hashlib.sha256(bundle_config.encode()).hexdigest()
    (Path(bundle) / "bundle.json").write_text(json.dumps(meta))
    sscell.load(bundle)
    embed(bundle, tiny_h5ad, str(tmp_path / "by_bundle.h5ad"))
    assert not marker.exists()


def test_predict_imports_nothing(runs, marker, tiny_h5ad, tmp_path):
    predict(runs[1], tiny_h5ad, str(tmp_path / "labelled.h5ad"))
    assert not marker.exists()


def test_finetune_imports_nothing_from_the_pretrained_run(runs, marker, tiny_store, tmp_path):
    finetune(runs[0], tiny_store.path, [1.0], arms=("pretrained",), base=classifier_config(tiny_store, steps=2))
    assert not marker.exists()


def test_a_bundle_is_evaluated_only_into_an_outdir_importing_nothing(runs, marker, tiny_store, tmp_path):
    bundle = sscell.load(runs[0]).export(tmp_path / "bundle")
    name_marker_modules(bundle, marker)  # a bundle naming them (modules of those names are on sys.path)
    meta = json.loads((Path(bundle) / "bundle.json").read_text())
    meta["sha256"]["config.json"] = hashlib.sha256((Path(bundle) / "config.json").read_bytes()).hexdigest()
    (Path(bundle) / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(SscellError, match="is a bundle"):
        evaluate(bundle, tasks="knn", eval_module="", loss_module="")
    before = sorted(p.name for p in Path(bundle).iterdir())
    evaluate(bundle, tasks="knn", store=tiny_store.path, outdir=str(tmp_path / "eval"), baselines="")
    assert not marker.exists() and sorted(p.name for p in Path(bundle).iterdir()) == before  # no lock, no cache


def test_load_contacts_no_store_the_run_names_at_a_url(runs, tiny_store, tmp_path, monkeypatch):
    config = json.loads((Path(runs[0]) / "config.json").read_text())
    config["data"]["store"] = "s3://someone-bucket/store"
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "checkpoints").symlink_to(Path(runs[0]) / "checkpoints")
    (workdir / "config.json").write_text(json.dumps(config))
    opened = []
    monkeypatch.setattr("sscell.api.open_store", lambda path: opened.append(path))
    with pytest.raises(SscellError, match=r"s3://someone-bucket/store, which sscell contacts only when you name it"):
        sscell.load(workdir)
    assert opened == []
    monkeypatch.undo()
    model = sscell.load(workdir, store=tiny_store.path)  # named: read there
    assert len(model.genes) == tiny_store.n_genes

"""The two entry points end to end, in subprocesses, on a tiny generated atlas."""
import csv
import json
import os
import subprocess
import sys

import pytest

from sscell.config_help import field_docs
from sscell.errors import exit_on_error

pytestmark = pytest.mark.slow

TINY = ["--config.data.synthetic.n_cells=1600", "--config.data.synthetic.n_genes=96",
        "--config.data.synthetic.n_datasets=2", "--config.model.hidden=(32,32)", "--config.model.latent=8",
        "--config.train.steps=20", "--config.train.batch_size=64", "--config.train.log_every=5",
        "--config.train.val_every=10", "--config.train.checkpoint_every=10", "--config.eval.pca_components=8",
        "--config.eval.tasks=('knn','reconstruction')",
        "--config.eval.scvi_epochs=3"]


def sscell(*args, module="sscell.main"):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=env,
                          cwd=os.path.dirname(os.path.dirname(__file__)), timeout=240)


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run") / "quickstart"
    result = sscell("--config=experiments/quickstart.py", f"--workdir={workdir}", *TINY)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir, result


def test_quickstart_trains_and_evaluates(quickstart_run):
    workdir, result = quickstart_run
    for name in ("atlas.h5ad", "store", "config.json", "metrics.jsonl", "results.md", "results.csv",
                 "loss_curve.png", "checkpoints"):
        assert (workdir / name).exists(), name
    with open(workdir / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"].split()[0] for r in rows] == ["sscell", "PCA(8)", "PCA(8)", "HVG(96)", "scVI(30)"]
    assert all(0 < float(r["knn_macro_f1"]) <= 1 for r in rows)
    assert "knn_macro_f1" in result.stdout and "PCA(8)" in result.stdout
    dtype = json.loads((workdir / "config.json").read_text())["model"]["dtype"]  # "auto", settled and recorded
    assert dtype in ("float32", "bfloat16") and f"model.dtype auto -> {dtype} (" in result.stdout


def test_rerun_goes_straight_to_evaluation(quickstart_run):
    workdir, _ = quickstart_run
    result = sscell("--config=experiments/quickstart.py", f"--workdir={workdir}", *TINY)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "training already complete at step 20" in result.stdout
    assert "knn_macro_f1" in result.stdout


def test_evaluation_entry_point_needs_only_the_workdir(quickstart_run):
    workdir, _ = quickstart_run
    result = sscell(f"--workdir={workdir}", module="sscell.evaluation")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "knn_macro_f1" in result.stdout


def one_line_error(result, pattern):
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and pattern in lines[0], result.stderr[-2000:]


def test_incompatible_workdir(quickstart_run):
    workdir, _ = quickstart_run
    result = sscell("--config=experiments/quickstart.py", f"--workdir={workdir}", *TINY, "--config.model.latent=16")
    one_line_error(result, "incompatible config")


def test_unknown_loss(tmp_path):
    one_line_error(sscell("--config=experiments/quickstart.py", f"--workdir={tmp_path}", "--config.loss.name=nope"),
                   "unknown loss 'nope'")


def test_missing_store(tmp_path):
    result = sscell("--config=experiments/quickstart.py", f"--workdir={tmp_path}",
                    f"--config.data.store={tmp_path}/missing")
    one_line_error(result, "missing")


def test_unknown_config_field(tmp_path):
    result = sscell("--config=experiments/quickstart.py", f"--workdir={tmp_path}", "--config.train.stepz=3")
    one_line_error(result, 'stepz Did you mean "steps"')


def test_missing_config_file(tmp_path):
    one_line_error(sscell("--config=experiments/nope.py", f"--workdir={tmp_path}"), "experiments/nope.py")


def test_the_training_command_defers_evaluation_and_tensorboard_imports():
    """A bad command line fails in ~half the time: evaluation's libraries and tensorboardX (which
    imports torch where installed) load only when a run evaluates or writes metrics."""
    heavy = ("sscell.evaluation.evaluate", "tensorboardX", "torch")
    code = f"import sys, sscell.main; print([m for m in {heavy} if m in sys.modules])"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_evaluating_an_empty_workdir(tmp_path):
    one_line_error(sscell(f"--workdir={tmp_path}", module="sscell.evaluation"), "holds no sscell run")


def test_a_failed_check_writes_nothing_and_the_corrected_rerun_trains(quickstart_run, tmp_path):
    store = quickstart_run[0] / "store"
    run = tmp_path / "run"
    result = sscell("--config=experiments/quickstart.py", f"--workdir={run}", *TINY, f"--config.data.store={store}",
                    "--config.train.batch_size=4096")
    one_line_error(result, "fewer than one batch of 4096")
    assert not run.exists()  # a store given: every check runs before the workdir is created
    # A converted store: the store lands in the workdir, the config only once every check passed.
    result = sscell("--config=experiments/quickstart.py", f"--workdir={run}", *TINY, "--config.train.batch_size=4096")
    one_line_error(result, "fewer than one batch of 4096")
    assert (run / "store").exists() and not (run / "config.json").exists()
    result = sscell("--config=experiments/quickstart.py", f"--workdir={run}", *TINY, "--noeval")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "converted" not in result.stdout and "starting step 0 of 20" in result.stdout


def test_ctrl_c_ends_a_command_with_one_line_and_code_130(capsys):
    with pytest.raises(SystemExit) as ended, exit_on_error():
        raise KeyboardInterrupt
    assert ended.value.code == 130 and capsys.readouterr().err == "interrupted\n"


def test_help_lists_every_config_field_with_its_default_and_meaning():
    result = sscell("--help")
    text = " ".join(result.stdout.split())
    assert "any field can be overridden with --config.FIELD=VALUE" in text  # (absl exits 1 after --help)
    assert "train.lr=0.001" in text and "model.hidden=(512, 512, 256, 256)" in text
    assert "eval.knn_reference='val': kNN reference cells: val (the study's) | train | train+val" in text
    assert all(name in text for name in field_docs())


def test_finetune_takes_config_overrides_without_a_config_file(tmp_path):
    result = sscell("--help", module="sscell.evaluation.finetune")
    assert "override any field with --config.FIELD=VALUE, e.g. --config.train.batch_size=64" in " ".join(
        result.stdout.split())
    result = sscell(f"--workdir={tmp_path}", f"--store={tmp_path}", "--config.train.batch_size=64",
                    module="sscell.evaluation.finetune")
    one_line_error(result, "holds no sscell run")  # the override was taken; the empty workdir is the problem

"""No wrong answer or lost data with exit code 0: embed / predict refuse bad options, outputs and
malformed inputs in one line, and leave no temporary a reader could take for output."""
import os
import subprocess
import sys

import anndata
import h5py
import numpy as np
import pytest
from test_api import train_run

import sscell
from sscell.embed import OBSM_KEY, embed
from sscell.embed import main as embed_main
from sscell.errors import SscellError
from sscell.evaluation.evaluate import evaluate
from sscell.training.workdir_lock import workdir_lock


@pytest.fixture(scope="module")
def masked_run(tiny_store, tmp_path_factory):
    return train_run(tiny_store, tmp_path_factory.mktemp("masked"))[0]


@pytest.fixture
def small_h5ad(tiny_h5ad, tmp_path):
    """The tiny atlas's first 100 cells as a fresh file."""
    path = tmp_path / "small.h5ad"
    anndata.read_h5ad(tiny_h5ad)[:100].copy().write_h5ad(path)
    return path


def gone_pid() -> int:
    """The pid of a process that has exited."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def one_line(capsys, match: str) -> None:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and match in err, err


@pytest.mark.parametrize("how", ["same", "relative", "symlink"])
def test_an_output_that_is_the_input_is_refused_and_the_input_kept(masked_run, small_h5ad, monkeypatch, how):
    before = small_h5ad.read_bytes()
    output = {"same": small_h5ad, "relative": "small.h5ad", "symlink": small_h5ad.parent / "link.h5ad"}[how]
    if how == "symlink":
        output.symlink_to(small_h5ad)
    monkeypatch.chdir(small_h5ad.parent)
    with pytest.raises(SscellError, match="is the input"):
        embed(masked_run, str(small_h5ad), str(output))
    assert small_h5ad.read_bytes() == before


@pytest.mark.parametrize("size", [-1, 10**9, 2.5, True])
def test_a_bad_batch_size_is_refused_by_the_call_and_the_command(masked_run, small_h5ad, tmp_path, capsys, size):
    model = sscell.load(masked_run)
    with pytest.raises(SscellError, match="batch size"):
        model.embed(anndata.read_h5ad(small_h5ad), batch_size=size)
    with pytest.raises(SscellError, match="batch size"):
        embed(masked_run, str(small_h5ad), str(tmp_path / "out.h5ad"), batch_size=size)
    assert not (tmp_path / "out.h5ad").exists()


@pytest.mark.parametrize("argument", ["--batch-size=-1", "--batch-size=1e9", "--batch-size=1000000000",
                                      "--min-gene-overlap=nan", "--min-gene-overlap=1.5",
                                      "--min-gene-overlap=-0.1"])
def test_bad_numeric_options_end_in_one_line(masked_run, small_h5ad, tmp_path, capsys, argument):
    with pytest.raises(SystemExit) as exit_:
        embed_main([f"--workdir={masked_run}", f"--input={small_h5ad}", f"--output={tmp_path / 'out.h5ad'}", argument])
    assert exit_.value.code == 2
    one_line(capsys, "error: ")
    assert not (tmp_path / "out.h5ad").exists()


@pytest.mark.parametrize("share", [float("nan"), 1.5, -0.1])
def test_a_bad_min_overlap_is_refused_by_the_call(masked_run, small_h5ad, share):
    with pytest.raises(SscellError, match="share from 0 to 1"):
        sscell.load(masked_run).embed(anndata.read_h5ad(small_h5ad), min_overlap=share)


def test_an_output_that_is_a_folder_or_unwritable_is_refused(masked_run, small_h5ad, tmp_path):
    with pytest.raises(SscellError, match="is a folder"):
        embed(masked_run, str(small_h5ad), str(tmp_path))
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as root: every folder is writable")
        with pytest.raises(SscellError, match="not writable"):
            embed(masked_run, str(small_h5ad), str(locked / "out.h5ad"))
    finally:
        locked.chmod(0o700)


def test_a_killed_runs_temporary_is_hidden_and_removed_by_the_next_run(masked_run, small_h5ad, tmp_path):
    output = tmp_path / "out.h5ad"
    leftover = tmp_path / f".out.h5ad.{gone_pid()}.tmp"  # what kill -9 during embed leaves
    leftover.write_bytes(b"half an h5ad")
    embed(masked_run, str(small_h5ad), str(output))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.h5ad", "small.h5ad"]
    assert anndata.read_h5ad(output).obsm[OBSM_KEY].shape == (100, 8)


def _rewrite(path, edit) -> None:
    with h5py.File(path, "a") as f:
        edit(f)


def _obs_unknown_encoding(f):
    f["obs"]["cell_type"].attrs["encoding-type"] = "no-such-encoding"


def _obs_wrong_length(f):
    name = "donor_id"
    del f["obs"][name]
    f["obs"].create_dataset(name, data=np.arange(7))
    f["obs"][name].attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})


def _indices_out_of_range(f):
    group = f["layers"]["counts"] if "layers" in f and "counts" in f["layers"] else f["X"]
    indices = group["indices"][:]
    indices[3] = 10_000
    group["indices"][...] = indices


def _float16_x(f):
    group = f["layers"]["counts"] if "layers" in f and "counts" in f["layers"] else f["X"]
    data = group["data"][:].astype(np.float16)
    del group["data"]
    group.create_dataset("data", data=data)


@pytest.mark.parametrize("damage", [_obs_unknown_encoding, _obs_wrong_length, _indices_out_of_range, _float16_x])
def test_a_malformed_input_ends_in_one_line(masked_run, small_h5ad, tmp_path, capsys, damage):
    _rewrite(small_h5ad, damage)
    with pytest.raises(SystemExit) as exit_:
        embed_main([f"--workdir={masked_run}", f"--input={small_h5ad}", f"--output={tmp_path / 'out.h5ad'}"])
    assert exit_.value.code == 2
    one_line(capsys, str(small_h5ad))
    assert not (tmp_path / "out.h5ad").exists()


def test_evaluation_refuses_a_workdir_a_run_is_training_in(masked_run, tmp_path):
    with workdir_lock(masked_run):  # as a training run holds it
        with pytest.raises(SscellError, match="is in use by another run"):
            evaluate(masked_run, tasks="knn", baselines="pca", outdir=str(tmp_path))
    assert not (tmp_path / "results.csv").exists()

"""A bundle is read only as it was exported: checksums, no symbolic links, parameters that fit its
model and are finite, and every malformed file refused in one line; an export replaces a bundle
in one step, and what a killed export leaves is cleared by the next."""
import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import safetensors.numpy
from test_api import train_run
from test_bad_inputs import gone_pid

import sscell
from sscell.bundle import flatten, write_bundle
from sscell.embed import main as embed_main
from sscell.errors import SscellError


@pytest.fixture(scope="module")
def model(tiny_store, tmp_path_factory):
    return sscell.load(train_run(tiny_store, tmp_path_factory.mktemp("masked"))[0])


@pytest.fixture
def bundle(model, tmp_path) -> Path:
    return Path(model.export(tmp_path / "bundle"))


def resign(bundle: Path, name: str) -> None:
    """Record `name`'s current sha256 in bundle.json (as someone who edits a bundle on purpose would)."""
    meta = json.loads((bundle / "bundle.json").read_text())
    meta["sha256"][name] = hashlib.sha256((bundle / name).read_bytes()).hexdigest()
    (bundle / "bundle.json").write_text(json.dumps(meta))


def edit_json(path: Path, edit) -> None:
    value = json.loads(path.read_text())
    edit(value)
    path.write_text(json.dumps(value))


def test_a_shuffled_gene_table_or_retyped_kernels_are_refused(bundle):
    genes = pd.read_csv(bundle / "genes.csv", index_col=0)
    genes.sample(frac=1, random_state=0).to_csv(bundle / "genes.csv")
    with pytest.raises(SscellError, match=r"genes.csv is not the file the bundle was exported with"):
        sscell.load(bundle)
    resign(bundle, "genes.csv")
    sscell.load(bundle)  # a table edited on purpose and re-signed is the owner's choice

    params = safetensors.numpy.load_file(bundle / "params.safetensors")
    params["encoder/dense_0/kernel"] = params["encoder/dense_0/kernel"].astype(np.float16)
    safetensors.numpy.save_file(params, bundle / "params.safetensors")
    with pytest.raises(SscellError, match=r"params.safetensors is not the file the bundle was exported with"):
        sscell.load(bundle)
    resign(bundle, "params.safetensors")
    with pytest.raises(SscellError, match=r"parameter dense_0/kernel is float16\[96, 32\].*needs float32\[96, 32\]"):
        sscell.load(bundle)


def test_files_that_are_symbolic_links_are_refused(bundle, tmp_path):
    outside = tmp_path / "elsewhere.csv"
    (bundle / "genes.csv").rename(outside)
    (bundle / "genes.csv").symlink_to(outside)
    with pytest.raises(SscellError, match="genes.csv is a symbolic link"):
        sscell.load(bundle)


def test_non_finite_parameters_are_refused(model, tmp_path):
    params = {**model.params, "encoder": {**model.params["encoder"], "dense_2": {
        **model.params["encoder"]["dense_2"], "bias": np.full(8, np.nan, np.float32)}}}
    write_bundle(tmp_path / "nan", params=params, genes=model.genes, config=model.config,
                 meta={"source": "x", "checkpoint": "best", "step": 1, "loss": "masked", **model.about})
    with pytest.raises(SscellError, match="parameter dense_2/bias holds NaN or infinite values"):
        sscell.load(tmp_path / "nan")


def test_an_unknown_activation_is_refused(model, tmp_path):
    config = model.config.copy_and_resolve_references()
    config.model.activation = "tanhh"
    write_bundle(tmp_path / "act", params=model.params, genes=model.genes, config=config,
                 meta={"source": "x", "checkpoint": "best", "step": 1, "loss": "masked", **model.about})
    with pytest.raises(SscellError, match=r"model.activation 'tanhh' .* is unknown"):
        sscell.load(tmp_path / "act")


def _deep(depth: int) -> str:
    return "[" * depth + "]" * depth


MALFORMED = {
    "missing step": ("bundle.json", lambda b: edit_json(b / "bundle.json", lambda m: m.pop("step")),
                     "lacks or garbles step"),
    "bad JSON": ("bundle.json", lambda b: (b / "bundle.json").write_text("{not json"), "is not valid JSON"),
    "bad Unicode": ("bundle.json", lambda b: (b / "bundle.json").write_bytes(b'{"format": "\xff"}'),
                    "is not valid JSON"),
    "deep JSON": ("bundle.json", lambda b: (b / "bundle.json").write_text(_deep(100_000)), "is not valid JSON"),
    "deep config": ("config.json", lambda b: (b / "config.json").write_text(_deep(100_000)),
                    "is not a readable sscell config"),
    "classes and ids": ("bundle.json", lambda b: edit_json(b / "bundle.json", lambda m: m.update(
        classes=["a", "b"], class_ontology_term_ids=["CL:1"])), "do not pair up"),
    "genes and params": ("genes.csv", lambda b: (b / "genes.csv").write_text("gene_id\ng1\ng2\n"),
                         r"parameter dense_0/kernel is float32\[96, 32\], its model \(2 genes\)"),
    "safetensors header": ("params.safetensors", lambda b: (b / "params.safetensors").write_bytes(
        (10**12).to_bytes(8, "little") + b"{}"), "is not a readable safetensors file"),
    "empty safetensors": ("params.safetensors", lambda b: (b / "params.safetensors").write_bytes(b""),
                          "is not a readable safetensors file"),
}


@pytest.mark.parametrize("case", MALFORMED, ids=list(MALFORMED))
def test_a_malformed_bundle_ends_in_one_line(bundle, tiny_h5ad, tmp_path, capsys, case):
    name, damage, message = MALFORMED[case]
    damage(bundle)
    if name != "bundle.json":
        resign(bundle, name)  # past the checksum: the reader itself must refuse it
    with pytest.raises(SystemExit) as exit_:
        embed_main([f"--workdir={bundle}", f"--input={tiny_h5ad}", f"--output={tmp_path / 'out.h5ad'}"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert re.search(message, err), err


def test_an_export_replaces_a_bundle_in_one_step_and_clears_what_a_killed_one_left(model, bundle):
    before = flatten(sscell.load(bundle).params)
    stale = [bundle.with_name(f".bundle.tmp-{gone_pid()}"), bundle.with_name(f".bundle.old-{gone_pid()}")]
    for path in stale:
        path.mkdir()
    model.export(bundle)
    assert sorted(p.name for p in bundle.parent.iterdir()) == ["bundle"]
    assert flatten(sscell.load(bundle).params).keys() == before.keys()
    # killed between the two renames of a system that cannot swap: the old bundle was set aside
    bundle.rename(bundle.with_name(f".bundle.old-{gone_pid()}"))
    model.export(bundle)  # put back, then replaced
    assert sorted(p.name for p in bundle.parent.iterdir()) == ["bundle"]


def test_concurrent_exports_never_leave_the_path_without_a_bundle(tmp_path):
    path = tmp_path / "bundle"
    writer = ("import sys; from sscell.atomic import atomic_folder\n"
              "for i in range(40):\n"
              "    with atomic_folder(sys.argv[1]) as tmp:\n"
              "        (tmp / 'bundle.json').write_text(str(i))\n")
    with_bundle = [sys.executable, "-c", writer, str(path)]
    subprocess.run(with_bundle, check=True, timeout=120)
    watcher = ("import os, sys, time\n"
               "missing = 0\nend = time.time() + float(sys.argv[2])\n"
               "while time.time() < end:\n"
               "    missing += not os.path.exists(os.path.join(sys.argv[1], 'bundle.json'))\n"
               "print(missing)\n")
    watch = subprocess.Popen([sys.executable, "-c", watcher, str(path), "3"], stdout=subprocess.PIPE, text=True)
    writers = [subprocess.Popen(with_bundle, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    assert all(w.wait(timeout=120) == 0 for w in writers), [w.stderr.read() for w in writers]
    assert watch.communicate(timeout=120)[0].strip() == "0"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]

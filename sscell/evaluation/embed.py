"""Embeddings of any dataset with a trained run, written into an AnnData file as obsm['X_sscell'].

    python -m sscell.evaluation.embed --workdir=RUN --input=data.h5ad|STORE --output=out.h5ad

An .h5ad input is aligned to the run's gene vocabulary by gene id, as the converter does
(`sscell.data.inputs`): its genes outside the vocabulary are dropped, and vocabulary genes it
lacks are unmeasured, zeroed exactly as in training (the model input is built by the training
step's `task_batch` with the measured mask). A store input must have the run's vocabulary.
Cells are read `eval.batch_size` rows at a time and the embeddings are written to disk block by
block, so memory stays bounded at any size. The output holds the input's obs (same cells, same
order), obsm['X_sscell'] and uns['sscell'] (workdir, checkpoint, step, input); it is written to
a temporary file beside the output and renamed into place.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import anndata
import h5py
import jax
import numpy as np
import pandas as pd
from absl import app, flags, logging

from sscell.config import load_config
from sscell.data.inputs import H5adInput, align, open_input
from sscell.data.loader import sequential_batches, shard_nonzeros
from sscell.data.prepare import store_path
from sscell.data.store import Store, open_store
from sscell.errors import SscellError, exit_on_error
from sscell.training import checkpoint
from sscell.training.mesh import make_mesh, replicated
from sscell.training.state import abstract_state, check_same_genes
from sscell.training.step import task_batch
from sscell.training.train import Setup, build

OBSM_KEY = "X_sscell"


def load_params(workdir: str, config, store: Store, which: str | None = None):
    """(setup, params, step) of `workdir`'s "latest" or "best" checkpoint (default `config.eval.checkpoint`)."""
    setup = build(config, store)
    manager = checkpoint.checkpoint_manager(workdir, config.train.checkpoint_every, config.train.keep_checkpoints)
    layout = abstract_state(setup.model, setup.optimizer, replicated(make_mesh(config.mesh)), setup.init_extra)
    restored = checkpoint.restore(manager, layout, which or config.eval.checkpoint)
    manager.close()
    if restored is None:
        raise SscellError(f"{workdir} has no checkpoint yet; train first with python -m sscell.main")
    return setup, restored[0]["params"], int(restored[0]["step"])


def make_encoder(setup: Setup):
    """`encode(params, batch, measured_table) -> embeddings` (jit): the model's embedding of a
    loader-format batch, its input built exactly as in training."""
    model, n_genes = setup.model, setup.info.n_genes

    @jax.jit
    def encode(params, batch, measured_table):
        return model.apply({"params": params}, task_batch(batch, n_genes, measured_table)["x"], method="encode")

    return encode


def h5ad_batches(inp: H5adInput, batch_size: int) -> Iterator[tuple[dict[str, np.ndarray], int]]:
    """An aligned .h5ad's cells in file order, as (loader-format batch, n_valid) of `batch_size`
    cells (the last padded with empty cells); every cell is dataset 0 of `inp`'s measured table."""
    for a in range(0, inp.n_cells, batch_size):
        b = min(a + batch_size, inp.n_cells)
        matrix = inp.read(a, b)
        lengths = np.pad(np.diff(matrix.indptr), (0, batch_size - (b - a)))
        yield {**shard_nonzeros(matrix.data, matrix.indices, lengths), "dataset": np.zeros(batch_size, np.int32)}, b - a


def _is_store(path: Path) -> bool:
    return path.is_dir() and (path / "zarr.json").is_file()


def _write_skeleton(path: Path, obs: pd.DataFrame, uns: dict, n_dims: int) -> None:
    """An .h5ad with `obs`, no genes, `uns` and an empty float32 obsm[OBSM_KEY] to fill in blocks."""
    anndata.AnnData(obs=obs, uns=uns).write_h5ad(path)
    with h5py.File(path, "a") as f:
        obsm = f.require_group("obsm")
        obsm.attrs.update({"encoding-type": "dict", "encoding-version": "0.1.0"})
        dataset = obsm.create_dataset(OBSM_KEY, shape=(len(obs), n_dims), dtype=np.float32,
                                      chunks=(min(max(len(obs), 1), 4096), n_dims))
        dataset.attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})


def embed(workdir: str, input_path: str, output: str, batch_size: int = 0, which: str | None = None) -> dict:
    """Embed the cells of `input_path` (.h5ad or store) with `workdir`'s checkpoint into `output`.

    Returns a summary: cells, dims, step, and for an .h5ad the genes dropped / not measured.
    """
    config = load_config(workdir)
    run_store = open_store(store_path(config, workdir))
    setup, params, step = load_params(workdir, config, run_store, which)
    batch_size = batch_size or config.eval.batch_size
    source, output = Path(input_path), Path(output)
    if not output.parent.is_dir():
        raise SscellError(f"{output.parent} does not exist; create it or choose another --output")
    summary = {"input": str(source), "step": step}
    with contextlib.ExitStack() as stack:
        if _is_store(source):
            store = open_store(source)
            check_same_genes(run_store.path, store, workdir)  # or embed its .h5ad files: they are aligned
            obs = store.read_obs()
            table = store.measured if len(store.measured) else np.ones((1, store.n_genes), bool)
            batches = sequential_batches(store, 0, store.n_cells, batch_size)
        else:
            inp = open_input(source, stack)
            align(inp, run_store.var.index, "the run's gene vocabulary")
            obs = anndata.io.read_elem(stack.enter_context(h5py.File(source, "r"))["obs"])
            table = inp.measured("")[None]
            batches = h5ad_batches(inp, batch_size)
            summary.update(genes_dropped=inp.dropped, genes_not_measured=int((~table).sum()))
        encode = make_encoder(setup)
        tmp = output.with_name(f".{output.name}.{os.getpid()}.tmp")
        uns = {"sscell": {"workdir": os.path.abspath(workdir), "checkpoint": which or config.eval.checkpoint,
                          "step": step, "input": os.path.abspath(source), "loss": config.loss.name}}
        try:
            _write_skeleton(tmp, obs, uns, config.model.latent)
            with h5py.File(tmp, "a") as f:
                dataset, row = f["obsm"][OBSM_KEY], 0
                for batch, n_valid in batches:
                    dataset[row:row + n_valid] = np.asarray(jax.device_get(encode(params, batch, table)))[:n_valid]
                    row += n_valid
            os.replace(tmp, output)
        finally:
            tmp.unlink(missing_ok=True)
    return {**summary, "cells": len(obs), "dims": int(config.model.latent), "output": str(output)}


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)
    values = flags.FLAGS
    with exit_on_error():
        s = embed(values.workdir, values.input, values.output, values.batch_size, values.checkpoint)
        extra = (f", {s['genes_dropped']} input genes outside the vocabulary, {s['genes_not_measured']} vocabulary "
                 "genes not measured" if "genes_dropped" in s else "")
        print(f"wrote {s['output']}: {s['cells']} cells x {s['dims']} dims (obsm['{OBSM_KEY}'], step {s['step']})"
              f"{extra}")


if __name__ == "__main__":  # flags defined here only: `sscell.evaluation` defines its own --workdir
    flags.DEFINE_string("workdir", None, "Work directory of a trained run.")
    flags.DEFINE_string("input", None, "An .h5ad file or an sscell store to embed.")
    flags.DEFINE_string("output", None, "The .h5ad file to write (obs + obsm['X_sscell']).")
    flags.DEFINE_integer("batch_size", 0, "Cells per forward pass (default: the run's eval.batch_size).")
    flags.DEFINE_enum("checkpoint", None, ["latest", "best"], "Checkpoint (default: the run's eval.checkpoint).")
    flags.mark_flags_as_required(["workdir", "input", "output"])
    app.run(main)

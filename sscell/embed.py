"""Embeddings of any dataset with a trained run or bundle, written into an AnnData file as obsm['X_sscell'].

    python -m sscell.embed --workdir=RUN|BUNDLE --input=data.h5ad|STORE --output=out.h5ad
        [--gene-column=COLUMN] [--round-counts] [--min-gene-overlap=0.5] [--batch-size=N] [--checkpoint=best]
        [--run-store=URL]

Any .h5ad works: obs is kept as it is (no column is required), counts come from layers['counts'],
raw.X or X, and genes are matched to the model's by id or by symbol through its gene table, or by
the var column `--gene-column` (`sscell.evaluation.align`: the overlap is reported, and an input
measuring less than `--min-gene-overlap` of the model's genes is refused). Model genes the input
lacks are unmeasured, zeroed exactly as in training. A store input must have the run's genes.
Cells are read `eval.batch_size` rows at a time and the outputs are written block by block, so
memory stays bounded at any size. The output holds the input's obs (same cells, same order),
obsm['X_sscell'] and uns['sscell'] (model, checkpoint, step, input, genes matched); with
`predict` (`sscell.predict`) also the predicted cell types. It is written to a hidden
temporary file beside the output (removed by the next run if this one is killed) and renamed
into place; an output that is the input, a folder or in a folder it cannot write to is refused.
Every bad input or option ends in one line and exit code 2.
"""
from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Sequence
from pathlib import Path

import anndata
import h5py
import numpy as np
import pandas as pd

from sscell.api import CONFIDENCE, LABEL, OBSM_KEY, ONTOLOGY, Model, load
from sscell.atomic import atomic_file
from sscell.data.loader import sequential_batches
from sscell.data.store import Store, open_store
from sscell.errors import SscellError, exit_on_error
from sscell.evaluation.align import MIN_OVERLAP, input_batches, match_genes, open_h5ad
from sscell.training.state import check_gene_order

__all__ = ["OBSM_KEY", "embed", "write_outputs"]


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


def _read_obs(path: Path, f: h5py.File) -> pd.DataFrame:
    """The obs of an .h5ad, or a one-line refusal naming why it cannot be read."""
    try:
        obs = anndata.io.read_elem(f["obs"])
    except Exception as error:  # noqa: BLE001 (anndata raises many types for a malformed element)
        reason = " ".join(str(error).split())
        raise SscellError(f"{path}: its obs cannot be read ({type(error).__name__}: {reason[:300]})") from None
    return obs


def _write_rows(obs: h5py.Group, columns: dict, start: int) -> None:
    """Fill rows from `start` of the obs columns (written by `_write_skeleton`) with `columns`."""
    for name, values in columns.items():
        if isinstance(values, pd.Categorical):
            obs[name]["codes"][start:start + len(values)] = values.codes
        else:
            obs[name][start:start + len(values)] = values


def write_outputs(model: Model, input_path: str, output: str, *, predict: bool = False, batch_size: int = 0,
                  gene_column: str | None = None, round_counts: bool = False,
                  min_overlap: float = MIN_OVERLAP) -> dict:
    """Embed (and with `predict`, classify) the cells of `input_path` (.h5ad or store) into `output`.

    Returns a summary: cells, dims, step, and for an .h5ad how its genes matched the model's.
    """
    if predict:
        model.require_classifier()
    batch_size = model.checked_batch_size(batch_size)
    source, output = Path(input_path), Path(output)
    check_output(source, output)
    summary = {"input": str(source), "step": model.step}
    with contextlib.ExitStack() as stack:
        if _is_store(source):
            store: Store = open_store(source)
            check_gene_order(model.genes.index, store, model.source)  # or embed its .h5ad files: they are matched
            obs, overlap = store.read_obs(), None
            table = store.measured if len(store.measured) else np.ones((1, store.n_genes), bool)
            batches = sequential_batches(store, 0, store.n_cells, batch_size)
        else:
            inp = open_h5ad(source, stack, gene_column=gene_column, round_counts=round_counts)
            overlap = match_genes(inp, model.genes, min_overlap)
            obs = _read_obs(source, stack.enter_context(h5py.File(source, "r")))
            if len(obs) != inp.n_cells:
                raise SscellError(f"{source}: its obs lists {len(obs)} cells, its counts {inp.n_cells}; the file is "
                                  "inconsistent")
            table = inp.measured("")[None]
            batches = input_batches(inp, batch_size)
            summary.update(genes=overlap.describe(), genes_matched_by=overlap.key, genes_used=overlap.used,
                           genes_dropped=inp.dropped, genes_measured=overlap.measured,
                           genes_not_measured=overlap.run_genes - overlap.measured)
        if predict:  # placeholders, filled block by block
            obs = obs.drop(columns=[c for c in (LABEL, CONFIDENCE, ONTOLOGY) if c in obs])
            obs = obs.assign(**model.prediction_columns(np.zeros(len(obs), int), np.zeros(len(obs))))
        uns = {"sscell": model.provenance(overlap, input=os.path.abspath(source))}
        with atomic_file(output) as tmp:
            _write_skeleton(tmp, obs, uns, int(model.config.model.latent))
            with h5py.File(tmp, "a") as f:
                row = 0
                for embedding, *predicted in model.outputs(batches, table):
                    f["obsm"][OBSM_KEY][row:row + len(embedding)] = embedding
                    if predict:
                        _write_rows(f["obs"], model.prediction_columns(*predicted), row)
                    row += len(embedding)
    return {**summary, "cells": len(obs), "dims": int(model.config.model.latent), "output": str(output)}


def check_output(source: Path, output: Path) -> None:
    """Refuse, in one line, an output that would replace the input or cannot be written."""
    if os.path.realpath(output) == os.path.realpath(source) or (
            output.exists() and source.exists() and os.path.samefile(output, source)):
        raise SscellError(f"--output {output} is the input {source}; writing it would replace the input's counts, "
                          "choose another --output")
    if output.is_dir():
        raise SscellError(f"--output {output} is a folder; name the .h5ad file to write")
    if not output.parent.is_dir():
        raise SscellError(f"{output.parent} does not exist; create it or choose another --output")
    if not os.access(output.parent, os.W_OK | os.X_OK):
        raise SscellError(f"{output.parent} is not writable; choose another --output")


def embed(workdir: str, input_path: str, output: str, batch_size: int = 0, which: str | None = None, *,
          gene_column: str | None = None, round_counts: bool = False, min_overlap: float = MIN_OVERLAP,
          store: str | None = None) -> dict:
    """Embed the cells of `input_path` (.h5ad or store) with the run or bundle `workdir` into `output`
    (`store`: the run's store, as `sscell.load` takes it)."""
    return write_outputs(load(workdir, which, store=store), input_path, output, batch_size=batch_size, gene_column=gene_column,
                         round_counts=round_counts, min_overlap=min_overlap)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """A bad command line in one line, exit code 2 (as `sscell.errors.exit_on_error`)."""
        self.exit(2, f"error: bad command line: {message}; see --help\n")


def parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The flags `embed` and `predict` share."""
    p = _Parser(prog=prog, description=description)
    p.add_argument("--workdir", required=True, help="a trained run's work directory, or a bundle")
    p.add_argument("--input", required=True, help="an .h5ad file (any obs) or an sscell store with the run's genes")
    p.add_argument("--output", required=True, help="the .h5ad file to write")
    p.add_argument("--gene-column", help="input var column holding the gene ids or symbols (default: the var index)")
    p.add_argument("--round-counts", action="store_true", help="round non-integer counts instead of refusing them")
    p.add_argument("--min-gene-overlap", type=float, default=MIN_OVERLAP,
                   help="refuse inputs measuring less than this share of the model's genes (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=0, help="cells per forward pass (default: eval.batch_size)")
    p.add_argument("--checkpoint", choices=("latest", "best"), help="of a run (default: its eval.checkpoint)")
    p.add_argument("--run-store", help="the run's store, for its gene table, when the run names one at a URL (sscell "
                   "contacts it only when named here)")
    return p


def describe(summary: dict) -> str:
    """The commands' one-line report of a written output."""
    genes = f"; {summary['genes']}" if "genes" in summary else ""
    return (f"wrote {summary['output']}: {summary['cells']} cells x {summary['dims']} dims (obsm['{OBSM_KEY}'], "
            f"step {summary['step']}){genes}")


def main(argv: Sequence[str] | None = None) -> None:
    args = parser("python -m sscell.embed", __doc__.splitlines()[0]).parse_args(argv)
    with exit_on_error():
        print(describe(embed(args.workdir, args.input, args.output, args.batch_size, args.checkpoint,
                             gene_column=args.gene_column, round_counts=args.round_counts,
                             min_overlap=args.min_gene_overlap, store=args.run_store)))


if __name__ == "__main__":
    main()

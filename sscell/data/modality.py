"""A second modality per cell (CITE-seq surface proteins, multiome ATAC peaks): found in inputs,
checked, read from stores.

Layout, the same in an .h5ad input and in a store (where anndata reads it back too):

    obsm['protein_counts']        dense float (cells x proteins), raw counts, row i = cell i
    uns['protein_counts_names']   the proteins' names, one per column
or
    obsm['atac_counts']           CSR (cells x peaks; data / indices / indptr, anndata's
                                  csr_matrix encoding), raw fragment counts, row i = cell i
    uns['atac_counts_names']      the peaks' names (e.g. chr1-9776-10668), one per column

An input holds at most one of them.

The converter carries it when every input holds it with the same names (in the same order),
through the same shuffle as the RNA, so store row r's proteins are cell r's; `--append` needs
the new inputs to hold the store's panel. In a store it is a zarr v3 array of
MODALITY_CHUNK_CELLS-row chunks (`sscell.data.store.StoreWriter`), read here with tensorstore
like the counts, so the loader fetches a batch's rows by the same runs of rows.

CITE-seq files that keep RNA and proteins as columns of one matrix (the NeurIPS 2021 bone-marrow
data: var['feature_types'] GEX / ADT) are rewritten into this layout by

    python -m sscell.data.modality --input=cite.h5ad --output=cite_rna_protein.h5ad [--hvg=2000]
        [--dataset-column=batch] [--donor-column=DonorID] [--gene-column=gene_id]

which also keeps the RNA's most variable genes and writes them, in order, to
`cite_rna_protein.genes.txt` (a --vocabulary for other stores, e.g. a pretraining corpus).

Peaks are stored like X: a CSR group (float32 counts, uint16/uint32 peak indices, its own
indptr) written by `sscell.data.store.CsrWriter`; the converter moves every cell's peaks through
its bucket shuffle as per-nonzero scratch, and the loader ships a batch's peaks as flat nonzeros
per data-parallel shard (PEAK_FIELDS, laid out like genes / counts / indptr), densified in jit
by the loss (`sscell.losses.crossmodal`). Multiome files holding RNA and peaks as columns of one
matrix (var['feature_types'] GEX / ATAC) are rewritten by the same command with --protein=ATAC
[--top-features=N].
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

import anndata
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
import tensorstore as ts

from sscell.data.store import CsrRows, Store, _context, _kvstore, _open_array, names_key
from sscell.errors import SscellError, exit_on_error

PROTEIN_KEY = "protein_counts"
ATAC_KEY = "atac_counts"
MODALITY_KEYS = (PROTEIN_KEY, ATAC_KEY)
SPARSE_KEYS = (ATAC_KEY,)  # modalities stored as CSR
BATCH_FIELD = "modality"  # the loader batch field holding the rows' (dense) modality values
PEAK_FIELDS = ("peaks", "peak_counts", "peak_indptr")  # a sparse modality's flat fields in a loader batch


def find_any(f: h5py.File, path: Path) -> tuple[str, h5py.Dataset | anndata.abc.CSRDataset, tuple[str, ...]] | None:
    """(key, obsm[key] on disk, its column names) of the one modality of MODALITY_KEYS an open
    .h5ad holds, or None if it holds none."""
    keys = [key for key in MODALITY_KEYS if f"obsm/{key}" in f]
    if len(keys) > 1:
        raise SscellError(f"{path}: holds {' and '.join(keys)}; convert one second modality per store (write "
                          "one copy of the file per modality)")
    found = find_in_input(f, path, keys[0]) if keys else None
    return (keys[0], *found) if found else None


def find_in_input(f: h5py.File, path: Path, key: str = PROTEIN_KEY
                  ) -> tuple[h5py.Dataset | anndata.abc.CSRDataset, tuple[str, ...]] | None:
    """(obsm[key] on disk, its column names) of an open .h5ad, or None if it has no obsm[key]."""
    if f"obsm/{key}" not in f:
        return None
    values = f["obsm"][key]
    if key in SPARSE_KEYS:
        if not isinstance(values, h5py.Group) or values.attrs.get("encoding-type") != "csr_matrix":
            raise SscellError(f"{path}: obsm['{key}'] must be a CSR cells x features matrix; write it as "
                              "scipy.sparse.csr_matrix (names in uns)")
        values = anndata.io.sparse_dataset(values)  # rows read on demand
    elif not isinstance(values, h5py.Dataset) or values.ndim != 2:
        raise SscellError(f"{path}: obsm['{key}'] must be a dense cells x features array; write it as a numpy "
                          "array (e.g. adata.obsm[key] = df.to_numpy(), names in uns)")
    if f"uns/{names_key(key)}" not in f:
        raise SscellError(f"{path}: obsm['{key}'] has no names; add uns['{names_key(key)}'] (one per column)")
    names = tuple(str(n) for n in anndata.io.read_elem(f["uns"][names_key(key)]))
    if len(names) != values.shape[1] or len(set(names)) < len(names):
        raise SscellError(f"{path}: uns['{names_key(key)}'] must hold {values.shape[1]} distinct names, one per "
                          f"column of obsm['{key}']; it holds {len(names)} ({len(set(names))} distinct)")
    return values, names


def checked(values: np.ndarray, path: Path, key: str, rows: str) -> np.ndarray:
    """`values` (rows of obsm[key]) as float32 if they are finite and non-negative counts."""
    values = np.asarray(values, np.float32)
    if not np.isfinite(values).all() or (values < 0).any():
        raise SscellError(f"{path}: obsm['{key}'] has negative, NaN or infinite values in rows {rows}; "
                          "give raw counts")
    return values


def checked_csr(values: sp.csr_matrix, path: Path, key: str, rows: str) -> sp.csr_matrix:
    """`values` (rows of a sparse obsm[key]) with float32 data if they are finite, non-negative counts
    in columns that exist."""
    if values.nnz and not 0 <= values.indices.min() <= values.indices.max() < values.shape[1]:
        raise SscellError(f"{path}: obsm['{key}'] has column indices outside its {values.shape[1]} columns in rows "
                          f"{rows}; the file is corrupt, write it again")
    return sp.csr_matrix((checked(values.data, path, key, rows), values.indices, values.indptr), shape=values.shape)


def common_panel(sources: Sequence) -> tuple[str, tuple[str, ...]] | None:
    """(key, names) of the modality every source holds (`source.modality_key` and
    `source.modality_names`, None if none), or None if no source holds one; sources that
    disagree are refused."""
    panels = [(src.modality_key, src.modality_names) if src.modality_names is not None else None for src in sources]
    if all(p is None for p in panels):
        return None
    first = next(i for i, p in enumerate(panels) if p is not None)
    key = panels[first][0]
    for src, panel in zip(sources, panels):
        if panel is None or panel[0] != key:
            raise SscellError(f"{src.path}: has no obsm['{key}'] while {sources[first].path} has; "
                              "convert inputs with and without it into separate stores")
        panel = panel[1]
        if panel != panels[first][1]:
            differ = next((a, b) for a, b in zip(panel + ("-",) * 9, panels[first][1] + ("-",) * 9) if a != b)
            raise SscellError(f"{src.path}: its obsm['{key}'] columns differ from {sources[first].path}'s "
                              f"({len(panel)} vs {len(panels[first][1])} names, first difference {differ[0]!r} vs "
                              f"{differ[1]!r}); reorder or subset them to one panel")
    return panels[first]


@dataclasses.dataclass(eq=False)
class ModalityReader:
    """A store's obsm[key]: its column names, and rows read on demand with tensorstore."""

    key: str
    names: tuple[str, ...]
    _array: ts.TensorStore = dataclasses.field(repr=False)

    @property
    def n_features(self) -> int:
        return len(self.names)

    def read(self, ranges: Sequence[tuple[int, int]]) -> np.ndarray:
        """float32 (cells, features) of the rows of every [start, stop) range, concatenated in
        range order (e.g. `sscell.data.loader.runs(rows)` for rows in any order); all reads are
        issued before any is awaited."""
        futures = [self._array[start:stop].read() for start, stop in ranges]
        return np.concatenate([f.result() for f in futures] or [np.zeros((0, self.n_features))]).astype(np.float32)


@dataclasses.dataclass(eq=False)
class SparseModalityReader(CsrRows):
    """A store's sparse obsm[key] (CSR, e.g. ATAC peaks): its column names, indptr in RAM, rows
    read on demand with tensorstore (`read_nonzeros`, `read_blocks`, or dense with `read`)."""

    key: str
    names: tuple[str, ...]
    path: str
    n_cells: int
    indptr: np.ndarray = dataclasses.field(repr=False)
    _data: ts.TensorStore = dataclasses.field(repr=False)
    _indices: ts.TensorStore = dataclasses.field(repr=False)

    @property
    def n_features(self) -> int:
        return len(self.names)

    @property
    def n_columns(self) -> int:
        return len(self.names)

    def lengths(self, rows: np.ndarray) -> np.ndarray:
        """Nonzeros of each of `rows`."""
        return self.indptr[rows + 1] - self.indptr[rows]

    def read(self, ranges: Sequence[tuple[int, int]]) -> np.ndarray:
        """float32 dense (cells, features) of the rows of every [start, stop) range, concatenated
        in range order (`ModalityReader.read`'s contract; meant for modest panels)."""
        blocks = self.read_blocks(ranges)
        return (sp.vstack(blocks, format="csr").toarray() if blocks else np.zeros((0, self.n_features))
                ).astype(np.float32)


def modality_key(store: Store) -> str | None:
    """The key of MODALITY_KEYS the store holds in obsm, or None."""
    return next((key for key in MODALITY_KEYS if has_modality(store, key)), None)


def has_modality(store: Store, key: str = PROTEIN_KEY) -> bool:
    """Whether the store holds obsm[key]."""
    root = store._root  # the store's open zarr group (local or remote)
    return "obsm" in root and key in root["obsm"]


def open_modality(store: Store, key: str = PROTEIN_KEY) -> ModalityReader | SparseModalityReader:
    """The reader of the store's obsm[key] (sparse for a CSR group); refuses a store without it in one line."""
    if not has_modality(store, key):
        raise SscellError(f"{store.path} has no obsm['{key}'] (a second modality per cell); convert .h5ad inputs "
                          f"holding obsm['{key}'] with names in uns['{names_key(key)}'], or drop data.modality")
    names = tuple(str(n) for n in anndata.io.read_elem(store._root["uns"][names_key(key)]))
    ctx = _context()
    if store._root["obsm"][key].attrs.get("encoding-type") == "csr_matrix":
        indptr = _open_array(_kvstore(store.path, f"obsm/{key}/indptr"), ctx).read().result()
        return SparseModalityReader(key, names, store.path, store.n_cells, indptr,
                                    _open_array(_kvstore(store.path, f"obsm/{key}/data"), ctx),
                                    _open_array(_kvstore(store.path, f"obsm/{key}/indices"), ctx))
    return ModalityReader(key, names, _open_array(_kvstore(store.path, f"obsm/{key}"), ctx))


def document_frequency(reader: SparseModalityReader, rows: np.ndarray, chunk_nonzeros: int = 2**24) -> np.ndarray:
    """Per feature (e.g. peak), how many of the sorted store `rows` have a nonzero value in it,
    read ~`chunk_nonzeros` nonzeros at a time."""
    from sscell.data.loader import runs  # here: the loader imports this module

    frequency = np.zeros(reader.n_features, np.int64)
    lengths = reader.lengths(rows)
    cuts = np.searchsorted(np.cumsum(lengths), np.arange(chunk_nonzeros, lengths.sum(), chunk_nonzeros))
    for part in np.split(rows, np.unique(cuts)):
        data, indices = reader.read_nonzeros(runs(part))
        frequency += np.bincount(indices[data > 0].astype(np.int64), minlength=reader.n_features)
    return frequency


def split_feature_types(input_path: str | os.PathLike, output: str | os.PathLike, *, n_hvg: int = 2000,
                        feature_column: str = "feature_types", rna: str = "GEX", protein: str = "ADT",
                        dataset_column: str = "batch", donor_column: str = "DonorID",
                        gene_column: str | None = "gene_id", top_features: int = 0) -> dict[str, object]:
    """Rewrite a CITE-seq (or multiome) .h5ad holding RNA and a second modality as columns of one
    matrix (raw counts in layers['counts'], else X) into the converter's layout: the `n_hvg` most
    variable RNA genes as X (0: all), the `protein` features in obsm['protein_counts'] (dense), or,
    when `protein` is "ATAC", the peaks in obsm['atac_counts'] (CSR; the `top_features` peaks open
    in most cells, 0: all), with their names, obs dataset_id / donor_id from `dataset_column` /
    `donor_column`, gene ids from var[`gene_column`] when present. Also writes the kept genes to
    OUTPUT.genes.txt. Reads the input whole (a CITE-seq or multiome file fits in memory).
    """
    # here: the loader imports this module
    from sscell.evaluation.metrics import highly_variable_genes

    adata = anndata.read_h5ad(input_path)
    for column, frame in ((feature_column, adata.var), (dataset_column, adata.obs), (donor_column, adata.obs)):
        if column not in frame:
            raise SscellError(f"{input_path}: no column {column!r} (var: {list(adata.var.columns)}, obs: "
                              f"{list(adata.obs.columns)}); name the right ones")
    counts = sp.csr_matrix(adata.layers.get("counts", adata.X))
    kinds = adata.var[feature_column].astype(str).to_numpy()
    if not (kinds == rna).any() or not (kinds == protein).any():
        raise SscellError(f"{input_path}: var[{feature_column!r}] must hold {rna!r} and {protein!r} features; it "
                          f"holds {sorted(set(kinds))[:5]}")
    genes = np.flatnonzero(kinds == rna)
    if n_hvg:
        x = counts[:, genes]
        library = np.maximum(np.asarray(x.sum(1)).ravel(), 1)
        genes = genes[highly_variable_genes((sp.diags(1e4 / library) @ x).log1p(), n_hvg)]
    var = adata.var.iloc[genes].copy()
    if gene_column and gene_column in var:
        var.index = pd.Index(var[gene_column].astype(str))
    obs = adata.obs.copy()
    obs["dataset_id"], obs["donor_id"] = obs[dataset_column].astype(str), obs[donor_column].astype(str)
    proteins = np.flatnonzero(kinds == protein)
    key = ATAC_KEY if protein == "ATAC" else PROTEIN_KEY
    values = counts[:, proteins].astype(np.float32)
    if key == ATAC_KEY and top_features:
        kept = np.sort(np.argsort(-values.getnnz(0), kind="stable")[:top_features])
        proteins, values = proteins[kept], values[:, kept]
    out = anndata.AnnData(X=counts[:, genes].astype(np.float32), obs=obs, var=var,
                          obsm={key: sp.csr_matrix(values) if key == ATAC_KEY else values.toarray()},
                          uns={names_key(key): np.asarray(adata.var_names[proteins], dtype=object)})
    out.write_h5ad(output)
    vocabulary = Path(output).with_suffix(".genes.txt")
    vocabulary.write_text("\n".join(var.index) + "\n")
    return {"output": str(output), "cells": out.n_obs, "genes": len(genes),
            "peaks" if key == ATAC_KEY else "proteins": len(proteins),
            "vocabulary": str(vocabulary), "datasets": sorted(obs["dataset_id"].unique())}


def main(argv: Sequence[str] | None = None) -> None:
    """Command line of `split_feature_types`."""
    parser = argparse.ArgumentParser(prog="python -m sscell.data.modality", description=split_feature_types.__doc__)
    parser.add_argument("--input", required=True, help="CITE-seq / multiome .h5ad with RNA and protein / ATAC "
                        "features in one matrix")
    parser.add_argument("--output", required=True, help=".h5ad to write (RNA in X, proteins or peaks in obsm)")
    parser.add_argument("--hvg", type=int, default=2000, help="most variable genes kept (0: all)")
    parser.add_argument("--feature-column", default="feature_types")
    parser.add_argument("--rna", default="GEX")
    parser.add_argument("--protein", default="ADT", help="feature type of the second modality: ADT (proteins) "
                        "or ATAC (peaks)")
    parser.add_argument("--top-features", type=int, default=0, help="ATAC: keep the peaks open in most cells (0: all)")
    parser.add_argument("--dataset-column", default="batch", help="obs column giving dataset_id (the batch)")
    parser.add_argument("--donor-column", default="DonorID", help="obs column giving donor_id")
    parser.add_argument("--gene-column", default="gene_id", help="var column of gene ids, when present")
    args = parser.parse_args(argv)
    with exit_on_error():
        report = split_feature_types(args.input, args.output, n_hvg=args.hvg, feature_column=args.feature_column,
                                     rna=args.rna, protein=args.protein, dataset_column=args.dataset_column,
                                     donor_column=args.donor_column, gene_column=args.gene_column,
                                     top_features=args.top_features)
    print(report)


if __name__ == "__main__":
    main()

"""The converter's inputs: CELLxGENE-style .h5ad files opened lazily, validated, aligned to a gene vocabulary.

Files are opened with h5py and anndata's element readers (`anndata.io.read_elem` for var,
`anndata.io.sparse_dataset` for the counts), because `read_h5ad(backed='r')` loads layers, obsm
and uns into memory. Only the obs columns the store keeps are read, as categoricals (a small
integer code per cell); cell ids stay on disk and are read in row blocks (sscell.data.h5columns,
which follows every encoding anndata writes, e.g. 0.13's nullable-string-array index).

Counts come from layers['counts'], else raw.X, else X. Genes are matched to the vocabulary by
id (the var index, or a var column named by `gene_column`); genes outside the vocabulary are
dropped, and a vocabulary gene an input lacks counts as not measured by that input. A second
modality, obsm['protein_counts'] (dense) or obsm['atac_counts'] (CSR) with its names in uns, stays
on disk and is read in the same row blocks (sscell.data.modality).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import re
from collections.abc import Iterable
from pathlib import Path

import anndata
import h5py
import numpy as np
import pandas as pd
import scipy.sparse

from sscell.bundle import GENES_FILE, is_bundle, read_bundle_genes
from sscell.data import modality as modalities
from sscell.data.cell_ids import as_utf8
from sscell.data.h5columns import Column
from sscell.data.store import SPLITS
from sscell.errors import SscellError

REQUIRED_OBS = ("cell_type", "donor_id")
OPTIONAL_OBS = ("cell_type_ontology_term_id", "dataset_id", "assay", "tissue")
_COLUMN_BLOCK = 2**20  # cells of a plain (non-categorical) obs column read at a time
_ENSEMBL = re.compile(r"ENS[A-Z]*G\d+(\.\d+)?")  # ENSG00000141510, ENSMUSG..., with version


def _one_line(error: Exception) -> str:
    return " ".join(f"{type(error).__name__}: {error}".split())


@dataclasses.dataclass
class H5adInput:
    """One opened .h5ad: its counts matrix (lazy), kept obs columns and gene alignment."""

    path: Path
    counts: anndata.abc.CSRDataset | h5py.Dataset
    source: str                 # where the counts came from, for the report
    obs: pd.DataFrame           # kept columns only, categoricals of strings; a RangeIndex (ids: read_ids)
    ids: Column                 # the obs index (cell ids), on disk
    var: pd.DataFrame           # index: gene ids of the counts' columns
    round_counts: bool = False  # round non-integer counts instead of refusing them
    columns: np.ndarray | None = None  # vocabulary column of each input column, -1: dropped
    n_genes: int = 0            # vocabulary size
    given_split: np.ndarray | None = None  # split codes (index into SPLITS) from --split-column
    modality: h5py.Dataset | anndata.abc.CSRDataset | None = None  # obsm[modality_key], on disk
    modality_names: tuple[str, ...] | None = None  # its column names (None: no modality)
    modality_key: str = modalities.PROTEIN_KEY
    # (non-integer, stored) values of each block of counts read, by its first row (a block read
    # again counts once); only non-zero with round_counts
    non_integer: dict[int, tuple[int, int]] = dataclasses.field(default_factory=dict)

    @property
    def n_cells(self) -> int:
        return len(self.obs)

    @property
    def dropped(self) -> int:
        """How many of the input's genes are outside the vocabulary."""
        return int((self.columns < 0).sum())

    @property
    def non_integer_share(self) -> float:
        """Share of the stored counts read so far that were not integers (rounded with round_counts)."""
        non_integer, stored = np.sum(list(self.non_integer.values()) or [(0, 0)], axis=0)
        return float(non_integer / max(stored, 1))

    def measured(self, dataset: str) -> np.ndarray:
        """Vocabulary genes the input measured (the same for each of its datasets)."""
        mask = np.zeros(self.n_genes, bool)
        mask[self.columns[self.columns >= 0]] = True
        return mask

    def read_ids(self, start: int, stop: int) -> np.ndarray:
        """Cell ids of rows [start, stop) as an object array of UTF-8 bytes."""
        try:
            ids = self.ids.block(start, stop, decode=False)
        except (OSError, KeyError, ValueError, RuntimeError) as e:
            raise SscellError(f"{self.path}: cannot read cell ids {start}-{stop - 1}, the file looks truncated "
                              f"or corrupt ({_one_line(e)})") from None
        if ids.dtype == object and any(i is None for i in ids):
            raise SscellError(f"{self.path}: the obs index (cell ids) has missing values in rows {start}-{stop - 1}; "
                              "give every cell an id")
        return as_utf8(ids)

    def read(self, start: int, stop: int) -> scipy.sparse.csr_matrix:
        """Validated counts of rows [start, stop) as csr over the vocabulary, explicit zeros dropped."""
        if np.dtype(self.counts.dtype) == np.float16:  # scipy.sparse cannot hold it
            raise SscellError(f"{self.path}: {self.source} holds float16 values, which sscell does not read; "
                              "write the counts as integers or float32")
        try:
            block = scipy.sparse.csr_matrix(self.counts[start:stop])
        except (OSError, KeyError, ValueError, RuntimeError) as e:
            raise SscellError(f"{self.path}: cannot read rows {start}-{stop - 1} of {self.source}, "
                              f"the file looks truncated or corrupt ({_one_line(e)})") from None
        if block.nnz and not 0 <= block.indices.min() <= block.indices.max() < len(self.columns):
            raise SscellError(f"{self.path}: rows {start}-{stop - 1} of {self.source} hold gene indices outside "
                              f"its {len(self.columns)} genes; the file is corrupt")
        block.data = self._checked(block.data, start, stop)
        kept = self.columns[block.indices]
        keep = kept >= 0
        indptr = np.concatenate([[0], np.cumsum(keep)])[block.indptr] if not keep.all() else block.indptr
        block = scipy.sparse.csr_matrix((block.data[keep], kept[keep], indptr), shape=(stop - start, self.n_genes))
        block.sort_indices()
        block.eliminate_zeros()
        return block

    def read_modality(self, start: int, stop: int) -> np.ndarray | scipy.sparse.csr_matrix:
        """Validated obsm[modality_key] rows [start, stop) with float32 values (cells x features;
        csr for a sparse modality)."""
        sparse = isinstance(self.modality, anndata.abc.CSRDataset)
        try:
            values = self.modality[start:stop]
        except (OSError, KeyError, ValueError, RuntimeError) as e:
            raise SscellError(f"{self.path}: cannot read obsm rows {start}-{stop - 1}, the file looks truncated "
                              f"or corrupt ({_one_line(e)})") from None
        check = modalities.checked_csr if sparse else modalities.checked
        return check(values, self.path, self.modality_key, f"{start}-{stop - 1}")

    def modality_lengths(self) -> np.ndarray:
        """Nonzeros per cell of a sparse modality."""
        return np.diff(self.modality.group["indptr"][:]).astype(np.int64)

    def _checked(self, data: np.ndarray, start: int, stop: int) -> np.ndarray:
        """`data` (stored values of rows [start, stop)) if they are non-negative integer counts,
        rounded if allowed."""
        problem, rounded = None, data
        if data.dtype.kind not in "fiu":
            problem = f"values of dtype {data.dtype}"
        elif data.dtype.kind == "f" and not np.isfinite(data).all():
            problem = "NaN or infinite values"
        elif data.dtype.kind in "fi" and (data < 0).any():
            problem = "negative values"
        elif data.dtype.kind == "f":
            rounded = np.rint(data)
            if not self.round_counts and (rounded != data).any():
                problem = "non-integer values (normalised data? pass --round-counts to round them to integers)"
        if problem:
            raise SscellError(f"{self.path}: counts in {self.source} have {problem} in rows {start}-{stop - 1}; "
                              "sscell needs raw integer counts")
        self.non_integer[start] = (int(np.count_nonzero(rounded != data)), len(data))
        return rounded


def _read_categorical(path: Path, name: str, elem: h5py.Group | h5py.Dataset, n_cells: int) -> pd.Categorical:
    """The obs column `name` as a categorical of strings, read in blocks (never as one array of
    objects); refused in one line when unreadable or not one value per cell."""
    try:
        column = Column(elem).categorical(_COLUMN_BLOCK)
    except Exception as e:  # noqa: BLE001 (anndata and h5py raise many types for a malformed element)
        raise SscellError(f"{path}: obs column {name} cannot be read ({_one_line(e)})") from None
    if len(column) != n_cells:
        raise SscellError(f"{path}: obs column {name} has {len(column)} values for {n_cells} cells; the file is "
                          "inconsistent")
    return column


def _read_obs(path: Path, group: h5py.Group, required: tuple[str, ...]) -> tuple[pd.DataFrame, Column]:
    """The kept obs columns as categoricals of strings (RangeIndex), and the cell ids' column."""
    ids = Column(group[group.attrs["_index"]])
    missing = [c for c in required if c not in group]
    if missing:
        without_donors = " or split a new store by cell (--split=cells) to do without donors" if "donor_id" in missing else ""
        raise SscellError(f"{path}: obs lacks required column(s) {', '.join(missing)}; "
                          f"add them (CELLxGENE names) before converting{without_donors}")
    columns = {}
    for c in dict.fromkeys(REQUIRED_OBS + OPTIONAL_OBS + required):
        if c in group:
            columns[c] = _read_categorical(path, c, group[c], len(ids))
            if c in required and (columns[c].codes < 0).any():
                raise SscellError(f"{path}: obs column {c} has missing values; fill or drop those cells")
    obs = pd.DataFrame(columns, index=pd.RangeIndex(len(ids)))
    if "dataset_id" not in obs:
        obs["dataset_id"] = pd.Categorical.from_codes(np.zeros(len(obs), np.int8), [path.stem])
    return obs, ids


def _read_split(path: Path, group: h5py.Group, column: str, n_cells: int) -> np.ndarray:
    """Split codes (index into SPLITS) of a user-given obs column of train/val/test values."""
    if column not in group:
        raise SscellError(f"{path}: obs has no split column {column!r}; add it or drop --split-column")
    values = _read_categorical(path, column, group[column], n_cells)
    unknown = sorted({str(v) for v in values.categories} - set(SPLITS))
    if unknown or (values.codes < 0).any():
        found = unknown[:3] if unknown else ["missing values"]
        raise SscellError(f"{path}: obs column {column!r} holds {', '.join(found)}; "
                          f"split values must be {', '.join(SPLITS)}")
    return np.asarray([SPLITS.index(str(v)) for v in values.categories], np.int8)[values.codes]


def keyed_by_gene(var: pd.DataFrame, gene_column: str | None, where: str, what: str) -> pd.DataFrame:
    """`var` indexed by its gene ids as strings: the index, or the column `gene_column`; refuses a
    missing column or a duplicated id (`where`: the input, `what`: which var, for the message)."""
    if gene_column is not None:
        if gene_column not in var:
            raise SscellError(f"{where}: {what} has no column {gene_column!r} (columns: {list(var.columns)})")
        var.index = pd.Index(var[gene_column].astype(str))
    var.index = var.index.astype(str)
    if var.index.has_duplicates:
        raise SscellError(f"{where}: gene id {var.index[var.index.duplicated()][0]!r} appears more than once "
                          f"in {what}{'.' + gene_column if gene_column else ''}; gene ids must be unique")
    return var


def open_input(path: str | os.PathLike, stack: contextlib.ExitStack, *, gene_column: str | None = None,
               round_counts: bool = False, split_column: str | None = None,
               required_obs: tuple[str, ...] = REQUIRED_OBS) -> H5adInput:
    """Open one .h5ad (closed with `stack`); check its obs and genes, not yet its counts.

    required_obs: obs columns it must hold, without missing values (the other kept columns are
    read when present, absent otherwise)."""
    path = Path(path)
    if not path.is_file():
        raise SscellError(f"{path}: no such input file")
    try:
        f = stack.enter_context(h5py.File(path, "r"))
        if "layers/counts" in f:
            key, source, var_key = "layers/counts", "layers['counts']", "var"
        elif "raw/X" in f:
            key, source, var_key = "raw/X", "raw.X", "raw/var"
        else:
            key, source, var_key = "X", "X", "var"
        if isinstance(f[key], h5py.Dataset):
            counts = f[key]
        else:
            counts = anndata.io.sparse_dataset(f[key])
            if counts.format != "csr":
                raise SscellError(f"{path}: counts in {source} are stored as {counts.format}; "
                                  "rewrite them as csr (e.g. adata.X = adata.X.tocsr()) and convert again")
        obs, ids = _read_obs(path, f["obs"], required_obs)
        given_split = _read_split(path, f["obs"], split_column, len(obs)) if split_column else None
        var = anndata.io.read_elem(f[var_key])
        found = modalities.find_any(f, path)
    except (OSError, KeyError, ValueError, RuntimeError) as e:
        raise SscellError(f"{path}: cannot read it as .h5ad, the file looks truncated or corrupt "
                          f"({_one_line(e)})") from None
    if len(obs) == 0 or counts.shape[0] == 0:
        raise SscellError(f"{path}: holds no cells; drop it from the inputs")
    if found is not None and found[1].shape[0] != len(obs):
        raise SscellError(f"{path}: obsm['{found[0]}'] has {found[1].shape[0]} rows for {len(obs)} "
                          "cells; the file is inconsistent")
    if counts.shape != (len(obs), len(var)):
        raise SscellError(f"{path}: counts in {source} have shape {counts.shape}, obs x {var_key} is "
                          f"{(len(obs), len(var))}; the file is inconsistent")
    var = keyed_by_gene(var, gene_column, str(path), var_key)
    key, values, names = found or (modalities.PROTEIN_KEY, None, None)
    return H5adInput(path, counts, source, obs, ids, var, round_counts, given_split=given_split,
                     modality=values, modality_names=names, modality_key=key)


def read_vocabulary(path: str | os.PathLike) -> pd.Index:
    """Gene ids, one per line, in order (blank lines ignored); or the genes of an sscell bundle, in its
    model's input order: the bundle's folder or its genes.csv (read and checked by `sscell.bundle`)."""
    bundle = Path(path) if is_bundle(path) else Path(path).parent if Path(path).name == GENES_FILE and \
        is_bundle(Path(path).parent) else None
    if bundle is not None:
        return pd.Index(read_bundle_genes(bundle).index.astype(str))
    try:
        genes = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    except OSError as e:
        raise SscellError(f"{path}: cannot read the gene vocabulary ({_one_line(e)})") from None
    vocabulary = pd.Index(genes)
    if vocabulary.empty:
        raise SscellError(f"{path}: the gene vocabulary is empty; give one gene id per line")
    if vocabulary.has_duplicates:
        raise SscellError(f"{path}: gene {vocabulary[vocabulary.duplicated()][0]!r} appears more than once "
                          "in the vocabulary")
    return vocabulary


def union_vocabulary(inputs: Iterable[H5adInput]) -> pd.Index:
    """The inputs' gene ids in first-seen order."""
    return pd.Index(dict.fromkeys(g for inp in inputs for g in inp.var.index))


def id_kind(genes: pd.Index) -> str:
    """'Ensembl ids' if most ids look like ENSG00000141510 (or another species' ENS*G), else 'symbols'."""
    looks_ensembl = np.mean([bool(_ENSEMBL.fullmatch(g)) for g in genes[:1000]]) if len(genes) else 0
    return "Ensembl ids" if looks_ensembl > 0.5 else "symbols"


def align(inp: H5adInput, vocabulary: pd.Index, what: str, wanted: str | None = None) -> None:
    """Map the input's genes onto `vocabulary`; `what` names where it came from and `wanted` its
    id kind (default: `id_kind(vocabulary)`), for errors."""
    kind, wanted = id_kind(inp.var.index), wanted or id_kind(vocabulary)
    if kind != wanted:
        fits = [c for c in inp.var.columns if id_kind(pd.Index(inp.var[c].astype(str))) == wanted]
        hint = (f"pass --gene-column={fits[0]} to match on that var column" if fits else
                f"give the var index (or a var column named with --gene-column) as {wanted}")
        raise SscellError(f"{inp.path}: gene ids look like {kind} (e.g. {inp.var.index[0]!r}) but {what} uses "
                          f"{wanted} (e.g. {vocabulary[0]!r}); {hint}")
    inp.columns = vocabulary.get_indexer(inp.var.index).astype(np.int32)  # int32 gene indices per nonzero
    inp.n_genes = len(vocabulary)
    if inp.dropped == len(inp.var):
        raise SscellError(f"{inp.path}: none of its {len(inp.var)} genes (e.g. {inp.var.index[0]!r}) is in "
                          f"{what} (e.g. {vocabulary[0]!r}); check the species and the gene id column")

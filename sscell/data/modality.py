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

CITE-seq and multiome files that keep RNA and the second modality as columns of one matrix are
rewritten into this layout by `python -m sscell.data.split_features` (sscell/data/split_features.py).

Peaks are stored like X: a CSR group (float32 counts, uint16/uint32 peak indices, its own
indptr) written by `sscell.data.store.CsrWriter`; the converter moves every cell's peaks through
its bucket shuffle as per-nonzero scratch, and the loader ships a batch's peaks as flat nonzeros
per data-parallel shard (`sscell.data.preprocess.PEAK_FIELDS`, laid out like genes / counts / indptr), densified in jit
by the loss (`sscell.losses.crossmodal`).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import anndata
import h5py
import numpy as np
import scipy.sparse as sp
import tensorstore as ts

from sscell.data.store import CsrRows, Store, kvstore_spec, names_key, open_array, tensorstore_context
from sscell.errors import SscellError

PROTEIN_KEY = "protein_counts"
ATAC_KEY = "atac_counts"
MODALITY_KEYS = (PROTEIN_KEY, ATAC_KEY)
SPARSE_KEYS = (ATAC_KEY,)  # modalities stored as CSR


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
        range order (e.g. `sscell.data.store.runs(rows)` for rows in any order); all reads are
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
    root = store.root  # the store's open zarr group (local or remote)
    return "obsm" in root and key in root["obsm"]


def open_modality(store: Store, key: str = PROTEIN_KEY) -> ModalityReader | SparseModalityReader:
    """The reader of the store's obsm[key] (sparse for a CSR group); refuses a store without it in one line."""
    if not has_modality(store, key):
        raise SscellError(f"{store.path} has no obsm['{key}'] (a second modality per cell); convert .h5ad inputs "
                          f"holding obsm['{key}'] with names in uns['{names_key(key)}'], or drop data.modality")
    names = tuple(str(n) for n in anndata.io.read_elem(store.root["uns"][names_key(key)]))
    ctx = tensorstore_context()
    if store.root["obsm"][key].attrs.get("encoding-type") == "csr_matrix":
        indptr = open_array(kvstore_spec(store.path, f"obsm/{key}/indptr"), ctx).read().result()
        return SparseModalityReader(key, names, store.path, store.n_cells, indptr,
                                    open_array(kvstore_spec(store.path, f"obsm/{key}/data"), ctx),
                                    open_array(kvstore_spec(store.path, f"obsm/{key}/indices"), ctx))
    return ModalityReader(key, names, open_array(kvstore_spec(store.path, f"obsm/{key}"), ctx))

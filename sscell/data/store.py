"""sscell's on-disk count-matrix store: an AnnData zarr v3 group whose CSR X is read with tensorstore.

Layout (`anndata.read_zarr(STORE)` opens it; the loader reads cells through `Store`)::

    STORE/zarr.json    group: encoding-type "anndata" + attribute "sscell" (format_version, provenance)
    STORE/X/           group: encoding-type "csr_matrix", shape [n_cells, n_genes]
    STORE/X/data       counts, uint16 if every count < 65536 else uint32
    STORE/X/indices    gene index, uint16 if n_genes <= 65536 else uint32
    STORE/X/indptr     int64, n_cells + 1 (held in RAM by `Store`)
    STORE/obs, /var    written by anndata, so dtypes and categoricals round trip (obs/_index, the
                       cell ids, in chunks of ID_CHUNK written as the rows arrive)

    STORE/varm/measured  bool DataFrame, genes x datasets: which genes each dataset_id measured
    STORE/obsm/protein_counts, STORE/uns/protein_counts_names   optional second modality: float32
                       cells x proteins in MODALITY_CHUNK_CELLS-row chunks, and its names
                       (sscell.data.modality)
    STORE/obsm/atac_counts/{data,indices,indptr}, STORE/uns/atac_counts_names   or a sparse one
                       (ATAC peaks): a csr_matrix group laid out like X (float32 counts, peak
                       indices, its own indptr), and the peaks' names

The sscell attribute is written last, after every array, so a half-written directory is never
accepted by `open_store`.

Rows are grouped by obs["split"] (train, val, test) and shuffled within each split at write time,
so a split is one contiguous row range and any contiguous block of it is a random sample.

Reading (`open_store`): indptr, the label columns of obs (as category codes) and var stay in
RAM; counts are read on demand with tensorstore, the full obs with `Store.read_obs()`. A store
copied to a bucket (`gsutil -m cp -r STORE gs://BUCKET/PATH`, `aws s3 sync STORE
s3://BUCKET/PATH`) opens from its URL: tensorstore's gcs / s3 drivers read X, zarr-python
through gcsfs / s3fs (`pip install 'sscell[remote]'`) reads obs, var and varm.

Chunking of data/indices/indptr (1-D, zarr v3 `sharding_indexed`, blosc lz4 + byte shuffle per
inner chunk, all readable by zarr-python too): inner chunks hold about `chunk_cells` cells' worth
of nonzeros (`convert --chunk-cells`, default CELLS_PER_CHUNK = 32, recorded in the attrs; a
power of two between 2**12 and 2**20 elements, chosen from the mean nonzeros per cell, so 23-45
cells at 32): a loader block of 64 cells (the default) decodes ~1.5x the cells it needs (~3.5x
with 128-cell chunks, the layout before 2026-12-05, which reads ~1.4x slower a core:
docs/performance.md); shards hold
2**24 elements (32 MiB of uint16 before compression), so 20 M cells of ~2,000 nonzeros make a
few thousand shard files per array rather than millions of chunk files; indptr's shards hold
INDPTR_SHARD = 2**20 entries, each written once as the rows arrive.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import scipy.sparse
import tensorstore as ts
import zarr

from sscell.errors import SscellError

FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
SHARD_ELEMENTS = 2**24
INDPTR_SHARD = 2**20  # indptr entries per shard: written whole as rows arrive (8 MiB)
CELLS_PER_CHUNK = 32  # cells' worth of nonzeros per inner chunk of X (convert --chunk-cells)
ID_CHUNK = 2**16  # cell ids per chunk of obs/_index
MODALITY_CHUNK_CELLS = 256  # rows per chunk of an obsm modality (a loader block reads one or two)
_HOW_TO_CREATE = "create one with python -m sscell.data.convert"
# obs columns held in RAM by `Store.labels` (as category codes), when the store has them
LABEL_OBS_COLUMNS = ("split", "cell_type", "cell_type_ontology_term_id", "donor_id", "dataset_id")
REMOTE = {"gs": ("gcs", "gcsfs"), "s3": ("s3", "s3fs")}  # URL scheme: tensorstore kvstore driver, fsspec package


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity: taskset, a cgroup cpuset), else all."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def tensorstore_context() -> ts.Context:
    """Threads for blosc decode on every core this process may use, many file reads in flight;
    no chunk cache."""
    return ts.Context({
        "data_copy_concurrency": {"limit": available_cores()},
        "file_io_concurrency": {"limit": 64},
    })


def inner_chunk_elements(nnz: int, n_cells: int, chunk_cells: int = CELLS_PER_CHUNK) -> int:
    """Inner chunk size: about `chunk_cells` cells' worth of nonzeros, a power of two."""
    per_cell = max(nnz / max(n_cells, 1), 1.0)
    return 2 ** int(np.clip(round(np.log2(chunk_cells * per_cell)), 12, 20))


def count_dtype(max_count: int) -> np.dtype:
    """Store dtype of counts whose largest value is `max_count`."""
    if max_count >= 2**32:
        raise SscellError(f"a count of {max_count} does not fit the store's uint32 counts; check the inputs")
    return np.dtype(np.uint16 if max_count < 2**16 else np.uint32)


def index_dtype(n_genes: int) -> np.dtype:
    """Store dtype of gene indices for `n_genes` genes."""
    return np.dtype(np.uint16 if n_genes <= 2**16 else np.uint32)


def names_key(key: str) -> str:
    """The uns entry naming the columns of obsm[key] (a modality: sscell.data.modality)."""
    return f"{key}_names"


# Blosc compressors (with byte shuffle) of X's data / indices / indptr, chosen at conversion
# (`convert --codec`, recorded in the store's attrs as "codec"): lz4 decodes fastest, zstd
# stores fewer bytes a cell (docs/performance.md measures both).
CODECS = {"lz4": {"cname": "lz4", "clevel": 5}, "zstd": {"cname": "zstd", "clevel": 3}}


def _create_array(path: Path, size: int, dtype: np.dtype, chunks: tuple[int, int],
                  ctx: ts.Context, codec: str = "lz4") -> ts.TensorStore:
    """A 1-D zarr v3 array of `size` elements, sharded as chunks = (inner chunk, shard),
    compressed with `CODECS[codec]`."""
    dtype = np.dtype(dtype)
    inner = [
        {"name": "bytes", "configuration": {"endian": "little"}},
        {"name": "blosc", "configuration": {
            **CODECS[codec], "shuffle": "shuffle", "typesize": dtype.itemsize, "blocksize": 0}},
    ]
    spec = {
        "driver": "zarr3",
        "kvstore": {"driver": "file", "path": str(path)},
        "metadata": {
            "shape": [size],
            "data_type": dtype.name,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [chunks[1]]}},
            "codecs": [{"name": "sharding_indexed", "configuration": {"chunk_shape": [chunks[0]], "codecs": inner}}],
            "fill_value": 0,
        },
        "create": True,
    }
    return ts.open(spec, context=ctx).result()


def resolved_location(path: str | os.PathLike) -> str:
    """A store's location made comparable and portable: URLs (gs://, s3://) as given, local
    paths absolute with links resolved."""
    path = str(path)
    return path if "://" in path else os.path.realpath(path)


def kvstore_spec(location: str, key: str) -> dict:
    """The tensorstore kvstore of `key` (e.g. "X/data") in the store at `location`: a local path,
    gs://BUCKET/PATH or s3://BUCKET/PATH.

    Credentials come from the environment as for gsutil / the aws CLI (Application Default
    Credentials; AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or ~/.aws/credentials); an s3://
    store on an S3-compatible server is reached through AWS_ENDPOINT_URL.
    """
    scheme, remote, rest = location.partition("://")
    if not remote:
        return {"driver": "file", "path": str(Path(location, key))}
    bucket, _, prefix = rest.partition("/")
    spec = {"driver": REMOTE[scheme][0], "bucket": bucket, "path": "/".join(filter(None, (prefix.strip("/"), key))) + "/"}
    if scheme == "s3" and os.environ.get("AWS_ENDPOINT_URL"):
        spec["endpoint"] = os.environ["AWS_ENDPOINT_URL"]
    return spec


def open_array(kvstore: dict, ctx: ts.Context) -> ts.TensorStore:
    """The zarr v3 array at `kvstore` (`kvstore_spec`), opened for reading."""
    return ts.open({"driver": "zarr3", "kvstore": kvstore}, read=True, context=ctx).result()


class CsrWriter:
    """Writes the CSR group `name` of `parent` (on disk at `path`) of `n_rows` rows holding `nnz`
    nonzeros in all: data/indices are created at that size and filled by rows appended in order,
    in shard-aligned pieces (each shard written once; the tail by `close`), and indptr from the
    rows' lengths in pieces of INDPTR_SHARD entries, so no array of the whole matrix is held.
    At most one piece of each is being written while the caller prepares the next block."""

    def __init__(self, parent: zarr.Group, name: str, path: Path, n_rows: int, nnz: int, n_columns: int,
                 data_dtype: np.dtype, shard_elements: int, ctx: ts.Context, codec: str = "lz4",
                 chunk_cells: int = CELLS_PER_CHUNK):
        self.n_rows, self.nnz, self.shard_elements = n_rows, nnz, shard_elements
        parent.create_group(name).attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0",
                                                "shape": [n_rows, n_columns]})
        chunks = (min(inner_chunk_elements(nnz, n_rows, chunk_cells), shard_elements), shard_elements)
        self._data = _create_array(path / "data", nnz, data_dtype, chunks, ctx, codec)
        self._indices = _create_array(path / "indices", nnz, index_dtype(n_columns), chunks, ctx, codec)
        self._indptr_shard = min(INDPTR_SHARD, shard_elements)
        self._indptr = _create_array(path / "indptr", n_rows + 1, np.int64,
                                     (min(chunks[0], self._indptr_shard), self._indptr_shard), ctx, codec)
        self.data_dtype, self.indices_dtype = np.dtype(data_dtype), index_dtype(n_columns)
        self.rows = 0         # rows appended so far
        self._nonzeros = 0    # nonzeros appended so far
        self._flushed = 0     # nonzeros written to disk so far
        self._buffer: list[tuple[np.ndarray, np.ndarray]] = []
        self._pending: list[ts.WriteFutures] = []
        self._indptr_buffer, self._indptr_flushed = [np.zeros(1, np.int64)], 0  # entries pending / written
        self._indptr_pending: ts.WriteFutures | None = None

    def append(self, block: scipy.sparse.csr_matrix) -> None:
        """Append the next rows (csr) after those already appended."""
        if self.rows + block.shape[0] > self.n_rows or self._nonzeros + block.nnz > self.nnz:
            raise ValueError(f"{self.rows + block.shape[0]} rows with {self._nonzeros + block.nnz} nonzeros appended "
                             f"to a matrix of {self.n_rows} rows with {self.nnz}")
        self._buffer.append((block.data.astype(self.data_dtype, copy=False),  # buffered at store width
                             block.indices.astype(self.indices_dtype, copy=False)))
        self._indptr_buffer.append(np.asarray(block.indptr[1:], np.int64) - block.indptr[0] + self._nonzeros)
        self.rows += block.shape[0]
        self._nonzeros += block.nnz
        buffered = self._nonzeros - self._flushed
        if buffered >= self.shard_elements:
            self._flush(buffered // self.shard_elements * self.shard_elements)
        pending = self.rows + 1 - self._indptr_flushed
        if pending >= self._indptr_shard:
            self._flush_indptr(pending // self._indptr_shard * self._indptr_shard)

    def _flush(self, n: int) -> None:
        data = np.concatenate([d for d, _ in self._buffer])
        indices = np.concatenate([i for _, i in self._buffer])
        self._buffer = [(data[n:].copy(), indices[n:].copy())]
        for pending in self._pending:
            pending.result()
        lo, hi = self._flushed, self._flushed + n
        self._pending = [  # data and indices are never modified again: tensorstore need not copy them
            self._data[lo:hi].write(data[:n].astype(self._data.dtype.numpy_dtype, copy=False),
                                    can_reference_source_data_indefinitely=True),
            self._indices[lo:hi].write(indices[:n].astype(self._indices.dtype.numpy_dtype, copy=False),
                                       can_reference_source_data_indefinitely=True),
        ]
        self._flushed = hi

    def _flush_indptr(self, n: int) -> None:
        entries = np.concatenate(self._indptr_buffer)
        self._indptr_buffer = [entries[n:].copy()]
        if self._indptr_pending is not None:
            self._indptr_pending.result()
        lo = self._indptr_flushed
        self._indptr_pending = self._indptr[lo:lo + n].write(entries[:n], can_reference_source_data_indefinitely=True)
        self._indptr_flushed = lo + n

    def close(self) -> None:
        """Write the remaining nonzeros and indptr entries and wait for every write."""
        if (self.rows, self._nonzeros) != (self.n_rows, self.nnz):
            raise ValueError(f"{self.rows} rows with {self._nonzeros} nonzeros appended to a matrix of "
                             f"{self.n_rows} rows with {self.nnz}")
        if self._flushed < self.nnz:
            self._flush(self.nnz - self._flushed)
        if self._indptr_flushed < self.n_rows + 1:
            self._flush_indptr(self.n_rows + 1 - self._indptr_flushed)
        for pending in [*self._pending, self._indptr_pending]:
            if pending is not None:
                pending.result()


class StoreWriter:
    """Writes a new store at `path`: `n_cells` X rows holding `nnz` nonzeros (and their cell ids)
    appended in order, then obs and var.

    X is written by a `CsrWriter`, which needs the totals up front but no row layout.
    `data_dtype` must hold every count; blocks may carry any dtypes that cast exactly.
    Cell ids given with the rows go to obs/_index in chunk-aligned pieces, so they are never all
    in memory; without them, `close` takes them from obs.index. `modality` = (key, names) adds
    obsm[key] (float32, one column per name), whose rows come with every `append`; (key, names,
    its nonzeros in all) adds a sparse one (a CSR group like X with float32 counts), whose rows come as csr.
    """

    def __init__(self, path: str | os.PathLike, n_cells: int, nnz: int, n_genes: int,
                 data_dtype: np.dtype, attrs: dict, shard_elements: int = SHARD_ELEMENTS,
                 modality: tuple[str, Sequence[str]] | tuple[str, Sequence[str], int] | None = None):
        self.path = Path(path)
        root = zarr.open_group(self.path, mode="w-", zarr_format=3)
        root.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
        self.attrs = {"format_version": FORMAT_VERSION, **attrs}
        ctx = tensorstore_context()
        codec = self.attrs.setdefault("codec", "lz4")
        chunk_cells = self.attrs.setdefault("chunk_cells", CELLS_PER_CHUNK)
        if codec not in CODECS:
            raise SscellError(f"codec '{codec}' is not one of {', '.join(CODECS)}; choose one")
        self._x = CsrWriter(root, "X", self.path / "X", n_cells, nnz, n_genes, data_dtype, shard_elements, ctx, codec,
                            chunk_cells)
        self.n_cells, self.n_genes = n_cells, n_genes
        self.data_dtype, self.indices_dtype = self._x.data_dtype, self._x.indices_dtype
        self._ids = root.create_group("obs").create_array(
            "_index", shape=(n_cells,), dtype=str, chunks=(max(1, min(n_cells, ID_CHUNK)),),
            compressors=zarr.codecs.ZstdCodec(), attributes={"encoding-type": "string-array",
                                                            "encoding-version": "0.2.0"})
        self._id_buffer: list[np.ndarray] = []
        self._ids_written = 0
        self._with_ids: bool | None = None  # whether append() gets the ids
        self._modality, self._modality_names = None, modality
        if modality is not None:
            obsm = root.create_group("obsm", attributes={"encoding-type": "dict", "encoding-version": "0.1.0"})
        if modality is not None and len(modality) == 3:
            self._modality = CsrWriter(obsm, modality[0], self.path / "obsm" / modality[0], n_cells, modality[2],
                                       len(modality[1]), np.dtype(np.float32), shard_elements, ctx, codec,
                                       chunk_cells)
        elif modality is not None:
            self._modality = obsm.create_array(
                modality[0], shape=(n_cells, len(modality[1])), dtype=np.float32,
                chunks=(max(1, min(n_cells, MODALITY_CHUNK_CELLS)), len(modality[1])),
                compressors=zarr.codecs.ZstdCodec(), attributes={"encoding-type": "array", "encoding-version": "0.2.0"})

    @property
    def _rows(self) -> int:
        return self._x.rows

    def append(self, block: scipy.sparse.csr_matrix, ids: np.ndarray | None = None,
               modality: np.ndarray | scipy.sparse.csr_matrix | None = None) -> None:
        """Append the next block of rows (csr, n_genes columns) after those already appended, with
        their cell ids (str), if given; give them with every block or with none. `modality`: the
        rows' obsm values (rows x features; csr for a sparse one) when the store has a modality."""
        start, stop = self._rows, self._rows + block.shape[0]
        if self._with_ids not in (None, ids is not None) or (ids is not None and len(ids) != block.shape[0]):
            raise ValueError("give one cell id per row with every block, or with none")
        if (self._modality is None) != (modality is None) or (
                modality is not None and modality.shape != (block.shape[0], len(self._modality_names[1]))):
            raise ValueError("give the modality's rows (rows x features) with every block when the store has one, "
                             "and none otherwise")
        self._x.append(block)
        if isinstance(self._modality, CsrWriter):
            self._modality.append(scipy.sparse.csr_matrix(modality))
        elif modality is not None:
            self._modality[start:stop] = modality
        self._with_ids = ids is not None
        if self._with_ids:
            self._id_buffer.append(np.asarray(ids, dtype=str))
            if stop - self._ids_written >= self._ids.chunks[0]:
                self._write_ids((stop - self._ids_written) // self._ids.chunks[0] * self._ids.chunks[0])

    def _write_ids(self, n: int) -> None:
        ids = np.concatenate(self._id_buffer)
        self._ids[self._ids_written:self._ids_written + n] = ids[:n]
        self._id_buffer = [ids[n:]]
        self._ids_written += n

    def close(self, obs: pd.DataFrame, var: pd.DataFrame, varm: dict[str, pd.DataFrame] | None = None) -> None:
        """Write the remaining nonzeros, obs, var and varm (obs rows in store order; its index is
        ignored if the ids came with the rows), then the sscell attribute."""
        if self._rows != self.n_cells:
            raise ValueError(f"{self._rows} rows appended to a store of {self.n_cells}")
        self._x.close()
        if isinstance(self._modality, CsrWriter):
            self._modality.close()
        if self._with_ids:
            self._write_ids(self._rows - self._ids_written)
        elif self._rows:
            self._ids[:] = obs.index.astype(str).to_numpy()
        root = zarr.open_group(self.path, mode="r+", zarr_format=3)
        # obs/var columns are small: unsharded; var may hold pandas string columns read from a file
        # anndata 0.13 wrote, which 0.12 writes only when allowed
        with anndata.settings.override(auto_shard_zarr_v3=False, allow_write_nullable_strings=True):
            for name in obs.columns:  # anndata's dataframe layout, around the _index written above
                anndata.io.write_elem(root["obs"], name, obs[name].values)
            root["obs"].attrs.update({"_index": "_index", "column-order": list(obs.columns),
                                      "encoding-type": "dataframe", "encoding-version": "0.2.0"})
            anndata.io.write_elem(root, "var", var)
            if varm:
                anndata.io.write_elem(root, "varm", varm)
            if self._modality_names is not None:
                key, names = self._modality_names[:2]
                anndata.io.write_elem(root, "uns", {names_key(key): np.asarray(names, dtype=object)})
        root.attrs["sscell"] = self.attrs


def runs(rows: np.ndarray, cut_every: int = 0) -> list[tuple[int, int]]:
    """[start, stop) ranges of the runs of consecutive values in `rows`, in order (what
    `CsrRows.read_nonzeros` and the modality readers take); with `cut_every`, a run also ends
    at every multiple of `cut_every` positions of `rows` (so no run spans two shards)."""
    step = np.diff(rows) != 1
    if cut_every:
        step[cut_every - 1::cut_every] = True
    breaks = np.flatnonzero(step) + 1
    firsts, lasts = rows[np.r_[0, breaks]], rows[np.r_[breaks, len(rows)] - 1]
    return [(int(a), int(b) + 1) for a, b in zip(firsts, lasts)] if len(rows) else []


class CsrRows:
    """Rows of a CSR matrix on disk read with tensorstore: `indptr` in RAM, `_data` / `_indices`
    opened arrays, `n_cells` rows of `n_columns` columns, at `path` (for messages)."""

    path: str
    n_cells: int
    indptr: np.ndarray
    _data: ts.TensorStore
    _indices: ts.TensorStore
    n_columns: int  # a subclass's property (a store's genes, a modality's peaks)

    @property
    def data_dtype(self) -> np.dtype:
        """The stored values' dtype (e.g. uint16 or uint32 counts)."""
        return np.dtype(self._data.dtype.numpy_dtype)

    @property
    def indices_dtype(self) -> np.dtype:
        """The stored column (gene) indices' dtype (uint16 or uint32)."""
        return np.dtype(self._indices.dtype.numpy_dtype)

    @property
    def decode_threads(self) -> int:
        """The threads tensorstore decodes chunks on (its context's data_copy_concurrency)."""
        return self._data.spec(retain_context=True).to_json()["context"]["data_copy_concurrency"]["limit"]

    def _nonzero_bounds(self, ranges: Sequence[tuple[int, int]]) -> np.ndarray:
        """(ranges, 2) int64: where each [start, stop) range of rows begins and ends in the nonzeros."""
        rows = np.asarray(ranges, np.int64).reshape(-1, 2)
        outside = (rows[:, 0] < 0) | (rows[:, 0] > rows[:, 1]) | (rows[:, 1] > self.n_cells)
        if outside.any():
            start, stop = rows[np.argmax(outside)]
            raise SscellError(f"rows [{start}, {stop}) are outside the store's {self.n_cells} cells ({self.path})")
        return self.indptr[rows]

    def _read(self, bounds: np.ndarray) -> list[tuple[ts.Future, ts.Future]]:
        """(values, column indices) read futures of each [lo, hi) of nonzeros, all issued at once."""
        return [(self._data[lo:hi].read(), self._indices[lo:hi].read()) for lo, hi in bounds.tolist()]

    def read_blocks(self, ranges: Sequence[tuple[int, int]]) -> list[scipy.sparse.csr_matrix]:
        """One csr per [start, stop) range; all reads are issued before any is awaited."""
        return [
            scipy.sparse.csr_matrix((data.result(), indices.result(), self.indptr[start:stop + 1] - self.indptr[start]),
                                    shape=(stop - start, self.n_columns))
            for (start, stop), (data, indices) in zip(ranges, self._read(self._nonzero_bounds(ranges)))
        ]

    def read_nonzeros(self, ranges: Sequence[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
        """(values, column indices) of the rows of every [start, stop) range, concatenated in range
        order, in the stored dtypes (row lengths: `indptr`); all reads are issued before any is awaited."""
        bounds = self._nonzero_bounds(ranges)
        sizes = bounds[:, 1] - bounds[:, 0]
        values, indices = np.empty(sizes.sum(), self.data_dtype), np.empty(sizes.sum(), self.indices_dtype)
        self.read_nonzeros_into(ranges, np.cumsum(sizes) - sizes, values, indices)
        return values, indices

    def read_nonzeros_into(self, ranges: Sequence[tuple[int, int]], offsets: np.ndarray, values: np.ndarray,
                           indices: np.ndarray) -> None:
        """Copy the (values, column indices) of the rows of range i to values / indices[offsets[i]:]
        (1-D arrays of the stored dtypes), each as soon as its read is done; all reads are issued
        before any is awaited. One copy from tensorstore's results to their place: a concatenated
        intermediate would cost another pass over the batch, in freshly mapped pages."""
        bounds = self._nonzero_bounds(ranges)
        for (lo, hi), offset, futures in zip(bounds.tolist(), np.asarray(offsets).tolist(), self._read(bounds)):
            for future, out in zip(futures, (values, indices)):
                out[offset:offset + hi - lo] = future.result()


@dataclasses.dataclass(eq=False)
class Store(CsrRows):
    """An open store: indptr, label columns and var in RAM; counts and the full obs read on demand.

    `labels` holds the obs columns of LABEL_OBS_COLUMNS the store has (split, cell type and its
    ontology id, donor, dataset) as categoricals with a RangeIndex: their integer codes and
    categories only, a few bytes a cell and no per-cell strings, so host memory grows by
    ~15 bytes a cell with the store (with `indptr`). `read_obs()` reads the full obs (every
    column, cell ids as index) from the store when asked.
    `datasets` are the obs dataset_id categories (the order of the loader's `dataset` codes);
    `measured[d, g]` says whether dataset `datasets[d]` measured gene `g` (unmeasured genes
    read as zeros but are unknown).
    """

    path: str
    n_cells: int
    n_genes: int
    indptr: np.ndarray = dataclasses.field(repr=False)
    labels: pd.DataFrame = dataclasses.field(repr=False)
    var: pd.DataFrame = dataclasses.field(repr=False)
    datasets: list[str] = dataclasses.field(repr=False)
    measured: np.ndarray = dataclasses.field(repr=False)
    root: zarr.Group = dataclasses.field(repr=False)  # the open zarr group (local or remote)
    _data: ts.TensorStore = dataclasses.field(repr=False)
    _indices: ts.TensorStore = dataclasses.field(repr=False)

    @property
    def n_columns(self) -> int:
        """The genes (X's columns)."""
        return self.n_genes

    def read_obs(self) -> pd.DataFrame:
        """The full obs (every column, the cell ids as index), read from the store now."""
        return anndata.io.read_elem(self.root["obs"])

    def split_range(self, split: str) -> tuple[int, int]:
        """Contiguous [start, stop) rows of `split` ("train", "val" or "test")."""
        if split not in SPLITS:
            raise SscellError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
        codes = self.labels["split"].cat.codes.to_numpy()
        k = SPLITS.index(split)
        return int(np.searchsorted(codes, k, "left")), int(np.searchsorted(codes, k, "right"))

    def read_rows(self, start: int, stop: int) -> scipy.sparse.csr_matrix:
        """Counts of rows [start, stop) as csr (data in the stored integer dtype)."""
        return self.read_blocks([(start, stop)])[0]


def _read_labels(obs: zarr.Group) -> pd.DataFrame:
    """The obs columns of LABEL_OBS_COLUMNS present in `obs`, as categoricals (codes and categories only)."""
    columns = {}
    for name in LABEL_OBS_COLUMNS:
        if name in obs:
            values = anndata.io.read_elem(obs[name])
            columns[name] = values if isinstance(values, pd.Categorical) else pd.Categorical(values)
    return pd.DataFrame(columns)


def open_store(path: str | os.PathLike) -> Store:
    """Open a store written by `sscell.data.convert`: a local path, or a gs://BUCKET/PATH or
    s3://BUCKET/PATH URL of a store copied there (`pip install 'sscell[remote]'`; see `kvstore_spec`)."""
    scheme, remote, _ = str(path).partition("://")
    location = str(path) if remote else str(Path(path))

    def not_a_store(why: str) -> SscellError:
        return SscellError(f"{location} is not an sscell store: {why}; {_HOW_TO_CREATE}")

    if remote and scheme not in REMOTE:
        raise SscellError(f"{location}: stores are read from a local path, gs://BUCKET/PATH or s3://BUCKET/PATH, "
                          f"not {scheme}://")
    if not remote and not Path(location).exists():
        raise not_a_store("it does not exist")
    try:
        root = zarr.open_group(location, mode="r", zarr_format=3)
    except ImportError as error:  # fsspec's backend for the scheme is missing
        raise SscellError(f"reading {scheme}:// stores needs {REMOTE[scheme][1]}: pip install 'sscell[remote]'"
                          ) from error
    except FileNotFoundError:  # zarr's GroupNotFoundError too
        raise not_a_store("no zarr.json") from None
    except OSError as error:  # e.g. a bucket that does not exist or refuses the credentials
        raise SscellError(f"cannot read {location}: {error}; check the URL and the credentials") from None
    version = root.attrs.get("sscell", {}).get("format_version")
    if version is None:
        raise not_a_store("its zarr.json has no sscell format_version attribute")
    if version != FORMAT_VERSION:
        raise not_a_store(f"sscell format_version is {version}, this sscell reads {FORMAT_VERSION}")
    if "X" not in root or "indptr" not in root["X"]:
        raise not_a_store("no X/indptr")
    labels = _read_labels(root["obs"])
    split = labels.get("split")
    if split is None or tuple(split.cat.categories) != SPLITS or np.any(np.diff(split.cat.codes.to_numpy()) < 0):
        raise not_a_store(f"obs['split'] is not a categorical {list(SPLITS)} with rows grouped in that order")
    ctx = tensorstore_context()
    indptr = open_array(kvstore_spec(location, "X/indptr"), ctx).read().result()
    n_cells, n_genes = root["X"].attrs["shape"]
    datasets = [str(d) for d in labels["dataset_id"].cat.categories] if "dataset_id" in labels else []
    if "varm" in root and "measured" in root["varm"]:
        mask = anndata.io.read_elem(root["varm"]["measured"])
        if not set(datasets) <= set(mask.columns):
            raise not_a_store("varm['measured'] lacks a column for some obs dataset_id")
        measured = mask[datasets].to_numpy(bool).T.copy()
    else:  # written without a mask (e.g. by StoreWriter directly): every gene measured
        measured = np.ones((len(datasets), n_genes), bool)
    return Store(path=location, n_cells=n_cells, n_genes=n_genes, indptr=indptr, labels=labels,
                 var=anndata.io.read_elem(root["var"]), datasets=datasets, measured=measured, root=root,
                 _data=open_array(kvstore_spec(location, "X/data"), ctx),
                 _indices=open_array(kvstore_spec(location, "X/indices"), ctx))

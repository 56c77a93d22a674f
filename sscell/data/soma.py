"""A SOMA experiment (the CELLxGENE Census, or one written by tiledbsoma.io) as a converter input.

`open_soma_input` opens the experiment, selects cells with a TileDB-SOMA value filter over obs
(and an optional per-cell-type size rule), and returns a `SomaInput`: the `H5adInput` interface
(n_cells, obs, read(start, stop) as csr over the vocabulary, read_ids, measured(dataset)) over
the selected cells in ascending soma_joinid order, so sscell.data.convert's passes, checks and
split policies run unchanged. Held in memory: 8 bytes a selected cell (its soma_joinid) plus the
kept obs columns as categorical codes, var, and the presence matrix (datasets x genes, sparse).

Counts come from X[layer] (Census: "raw"), read a row block at a time by soma_joinid. Gene ids:
var `feature_id` (the Census) or `var_id` (tiledbsoma.io's default), or `gene_column`.
Measured genes: a Census-shaped collection (census_data/<organism>, census_info/datasets) holds
ms[measurement]["feature_dataset_presence_matrix"], datasets (census_info/datasets soma_joinid)
x genes (var soma_joinid); a gene a dataset did not measure counts as unmeasured in the store.
Cell ids: obs `obs_id` when present (tiledbsoma.io), else the soma_joinid (the Census has no other).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse
from pandas.api.types import union_categoricals

from sscell.data.h5columns import categorical_of_strings
from sscell.data.inputs import OPTIONAL_OBS, REQUIRED_OBS, H5adInput, keyed_by_gene
from sscell.errors import SscellError

CENSUS_OBS = ("suspension_type", "tissue_general", "disease", "sex", "development_stage",
              "assay_ontology_term_id", "tissue_ontology_term_id", "is_primary_data")  # kept too, when present
PRESENCE = "feature_dataset_presence_matrix"
GENE_ID_COLUMNS = ("feature_id", "var_id")  # the Census's, tiledbsoma.io's


def _soma():
    try:
        import tiledbsoma
    except ImportError:
        raise SscellError("reading SOMA experiments needs tiledbsoma: pip install 'sscell[census]'") from None
    return tiledbsoma


def _soma_errors() -> tuple[type[Exception], ...]:
    return (_soma().SOMAError, OSError, KeyError, ValueError, RuntimeError)


def organism_key(organism: str) -> str:
    """The Census's name of an organism's experiment: "Homo sapiens" -> "homo_sapiens"."""
    return organism.strip().lower().replace(" ", "_")


def is_uri(text: str) -> bool:
    """Whether --uri names a location (a path or URL) rather than a Census version."""
    return "://" in text or os.sep in text or Path(text).exists()


def open_experiment(uri: str, organism: str, stack: contextlib.ExitStack):
    """(experiment, census_info/datasets as a DataFrame or None) of `uri`: a Census release
    ("2023-05-15", "stable"; via cellxgene_census), a Census-shaped collection, or an experiment."""
    soma = _soma()
    if not is_uri(uri):
        try:
            import cellxgene_census
        except ImportError:
            raise SscellError(f"opening Census release {uri!r} needs cellxgene-census: pip install "
                              "'sscell[census]' (or pass --uri=PATH of a local SOMA experiment)") from None
        try:
            root = stack.enter_context(cellxgene_census.open_soma(census_version=uri))
        except (ValueError, OSError, RuntimeError) as e:
            raise SscellError(f"cannot open CELLxGENE Census release {uri!r} ({_one_line(e)}); check the "
                              "version (cellxgene_census.get_census_version_directory()) and the network") from None
    else:
        try:
            root = stack.enter_context(soma.open(uri if "://" in uri else str(Path(uri).absolute())))  # TileDB resolves
            # a relative path against a cwd it may have cached
        except _soma_errors() as e:
            raise SscellError(f"{uri}: cannot open it as a SOMA experiment or Census ({_one_line(e)})") from None
    if isinstance(root, soma.Experiment):
        return root, None
    if "census_data" not in root:
        raise SscellError(f"{uri}: a SOMA {type(root).__name__} without census_data; give an Experiment "
                          "or a Census-shaped collection (census_data/<organism>, census_info/datasets)")
    key = organism_key(organism)
    if key not in root["census_data"]:
        raise SscellError(f"{uri}: no organism {organism!r} (census_data holds "
                          f"{', '.join(sorted(root['census_data'].keys()))}); pass --organism")
    datasets = None
    if "census_info" in root and "datasets" in root["census_info"]:
        datasets = root["census_info"]["datasets"].read(column_names=["soma_joinid", "dataset_id"]).concat().to_pandas()
    return root["census_data"][key], datasets


def _one_line(error: Exception) -> str:
    return " ".join(f"{type(error).__name__}: {error}".split())


@dataclasses.dataclass(eq=False)
class _SomaRows:
    """X[layer] rows of the selected cells, sliced by position like an h5py counts matrix."""

    array: object          # tiledbsoma.SparseNDArray
    joinids: np.ndarray    # obs soma_joinid of each selected cell, ascending
    var_joinids: np.ndarray  # var soma_joinid of each var row
    where: str
    fetch: np.ndarray | None = None  # var rows to read (None: all); set once genes are aligned

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.joinids), len(self.var_joinids)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.array.schema.field("soma_data").type.to_pandas_dtype())

    def __getitem__(self, rows: slice) -> scipy.sparse.csr_matrix:
        cells = self.joinids[rows]
        if len(cells) and cells[-1] - cells[0] == len(cells) - 1:
            cell_coords = slice(int(cells[0]), int(cells[-1]))  # contiguous: one range query (inclusive)
        else:
            cell_coords = cells
        gene_coords = slice(None) if self.fetch is None else self.var_joinids[self.fetch]
        try:
            table = self.array.read((cell_coords, gene_coords)).tables().concat()
        except _soma_errors() as e:
            raise SscellError(f"{self.where}: cannot read X rows {rows.start}-{rows.stop - 1} "
                              f"({_one_line(e)})") from None
        row = np.searchsorted(cells, table["soma_dim_0"].to_numpy())
        column = np.searchsorted(self.var_joinids, table["soma_dim_1"].to_numpy())
        return scipy.sparse.csr_matrix((table["soma_data"].to_numpy(), (row, column)), shape=(len(cells), self.shape[1]))


@dataclasses.dataclass(eq=False)
class _SomaIds:
    """Cell ids of the selected cells (obs `obs_id`, else the soma_joinid), read by position."""

    obs: object  # tiledbsoma.DataFrame
    joinids: np.ndarray
    column: str | None

    def block(self, start: int, stop: int, decode: bool = False) -> np.ndarray:
        cells = self.joinids[start:stop]
        if self.column is None:
            return cells.astype(str).astype(object)
        table = self.obs.read(coords=(cells,), column_names=["soma_joinid", self.column]).concat()
        at = np.searchsorted(cells, table["soma_joinid"].to_numpy())
        ids = np.empty(len(cells), object)
        ids[at] = table[self.column].to_numpy(zero_copy_only=False)
        return ids


@dataclasses.dataclass(eq=False)
class SomaInput(H5adInput):
    """The selected cells of a SOMA experiment, read like an .h5ad input."""

    presence: scipy.sparse.csr_matrix | None = None  # datasets (rows: dataset_id order below) x var rows
    presence_datasets: dict[str, int] = dataclasses.field(default_factory=dict)

    def read(self, start: int, stop: int) -> scipy.sparse.csr_matrix:
        if self.counts.fetch is None:  # genes are aligned by now: read only the vocabulary's
            self.counts.fetch = np.flatnonzero(self.columns >= 0)
        return super().read(start, stop)

    def measured(self, dataset: str) -> np.ndarray:
        """Vocabulary genes `dataset` measured: its presence-matrix row, else every gene in var."""
        mask = super().measured(dataset)
        if self.presence is None:
            return mask
        if dataset not in self.presence_datasets:
            raise SscellError(f"{self.path}: dataset {dataset!r} has no row in census_info/datasets, so its "
                              f"measured genes ({PRESENCE}) are unknown; the experiment is inconsistent")
        present = self.presence[self.presence_datasets[dataset]].toarray().ravel().astype(bool)
        mask[:] = False
        mask[self.columns[(self.columns >= 0) & present]] = True
        return mask


def _read_obs(obs, value_filter: str | None, columns: list[str], where: str) -> tuple[np.ndarray, pd.DataFrame]:
    """soma_joinids (ascending) and kept columns (categoricals, RangeIndex) of the cells matching
    `value_filter`, read in the batches tiledbsoma hands out."""
    joinids, parts = [], {c: [] for c in columns}
    try:
        for table in obs.read(value_filter=value_filter, column_names=["soma_joinid", *columns]):
            joinids.append(table["soma_joinid"].to_numpy())
            for c in columns:
                parts[c].append(categorical_of_strings(pd.Categorical(table[c].to_pandas())))
    except _soma_errors() as e:
        raise SscellError(f"{where}: cannot select cells with --obs-filter {value_filter!r} "
                          f"({_one_line(e)}); check the expression and the obs column names") from None
    ids = np.concatenate(joinids) if joinids else np.empty(0, np.int64)
    order = np.argsort(ids, kind="stable")
    merged = {c: union_categoricals(parts[c], sort_categories=True) if parts[c]
              else pd.Categorical([], categories=pd.Index([], dtype=object)) for c in columns}
    frame = pd.DataFrame({c: pd.Categorical.from_codes(v.codes[order], v.categories) for c, v in merged.items()},
                         index=pd.RangeIndex(len(ids)))
    return ids[order], frame


def cell_type_rule(obs: pd.DataFrame, min_cells: int = 0, min_donor_units: int = 0) -> np.ndarray:
    """Cells whose cell_type has >= min_cells cells and >= min_donor_units (dataset_id, donor_id)
    units among `obs`."""
    types = obs["cell_type"].cat.codes.to_numpy()
    n_types = len(obs["cell_type"].cat.categories)
    cells = np.bincount(types[types >= 0], minlength=n_types)
    units = obs.groupby(["cell_type", "dataset_id", "donor_id"], observed=True).size().reset_index()
    donor_units = units["cell_type"].value_counts().reindex(obs["cell_type"].cat.categories, fill_value=0).to_numpy()
    keep_type = (cells >= min_cells) & (donor_units >= min_donor_units)
    return (types >= 0) & keep_type[np.maximum(types, 0)]


def open_soma_input(uri: str, stack: contextlib.ExitStack, *, organism: str = "Homo sapiens",
                    obs_filter: str | None = None, layer: str = "raw", measurement: str = "RNA",
                    min_cells_per_cell_type: int = 0, min_donor_units_per_cell_type: int = 0,
                    gene_column: str | None = None, round_counts: bool = False, split_column: str | None = None,
                    required_obs: tuple[str, ...] = REQUIRED_OBS) -> SomaInput:
    """The cells of the SOMA experiment at `uri` (see `open_experiment`) matching `obs_filter` (a
    TileDB-SOMA value filter, e.g. "is_primary_data == True and assay in ['10x 3\\' v3']") and the
    cell-type size rule, as a converter input; closed with `stack`."""
    if split_column:
        raise SscellError("--split-column is for .h5ad inputs; filter SOMA cells with --obs-filter and split by "
                          "donor or cells")
    exp, datasets = open_experiment(uri, organism, stack)
    where = f"{uri}" + (f" ({organism})" if datasets is not None or not is_uri(uri) else "")
    if measurement not in exp.ms:
        raise SscellError(f"{where}: no measurement {measurement!r} (it has {', '.join(exp.ms.keys())})")
    ms = exp.ms[measurement]
    if "X" not in ms or layer not in ms.X:
        found = ", ".join(ms.X.keys()) if "X" in ms else "none"
        raise SscellError(f"{where}: ms[{measurement!r}] has no X layer {layer!r} (layers: {found}); "
                          "pass --layer naming the raw counts")
    names = exp.obs.schema.names
    missing = [c for c in required_obs if c not in names]
    if missing:
        raise SscellError(f"{where}: obs lacks required column(s) {', '.join(missing)}; "
                          "add them (CELLxGENE names) or pass --split=cells to split cells without donors")
    kept = [c for c in dict.fromkeys(REQUIRED_OBS + OPTIONAL_OBS + CENSUS_OBS + required_obs) if c in names]
    joinids, obs = _read_obs(exp.obs, obs_filter, kept, where)
    if "dataset_id" not in obs:
        obs["dataset_id"] = pd.Categorical.from_codes(np.zeros(len(obs), np.int8), [Path(uri).name or uri])
    if min_cells_per_cell_type or min_donor_units_per_cell_type:
        keep = cell_type_rule(obs, min_cells_per_cell_type, min_donor_units_per_cell_type)
        joinids, obs = joinids[keep], obs[keep].reset_index(drop=True)
        obs = obs.apply(lambda c: c.cat.remove_unused_categories())
    if len(joinids) == 0:
        raise SscellError(f"{where}: no cells match --obs-filter {obs_filter!r}"
                          + (" and the cell-type rule" if min_cells_per_cell_type or min_donor_units_per_cell_type
                             else "") + "; loosen the filter")
    for c in required_obs:
        if (obs[c].cat.codes < 0).any():
            raise SscellError(f"{where}: obs column {c} has missing values in the selected cells; "
                              "exclude them with --obs-filter")
    var = ms.var.read().concat().to_pandas()
    id_column = gene_column or next((c for c in GENE_ID_COLUMNS if c in var), None)
    if id_column not in var:
        raise SscellError(f"{where}: var has no column {id_column or ' or '.join(GENE_ID_COLUMNS)!r} of gene ids "
                          f"(columns: {list(var.columns)}); pass --gene-column")
    var = var.sort_values("soma_joinid")
    var_joinids = var.pop("soma_joinid").to_numpy()
    var = keyed_by_gene(var, id_column, where, "var")
    presence, presence_datasets = None, {}
    if PRESENCE in ms:
        if datasets is None:
            raise SscellError(f"{where}: has {PRESENCE} but no census_info/datasets table mapping its rows to "
                              "dataset_id; open the Census-shaped collection holding it")
        matrix = ms[PRESENCE].read((slice(None),)).coos().concat().to_scipy().tocsr()
        presence = matrix[:, var_joinids] if matrix.shape[1] > var_joinids.max() else None
        if presence is None:
            raise SscellError(f"{where}: {PRESENCE} has {matrix.shape[1]} genes for {len(var)} var rows; "
                              "the experiment is inconsistent")
        presence_datasets = {d: int(j) for d, j in zip(datasets["dataset_id"], datasets["soma_joinid"])
                             if j < matrix.shape[0]}
    cell_ids = "obs_id" if "obs_id" in names else None
    source = f"ms[{measurement!r}].X[{layer!r}]"
    return SomaInput(where, _SomaRows(ms.X[layer], joinids, var_joinids, where), source, obs,
                     _SomaIds(exp.obs, joinids, cell_ids), var, round_counts, presence=presence,
                     presence_datasets=presence_datasets)


def write_census_like(adata, uri: str, measured: pd.DataFrame | None = None, organism: str = "Homo sapiens") -> str:
    """Write `adata` (raw counts in X) as a Census-shaped SOMA collection at `uri` (for tests and
    offline trials): census_data/<organism> with X['raw'], census_info/datasets numbering the obs
    dataset_ids, and, given `measured` (datasets x var_names, bool), the
    feature_dataset_presence_matrix. Returns `uri`."""
    soma = _soma()
    import anndata
    import pyarrow as pa
    import tiledbsoma.io

    uri = uri if "://" in uri else str(Path(uri).absolute())  # tiledbsoma relates members to absolute paths

    with soma.Collection.create(uri) as root:
        root.add_new_collection("census_data")
        root.add_new_collection("census_info")
    experiment = f"{uri}/census_data/{organism_key(organism)}"
    # the counts as layer "raw" of an AnnData without X: anndata >= 0.13 lists X among its layers under the
    # key None, which tiledbsoma.io (2.3) would also write, as a layer named None
    counts = anndata.AnnData(obs=adata.obs, var=adata.var, layers={"raw": adata.X})
    tiledbsoma.io.from_anndata(experiment, counts, measurement_name="RNA")
    names = sorted(measured.index if measured is not None else adata.obs["dataset_id"].astype(str).unique())
    with soma.Collection.open(uri, "w") as root:
        root["census_data"].set(organism_key(organism), soma.Experiment.open(experiment), use_relative_uri=True)
        table = pa.table({"soma_joinid": pa.array(np.arange(len(names)), pa.int64()),
                          "dataset_id": pa.array(names, pa.large_string())})
        with root["census_info"].add_new_dataframe("datasets", schema=table.schema, index_column_names=["soma_joinid"],
                                                   domain=[(0, len(names) - 1)]) as datasets:
            datasets.write(table)
    if measured is not None:
        rows, columns = np.nonzero(measured.loc[names, list(adata.var_names)].to_numpy(bool))
        with soma.Experiment.open(experiment, "w") as exp, exp.ms["RNA"].add_new_sparse_ndarray(
                PRESENCE, type=pa.bool_(), shape=(len(names), adata.n_vars)) as presence:
            presence.write(pa.table({"soma_dim_0": rows.astype(np.int64), "soma_dim_1": columns.astype(np.int64),
                                     "soma_data": np.ones(len(rows), bool)}))
    return uri

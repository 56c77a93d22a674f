"""What a task needs to know about the data (`TaskInfo`: genes, classes, measured genes, gene
programmes, a second modality's IDF), read from a run's store and config."""
from __future__ import annotations

import dataclasses
import os

import numpy as np

from sscell.data.gmt import read_gmt
from sscell.data.loader import LABEL_COLUMNS, label_codes, label_names, select_rows
from sscell.data.modality import ModalityReader, SparseModalityReader, open_modality
from sscell.data.store import Store, runs
from sscell.data.synthetic import programmes_path, tf_targets_path
from sscell.errors import SscellError


@dataclasses.dataclass(frozen=True)
class TaskInfo:
    """Data facts for building a task's model and loss.

    class_counts: cells per cell-type code among the cells the run trains on (its train split,
    narrowed to `data.train_datasets` and `data.train_fraction`).
    measured: bool (n_datasets, n_genes), rows in the order of the loader's `dataset` codes.
    programmes: bool (n_programmes, n_genes) membership, from `config.loss.gmt` (empty if none).
    programme_genes: for each programme, the gene it predicts (GP -> TF: the TF), -1 if none.
    modality_features: columns of the second modality `config.data.modality` (0: none).
    modality_idf: for a sparse modality (ATAC peaks), each feature's inverse document frequency
    log(1 + n / n_f) over the n train cells of `data.train_datasets` (every fraction), n_f of
    them with the feature nonzero (at least 1): the IDF of `sscell.losses.crossmodal.tfidf`.
    """

    n_genes: int
    n_cell_types: int = 1
    class_counts: np.ndarray = dataclasses.field(default_factory=lambda: np.ones(1, np.int64))
    measured: np.ndarray | None = None
    programmes: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0, 0), bool))
    programme_names: tuple[str, ...] = ()
    programme_genes: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int32))
    modality_features: int = 0  # columns of `data.modality` (e.g. proteins) when the run reads one
    modality_idf: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.float32))

    def measured_table(self) -> np.ndarray:
        """The measured-gene table, all True (one row) when the data names no datasets."""
        return np.ones((1, self.n_genes), bool) if self.measured is None or not len(self.measured) else self.measured


def gene_programmes(path: str, gene_ids, symbols=None, tf_from_name: bool = False
                    ) -> tuple[np.ndarray, tuple[str, ...], np.ndarray]:
    """(membership, names, predicted gene) of the gene sets in the .gmt file `path`.

    Genes match the store's gene ids or, failing that, its symbols; genes outside the
    vocabulary are dropped, and so are sets left empty. With `tf_from_name` a set's target is
    the gene named by its name up to the first '_' (a gene id, or a symbol as in MSigDB C3 TFT's
    `ATF1_TARGET_GENES`), the
    target is removed from its own programme, and sets whose TF is not in the vocabulary are
    dropped.
    """
    index = {gene: i for i, gene in enumerate(gene_ids)}
    if symbols is not None:
        index.update({s: i for i, s in enumerate(symbols) if s not in index})
    rows, names, targets = [], [], []
    for name, genes in read_gmt(path).items():
        members = np.zeros(len(gene_ids), bool)
        members[[index[g] for g in genes if g in index]] = True
        target = index.get(name.split("_")[0], -1) if tf_from_name else -1
        if tf_from_name:
            if target < 0:
                continue
            members[target] = False
        if members.any():
            rows.append(members)
            names.append(name)
            targets.append(target)
    if not rows:
        raise SscellError(f"{path}: no gene set shares genes with the store's vocabulary"
                          f"{' (or names a TF in it)' if tf_from_name else ''}; check the gene ids")
    return np.stack(rows), tuple(names), np.asarray(targets, np.int32)


def document_frequency(reader: SparseModalityReader, rows: np.ndarray, chunk_nonzeros: int = 2**24) -> np.ndarray:
    """Per feature (e.g. peak), how many of the sorted store `rows` have a nonzero value in it,
    read ~`chunk_nonzeros` nonzeros at a time."""
    frequency = np.zeros(reader.n_features, np.int64)
    lengths = reader.lengths(rows)
    cuts = np.searchsorted(np.cumsum(lengths), np.arange(chunk_nonzeros, lengths.sum(), chunk_nonzeros))
    for part in np.split(rows, np.unique(cuts)):
        data, indices = reader.read_nonzeros(runs(part))
        frequency += np.bincount(indices[data > 0].astype(np.int64), minlength=reader.n_features)
    return frequency


def inverse_document_frequency(store: Store, reader: SparseModalityReader, datasets: tuple[str, ...]) -> np.ndarray:
    """float32 log(1 + n / n_f) of each feature of a sparse modality over the n train cells of
    `datasets` (all if empty), n_f (at least 1) of them with the feature nonzero."""
    rows = select_rows(store, "train", datasets=datasets)
    return np.log1p(len(rows) / np.maximum(document_frequency(reader, rows), 1)).astype(np.float32)


def _shape_facts(config, store: Store) -> tuple[TaskInfo, ModalityReader | SparseModalityReader | None]:
    """(`model_info`, the reader of `data.modality` or None)."""
    n_types = max(1, len(label_names(store, "cell_type"))) if LABEL_COLUMNS["cell_type"] in store.labels else 1
    modality = config.data.get("modality", "")
    reader = open_modality(store, modality) if modality else None
    info = TaskInfo(n_genes=store.n_genes, n_cell_types=n_types, measured=np.asarray(store.measured, bool),
                    modality_features=reader.n_features if reader else 0)
    if isinstance(reader, SparseModalityReader):
        info = dataclasses.replace(info, modality_idf=np.ones(reader.n_features, np.float32))
    return info, reader


def model_info(config, store: Store) -> TaskInfo:
    """The data facts a run's model is shaped by (`TaskInfo` without training statistics): genes,
    cell types, the measured-gene table and the width of the second modality `data.modality`.
    A sparse modality's IDF weighs the loss's targets, not the model: it is ones here."""
    return _shape_facts(config, store)[0]


def task_info(config, store: Store, programmes: str = "") -> TaskInfo:
    """The TaskInfo of a run config and its store: `model_info` plus the training statistics.

    `programmes` is what the task needs: "" nothing, "sets" gene programmes, "tf" TF target
    programmes (see `gene_programmes`). Gene programmes come from `config.loss.gmt`, or, when
    that is empty, from the .gmt files of a generated atlas beside the store
    (WORKDIR/atlas.programmes.gmt, or atlas.tf_targets.gmt for GP -> TF); a task that needs
    programmes fails when neither exists.
    """
    info, reader = _shape_facts(config, store)
    start, stop = store.split_range("train")
    rows = select_rows(store, "train", datasets=tuple(config.data.train_datasets),
                       fraction=config.data.train_fraction, seed=config.seed)  # the cells trained on
    counts = np.bincount(label_codes(store, start, stop)["cell_type"][rows - start], minlength=info.n_cell_types)
    info = dataclasses.replace(info, class_counts=counts)
    if isinstance(reader, SparseModalityReader):
        info = dataclasses.replace(info, modality_idf=inverse_document_frequency(store, reader,
                                                                                 tuple(config.data.train_datasets)))
    if not programmes:
        return info
    tf = programmes == "tf"
    atlas = os.path.join(os.path.dirname(os.path.abspath(store.path)), "atlas.h5ad")  # see sscell.data.prepare
    default = str(tf_targets_path(atlas) if tf else programmes_path(atlas))
    path = config.loss.get("gmt", "") or default
    if not os.path.exists(path):
        raise SscellError(f"pretext task '{config.loss.name}' needs gene programmes: set --config.loss.gmt "
                          "to a .gmt file (e.g. MSigDB C8, or C3 TFT for gp_to_tf)")
    symbols = store.var["feature_name"].astype(str).tolist() if "feature_name" in store.var else None
    membership, names, targets = gene_programmes(path, store.var.index.astype(str).tolist(), symbols, tf)
    return dataclasses.replace(info, programmes=membership, programme_names=names, programme_genes=targets)

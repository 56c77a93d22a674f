"""sscell from Python: a trained model, from a run's workdir or a bundle, applied to AnnData.

    import sscell
    model = sscell.load("runs/quickstart")          # or a bundle made by model.export(...)
    embedding = model.embed(adata)                  # also sets adata.obsm["X_sscell"]
    labels = model.predict(adata)                   # a classifier (a supervised / fine-tuned run)
    model.export("bundles/quickstart")              # safetensors + gene table + config + model card

A workdir's parameters are restored alone from its checkpoint (no optimiser state, no data
loader); its gene table and class names come from its store. A bundle needs neither. The model
input is built as in training (`sscell.training.step.task_batch`, genes the input lacks
zeroed), in blocks of the run's `eval.batch_size` cells, so `embed`/`predict` here, the
`sscell.evaluation.embed` / `predict` commands and a bundle give the same numbers, bit for bit.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Iterable, Iterator

import anndata
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pandas as pd
import zarr

from sscell.bundle import HEADLINE, is_bundle, read_bundle, write_bundle
from sscell.data.inputs import H5adInput
from sscell.data.loader import label_names, select_rows
from sscell.data.store import Store, resolved_location
from sscell.errors import SscellError
from sscell.evaluation.align import MIN_OVERLAP, Overlap, anndata_input, input_batches, match_genes
from sscell.evaluation.report import read_results
from sscell.evaluation.run import open_run
from sscell.models.classifier import Classifier
from sscell.models.mlp import encoder
from sscell.training.resume import settle_dtype
from sscell.training.step import task_batch

OBSM_KEY = "X_sscell"
LABEL, CONFIDENCE, ONTOLOGY = "sscell_cell_type", "sscell_confidence", "sscell_cell_type_ontology_term_id"
CLASSIFIER_LOSS = "supervised"


def _embed_and_classify(module: Classifier, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    z = module.encode(x)
    return z, module.head(z)


@dataclasses.dataclass(eq=False)
class Model:
    """A trained sscell model: parameters, the genes it reads (in input order) and its config.

    `classes` (classifiers only): the training store's cell types in code order, with their
    Cell Ontology ids when the store has them. `about`: training data and headline results,
    for the model card.
    """

    source: str
    config: ml_collections.ConfigDict
    params: dict
    genes: pd.DataFrame
    step: int
    checkpoint: str
    classes: pd.DataFrame | None = None
    about: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if "encoder" not in self.params:
            raise SscellError(f"{self.source}: its model (loss {self.config.loss.name}) has no 'encoder' parameters; "
                              "sscell embeds models built on its MLP encoder (every built-in task's)")
        n_inputs = self.params["encoder"]["dense_0"]["kernel"].shape[0]
        if n_inputs != len(self.genes):
            raise SscellError(f"{self.source}: the model reads {n_inputs} genes, its gene table lists "
                              f"{len(self.genes)}; the run or bundle is inconsistent")
        head = self.params.get("head", {}).get("kernel")
        if self.classes is not None and (head is None or head.shape[-1] != len(self.classes)):
            raise SscellError(f"{self.source}: the classifier has {0 if head is None else head.shape[-1]} outputs "
                              f"for {len(self.classes)} classes; the run or bundle is inconsistent")

    @property
    def is_classifier(self) -> bool:
        return self.classes is not None

    def require_classifier(self) -> None:
        """Refuse, in one line naming what to do, to predict with a model that has no classifier head."""
        if not self.is_classifier:
            raise SscellError(
                f"{self.source} was trained with loss '{self.config.loss.name}' and has no cell-type classifier "
                "head; fine-tune one (python -m sscell.evaluation.finetune, then predict with RUN/finetune/"
                "pretrained_1) or embed instead (python -m sscell.evaluation.embed)")

    @functools.cached_property
    def _device_params(self):
        return jax.device_put(self.params)

    @functools.cached_property
    def _forward(self):
        """jit `(params, batch, measured_table) -> (embedding,)`, or for a classifier
        `(embedding, class code, softmax max)`, from a loader-format batch."""
        n_genes, body = len(self.genes), encoder(self.config.model)
        if self.is_classifier:
            classifier = Classifier(n_genes=n_genes, n_classes=len(self.classes), encoder=body)

            def compute(params, x):
                z, logits = classifier.apply({"params": params}, x, method=_embed_and_classify)
                return z, jnp.argmax(logits, -1).astype(jnp.int32), jax.nn.softmax(logits).max(-1)
        else:
            def compute(params, x):
                return (body.apply({"params": params["encoder"]}, x, False),)

        @jax.jit
        def forward(params, batch, table):
            return compute(params, task_batch(batch, n_genes, table)["x"])

        return forward

    def outputs(self, batches: Iterable[tuple[dict, int]], table: np.ndarray) -> Iterator[tuple[np.ndarray, ...]]:
        """(embedding, [class code, confidence]) of each (batch, n_valid), valid cells only."""
        for batch, n_valid in batches:
            computed = jax.device_get(self._forward(self._device_params, batch, table))
            yield tuple(np.asarray(a)[:n_valid] for a in computed)

    @property
    def batch_size(self) -> int:
        return int(self.config.eval.batch_size)

    def prediction_columns(self, codes: np.ndarray, confidence: np.ndarray) -> dict[str, np.ndarray | pd.Categorical]:
        """obs columns of predicted class codes: LABEL, CONFIDENCE and, when the classes have
        them, ONTOLOGY (categoricals over every class)."""
        names = self.classes["cell_type"].astype(str).tolist()
        columns = {LABEL: pd.Categorical.from_codes(codes, names), CONFIDENCE: np.asarray(confidence, np.float32)}
        if "cell_type_ontology_term_id" in self.classes:
            ids = self.classes["cell_type_ontology_term_id"]
            categories = pd.Index(ids.dropna().astype(str).unique())
            to_code = np.where(ids.notna(), categories.get_indexer(ids.astype(str)), -1)
            columns[ONTOLOGY] = pd.Categorical.from_codes(to_code[codes], categories)
        return columns

    def provenance(self, overlap: Overlap | None = None, **extra) -> dict:
        """What made an output (written to its uns['sscell']): model, checkpoint, step, loss, genes matched."""
        about = {"model": self.source, "checkpoint": self.checkpoint, "step": self.step,
                 "loss": self.config.loss.name, **extra}
        return {**about, "genes": overlap.describe()} if overlap else about

    def _apply(self, adata: anndata.AnnData, gene_column: str | None, round_counts: bool, min_overlap: float,
               batch_size: int) -> tuple[np.ndarray, ...]:
        """The outputs (`outputs`) for every cell of `adata`; records the provenance in its uns['sscell']."""
        inp: H5adInput = anndata_input(adata, gene_column=gene_column, round_counts=round_counts)
        overlap = match_genes(inp, self.genes, min_overlap)
        parts = list(self.outputs(input_batches(inp, batch_size or self.batch_size), inp.measured("")[None]))
        adata.uns["sscell"] = self.provenance(overlap)
        return tuple(np.concatenate(p) for p in zip(*parts))

    def embed(self, adata: anndata.AnnData, *, gene_column: str | None = None, round_counts: bool = False,
              min_overlap: float = MIN_OVERLAP, batch_size: int = 0) -> np.ndarray:
        """The embedding (cells x latent, float32) of `adata`'s cells, also set as obsm['X_sscell'].

        Counts come from layers['counts'], raw.X or X (the first present); genes are matched by
        id or symbol (`sscell.evaluation.align`), or by the var column `gene_column`.
        """
        embedding = self._apply(adata, gene_column, round_counts, min_overlap, batch_size)[0]
        adata.obsm[OBSM_KEY] = embedding
        return embedding

    def predict(self, adata: anndata.AnnData, *, gene_column: str | None = None, round_counts: bool = False,
                min_overlap: float = MIN_OVERLAP, batch_size: int = 0) -> pd.DataFrame:
        """Cell types of `adata`'s cells (a classifier only): returns and sets obs LABEL,
        CONFIDENCE (the softmax maximum) and ONTOLOGY (when the training labels had ids), and
        obsm['X_sscell']."""
        self.require_classifier()
        embedding, codes, confidence = self._apply(adata, gene_column, round_counts, min_overlap, batch_size)
        predicted = pd.DataFrame(self.prediction_columns(codes, confidence), index=adata.obs_names)
        for column in predicted:
            adata.obs[column] = predicted[column]
        adata.obsm[OBSM_KEY] = embedding
        return predicted

    def export(self, path: str | os.PathLike) -> str:
        """Write the model as a portable bundle at `path` (`sscell.bundle`); returns the path."""
        config = self.config.copy_and_resolve_references()
        settle_dtype(config)  # the precision it computes in here
        meta = {"source": self.source, "checkpoint": self.checkpoint, "step": self.step, "loss": config.loss.name,
                **self.about}
        if self.is_classifier:
            meta["classes"] = self.classes["cell_type"].astype(str).tolist()
            if "cell_type_ontology_term_id" in self.classes:
                meta["class_ontology_term_ids"] = [None if pd.isna(v) else str(v)
                                                   for v in self.classes["cell_type_ontology_term_id"]]
        return str(write_bundle(path, params=self.params, genes=self.genes, config=config, meta=meta))


def class_table(store: Store) -> pd.DataFrame:
    """The store's cell types in code order and, when obs has them, each type's (most common) Cell Ontology id."""
    table = pd.DataFrame({"cell_type": label_names(store, "cell_type")})
    if "cell_type_ontology_term_id" in store.labels:
        types = store.labels["cell_type"].cat.codes.to_numpy()
        ontology = store.labels["cell_type_ontology_term_id"]
        codes = ontology.cat.codes.to_numpy()
        known = (types >= 0) & (codes >= 0)
        pairs = np.zeros((len(table), len(ontology.cat.categories)), np.int64)
        np.add.at(pairs, (types[known], codes[known]), 1)
        names = np.asarray(ontology.cat.categories.astype(str), dtype=object)
        table["cell_type_ontology_term_id"] = np.where(pairs.max(1) > 0, names[pairs.argmax(1)], None)
    return table


def _about(config: ml_collections.ConfigDict, workdir: str, store: Store) -> dict:
    """Training data and headline results of a run, for the model card."""
    inputs = zarr.open_group(store.path, mode="r", zarr_format=3).attrs["sscell"].get("inputs", [])
    trained = select_rows(store, "train", datasets=tuple(config.data.train_datasets),
                          fraction=config.data.train_fraction, seed=config.seed)
    training = {"store": resolved_location(store.path), "inputs": [str(i) for i in inputs], "cells": store.n_cells,
                "train_cells": len(trained), "genes": store.n_genes, "datasets": list(store.datasets)}
    rows = read_results(workdir, "results")
    results = ({"method": rows[0]["method"], **{k: float(rows[0][k]) for k in HEADLINE
                                                if k in rows[0] and pd.notna(rows[0][k])}} if rows else None)
    return {"training": training, "results": results}


def _from_workdir(workdir: str, which: str | None) -> Model:
    run = open_run(workdir, which)
    classes = class_table(run.store) if run.config.loss.name == CLASSIFIER_LOSS else None
    return Model(os.path.abspath(workdir), run.config, run.params, run.store.var, run.step, run.checkpoint, classes,
                 _about(run.config, workdir, run.store))


def _from_bundle(path: str) -> Model:
    params, genes, config, meta = read_bundle(path)
    classes = None
    if meta.get("classes") is not None:
        classes = pd.DataFrame({"cell_type": meta["classes"]})
        if meta.get("class_ontology_term_ids") is not None:
            classes["cell_type_ontology_term_id"] = meta["class_ontology_term_ids"]
    return Model(os.path.abspath(path), config, params, genes, int(meta["step"]), meta["checkpoint"], classes,
                 {"training": meta["training"], "results": meta.get("results")})


def load(path: str | os.PathLike, checkpoint: str | None = None) -> Model:
    """The trained model of a run's workdir (its "latest" or "best" `checkpoint`, default the
    run's eval.checkpoint) or of a bundle written by `Model.export`."""
    path = str(path)
    if is_bundle(path):
        if checkpoint is not None:
            raise SscellError(f"{path} is a bundle, which holds one checkpoint; drop the checkpoint choice")
        return _from_bundle(path)
    return _from_workdir(path, checkpoint)

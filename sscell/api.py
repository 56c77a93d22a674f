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
`sscell.embed` / `predict` commands and a bundle give the same numbers, bit for bit.
"""
from __future__ import annotations

import dataclasses
import functools
import numbers
import os
from collections.abc import Iterable, Iterator

import anndata
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pandas as pd
import zarr

from sscell.bundle import HEADLINE, check_parameters, is_bundle, read_bundle, write_bundle
from sscell.config import load_config
from sscell.data.inputs import H5adInput
from sscell.data.loader import label_names, select_rows
from sscell.data.prepare import store_path
from sscell.data.store import Store, open_store, resolved_location
from sscell.errors import SscellError
from sscell.evaluation.align import KEYWORDS, MIN_OVERLAP, Overlap, anndata_input, input_batches, match_genes
from sscell.evaluation.report import read_results
from sscell.evaluation.run import open_run
from sscell.models.classifier import Classifier
from sscell.models.mlp import ACTIVATIONS, MLP, NORMS, encoder
from sscell.training.resume import settle_dtype
from sscell.training.step import task_batch

OBSM_KEY = "X_sscell"
LABEL, CONFIDENCE, ONTOLOGY = "sscell_cell_type", "sscell_confidence", "sscell_cell_type_ontology_term_id"
CLASSIFIER_LOSS = "supervised"
MAX_BATCH_SIZE = 1 << 16  # cells per forward pass: a dense batch of 65,536 x 20,000 genes is 5 GB


def _embed_and_classify(module: Classifier, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    z = module.encode(x)
    return z, module.classify(z)


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

    def __repr__(self) -> str:
        """One line (not the parameter arrays): source, checkpoint and step, loss, widths, classes."""
        model = self.config.model
        classes = f", {len(self.classes)} classes" if self.is_classifier else ""
        return (f"sscell.Model({self.source!r}: {self.checkpoint} checkpoint, step {self.step}, loss "
                f"{self.config.loss.name}, {len(self.genes)} genes -> {list(model.hidden)} -> {model.latent}{classes})")

    def __post_init__(self):
        if not isinstance(self.params.get("encoder"), dict):
            raise SscellError(f"{self.source}: its model (loss {self.config.loss.name}) has no 'encoder' parameters; "
                              "sscell embeds models built on its MLP encoder (every built-in task's)")
        self._check_params()

    def _check_params(self) -> None:
        """Refuse parameters that are not those of the config's model for its genes (and classes):
        a missing name, another shape or dtype, or a value that is not finite."""
        model = self.config.model
        if model.get("activation") not in ACTIVATIONS or model.get("norm") not in NORMS:
            raise SscellError(f"{self.source}: its config's model.activation {model.get('activation')!r} or "
                              f"model.norm {model.get('norm')!r} is unknown (sscell knows {', '.join(ACTIVATIONS)}; "
                              f"{', '.join(NORMS)}); the run or bundle is damaged")
        x = jax.ShapeDtypeStruct((1, len(self.genes)), jnp.float32)
        try:
            wanted = jax.eval_shape(lambda key, x: self._module.init(key, x, False), jax.random.key(0), x)["params"]
        except (TypeError, ValueError, KeyError) as error:
            reason = (str(error).splitlines() or [""])[0]
            raise SscellError(f"{self.source}: its config's model section describes no model sscell builds "
                              f"({type(error).__name__}: {reason}); the run or bundle is damaged") from None
        classes = f", {len(self.classes)} classes" if self.is_classifier else ""
        check_parameters(self.source, self.params if self.is_classifier else self.params["encoder"], wanted,
                         f"its model ({len(self.genes)} genes{classes})", "the run or bundle")

    @property
    def is_classifier(self) -> bool:
        return self.classes is not None

    def require_classifier(self) -> None:
        """Refuse, in one line naming what to do, to predict with a model that has no classifier head."""
        if not self.is_classifier and "head" in self.params:
            raise SscellError(f"{self.source} has a classifier head but no class names; import it with them "
                              "(sscell.from_study(..., classes=FILE), --classes=FILE) or embed instead")
        if not self.is_classifier:
            raise SscellError(
                f"{self.source} was trained with loss '{self.config.loss.name}' and has no cell-type classifier "
                "head; fine-tune one (python -m sscell.evaluation.finetune, then predict with RUN/finetune/"
                "pretrained_1) or embed instead (python -m sscell.embed)")

    @functools.cached_property
    def _device_params(self):
        return jax.device_put(self.params)

    @functools.cached_property
    def _module(self) -> Classifier | MLP:
        """The classifier, or the encoder of a model without one."""
        body = encoder(self.config.model)
        return Classifier(n_genes=len(self.genes), n_classes=len(self.classes), encoder=body,
                          head_activation=self.config.model.get("head_activation", "none")) if self.is_classifier \
            else body

    @functools.cached_property
    def _forward(self):
        """jit `(params, batch, measured_table) -> (embedding,)`, or for a classifier
        `(embedding, class code, softmax max)`, from a loader-format batch."""
        n_genes, module = len(self.genes), self._module
        if self.is_classifier:
            def compute(params, x):
                z, logits = module.apply({"params": params}, x, method=_embed_and_classify)
                return z, jnp.argmax(logits, -1).astype(jnp.int32), jax.nn.softmax(logits).max(-1)
        else:
            def compute(params, x):
                return (module.apply({"params": params["encoder"]}, x, False),)

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

    def checked_batch_size(self, batch_size: int) -> int:
        """`batch_size` cells per forward pass (0: the run's eval.batch_size); refused in one line
        unless a whole number from 1 to MAX_BATCH_SIZE."""
        chosen = batch_size or self.batch_size
        if isinstance(chosen, bool) or not isinstance(chosen, numbers.Integral) or not 0 < chosen <= MAX_BATCH_SIZE:
            raise SscellError(f"batch size {batch_size!r} (batch_size, --batch-size) must be a whole number of "
                              f"cells from 1 to {MAX_BATCH_SIZE:,}, or 0 for the run's eval.batch_size")
        return int(chosen)

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
        batch_size = self.checked_batch_size(batch_size)  # before any work
        inp: H5adInput = anndata_input(adata, gene_column=gene_column, round_counts=round_counts)
        overlap = match_genes(inp, self.genes, min_overlap, KEYWORDS)
        parts = list(self.outputs(input_batches(inp, batch_size), inp.measured("")[None]))
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

    def export_study(self, path: str | os.PathLike) -> str:
        """Write the model as the study's Lightning checkpoint at `path` (`sscell.study.export`); returns the path."""
        from sscell.study.export import export_study

        return str(export_study(path, self.params, self.config, self.source))


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


def _from_workdir(workdir: str, which: str | None, store: str | os.PathLike | None) -> Model:
    """The model of a run; its gene table and classes from its store, or from `store` if given (a
    store the run names at a URL is opened only when given: reading a run contacts nothing)."""
    location = str(store or store_path(load_config(workdir), workdir))
    if store is None and "://" in location:
        raise SscellError(f"{workdir}'s store is {location}, which sscell contacts only when you name it: pass "
                          f"store='{location}' (--run-store={location}) to read its gene table there, or a copy")
    run = open_run(workdir, which, store=open_store(location))
    classes = class_table(run.store) if run.config.loss.name == CLASSIFIER_LOSS else None
    return Model(os.path.abspath(workdir), run.config, run.params, run.store.var, run.step, run.checkpoint, classes,
                 _about(run.config, workdir, run.store))


def _from_bundle(path: str) -> Model:
    params, genes, config, meta = read_bundle(path)
    names, ids = meta.get("classes"), meta.get("class_ontology_term_ids")
    if names is not None and not (isinstance(names, list) and (ids is None or isinstance(ids, list)
                                                               and len(ids) == len(names))):
        raise SscellError(f"{path}: its classes and their ontology ids in bundle.json do not pair up; export it again")
    classes = None
    if meta.get("classes") is not None:
        classes = pd.DataFrame({"cell_type": meta["classes"]})
        if meta.get("class_ontology_term_ids") is not None:
            classes["cell_type_ontology_term_id"] = meta["class_ontology_term_ids"]
    return Model(os.path.abspath(path), config, params, genes, int(meta["step"]), meta["checkpoint"], classes,
                 {"training": meta["training"], "results": meta.get("results")})


def load(path: str | os.PathLike, checkpoint: str | None = None, *, store: str | os.PathLike | None = None) -> Model:
    """The trained model of a run's workdir (its "latest" or "best" `checkpoint`, default the
    run's eval.checkpoint) or of a bundle written by `Model.export`. No module the run's config
    names is imported; `store` (a run only): the run's store, needed when its config names one at a URL.
    """
    path = str(path)
    if is_bundle(path):
        if checkpoint is not None or store is not None:
            raise SscellError(f"{path} is a bundle, which holds one checkpoint and its gene table; drop the "
                              "checkpoint and store choices")
        return _from_bundle(path)
    return _from_workdir(path, checkpoint, store)

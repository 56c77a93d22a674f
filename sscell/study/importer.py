"""The study's published checkpoints as sscell models: `from_study(checkpoint, genes) -> Model`.

A checkpoint carries no genes: `genes` is scTab's var.parquet (feature_id, feature_name: the
19,331 genes of its minimal data archive, in model input order) or a text file of one gene id a
line; its length must equal the model's input width. The model reads log1p of counts per 10,000
over its own genes, as the study's data did (docs/study_models.md), which is what sscell's
inputs already are, so a Model from here embeds and predicts like any other.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from sscell.api import Model
from sscell.config import default_config
from sscell.errors import SscellError
from sscell.study.checkpoint import read_checkpoint
from sscell.study.layout import Imported, from_state

CLASS_FILES = ("cell_type.parquet", "categorical_lookup/cell_type.parquet")  # scTab's class lookup, beside the file


def read_genes(path: str | os.PathLike) -> pd.DataFrame:
    """The gene table (index: ids) of scTab's var.parquet or of a text file of one gene id a line."""
    path = Path(path)
    if not path.is_file():
        raise SscellError(f"genes: {path} does not exist; give scTab's var.parquet or a file of one gene id a line")
    if path.suffix == ".parquet":
        var = pd.read_parquet(path)
        if "feature_id" not in var:
            raise SscellError(f"genes: {path} has no feature_id column (columns: {', '.join(map(str, var.columns))})")
        genes = var.set_index(var["feature_id"].astype(str)).drop(columns="feature_id")
    else:
        ids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        genes = pd.DataFrame(index=pd.Index(ids))
    genes.index.name = "feature_id"
    duplicated = genes.index[genes.index.duplicated()]
    if len(duplicated):
        raise SscellError(f"genes: {path} lists {duplicated[0]} more than once; one line per model input")
    return genes


def read_classes(classes: str | os.PathLike | None, checkpoint: Path) -> pd.DataFrame | None:
    """Class names in code order: `classes` (scTab's cell_type.parquet, column 'label', or a text file
    of one name a line), else scTab's lookup beside the checkpoint, else None."""
    if classes is None:
        found = [checkpoint.parent / name for name in CLASS_FILES if (checkpoint.parent / name).is_file()]
        if not found:
            return None
        classes = found[0]
    path = Path(classes)
    if not path.is_file():
        raise SscellError(f"classes: {path} does not exist")
    if path.suffix == ".parquet":
        table = pd.read_parquet(path)
        names = table["label"] if "label" in table else table.iloc[:, 0]
        return pd.DataFrame({"cell_type": names.astype(str).to_numpy()})
    return pd.DataFrame({"cell_type": [line.strip() for line in path.read_text().splitlines() if line.strip()]})


def _state_and_hparams(root: object, where: str) -> tuple[dict, dict, int]:
    """(state dict, hyper-parameters, global step) of a Lightning checkpoint or a bare state dict."""
    if isinstance(root, Mapping) and isinstance(root.get("state_dict"), Mapping):
        hparams = root.get("hyper_parameters")
        return dict(root["state_dict"]), dict(hparams) if isinstance(hparams, Mapping) else {}, \
            int(root.get("global_step") or 0)
    if isinstance(root, Mapping) and root and all(isinstance(k, str) for k in root):
        return dict(root), {}, 0
    raise SscellError(f"{where}: holds neither a Lightning checkpoint (a dict with state_dict) nor a state dict")


def _config(imported: Imported, step: int):
    config = default_config()
    config.model.update(imported.model)
    config.loss.update(imported.loss)
    config.train.steps = step
    return config


def from_study(checkpoint: str | os.PathLike, genes: str | os.PathLike, *,
               classes: str | os.PathLike | None = None) -> Model:
    """The sscell Model of one of the study's checkpoints (`sscell.study`), reading `genes` in order.

    A classifier gets its class names from `classes` or scTab's cell_type.parquet beside the
    checkpoint; without them it embeds, and predict refuses in one line.
    """
    path = Path(checkpoint)
    where = str(path)
    state, hparams, step = _state_and_hparams(read_checkpoint(path), where)
    imported = from_state(state, hparams, where)
    table = read_genes(genes)
    width = imported.params["encoder"]["dense_0"]["kernel"].shape[0]
    if len(table) != width:
        raise SscellError(f"genes: {genes} lists {len(table)} genes, the checkpoint's first layer reads {width}; "
                          "give the gene list the model was trained on (scTab's var.parquet for the study's models)")
    class_table = read_classes(classes, path) if "head" in imported.params else None
    if class_table is not None and len(class_table) != imported.params["head"]["kernel"].shape[1]:
        raise SscellError(f"classes: {len(class_table)} names for the checkpoint's "
                          f"{imported.params['head']['kernel'].shape[1]} outputs; give its cell_type.parquet")
    training = {"store": f"the study's {imported.module} checkpoint {path.name} (its training data is not recorded "
                         "in it: scTab for the published models)", "inputs": [], "cells": 0, "train_cells": 0,
                "genes": len(table), "datasets": []}
    about = {"training": training, "results": None,
             "study": {"module": imported.module, "checkpoint": path.name, "not_imported": imported.not_imported}}
    return Model(os.path.abspath(path), _config(imported, step), imported.params, table, step, path.name,
                 class_table, about)

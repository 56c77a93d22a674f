"""integration: scib-metrics bio conservation and batch correction (`sscell.evaluation.integration`)
with batch = donor and batch = dataset, on a seeded sample of `eval.integration_cells` held-out
(validation and test) cells, so that several donors take part. Totals go into the result rows
(`scib_<batch>_bio`, `_batch`, `_total`), every metric into integration.{csv,md}.

An embedding of more than MAX_DIMS dimensions (the `hvg` baseline's gene space) is not scored:
scib-metrics takes minutes on it (463 s for the quickstart's 2,000 genes), and scIB scores a
gene-space output through its PCA, which the `pca_hvg` baseline is."""
from __future__ import annotations

import gc

import pandas as pd

from sscell.evaluation.cells import Cells
from sscell.evaluation.integration import AGGREGATES, integration_scores
from sscell.evaluation.tasks.registry import Inputs, Outcome, register

BATCHES = {"donor": "donor", "dataset": "dataset"}  # batch keys -> label names of the cells
MAX_DIMS = 512


@register("integration", columns=tuple(f"scib_{b}_{a}" for b in BATCHES for a in ("bio", "batch", "total")),
          headline=("scib_donor_total",))
def integration(inputs: Inputs, outcome: Outcome) -> None:
    cells = Cells.held_out(inputs.val, inputs.test, inputs.settings.integration_cells, inputs.seed)
    wide = [m for m in inputs.methods if cells.embeddings[m].shape[1] > MAX_DIMS]
    if wide:
        outcome.notes.append(f"integration: {', '.join(wide)} not scored: more than {MAX_DIMS} dimensions (scIB "
                             "scores a gene-space output through its PCA: the pca_hvg baseline)")
    methods = [m for m in inputs.methods if m not in wide]
    embeddings = {m: cells.embeddings[m] for m in inputs.distinct() if m not in wide}
    done: dict[bytes, pd.DataFrame] = {}  # batch partition -> its scores (donor and dataset may coincide)
    for batch, label in BATCHES.items():
        partition = pd.factorize(cells.labels[label])[0]
        if partition.max() < 1:
            outcome.notes.append(f"integration with batch = {batch}: skipped, the held-out cells hold one {batch}")
            continue
        if partition.tobytes() not in done:
            gc.freeze()  # scib-metrics collects garbage after every metric: spare it the objects alive now
            try:
                done[partition.tobytes()] = integration_scores(
                    embeddings, cells.labels["cell_type"], partition, inputs.unintegrated,
                    kbet=inputs.settings.integration_kbet, knn_method=inputs.settings.knn_method)
            finally:
                gc.unfreeze()
        scores = done[partition.tobytes()]
        for m in methods:
            values = scores.loc[inputs.aliases.get(m, m)]
            outcome.rows[m].update({f"scib_{batch}_{key}": values[name] for key, name in
                                    zip(("bio", "batch", "total"), AGGREGATES)})
            outcome.tables.setdefault("integration", []).append(
                {"method": m, "batch": batch, "cells": len(cells), **values.to_dict()})
    outcome.described.append(f"integration: {len(cells)} held-out cells")

"""umap: UMAP of each method's embedding of `eval.umap_cells` held-out (validation and test)
cells, coloured by cell type and by batch (dataset, or donor when there is one dataset), into
umap_cell_type.png and umap_batch.png."""
from __future__ import annotations

import os

import jax
import numpy as np

from sscell.data.loader import label_names
from sscell.evaluation.cells import Cells
from sscell.evaluation.figures import plot_maps, umap_2d
from sscell.evaluation.tasks.registry import Inputs, Outcome, register


@register("umap", bars=False)
def umap(inputs: Inputs, outcome: Outcome) -> None:
    if jax.process_index() != 0:  # a figure, drawn once
        return
    cells = Cells.held_out(inputs.val, inputs.test, inputs.settings.umap_cells, inputs.seed)
    batch = "dataset" if len(np.unique(cells.labels["dataset"])) > 1 else "donor"
    coords = inputs.share({m: umap_2d(cells.embeddings[m], inputs.seed, inputs.settings.knn_method)
                           for m in inputs.distinct()})
    title = f"UMAP of {len(cells)} held-out cells"
    plot_maps(coords, cells.labels["cell_type"], inputs.type_names, f"{title}: cell type",
              os.path.join(inputs.outdir, "umap_cell_type.png"))
    plot_maps(coords, cells.labels[batch], label_names(inputs.store, batch), f"{title}: {batch}",
              os.path.join(inputs.outdir, "umap_batch.png"))
    outcome.files += ["umap_cell_type.png", "umap_batch.png"]

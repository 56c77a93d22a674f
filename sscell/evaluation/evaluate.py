"""Evaluate a run from its workdir alone: `python -m sscell.evaluation --workdir=runs/quickstart`.

Embeds validation and test cells with the latest (or best, `eval.checkpoint`) checkpoint, then
reports zero-shot kNN cell typing (reference = validation cells, query = test cells) for the embedding and for PCA of
log1p-normalised counts, and the test cells' reconstruction explained variance (PCA's is its
projection back to genes). Writes
`results.md`, `results.csv` and `loss_curve.png` into the workdir.
"""
from __future__ import annotations

import os

import jax
import numpy as np

from sscell.config import load_config
from sscell.data.loader import label_names, sequential_batches
from sscell.data.prepare import store_path
from sscell.data.store import Store, open_store
from sscell.errors import SscellError
from sscell.evaluation.metrics import ExplainedVariance, explained_variance, f1_scores, fit_pca, knn_predict
from sscell.evaluation.report import plot_loss_curves, write_results
from sscell.training import checkpoint
from sscell.training.mesh import make_mesh, replicated
from sscell.training.state import abstract_state
from sscell.training.step import task_batch
from sscell.training.train import Setup, build


def load_params(workdir: str, config, store: Store):
    """(setup, params, step) of `workdir`'s "latest" or "best" checkpoint (`config.eval.checkpoint`)."""
    setup = build(config, store)
    manager = checkpoint.checkpoint_manager(workdir, config.train.checkpoint_every, config.train.keep_checkpoints)
    layout = abstract_state(setup.model, setup.optimizer, replicated(make_mesh(config.mesh)), setup.init_extra)
    restored = checkpoint.restore(manager, layout, config.eval.checkpoint)
    manager.close()
    if restored is None:
        raise SscellError(f"{workdir} has no checkpoint yet; train first with python -m sscell.main")
    return setup, restored[0]["params"], int(restored[0]["step"])


def embed_split(setup: Setup, params, store: Store, split: str, batch_size: int, max_cells: int,
                reconstruction: ExplainedVariance | None = None) -> dict[str, np.ndarray]:
    """Embeddings, log1p-normalised expression and cell-type codes of a split's cells.

    `max_cells` > 0 keeps the first cells of the split (a random sample: the store is
    shuffled within splits). With `reconstruction` (only for models with a decoder, i.e. a
    `reconstruct` method), also accumulates its explained variance.
    """
    model, measured = setup.model, setup.info.measured_table()

    @jax.jit
    def forward(params, batch):
        x = task_batch(batch, store.n_genes, measured)["x"]  # the model's training-time input
        z = model.apply({"params": params}, x, method="encode")
        x_hat = model.apply({"params": params}, x, method="reconstruct") if reconstruction is not None else x
        return x, x_hat, z

    start, stop = store.split_range(split)
    if max_cells > 0:
        stop = min(stop, start + max_cells)
    parts = {"x": [], "z": [], "cell_type": []}
    for batch, n_valid in sequential_batches(store, start, stop, batch_size):
        x, x_hat, z = jax.device_get(forward(params, batch))
        parts["x"].append(x[:n_valid])
        parts["z"].append(z[:n_valid])
        parts["cell_type"].append(batch["cell_type"][:n_valid])
        if reconstruction is not None:
            reconstruction.update(x[:n_valid], x_hat[:n_valid])
    return {name: np.concatenate(values) for name, values in parts.items()}


def evaluate(workdir: str) -> list[dict]:
    """Run the evaluation of `workdir`'s `eval.checkpoint` checkpoint; returns the result rows."""
    config = load_config(workdir)
    store = open_store(store_path(config, workdir))
    setup, params, step = load_params(workdir, config, store)
    settings = config.eval
    reconstruction = ExplainedVariance() if hasattr(setup.model, "reconstruct") else None
    val = embed_split(setup, params, store, "val", settings.batch_size, settings.max_cells)
    test = embed_split(setup, params, store, "test", settings.batch_size, settings.max_cells, reconstruction)
    pca = fit_pca(val["x"], settings.pca_components, config.seed)
    pca_val, pca_test = pca.transform(val["x"]), pca.transform(test["x"])

    model_ev = reconstruction.result() if reconstruction else {}  # tasks without a decoder have none
    rows = []
    for method, ref, query, ev in (
            (f"sscell {config.loss.name} (step {step})", val["z"], test["z"], model_ev),
            (f"PCA({pca.n_components_}) log1p", pca_val, pca_test,
             explained_variance(test["x"], pca.inverse_transform(pca_test)))):
        predicted = knn_predict(ref, val["cell_type"], query, settings.knn_k)
        scores = f1_scores(test["cell_type"], predicted)
        rows.append({"method": method, "knn_macro_f1": scores["macro_f1"], "knn_micro_f1": scores["micro_f1"],
                     **{f"recon_{k}": v for k, v in ev.items()}})

    if jax.process_index() != 0:  # every process computes (params are global arrays), one writes
        return rows
    table = write_results(rows, workdir)
    plot_loss_curves(os.path.join(workdir, "metrics.jsonl"), os.path.join(workdir, "loss_curve.png"))
    print(f"\nZero-shot kNN (k={settings.knn_k}): reference = {len(val['z'])} validation cells, "
          f"query = {len(test['z'])} test cells, {len(label_names(store, 'cell_type'))} cell types; "
          f"reconstruction on test cells\n\n{table}\nwritten to {workdir}/results.md, results.csv, loss_curve.png")
    return rows

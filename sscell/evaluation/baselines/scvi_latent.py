"""scvi: scVI's latent mean (scvi-tools, Lopez et al. 2018), the field's deep generative baseline.

An optional extra (`pip install -e '.[baselines]'`): without scvi-tools it is skipped and the
evaluation says so. Trained on the raw counts of the `eval.hvg_genes` highly variable genes
(chosen on validation cells, as for the other baselines) of the first `eval.scvi_cells` training
cells (a random sample), for `eval.scvi_epochs` epochs, seeded with the run's seed; the scIB
benchmark's architecture (2 layers, 30 latent dimensions, negative binomial). No batch key: like
sscell it then embeds cells of unseen donors and datasets (a query store) zero-shot, so it is
not the batch-corrected scVI of integration benchmarks.

On a CPU torch runs on one thread here: its small matrix products gain little from more, lose
up to 70x on cores other processes share (OpenMP threads spin), and one thread sums in one order,
so two fits with one seed give the same embedding on the same machine; not across machines, whose
kernels differ (the quickstart's scVI kNN: 0.943, 0.934 and 0.930 on three CPUs, docs/evaluation.md).
On a GPU (scvi-tools picks it when torch sees one) torch may not be deterministic.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
import warnings
from collections.abc import Iterator

import anndata
import numpy as np
import scipy.sparse as sp

from sscell.evaluation.baselines.registry import CellBatch, FitData, Skipped, register

ARCHITECTURE = dict(n_layers=2, n_latent=30, gene_likelihood="nb")  # the scIB benchmark's scVI
BATCH_SIZE = 128  # scvi-tools' default


@contextlib.contextmanager
def one_cpu_thread() -> Iterator[None]:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def import_scvi():
    """scvi-tools, imported on first use (its import takes seconds); `Skipped` without it."""
    try:
        import scvi
    except ImportError as error:
        if error.name == "scvi":
            raise Skipped("scvi-tools is not installed (pip install -e '.[baselines]')") from None
        raise Skipped(f"scvi-tools cannot be imported ({error})") from None
    scvi.settings.verbosity = logging.WARNING
    for name in ("lightning.pytorch", "lightning.fabric", "scvi"):  # GPU/TPU notices, setup notes
        logging.getLogger(name).setLevel(logging.WARNING)
    return scvi


@dataclasses.dataclass
class FittedSCVI:
    model: object  # scvi.model.SCVI
    genes: np.ndarray
    method: str
    fit_seconds: float

    def embed(self, cells: CellBatch) -> np.ndarray:
        adata = anndata.AnnData(sp.csr_matrix(cells.counts[:, self.genes]))
        with warnings.catch_warnings(), one_cpu_thread():  # "not setup with scvi-tools": its setup is transferred
            warnings.simplefilter("ignore")
            z = self.model.get_latent_representation(adata, give_mean=True, batch_size=len(adata))
        return np.asarray(z, np.float32)


@register("scvi", label="scVI", settings=("hvg_genes", "baseline_cells", "scvi_cells", "scvi_epochs"),
          packages=("scvi-tools", "torch"))
def fit(data: FitData) -> FittedSCVI:
    scvi = import_scvi()
    genes, hvg_seconds = data.hvg
    counts = data.train_counts(data.settings.scvi_cells, genes)
    started = time.perf_counter()
    scvi.settings.seed = data.seed  # torch, numpy and python's RNGs: initial weights and minibatch order
    adata = anndata.AnnData(counts)
    scvi.model.SCVI.setup_anndata(adata)
    model = scvi.model.SCVI(adata, **ARCHITECTURE)
    with warnings.catch_warnings(), one_cpu_thread():  # lightning's advice on dataloader workers and loggers
        warnings.simplefilter("ignore")
        model.train(max_epochs=data.settings.scvi_epochs, train_size=1.0, batch_size=BATCH_SIZE,
                    datasplitter_kwargs={"drop_last": True}, enable_progress_bar=False, logger=False,
                    enable_model_summary=False, enable_checkpointing=False)
    return FittedSCVI(model, genes, f"scVI({ARCHITECTURE['n_latent']}) HVG({len(genes)})",
                      hvg_seconds + time.perf_counter() - started)

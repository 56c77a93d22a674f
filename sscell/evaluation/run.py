"""A trained run opened for use: its config, its store and the parameters of one checkpoint.

    run = open_run("runs/quickstart")              # eval.checkpoint ("best" by default)
    run.model.apply({"params": run.params}, x, method="encode")

Only what using a model needs is read: the saved config, the store's metadata and the
checkpoint's parameters (a partial orbax restore: no optimiser state, no task state). The
model is rebuilt from the config and the store's shape facts (genes, cell types, measured-gene
table, width of a second modality); nothing of training is built (no loader, optimiser, class
counts, gene programmes or IDF statistics).

A bundle is opened for evaluation on a store with its genes (`open_bundle`): its encoder alone,
read by `sscell.bundle` (checksums, no code run), no task built.
"""
from __future__ import annotations

import dataclasses
import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from sscell.bundle import check_parameters, read_bundle
from sscell.config import load_config
from sscell.data.prepare import store_path
from sscell.data.store import Store, open_store
from sscell.data.task_data import TaskInfo, model_info
from sscell.errors import SscellError
from sscell.losses import get_task
from sscell.models.mlp import Embedder, encoder
from sscell.training import checkpoint as checkpoints
from sscell.training.state import check_gene_order

__all__ = ["Run", "bundle_embedder", "open_bundle", "open_run"]


@dataclasses.dataclass(frozen=True, eq=False)
class Run:
    """A run's workdir, config, store, and the parameters (numpy) and step of its `checkpoint`."""

    workdir: str
    config: ml_collections.ConfigDict
    store: Store
    params: dict
    step: int
    checkpoint: str
    module: nn.Module | None = None  # a bundle's (`open_bundle`): its encoder alone, no task built

    @functools.cached_property
    def info(self) -> TaskInfo:
        return model_info(self.config, self.store)

    @functools.cached_property
    def model(self) -> nn.Module:
        """The run's Flax module (its task's `build_model`), for `apply` with `params`; a task of
        the run's own must be registered first (its loss.module is never imported here)."""
        return self.module or get_task(self.config.loss.name).build_model(self.config, self.info)


def open_run(workdir: str | os.PathLike, checkpoint: str | None = None, *, store: Store | None = None) -> Run:
    """The run in `workdir` at its "latest" or "best" `checkpoint` (default: its eval.checkpoint).

    `store`: the run's store when the caller has it open already (else it is opened from the
    run's config)."""
    workdir = str(workdir)
    config = load_config(workdir)
    which = checkpoint or config.eval.checkpoint
    saved = checkpoints.saved_state(workdir, config.train, which)
    if saved is None:
        raise SscellError(f"{workdir} has no {which} checkpoint yet; train first with python -m sscell.main")
    path, step = saved
    params = checkpoints.restore_params(path, checkpoints.params_metadata(path))
    return Run(workdir, config, store or open_store(store_path(config, workdir)), params, step, which)


def bundle_embedder(config: ml_collections.ConfigDict, meta: dict, protocol: str = "sscell") -> Embedder:
    """The module that embeds for a bundle's evaluation: its encoder's output, or, under the study's
    protocol for a model imported from the study's checkpoints (bundle.json's "study"), the study's
    zero-shot embedding of it.

    The study's kNN evaluation (`self_supervision/tester/classifier/test.py:117-136`) loads a pretrained
    encoder's Linear layers into its MLPClassifier (`tester/classifier/model_utils.py:39-64`;
    `trainer/classifier/train.py:44-109`, update_weights: encoder.N / inner_model.N / backbone.N ->
    classifier.N, the head left random), a stack with ReLU after every hidden Linear whatever the
    encoder trained with (`models/lightning_modules/cellnet_autoencoder.py:1471-1476`: MLP's default
    activation, `models/base/base.py:181`), and embeds with the output of `classifier[14]`
    (`estimator/cellnet.py:217-252`, a forward hook; `tester/classifier/data_utils.py:181,189`): the Dropout
    after the ReLU of the 64-unit Linear (`classifier[12]`), the identity in eval mode. So: every
    hidden activation ReLU, and a ReLU on the embedding (`classifier[3 * len(widths) - 1]` for other
    depths).
    """
    body = encoder(config.model)
    if protocol == "study" and isinstance(meta.get("study"), dict):
        return Embedder(body.clone(activation="relu"), output_activation="relu")
    return Embedder(body)


def open_bundle(path: str | os.PathLike, store: Store, protocol: str = "sscell") -> Run:
    """The bundle at `path` opened to embed `store`'s cells (`bundle_embedder` under `protocol`):
    refused in one line unless `store` has its genes in order and its encoder is the one its config
    describes, with finite values. `Run.store` is `store`."""
    path = str(path)
    params, genes, config, meta = read_bundle(path)
    check_gene_order(genes.index, store, path)
    module = bundle_embedder(config, meta, protocol)
    x = jax.ShapeDtypeStruct((1, len(genes)), jnp.float32)
    wanted = jax.eval_shape(lambda key, x: module.init(key, x, method="encode"), jax.random.key(0), x)["params"]
    check_parameters(path, {"encoder": params.get("encoder") or {}}, wanted, f"its encoder ({len(genes)} genes)",
                     "the bundle")
    return Run(path, config, store, {"encoder": params["encoder"]}, int(meta["step"]), meta["checkpoint"], module)

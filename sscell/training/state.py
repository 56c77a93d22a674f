"""The train state: a plain pytree {"params", "opt_state", "step", "extra"}, created already sharded.

`extra` is the pretext task's state outside the gradient (e.g. BYOL's EMA target), from
`init_extra(params)`; most tasks keep it empty. A fresh state may start from the encoder of
another run's checkpoint or of a bundle (`train.init_from`, fine-tuning): `pretrained_encoder`
reads it (a bundle through `sscell.bundle`'s checked reader: no code from it runs).
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pandas as pd
from jax.sharding import NamedSharding

from sscell.bundle import is_bundle, read_bundle, read_bundle_genes
from sscell.config import load_config
from sscell.data.prepare import store_path
from sscell.data.store import Store, open_store, resolved_location
from sscell.errors import SscellError
from sscell.models.mlp import init_params
from sscell.training import checkpoint


def no_extra(params) -> dict:
    """The `extra` of tasks without non-gradient state."""
    return {}


def _init(model: nn.Module, optimizer: optax.GradientTransformation, init_extra: Callable, key: jax.Array,
          encoder: dict | None = None) -> dict:
    params = init_params(model, key)
    if encoder is not None:
        params = {**params, "encoder": encoder}
    return {"params": params, "opt_state": optimizer.init(params), "step": jnp.zeros((), jnp.int32),
            "extra": init_extra(params)}


def create_state(model: nn.Module, optimizer: optax.GradientTransformation, key: jax.Array,
                 sharding: NamedSharding | dict, init_extra: Callable = no_extra, encoder: dict | None = None) -> dict:
    """A fresh train state, placed with `sharding` (one, or a pytree like the state) as it is created.

    `encoder` (e.g. from `pretrained_encoder`) replaces the fresh parameters' "encoder" subtree;
    everything else (heads, decoder) is initialised from `key` as usual, and the optimiser
    state and `extra` are built around the resulting parameters.
    """
    return jax.jit(functools.partial(_init, model, optimizer, init_extra), out_shardings=sharding)(key, encoder)


def abstract_state(model: nn.Module, optimizer: optax.GradientTransformation,
                   sharding: NamedSharding | dict | None = None, init_extra: Callable = no_extra) -> dict:
    """Shapes, dtypes and shardings of the train state, for restoring a checkpoint into.

    `sharding` is one NamedSharding for every leaf, a pytree of them like the state, or None.
    """
    shapes = jax.eval_shape(functools.partial(_init, model, optimizer, init_extra), jax.random.key(0))
    if sharding is None:
        return shapes
    if isinstance(sharding, NamedSharding):
        sharding = jax.tree.map(lambda _: sharding, shapes)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, sharding)


def _shapes(tree) -> dict[str, tuple[int, ...]]:
    """{"dense_0/kernel": shape, ...} of a parameter tree (arrays, shape structs or orbax metadata)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path, simple=True, separator="/"): tuple(leaf.shape) for path, leaf in leaves}


def _fit_problems(pretrained: dict, here: dict) -> list[str]:
    """How two parameter layouts (`_shapes`) differ, one phrase per differing parameter."""
    problems = [f"{k} is {pretrained[k]} there, {here[k]} here" for k in sorted(pretrained.keys() & here.keys())
                if pretrained[k] != here[k]]
    problems += [f"{k} only there" for k in sorted(pretrained.keys() - here.keys())]
    return problems + [f"{k} only here" for k in sorted(here.keys() - pretrained.keys())]


def check_same_genes(pretrained_store: str, store: Store, run: str) -> None:
    """Refuse `store` unless its gene vocabulary (var index, in order) is that of `pretrained_store`,
    the store run `run` trained on: an encoder's first layer is tied to its genes' order."""
    if resolved_location(pretrained_store) == resolved_location(store.path):
        return
    try:
        reference = open_store(pretrained_store).var.index
    except SscellError as error:
        raise SscellError(f"cannot check that {store.path} has the genes of the pretrained run {run}: {error}") from None
    check_gene_order(reference, store, run)


def check_gene_order(reference: pd.Index, store: Store, run: str) -> None:
    """Refuse `store` unless its var index is `reference` (the genes run or bundle `run` trained on), in order."""
    reference, genes = reference.astype(str), store.var.index.astype(str)
    if is_bundle(run):
        source, fix = f"the bundle {run}", f"convert it with --vocabulary={run} (the bundle's genes, in order)"
    else:
        source, fix = (f"the pretrained run {run}'s store",
                       "convert it with --vocabulary=FILE listing the pretrained store's var index, in order")
    if len(genes) != len(reference):
        raise SscellError(f"{store.path} has {len(genes)} genes, {source} {len(reference)}; {fix}")
    differ = np.flatnonzero(np.asarray(genes) != np.asarray(reference))
    if len(differ):
        i = differ[0]
        raise SscellError(f"{store.path} orders its genes unlike {source} ({len(differ)} positions differ, "
                          f"first gene {i}: {genes[i]} vs {reference[i]}); {fix}")


def pretrained_config(source: str) -> ml_collections.ConfigDict:
    """The config of the run in `source`, or of the bundle at `source` (read and checked by `sscell.bundle`)."""
    return read_bundle(source)[2] if is_bundle(source) else load_config(source)


def check_pretrained_genes(source: str, store: Store) -> None:
    """Refuse `store` unless it has the genes, in order, of the run or bundle `source` (its encoder's input)."""
    if is_bundle(source):
        check_gene_order(read_bundle_genes(source).index, store, source)
    else:
        check_same_genes(store_path(load_config(source), source), store, source)


def _checkpoint_path(init_from: str, train_config, which: str):
    """(path of the train state, step) of run `init_from`'s "latest" or "best" checkpoint."""
    if which not in ("latest", "best"):
        raise SscellError(f"unknown train.init_checkpoint '{which}'; choose latest or best")
    saved = checkpoint.saved_state(init_from, train_config, which)
    if saved is None:
        raise SscellError(f"train.init_from {init_from} has no {which} checkpoint; train it first")
    return saved


def check_init_from(init_from: str, which: str, store: Store) -> tuple[ml_collections.ConfigDict, Path, int]:
    """(config, train-state path, step) of the "latest" or "best" checkpoint of run `init_from`, or
    (config, its folder, step) of the bundle `init_from` (one checkpoint: `which` does not apply);
    refuses a folder without a run or that checkpoint, a damaged bundle, or other genes than `store`'s."""
    if is_bundle(init_from):
        _, genes, pretrained, meta = read_bundle(init_from)
        check_gene_order(genes.index, store, init_from)
        return pretrained, Path(init_from), int(meta["step"])
    pretrained = load_config(init_from)
    check_same_genes(store_path(pretrained, init_from), store, init_from)
    return pretrained, *_checkpoint_path(init_from, pretrained.train, which)


def _bundle_encoder(init_from: str, store: Store) -> tuple[ml_collections.ConfigDict, dict | None, int]:
    """(config, "encoder" parameters or None, step) of the bundle `init_from`, its genes checked against `store`'s."""
    params, genes, pretrained, meta = read_bundle(init_from)
    check_gene_order(genes.index, store, init_from)
    encoder = params.get("encoder")
    if isinstance(encoder, dict) and not all(np.isfinite(a).all() for a in jax.tree.leaves(encoder)):
        raise SscellError(f"train.init_from {init_from}: its encoder holds NaN or infinite values; the bundle is damaged")
    return pretrained, encoder if isinstance(encoder, dict) else None, int(meta["step"])


def pretrained_encoder(init_from: str, which: str, store: Store, params_layout: dict) -> dict:
    """The "encoder" parameters (numpy) of run `init_from`'s "latest" or "best" checkpoint, or of
    the bundle `init_from`.

    Refuses, in one line naming what differs, a run or bundle of other genes than `store`'s or
    whose encoder does not have the shapes of `params_layout["encoder"]` (this run's params).
    Only the encoder is read from the checkpoint.
    """
    if "encoder" not in params_layout:
        raise SscellError("train.init_from: this run's model has no 'encoder' to initialise; choose a task "
                          "whose model has one (every built-in task's does)")
    bundle = is_bundle(init_from)
    if bundle:
        pretrained, saved, step = _bundle_encoder(init_from, store)
    else:
        pretrained, path, step = check_init_from(init_from, which, store)
        saved = checkpoint.params_metadata(path).get("encoder")
    if saved is None:
        raise SscellError(f"train.init_from {init_from}: its model ({pretrained.loss.name}) has no encoder")
    problems = _fit_problems(_shapes(saved), _shapes(params_layout["encoder"]))
    if problems:
        raise SscellError(
            f"train.init_from {init_from}: its encoder does not fit this run's ({'; '.join(problems[:3])}"
            f"{'; ...' if len(problems) > 3 else ''}); use its model settings (hidden="
            f"{tuple(pretrained.model.hidden)}, latent={pretrained.model.latent}) and its genes")
    if bundle:
        encoder = jax.tree.map(lambda a, want: np.asarray(a, want.dtype), saved, params_layout["encoder"])
    else:
        encoder = checkpoint.restore_params(path, {"encoder": saved})["encoder"]
    if jax.process_index() == 0:
        print(f"encoder initialised from {init_from} (step {step}, {'bundle' if bundle else f'{which} checkpoint'})")
    return encoder

"""The train state: a plain pytree {"params", "opt_state", "step", "extra"}, created already sharded.

`extra` is the pretext task's state outside the gradient (e.g. BYOL's EMA target), from
`init_extra(params)`; most tasks keep it empty. A fresh state may start from the encoder of
another run's checkpoint (`train.init_from`, fine-tuning): `pretrained_encoder` reads it.
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding

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
        reference = open_store(pretrained_store).var.index.astype(str)
    except SscellError as error:
        raise SscellError(f"cannot check that {store.path} has the genes of the pretrained run {run}: {error}") from None
    genes = store.var.index.astype(str)
    fix = "convert it with --vocabulary=FILE listing the pretrained store's var index, in order"
    if len(genes) != len(reference):
        raise SscellError(f"{store.path} has {len(genes)} genes, the pretrained run {run}'s store "
                          f"{len(reference)}; {fix}")
    differ = np.flatnonzero(np.asarray(genes) != np.asarray(reference))
    if len(differ):
        i = differ[0]
        raise SscellError(f"{store.path} orders its genes unlike the pretrained run {run}'s store ({len(differ)} "
                          f"positions differ, first gene {i}: {genes[i]} vs {reference[i]}); {fix}")


def _checkpoint_path(init_from: str, train_config, which: str):
    """(path of the train state, step) of run `init_from`'s "latest" or "best" checkpoint."""
    if which not in ("latest", "best"):
        raise SscellError(f"unknown train.init_checkpoint '{which}'; choose latest or best")
    manager = checkpoint.checkpoint_manager(init_from, train_config.checkpoint_every, train_config.keep_checkpoints)
    try:
        step = checkpoint.best_or_latest_step(manager, which)
    finally:
        manager.close()
    if step is None:
        raise SscellError(f"train.init_from {init_from} has no {which} checkpoint; train it first")
    return manager.directory / str(step) / "state", step


def pretrained_encoder(init_from: str, which: str, store: Store, params_layout: dict) -> dict:
    """The "encoder" parameters (numpy) of run `init_from`'s "latest" or "best" checkpoint.

    Refuses, in one line naming what differs, a run trained on other genes than `store`'s or
    whose encoder does not have the shapes of `params_layout["encoder"]` (this run's params).
    Only the encoder is read from the checkpoint.
    """
    if "encoder" not in params_layout:
        raise SscellError("train.init_from: this run's model has no 'encoder' to initialise; choose a task "
                          "whose model has one (every built-in task's does)")
    pretrained = load_config(init_from)
    check_same_genes(store_path(pretrained, init_from), store, init_from)
    path, step = _checkpoint_path(init_from, pretrained.train, which)
    handler = ocp.PyTreeCheckpointHandler()
    try:
        saved = dict(handler.metadata(path))["params"].get("encoder")
        if saved is None:
            raise SscellError(f"train.init_from {init_from}: its model ({pretrained.loss.name}) has no encoder")
        problems = _fit_problems(_shapes(saved), _shapes(params_layout["encoder"]))
        if problems:
            raise SscellError(
                f"train.init_from {init_from}: its encoder does not fit this run's ({'; '.join(problems[:3])}"
                f"{'; ...' if len(problems) > 3 else ''}); use its model settings (hidden="
                f"{tuple(pretrained.model.hidden)}, latent={pretrained.model.latent}) and its genes")
        item = {"params": {"encoder": jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), saved)}}
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
        restored = handler.restore(path, args=ocp.args.PyTreeRestore(item, restore_args, partial_restore=True))
    finally:
        handler.close()
    if jax.process_index() == 0:
        print(f"encoder initialised from {init_from} (step {step}, {which} checkpoint)")
    return restored["params"]["encoder"]

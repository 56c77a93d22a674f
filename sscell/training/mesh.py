"""The device mesh and the shardings of a run: data parallel by default, FSDP by rules.

The mesh has axes ("data", "model"). Batches are split over "data". Each train-state leaf
gets its layout from the first of `config.mesh.rules` whose regex matches its path (e.g.
`params/encoder/dense_0/kernel`, `opt_state/1/0/mu/encoder/dense_0/kernel`, so optimiser
moments follow their parameter), big_vision style:

    "replicate"            the same value on every device (the default for unmatched leaves)
    "fsdp"                 the largest axis divisible by the "data" size is split over "data"
    ("model", None), ...   an explicit PartitionSpec, one entry per array axis
"""
from __future__ import annotations

import re

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sscell.errors import SscellError

AXES = ("data", "model")
FSDP_RULES = (("kernel$", "fsdp"),)  # the wide gene-sized layers are the encoder's/decoder's kernels


def make_mesh(mesh_config: ml_collections.ConfigDict, devices=None) -> Mesh:
    """A (data, model) mesh over `devices` (default: every device of every process).

    `mesh_config.data = -1` takes all devices left after the model axis.
    """
    devices = jax.devices() if devices is None else list(devices)
    model = mesh_config.model
    data = len(devices) // model if mesh_config.data == -1 else mesh_config.data
    if model < 1 or data * model != len(devices):
        raise SscellError(f"mesh data={mesh_config.data} x model={model} does not fit {len(devices)} devices; "
                          "set config.mesh.data=-1 or sizes whose product is the device count")
    return jax.make_mesh((data, model), AXES, axis_types=(jax.sharding.AxisType.Auto,) * 2, devices=devices)


def replicated(mesh: Mesh) -> NamedSharding:
    """Same value on every device."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """Leading (cell) axis split over the 'data' axis, replicated over 'model'."""
    return NamedSharding(mesh, PartitionSpec("data"))


def _partition(strategy, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    if strategy == "replicate":
        return PartitionSpec()
    if strategy == "fsdp":
        size = mesh.shape["data"]
        divisible = [axis for axis in np.argsort(shape)[::-1] if shape[axis] % size == 0]
        if size == 1 or not divisible:
            return PartitionSpec()
        return PartitionSpec(*("data" if axis == divisible[0] else None for axis in range(len(shape))))
    if isinstance(strategy, (tuple, list)) and len(strategy) == len(shape):
        return PartitionSpec(*strategy)
    raise SscellError(f"sharding rule {strategy!r} for shape {shape} is not 'replicate', 'fsdp' or a "
                      "PartitionSpec tuple with one entry per axis; fix config.mesh.rules")


def state_shardings(shapes, mesh: Mesh, rules) -> dict:
    """A NamedSharding per leaf of `shapes` (e.g. from `jax.eval_shape`), from the first matching rule."""
    def sharding(path, leaf):
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        strategy = next((s for pattern, s in rules if re.search(pattern, name)), "replicate")
        return NamedSharding(mesh, _partition(strategy, tuple(leaf.shape), mesh))
    return jax.tree_util.tree_map_with_path(sharding, shapes)


def local_data_shards(mesh: Mesh) -> int:
    """How many positions of the mesh's "data" axis this process's devices hold: the number of
    shards its loader lays each batch out in (`sscell.data.loader`)."""
    here = jax.process_index()
    return sum(any(d.process_index == here for d in row.flat) for row in mesh.devices)


def global_batch(local_batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """One global jax.Array per field, assembled from every process's slice of the batch.

    Every field's leading axis (cells, or the loader's shards) is split by `sharding`; a
    process's slice must hold a multiple of its devices' share of that axis."""
    return {name: jax.make_array_from_process_local_data(sharding, value)
            for name, value in local_batch.items()}

"""Device-resident train data (sscell.training.device_resident): its batches, and so a run's
parameters, equal the streamed loader's bit for bit, on 1 device here and on 4 simulated
devices (data-parallel and data x model meshes) in a worker process, across a resume.

Run as a script, this file is the worker: `python test_device_resident.py CONFIG_JSON WORKDIR`.
"""
import json
import os
import subprocess
import sys

import pytest

from sscell.errors import SscellError

pytestmark = pytest.mark.slow


def assert_same_batches(config, store, mesh_shapes) -> None:
    """Resident and streamed global batches agree in keys, dtypes, shapes, shardings and values
    over an epoch boundary, for each (data, model) mesh shape."""
    import jax
    import numpy as np

    from sscell.training.device_resident import DeviceResidentData
    from sscell.training.mesh import batch_sharded, global_batch, make_mesh
    from sscell.training.train import make_loader

    for data, model in mesh_shapes:
        config.mesh.update(data=data, model=model)
        mesh = make_mesh(config.mesh)
        loader = make_loader(config, store, "train", mesh.shape["data"])
        resident = DeviceResidentData(loader, mesh)
        resident.put()
        for step in (0, 1, loader.steps_per_epoch - 1, loader.steps_per_epoch, 2 * loader.steps_per_epoch + 1):
            ours, streamed = resident.batch(step), global_batch(loader.batch(step), batch_sharded(mesh))
            assert list(ours) == list(streamed)
            for name in ours:
                a, b = jax.device_get(ours[name]), jax.device_get(streamed[name])
                assert a.dtype == b.dtype and a.shape == b.shape, (name, a.dtype, b.dtype, a.shape, b.shape)
                np.testing.assert_array_equal(a, b, err_msg=f"{name} at step {step} on mesh {data}x{model}")
                assert ours[name].sharding.is_equivalent_to(streamed[name].sharding, a.ndim), name


def assert_resident_run_equals_streamed(config, store, workdir) -> None:
    """A resident run stopped and resumed half way ends with the streamed run's parameters."""
    import jax
    import numpy as np

    from sscell.training.train import train

    config.train.update(steps=6, checkpoint_every=3, val_every=3, log_every=3)
    streamed = jax.device_get(train(config, os.path.join(workdir, "streamed"), store).state["params"])
    config.data.device_resident = True
    config.train.steps = 3
    train(config, os.path.join(workdir, "resident"), store)
    config.train.steps = 6
    resumed = train(config, os.path.join(workdir, "resident"), store).state
    assert int(resumed["step"]) == 6
    for a, b in zip(jax.tree.leaves(streamed), jax.tree.leaves(jax.device_get(resumed["params"])), strict=True):
        np.testing.assert_array_equal(a, b)


def test_resident_batches_and_resumed_run_equal_the_streamed_ones(tiny_config, tiny_store, tmp_path):
    assert_same_batches(tiny_config, tiny_store, [(1, 1)])
    tiny_config.mesh.update(data=-1, model=1)
    assert_resident_run_equals_streamed(tiny_config, tiny_store, str(tmp_path))


def test_on_four_devices_resident_batches_and_resumed_run_equal_the_streamed_ones(tiny_config, tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    result = subprocess.run([sys.executable, __file__, tiny_config.to_json(), str(tmp_path)], env=env,
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]


def test_a_run_that_does_not_fit_is_refused_naming_the_sizes(tiny_config, tiny_store, monkeypatch):
    from sscell.training import device_resident
    from sscell.training.mesh import make_mesh
    from sscell.training.train import make_loader

    mesh = make_mesh(tiny_config.mesh)
    loader = make_loader(tiny_config, tiny_store, "train")
    need = device_resident.DeviceResidentData(loader, mesh).bytes_per_device
    assert need >= 4 * loader.n_cells + 4 * int((tiny_store.indptr[loader.rows + 1] - tiny_store.indptr[loader.rows]).sum())
    monkeypatch.setattr(device_resident, "device_memory", lambda device: 2 * need)  # as a GPU reports it
    assert device_resident.resident_data(loader, mesh, "auto", 0.5) is not None  # exactly half fits
    monkeypatch.setattr(device_resident, "device_memory", lambda device: 2 * need - 1)
    assert device_resident.resident_data(loader, mesh, "auto", 0.5) is None  # "auto" streams instead
    with pytest.raises(SscellError, match=r"take 0\.00 GiB per device, over 50% of its 0\.0 GiB"):
        device_resident.resident_data(loader, mesh, True, 0.5)


def test_bad_settings_are_refused(tiny_config, tiny_store, tiny_protein_store):
    from sscell.training.device_resident import resident_data
    from sscell.training.mesh import make_mesh
    from sscell.training.train import make_loader

    mesh = make_mesh(tiny_config.mesh)
    with pytest.raises(SscellError, match="device_resident='yes' is not False, True or 'auto'"):
        resident_data(make_loader(tiny_config, tiny_store, "train"), mesh, "yes", 0.5)
    tiny_config.data.update(store=tiny_protein_store.path, modality="protein_counts")
    loader = make_loader(tiny_config, tiny_protein_store, "train")
    with pytest.raises(SscellError, match="does not hold a second modality"):
        resident_data(loader, mesh, True, 0.5)
    assert resident_data(loader, mesh, "auto", 0.5) is None


if __name__ == "__main__":
    import ml_collections

    from sscell.data.store import open_store

    config_arg = ml_collections.ConfigDict(json.loads(sys.argv[1]))
    store_arg = open_store(config_arg.data.store)
    assert_same_batches(config_arg, store_arg, [(4, 1), (2, 2)])
    config_arg.mesh.update(data=-1, model=1)
    assert_resident_run_equals_streamed(config_arg, store_arg, sys.argv[2])

"""Sharded training on simulated CPU devices, each case in its own process (the device count
is fixed when JAX starts): data-parallel and FSDP steps, float32 and bfloat16, equal the
single-device step on the same global batch, and a checkpoint saved on 4 devices restores onto 2.

Run as a script, this file is the worker: `python test_distributed_mesh.py MODE CONFIG_JSON WORKDIR`.
"""
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

FSDP = [["kernel$", "fsdp"]]


def run_worker(mode: str, n_devices: int, config, workdir) -> None:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={n_devices}"}
    result = subprocess.run([sys.executable, __file__, mode, config.to_json(), str(workdir)], env=env,
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])  # bfloat16: matmuls with row-major transposes
def test_sharded_steps_equal_the_single_device_step_and_restore_onto_fewer_devices(tiny_config, tmp_path, dtype):
    tiny_config.model.dtype = dtype
    tiny_config.train.update(steps=10, checkpoint_every=10, val_every=10)
    run_worker("steps_then_train", 4, tiny_config, tmp_path)
    tiny_config.train.steps = 12
    run_worker("restore_then_train", 2, tiny_config, tmp_path)


def _steps_then_train(config, workdir):
    """DP and FSDP steps on 4 devices vs 1 device; then a 4-device FSDP run saving checkpoints."""

    import jax
    import numpy as np

    from sscell.data.store import open_store
    from sscell.training.mesh import batch_sharded, global_batch, make_mesh
    from sscell.training.state import create_state
    from sscell.training.step import make_train_step
    from sscell.training.train import build, make_loader, sharded_state_layout, train

    store = open_store(config.data.store)
    setup = build(config, store)
    task, info, model, optimizer, _, init_extra = setup
    loader = make_loader(config, store, "train", shards=4)  # 4 data shards fit a 1- and a 4-device mesh
    key = jax.random.key(0)

    def three_steps(devices, rules):
        config.mesh.rules = rules
        mesh = make_mesh(config.mesh, devices)
        _, shardings = sharded_state_layout(config, setup, mesh)
        state = create_state(model, optimizer, key, shardings, init_extra)
        step = make_train_step(task, model, config, optimizer, info, shardings, batch_sharded(mesh))
        for i in range(3):
            state, metrics = step(state, global_batch(loader.batch(i), batch_sharded(mesh)), key)
            jax.block_until_ready(state)  # stable rendezvous of simulated devices
        return state

    single = jax.device_get(three_steps(jax.devices()[:1], [])["params"])
    for rules in ([], FSDP):
        state = three_steps(jax.devices(), rules)
        kernel = state["params"]["encoder"]["dense_0"]["kernel"]
        assert len(kernel.sharding.device_set) == 4
        assert ("data" in kernel.sharding.spec) == bool(rules), kernel.sharding.spec
        for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(jax.device_get(state["params"])), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

    config.mesh.rules = FSDP
    final = train(config, workdir, store).state
    np.savez(os.path.join(workdir, "params.npz"), *jax.tree.leaves(jax.device_get(final["params"])))


def _restore_then_train(config, workdir):
    """Restore the 4-device FSDP checkpoint onto a 2-device mesh, then continue training there."""

    import jax
    import numpy as np

    from sscell.data.store import open_store
    from sscell.training import checkpoint
    from sscell.training.mesh import make_mesh
    from sscell.training.train import build, sharded_state_layout, train

    store = open_store(config.data.store)
    config.mesh.rules = FSDP
    abstract, _ = sharded_state_layout(config, build(config, store), make_mesh(config.mesh))
    manager = checkpoint.checkpoint_manager(workdir, config.train.checkpoint_every, config.train.keep_checkpoints)
    state, data_state = checkpoint.restore(manager, abstract)
    manager.close()
    saved = np.load(os.path.join(workdir, "params.npz"))
    for i, leaf in enumerate(jax.tree.leaves(state["params"])):
        assert len(leaf.sharding.device_set) == 2
        np.testing.assert_array_equal(np.asarray(leaf), saved[f"arr_{i}"])
    assert data_state["step"] == 10
    assert int(train(config, workdir, store).state["step"]) == 12


if __name__ == "__main__":
    import ml_collections

    mode, config_json, workdir_arg = sys.argv[1:]
    {"steps_then_train": _steps_then_train, "restore_then_train": _restore_then_train}[mode](
        ml_collections.ConfigDict(json.loads(config_json)), workdir_arg)

"""Masked reconstruction is scored on the input the run was trained on: the genes left visible
are rescaled by 1 / (1 - mask rate) only when the run's `loss.rescale_inputs` did so."""
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import train_tiny_run  # tests/ is on sys.path (rootdir conftest)

from sscell.evaluation.cells import Evaluator
from sscell.evaluation.evaluate import eval_settings
from sscell.evaluation.run import open_run


@pytest.fixture(scope="module")
def workdir(tiny_store, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("masked_input")
    train_tiny_run(tiny_store, workdir)
    return workdir


@pytest.mark.parametrize("rescale", [True, False])
def test_the_masked_input_follows_the_runs_rescale_setting(workdir, tiny_store, rescale):
    run = open_run(workdir)
    run.config.loss.rescale_inputs = rescale
    settings = eval_settings(run.config)
    settings.update(baselines=())
    evaluator = Evaluator(run, tiny_store, settings, "model", True)
    _, n_valid, out = next(evaluator._batches("test", 0, "reconstruct"))
    x, hidden = np.asarray(out["x"]), np.asarray(out["hidden"])
    assert hidden.any() and (~hidden).any()
    visible = np.where(hidden, 0.0, x) / ((1 - settings.mask_rate) if rescale else 1.0)  # numpy, not mask_input
    expected = run.model.apply({"params": run.params}, jnp.asarray(visible, jnp.float32), out["measured"],
                               method="reconstruct")
    np.testing.assert_allclose(np.asarray(out["x_hat_masked"])[:n_valid], np.asarray(expected)[:n_valid],
                               rtol=1e-5, atol=1e-5)

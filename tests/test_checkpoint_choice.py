"""Which checkpoint evaluation and fine-tuning read: the best (lowest validation loss) by default."""
import logging

import jax.numpy as jnp
import pytest

from sscell.config import default_config, save_config
from sscell.errors import SscellError
from sscell.evaluation.run import open_run
from sscell.training import checkpoint
from sscell.training.state import pretrained_encoder
from sscell.training.train import train


def save_steps(workdir, config, state, val_losses):
    """Checkpoints of `state` at steps 1, 2, ... with these validation losses (None: not validated)."""
    manager = checkpoint.checkpoint_manager(workdir, 1, 5)
    for step, loss in enumerate(val_losses, start=1):
        metrics = None if loss is None else {"val/loss": loss}
        checkpoint.save(manager, step, {**state, "step": jnp.asarray(step, state["step"].dtype)}, {"step": step},
                        {}, metrics=metrics, force=True)
    manager.wait_until_finished()
    manager.close()


def test_evaluation_and_init_from_read_the_best_checkpoint_by_default(tiny_config, tiny_store, tmp_path):
    assert default_config().eval.checkpoint == default_config().train.init_checkpoint == "best"
    tiny_config.train.steps = 0  # train() returns the fresh state
    state = train(tiny_config, str(tmp_path / "fresh"), tiny_store).state
    save_config(tiny_config, tmp_path)
    save_steps(tmp_path, tiny_config, state, [3.0, 1.0, 2.0, None])
    assert open_run(tmp_path).step == 2  # lowest validation loss, not the latest (4)
    assert open_run(tmp_path, "latest").step == 4
    encoder = pretrained_encoder(str(tmp_path), default_config().train.init_checkpoint, tiny_store,
                                 {"encoder": state["params"]["encoder"]})
    assert set(encoder) == set(state["params"]["encoder"])


def test_best_is_refused_while_no_checkpoint_has_a_validation_loss(tiny_config, tiny_store, tmp_path, caplog):
    tiny_config.train.steps = 0
    state = train(tiny_config, str(tmp_path / "fresh"), tiny_store).state
    save_config(tiny_config, tmp_path)
    with caplog.at_level(logging.WARNING):
        save_steps(tmp_path, tiny_config, state, [None, None])
    assert "tracked_metric" not in caplog.text  # orbax's warning for saves between validations: on purpose
    message = r"has checkpoints \(latest: step 2\) but none with a validation loss yet.*choose 'latest'"
    with pytest.raises(SscellError, match=message):
        open_run(tmp_path)
    with pytest.raises(SscellError, match=message):
        pretrained_encoder(str(tmp_path), "best", tiny_store, {"encoder": state["params"]["encoder"]})
    assert open_run(tmp_path, "latest").step == 2

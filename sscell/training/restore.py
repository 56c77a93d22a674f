"""A trained run's parameters, restored from the checkpoints in its workdir."""
from __future__ import annotations

from sscell.data.store import Store
from sscell.errors import SscellError
from sscell.training import checkpoint
from sscell.training.mesh import make_mesh, replicated
from sscell.training.state import abstract_state
from sscell.training.train import build


def load_params(workdir: str, config, store: Store, which: str | None = None):
    """(setup, params, step) of `workdir`'s "latest" or "best" checkpoint (default `config.eval.checkpoint`)."""
    setup = build(config, store)
    manager = checkpoint.checkpoint_manager(workdir, config.train.checkpoint_every, config.train.keep_checkpoints)
    layout = abstract_state(setup.model, setup.optimizer, replicated(make_mesh(config.mesh)), setup.init_extra)
    restored = checkpoint.restore(manager, layout, which or config.eval.checkpoint)
    manager.close()
    if restored is None:
        raise SscellError(f"{workdir} has no checkpoint yet; train first with python -m sscell.main")
    return setup, restored[0]["params"], int(restored[0]["step"])

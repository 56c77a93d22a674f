"""A checked run trained in its workdir the way `sscell.main` does: one run per workdir, the
saved config compatible with a checkpointed run there, the config saved, then trained."""
from __future__ import annotations

import jax
import ml_collections

from sscell.config import save_config
from sscell.data.store import Store
from sscell.training.resume import check_compatible
from sscell.training.train import train
from sscell.training.workdir_lock import workdir_lock


def train_in_workdir(config: ml_collections.ConfigDict, workdir: str, store: Store) -> bool:
    """Train (or resume, or find finished) `config` (already checked with `train.check_run`) in
    `workdir`; False if it stopped early (preemption or Ctrl-C: rerunning resumes)."""
    with workdir_lock(workdir):
        check_compatible(config, workdir, store.n_genes)
        if jax.process_index() == 0:
            save_config(config, workdir)
        return train(config, workdir, store).finished

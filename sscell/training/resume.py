"""Whether a run may start or resume in a workdir: its config against the one saved there, and
the compute dtype (`model.dtype`) settled for good."""
from __future__ import annotations

import json
import os

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from sscell.config import CONFIG_FILE, default_config, flatten_config, load_config
from sscell.errors import SscellError
from sscell.models.dtype_probe import auto_dtype
from sscell.models.precision import resolve_dtype
from sscell.training.checkpoint import has_checkpoint

# Fields that may differ between a run and its resumption (they do not change what is learned
# up to the current step).
RESUMABLE_CHANGES = ("train.steps", "train.log_every", "train.val_every", "train.checkpoint_every",
                     "train.keep_checkpoints", "train.profile_steps", "data.prefetch", "data.device_resident",
                     "data.device_memory_share", "mesh.", "eval.",
                     "train.init_checkpoint")  # read by a fresh run only

# What a store converted into WORKDIR/store (no data.store) was made from.
STORE_SOURCE = ("seed", "data.h5ad", "data.vocabulary", "data.split", "data.synthetic.")  # data.split*: both fields


def settle_dtype(config: ml_collections.ConfigDict, resumed: ml_collections.ConfigDict | None = None,
                 n_genes: int | None = None) -> None:
    """Set `config.model.dtype` "auto" to the dtype the checkpointed run `resumed` (its saved
    config) trained with, so a resumed run continues exactly; else, for a new run over `n_genes`
    genes, to the faster one here (`auto_dtype`: measured on a CPU with bfloat16 instructions, the
    first process's choice on every process; printed); else to the hardware rule (`resolve_dtype`).
    An unknown dtype is refused. The one place a run's dtype is decided: the saved config then
    names it, and model builders only resolve "auto" in configs saved before."""
    if config.model.dtype == "auto" and resumed is not None:
        config.model.dtype = resumed.model.get("dtype", "float32")
    elif config.model.dtype == "auto" and n_genes is not None:
        choice = auto_dtype(config.model, config.train.batch_size, n_genes)
        bfloat16 = np.int32(choice.dtype == "bfloat16")
        if jax.process_count() > 1:
            bfloat16 = multihost_utils.broadcast_one_to_all(bfloat16)
        config.model.dtype = "bfloat16" if bfloat16 else "float32"
        if jax.process_index() == 0:
            print(choice.describe())
    config.model.dtype = resolve_dtype(config.model.dtype)


def check_compatible(config: ml_collections.ConfigDict, workdir: str | os.PathLike, n_genes: int | None = None) -> None:
    """Settle `model.dtype` "auto" for a run in `workdir` (`settle_dtype`: the dtype its
    checkpointed run trained with, so a resumed run continues exactly; for a new run, given its
    store's `n_genes`, the faster one here, else left to `settle_dtype` once the store is there),
    then refuse to resume a run there whose saved config differs in what it learns.

    A workdir without a checkpoint holds nothing learned: its saved config is simply replaced,
    unless the store converted into it was made from other data (`STORE_SOURCE`).
    """
    saved_config = load_config(workdir) if os.path.exists(os.path.join(workdir, CONFIG_FILE)) else None
    resuming = saved_config is not None and has_checkpoint(workdir)
    if resuming or n_genes is not None:
        settle_dtype(config, saved_config if resuming else None, n_genes)
    else:
        resolve_dtype(config.model.dtype)  # checked; "auto" is measured with the store's genes
    if saved_config is None:
        return
    defaults = flatten_config(json.loads(default_config().to_json_best_effort()))
    saved = {**defaults, **flatten_config(saved_config.to_dict())}  # fields added since count as defaults
    new = flatten_config(json.loads(config.to_json_best_effort()))
    if not resuming:
        derived_store = not config.data.store and os.path.exists(os.path.join(workdir, "store"))
        changed = sorted(k for k in saved.keys() | new.keys()
                         if derived_store and k.startswith(STORE_SOURCE) and saved.get(k) != new.get(k))
        if changed:
            raise SscellError(f"{workdir}/store was converted from other data ({_changes(changed, saved, new)}); "
                              f"delete {workdir}/store (and {workdir}/atlas.h5ad) or use another --workdir")
        return
    saved["model.dtype"] = resolve_dtype(saved["model.dtype"])  # saved unsettled: it ran in this hardware's choice
    resumable = RESUMABLE_CHANGES
    if saved.get("train.schedule") == "warmup_cosine":  # its decay is laid out over train.steps
        resumable = tuple(k for k in resumable if k != "train.steps")
    changed = sorted(key for key in saved.keys() | new.keys()
                     if saved.get(key) != new.get(key) and not key.startswith(resumable))
    if changed:
        raise SscellError(f"workdir {workdir} holds a run with an incompatible config ({_changes(changed, saved, new)}); "
                          "use another --workdir or the run's own settings")


def _changes(keys: list[str], saved: dict, new: dict) -> str:
    return ", ".join(f"{k}: {saved.get(k)!r} -> {new.get(k)!r}" for k in keys[:4])

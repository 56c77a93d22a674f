"""A run's config: saved resolved into its workdir, checked before a run resumes there."""
from __future__ import annotations

import json
import os

import ml_collections

from sscell.errors import SscellError

# Fields that may differ between a run and its resumption (they do not change what is learned
# up to the current step).
RESUMABLE_CHANGES = ("train.steps", "train.log_every", "train.val_every", "train.checkpoint_every",
                     "train.keep_checkpoints", "data.prefetch", "eval.")

CONFIG_FILE = "config.json"


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return flat


def save_config(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> None:
    """Write the resolved config to `workdir/config.json` (atomically)."""
    path = os.path.join(workdir, CONFIG_FILE)
    with open(path + ".tmp", "w") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    os.replace(path + ".tmp", path)


def load_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
    """The config a run saved into `workdir`."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        raise SscellError(f"{workdir} holds no sscell run (no {CONFIG_FILE}); train one with "
                          "python -m sscell.main --config=... --workdir=...")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def check_compatible(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> None:
    """Refuse to resume a run in `workdir` whose saved config differs in what it learns."""
    if not os.path.exists(os.path.join(workdir, CONFIG_FILE)):
        return
    saved = _flatten(load_config(workdir).to_dict())
    new = _flatten(json.loads(config.to_json_best_effort()))
    changed = sorted(key for key in saved.keys() | new.keys()
                     if saved.get(key) != new.get(key) and not key.startswith(RESUMABLE_CHANGES))
    if changed:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {new.get(k)!r}" for k in changed[:4])
        raise SscellError(f"workdir {workdir} holds a run with an incompatible config ({details}); "
                          "use another --workdir or the run's own settings")


def default_config() -> ml_collections.ConfigDict:
    """Every field a run reads, with the study's settings; experiments/*.py start from this."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.data = ml_collections.ConfigDict(dict(
        store="",               # a store made by `python -m sscell.data.convert`, or
        h5ad="",                # comma-separated .h5ad paths/globs, converted into WORKDIR/store, or
        # a generated atlas (sscell.data.synthetic.AtlasSpec fields), used when n_cells > 0
        synthetic=ml_collections.ConfigDict(dict(n_cells=0, n_genes=2000, n_datasets=4, donors_per_dataset=4)),
        block_cells=64,         # contiguous cells per read; blocks are shuffled per epoch
        prefetch=4,             # batches read ahead on background threads
    ))
    config.model = ml_collections.ConfigDict(dict(
        hidden=(512, 512, 256, 256), latent=64, activation="selu", dropout=0.1))
    config.loss = ml_collections.ConfigDict(dict(name="masked", mask_rate=0.5))
    config.train = ml_collections.ConfigDict(dict(
        steps=10_000, batch_size=8192, lr=1e-3, weight_decay=0.01, grad_clip=1.0,
        lr_decay=0.9, lr_decay_epochs=2,
        log_every=50, val_every=500, val_batches=8, checkpoint_every=500, keep_checkpoints=3))
    config.eval = ml_collections.ConfigDict(dict(
        knn_k=5, pca_components=64, batch_size=1024, max_cells=0))
    return config

"""Shared fixtures: a tiny generated atlas converted into a store, once per test session."""
from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile

import jax
import pytest

from sscell.config import default_config, save_config
from sscell.data.convert import convert
from sscell.data.store import open_store
from sscell.data.synthetic import AtlasSpec, write_atlas

TINY_ATLAS = AtlasSpec(n_cells=1600, n_genes=96, n_datasets=2, donors_per_dataset=4, seed=0)
TINY_PROTEIN_ATLAS = dataclasses.replace(TINY_ATLAS, n_proteins=8)  # the same cells with a protein panel
TINY_ATAC_ATLAS = dataclasses.replace(TINY_ATLAS, n_peaks=60)  # the same cells with 60 ATAC peaks


def pytest_configure(config):
    """One persistent XLA compilation cache for the session and the processes its tests start:
    many tests compile the same tiny programs (the suite runs ~1.5x faster)."""
    cache = tempfile.mkdtemp(prefix="sscell-xla-cache-")
    os.environ.update(JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_unconfigure(config):
    shutil.rmtree(jax.config.jax_compilation_cache_dir or "", ignore_errors=True)


def pytest_collection_modifyitems(items):
    """A hung test (e.g. a stuck collective) fails after 5 minutes instead of stalling CI."""
    for item in items:
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(300))


def _atlas(spec: AtlasSpec, name: str, tmp_path_factory) -> str:
    """`spec` written as atlas.h5ad in a fresh folder `name`."""
    path = str(tmp_path_factory.mktemp(name) / "atlas.h5ad")
    write_atlas(spec, path)
    return path


@pytest.fixture(scope="session")
def tiny_h5ad(tmp_path_factory) -> str:
    return _atlas(TINY_ATLAS, "atlas", tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_store(tiny_h5ad, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("store") / "store")
    convert([tiny_h5ad], path, seed=0)
    return open_store(path)


@pytest.fixture
def tiny_config(tiny_store):
    """A config that trains the tiny store in seconds."""
    config = default_config()
    config.data.store = tiny_store.path
    config.model.hidden = (32, 32)
    config.model.latent = 8
    config.train.update(steps=30, batch_size=64, log_every=5, val_every=10, val_batches=2,
                        checkpoint_every=10, lr_decay_epochs=100)
    config.eval.update(batch_size=128, pca_components=8)
    return config


def train_tiny_run(store, workdir, **eval_settings):
    """Train a float32 run 20 steps on `store` in `workdir` (config saved there); `eval_settings`
    over small evaluation defaults. Returns the config."""
    from sscell.training.train import train

    config = default_config()
    config.data.store = store.path
    config.model.update(hidden=(32, 32), latent=8, dtype="float32")
    config.train.update(steps=20, batch_size=64, log_every=10, val_every=10, val_batches=2, checkpoint_every=10,
                        lr_decay_epochs=100)
    config.eval.update(batch_size=256, pca_components=8, **eval_settings)
    save_config(config, workdir)
    train(config, str(workdir), store)
    return config


def _store_in_small_buckets(h5ad: str, name: str, tmp_path_factory):
    """`h5ad` converted through many small blocks and shuffle buckets."""
    path = str(tmp_path_factory.mktemp(name) / "store")
    convert([h5ad], path, seed=0, block_cells=300, bucket_nonzeros=5000)
    return open_store(path)


@pytest.fixture(scope="session")
def tiny_protein_h5ad(tmp_path_factory) -> str:
    """TINY_ATLAS with 8 proteins per cell (obsm['protein_counts'])."""
    return _atlas(TINY_PROTEIN_ATLAS, "protein_atlas", tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_protein_store(tiny_protein_h5ad, tmp_path_factory):
    return _store_in_small_buckets(tiny_protein_h5ad, "protein_store", tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_atac_h5ad(tmp_path_factory) -> str:
    """TINY_ATLAS with 60 ATAC peaks per cell (obsm['atac_counts'], CSR)."""
    return _atlas(TINY_ATAC_ATLAS, "atac_atlas", tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_atac_store(tiny_atac_h5ad, tmp_path_factory):
    return _store_in_small_buckets(tiny_atac_h5ad, "atac_store", tmp_path_factory)

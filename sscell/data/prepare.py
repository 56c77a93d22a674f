"""Resolve a run's data section to an opened store, creating the store on first use.

Three ways in, first match wins: `data.store` (a store made with `python -m sscell.data.convert`),
`data.h5ad` (comma-separated .h5ad paths or globs, converted into `WORKDIR/store`), or
`data.synthetic` (a generated atlas, `WORKDIR/atlas.h5ad`, then converted).
"""
from __future__ import annotations

import glob
import os

import ml_collections

from sscell.data.convert import convert
from sscell.data.store import Store, open_store
from sscell.data.synthetic import AtlasSpec, write_atlas
from sscell.errors import SscellError


def _h5ad_inputs(pattern_list: str) -> list[str]:
    paths = []
    for pattern in (p.strip() for p in pattern_list.split(",") if p.strip()):
        matches = sorted(glob.glob(os.path.expanduser(pattern)))
        if not matches:
            raise SscellError(f"no .h5ad file matches data.h5ad entry '{pattern}'; check the path")
        paths.extend(matches)
    return paths


def store_path(config: ml_collections.ConfigDict, workdir: str) -> str:
    """Where the run's store is: `data.store` if given, else `WORKDIR/store`."""
    return config.data.store or os.path.join(workdir, "store")


def prepare_store(config: ml_collections.ConfigDict, workdir: str) -> Store:
    """The store the run trains on, converted (and generated) first if it does not exist yet."""
    data, path = config.data, store_path(config, workdir)
    if not data.store and not os.path.exists(path):
        if data.h5ad:
            inputs = _h5ad_inputs(data.h5ad)
        elif data.synthetic.n_cells > 0:
            inputs = [os.path.join(workdir, "atlas.h5ad")]
            if not os.path.exists(inputs[0]):
                spec = AtlasSpec(**data.synthetic.to_dict(), seed=config.seed)
                print(f"generating a synthetic atlas: {spec.n_cells} cells x {spec.n_genes} genes")
                write_atlas(spec, inputs[0])
        else:
            raise SscellError("the config names no data: set data.store, data.h5ad or data.synthetic")
        report = convert(inputs, path, seed=config.seed, vocabulary=data.vocabulary or None,
                         split_column=data.split_column or None, split=data.split)
        print(f"converted {report['cells']} cells into {path} ({report['bytes_per_cell']:.0f} bytes/cell, "
              f"{report['cells_per_s']:.0f} cells/s)")
    return open_store(path)

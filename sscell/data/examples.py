"""Small real datasets that ship inside an installed wheel, written as CELLxGENE-like .h5ad files
(raw integer counts in a CSR X, obs['cell_type'], gene symbols as the var index): real data with
no download.

    python -m sscell.data.examples pbmc68k --output=pbmc.h5ad

pbmc68k: 700 peripheral blood mononuclear cells x 765 genes from 10x Genomics' 68k PBMCs
(Zheng et al., Nat. Commun. 2017), as reduced by scanpy (`scanpy/datasets/10x_pbmc68k_reduced.h5ad`,
installed with scanpy, a dependency of scib-metrics). Cell types are its `bulk_labels`: the 10
FACS-sorted populations each cell is closest to. One donor, so there is no donor_id: split it by
cell (`convert --split=cells`). The file keeps log1p(counts / n_counts * 1e4) in raw.X; the
counts come back as round(expm1(raw.X) * n_counts / 1e4), each within 0.1 of its integer.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import anndata
import numpy as np
import scipy.sparse as sp

from sscell.atomic import atomic_file
from sscell.errors import SscellError, exit_on_error

MAX_ROUNDING = 0.1  # how far a recovered count may be from its integer before the file is not what we expect


def _packaged_file(package: str, *parts: str) -> Path:
    """A data file inside an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SscellError(f"this example needs the {package} package; pip install {package}")
    path = Path(spec.submodule_search_locations[0], *parts)
    if not path.is_file():
        raise SscellError(f"{path} is missing from the installed {package}; reinstall it (pip install -U {package})")
    return path


def recovered_counts(normalised: sp.csr_matrix, library_sizes: np.ndarray, scale: float = 1e4) -> sp.csr_matrix:
    """Integer counts (float32) behind log1p(counts / library_size * scale); refuses values that
    are not within MAX_ROUNDING of an integer."""
    normalised = sp.csr_matrix(normalised, dtype=np.float64)
    per_row = np.repeat(np.asarray(library_sizes, np.float64) / scale, np.diff(normalised.indptr))
    values = np.expm1(normalised.data) * per_row
    deviation = np.abs(values - np.rint(values)).max(initial=0.0)
    if deviation > MAX_ROUNDING:
        raise SscellError(f"recovered counts are up to {deviation:.3f} from an integer (at most {MAX_ROUNDING} "
                          "expected): the input is not log1p of library-size-normalised counts")
    counts = sp.csr_matrix((np.rint(values).astype(np.float32), normalised.indices, normalised.indptr),
                           shape=normalised.shape)
    counts.eliminate_zeros()
    return counts


def pbmc68k() -> anndata.AnnData:
    """scanpy's 700 reduced 68k PBMCs: counts in X, obs['cell_type'], gene symbols as var index."""
    with warnings.catch_warnings():  # an old file: anndata warns of its layout
        warnings.simplefilter("ignore")
        source = anndata.read_h5ad(_packaged_file("scanpy", "datasets", "10x_pbmc68k_reduced.h5ad"))
    obs = source.obs[["bulk_labels"]].rename(columns={"bulk_labels": "cell_type"})
    obs.index = obs.index.astype(str).rename(None)
    var = source.raw.var[[]].copy()
    var.index = var.index.astype(str).rename(None)
    return anndata.AnnData(X=recovered_counts(source.raw.X, source.obs["n_counts"].to_numpy()), obs=obs, var=var,
                           uns={"source": "scanpy.datasets.pbmc68k_reduced (10x Genomics 68k PBMCs, Zheng et al. "
                                          "2017); counts = round(expm1(raw.X) * n_counts / 1e4)"})


EXAMPLES: dict[str, Callable[[], anndata.AnnData]] = {"pbmc68k": pbmc68k}


def write_example(name: str, output: str | os.PathLike) -> anndata.AnnData:
    """Write example `name` to `output` (atomically, creating its folder) and return it."""
    if name not in EXAMPLES:
        raise SscellError(f"unknown example {name!r}; choose from {', '.join(EXAMPLES)}")
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    adata = EXAMPLES[name]()
    with atomic_file(output) as tmp:
        adata.write_h5ad(tmp)
    return adata


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", help=f"the example: {', '.join(EXAMPLES)}")
    parser.add_argument("--output", required=True, help="path of the .h5ad file to write")
    args = parser.parse_args(argv)
    with exit_on_error():
        adata = write_example(args.name, args.output)
    counts = adata.X
    print(f"wrote {args.output}: {adata.n_obs} cells x {adata.n_vars} genes, {counts.nnz} nonzero counts "
          f"({1 - counts.nnz / (adata.n_obs * adata.n_vars):.0%} zeros), "
          f"{adata.obs['cell_type'].nunique()} cell types, no donor_id (split it with convert --split=cells)")


if __name__ == "__main__":
    main()

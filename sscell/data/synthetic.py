"""A synthetic single-cell atlas shaped like a CELLxGENE download, so quickstarts need no data.

Cells come from a small Cell Ontology hierarchy (CELL_TYPES). Every cell type switches on its
own gene programmes plus its ancestors', so siblings (CD4 vs CD8 T cells) are harder to tell
apart than lineages. Datasets and donors shift genes on the log scale (batch effects), cells
vary in library size and in a few cell-state programmes, and counts are negative binomial
(Gamma-Poisson with per-gene dispersion). Cells are grouped by dataset then donor (types mixed
within a donor), as in a concatenated atlas.

    python -m sscell.data.synthetic --output=atlas.h5ad --cells=20000 --genes=2000 --seed=0
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import anndata
import numpy as np
import pandas as pd
import scipy.optimize
import scipy.sparse as sp

from sscell.errors import SscellError, exit_on_error


class CellType(NamedTuple):
    """One row of the hierarchy; only leaves (types that are nobody's parent) get cells."""

    name: str
    ontology_id: str
    parent: str | None


CELL_TYPES: tuple[CellType, ...] = (
    CellType("leukocyte", "CL:0000738", None),
    CellType("T cell", "CL:0000084", "leukocyte"),
    CellType("CD4-positive, alpha-beta T cell", "CL:0000624", "T cell"),
    CellType("CD8-positive, alpha-beta T cell", "CL:0000625", "T cell"),
    CellType("B cell", "CL:0000236", "leukocyte"),
    CellType("natural killer cell", "CL:0000623", "leukocyte"),
    CellType("monocyte", "CL:0000576", "leukocyte"),
    CellType("classical monocyte", "CL:0000860", "monocyte"),
    CellType("non-classical monocyte", "CL:0000875", "monocyte"),
    CellType("dendritic cell", "CL:0000451", "leukocyte"),
    CellType("epithelial cell", "CL:0000066", None),
    CellType("fibroblast", "CL:0000057", None),
    CellType("endothelial cell", "CL:0000115", None),
)
_INDEX = {t.name: i for i, t in enumerate(CELL_TYPES)}
_LEAVES = tuple(i for i, t in enumerate(CELL_TYPES) if t.name not in {u.parent for u in CELL_TYPES})

ASSAYS = ("10x 3' v3", "10x 3' v2", "10x 5' v2")  # dataset k uses ASSAYS[k % 3]
TISSUES = ("blood", "lung")  # dataset k uses TISSUES[k % 2]

CHUNK_ENTRIES = 2**23  # cells x genes sampled at once (4,096 x 2,048): bounds memory
ZEROS = 0.89  # the mean library size is set so an average cell has this share of zeros
LIBRARY_SD = 0.5  # per-cell log library size sd (CV ~0.5), before the dataset scale
DATASET_LIBRARY_SD = 0.3  # per-dataset log library scale sd
DONOR_SHIFT = 1 / 3  # donor shift sd as a fraction of spec.batch_effect
BASELINE_SD = 1.5  # sd of per-gene log baseline: a few genes dominate, most are low
DISPERSION = 0.3  # median per-gene negative-binomial dispersion (var = mu + disp * mu^2)
DISPERSION_SD = 0.5  # sd of log dispersion across genes
ROOT_EFFECT = 2.0  # mean log fold change of a root type's programme genes...
DEPTH_DECAY = 0.75  # ...shrunk per level, so finer types differ by less
STATE_EFFECT = 1.0  # mean log fold change of a cell-state programme
STATE_RATE = 0.2  # share of cells with a given cell-state programme switched on


@dataclasses.dataclass(frozen=True)
class AtlasSpec:
    """Size and randomness of a synthetic atlas; the same spec always gives the same atlas."""

    n_cells: int = 20_000
    n_genes: int = 2_000
    n_datasets: int = 4
    donors_per_dataset: int = 4
    n_programmes: int = 40  # gene programmes (sets of co-regulated genes)
    genes_per_programme: int = 40
    batch_effect: float = 0.3  # sd of per-dataset per-gene log-scale shifts
    seed: int = 0


def _check(spec: AtlasSpec) -> None:
    for field in ("n_cells", "n_genes", "n_datasets", "donors_per_dataset", "genes_per_programme"):
        if getattr(spec, field) < 1:
            raise SscellError(f"AtlasSpec.{field}={getattr(spec, field)}: must be at least 1.")
    if spec.seed < 0 or spec.batch_effect < 0:
        raise SscellError("AtlasSpec.seed and AtlasSpec.batch_effect must be non-negative.")
    if spec.n_programmes < len(CELL_TYPES) + 1:
        raise SscellError(
            f"AtlasSpec.n_programmes={spec.n_programmes}: need at least {len(CELL_TYPES) + 1} "
            "(one per entry of CELL_TYPES plus one cell-state programme)."
        )
    if spec.genes_per_programme > spec.n_genes:
        raise SscellError(
            f"AtlasSpec.genes_per_programme={spec.genes_per_programme} exceeds "
            f"n_genes={spec.n_genes}: lower it or add genes."
        )
    per_dataset = max(len(_LEAVES), spec.donors_per_dataset)
    if spec.n_cells < spec.n_datasets * per_dataset:
        raise SscellError(
            f"AtlasSpec.n_cells={spec.n_cells} is too small: every dataset needs at least "
            f"{per_dataset} cells (one per leaf cell type and per donor); use at least "
            f"{spec.n_datasets * per_dataset}."
        )


def _ancestors(index: int) -> list[int]:
    """The type itself and all its ancestors, as indices into CELL_TYPES."""
    chain = [index]
    while CELL_TYPES[chain[-1]].parent is not None:
        chain.append(_INDEX[CELL_TYPES[chain[-1]].parent])
    return chain


def _programmes(
    spec: AtlasSpec, rng: np.random.Generator
) -> tuple[list[str], list[np.ndarray], np.ndarray, np.ndarray]:
    """Programme names, member genes, log fold changes (programmes x genes) and owners.

    Each entry of CELL_TYPES owns n_programmes // (len(CELL_TYPES) + 1) programmes; the rest
    are cell-state programmes (owner -1) that switch on in random cells of any type.
    """
    per_type = spec.n_programmes // (len(CELL_TYPES) + 1)
    owner = np.full(spec.n_programmes, -1)
    owner[: per_type * len(CELL_TYPES)] = np.repeat(np.arange(len(CELL_TYPES)), per_type)
    depth = np.array([len(_ancestors(i)) - 1 for i in range(len(CELL_TYPES))])
    strength = np.where(owner >= 0, ROOT_EFFECT * DEPTH_DECAY ** depth[owner], STATE_EFFECT)
    names, members = [], []
    effects = np.zeros((spec.n_programmes, spec.n_genes), np.float32)
    for p in range(spec.n_programmes):
        genes = np.sort(rng.choice(spec.n_genes, spec.genes_per_programme, replace=False))
        effects[p, genes] = strength[p] * rng.gamma(4.0, 0.25, genes.size)  # mean 1, CV 0.5
        label = CELL_TYPES[owner[p]].name if owner[p] >= 0 else "cell state"
        label = label.replace(",", "").replace(" ", "_")
        names.append(f"{label}_{int(np.sum(owner[:p] == owner[p])) + 1}")
        members.append(genes)
    return names, members, effects, owner


def _split(total: int, weights: np.ndarray, minimum: int) -> np.ndarray:
    """Integer sizes summing to `total`, each >= `minimum`, the rest shared by `weights`."""
    extra = total - minimum * len(weights)
    raw = extra * weights / weights.sum()
    sizes = np.floor(raw).astype(np.int64)
    sizes[np.argsort(sizes - raw, kind="stable")[: extra - sizes.sum()]] += 1  # largest remainders
    return sizes + minimum


def _cover_all_types(counts: np.ndarray) -> None:
    """Move single cells (in place) so every leaf type appears in a dataset's donors x types."""
    totals = counts.sum(axis=0)
    for missing in np.flatnonzero(totals == 0):
        source = int(np.argmax(totals))  # holds >= 2 cells, since the dataset has >= n_leaves
        donor = int(np.argmax(counts[:, source]))
        counts[donor, source] -= 1
        counts[donor, missing] += 1
        totals[source] -= 1
        totals[missing] += 1


def _assign_cells(spec: AtlasSpec, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Donor and leaf index of every cell: unequal type shares that vary per donor (Dirichlet)."""
    n_leaves = len(_LEAVES)
    overall = rng.permutation(0.5 ** np.linspace(0.0, 3.0, n_leaves))  # rarest 8x below commonest
    overall /= overall.sum()
    dataset_sizes = _split(
        spec.n_cells,
        rng.dirichlet(np.full(spec.n_datasets, 20.0)),
        max(n_leaves, spec.donors_per_dataset),
    )
    counts = np.zeros((spec.n_datasets * spec.donors_per_dataset, n_leaves), np.int64)
    for k, size in enumerate(dataset_sizes):
        rows = counts[k * spec.donors_per_dataset : (k + 1) * spec.donors_per_dataset]
        donor_sizes = _split(size, rng.dirichlet(np.full(spec.donors_per_dataset, 20.0)), 1)
        for row, n in zip(rows, donor_sizes):
            share = 0.9 * rng.dirichlet(20.0 * overall) + 0.1 / n_leaves  # every type >= 1%
            row[:] = rng.multinomial(n, share)
        _cover_all_types(rows)
    donor = np.repeat(np.arange(len(counts)), counts.sum(axis=1))
    leaf = np.concatenate([rng.permutation(np.repeat(np.arange(n_leaves), row)) for row in counts])
    return donor, leaf


def _library_for_zeros(leaf_logits: np.ndarray, dispersion: np.ndarray) -> float:
    """Library size at which cells at their type's mean expression have ZEROS zero counts.

    Scales with gene count and adapts to the programme layout, so every spec is ~90% sparse
    (library spread and batch shifts add a couple of points to ZEROS).
    """
    share = np.exp(leaf_logits - leaf_logits.max(axis=1, keepdims=True))
    share /= share.sum(axis=1, keepdims=True)

    def excess_zeros(log_size: float) -> float:
        mean = np.exp(log_size) * share
        return float(np.mean((1 + dispersion * mean) ** (-1 / dispersion))) - ZEROS

    return float(np.exp(scipy.optimize.brentq(excess_zeros, -5.0, 30.0)))


def _sample_counts(
    rng: np.random.Generator,
    logits: np.ndarray,
    library: np.ndarray,
    state_effects: np.ndarray,
    dispersion: np.ndarray,
) -> sp.csr_matrix:
    """Negative-binomial counts for cells with log expression `logits` and mean sizes `library`."""
    n_cells, n_genes = logits.shape
    on = rng.random((n_cells, len(state_effects))) < STATE_RATE
    logits = logits + (on * rng.uniform(0.5, 1.5, on.shape)).astype(np.float32) @ state_effects
    share = np.exp(logits - logits.max(axis=1, keepdims=True))
    share /= share.sum(axis=1, keepdims=True)
    size = library * rng.lognormal(-LIBRARY_SD**2 / 2, LIBRARY_SD, n_cells)  # keeps the mean
    share *= size.astype(np.float32)[:, None]  # now the mean count, then the Gamma scale:
    share *= dispersion.astype(np.float32)
    shape = np.broadcast_to((1 / dispersion).astype(np.float32), (n_cells, n_genes))
    rate = rng.standard_gamma(shape, dtype=np.float32)
    rate *= share
    counts = rng.poisson(rate).astype(np.float32)
    empty = np.flatnonzero(counts.sum(axis=1) == 0)  # real atlases drop such cells in QC
    counts[empty, rate[empty].argmax(axis=1)] = 1
    return sp.csr_matrix(counts)


def generate_atlas(spec: AtlasSpec) -> anndata.AnnData:
    """A synthetic atlas: raw counts (CSR float32) in X, CELLxGENE-style obs and var.

    obs: cell_type, cell_type_ontology_term_id, donor_id, dataset_id, assay, tissue.
    var: Ensembl-style ids as index, symbols in `feature_name`.
    uns['gene_programmes']: {programme name: [gene ids]}.
    """
    _check(spec)
    rng = np.random.default_rng([spec.seed, 0])  # model parameters; chunk c uses [seed, c + 1]
    n_genes, per = spec.n_genes, spec.donors_per_dataset
    n_donors = spec.n_datasets * per
    names, members, effects, owner = _programmes(spec, rng)
    lineage = np.array([np.isin(owner, _ancestors(i)) for i in _LEAVES], np.float32)
    baseline = rng.normal(0.0, BASELINE_SD, n_genes).astype(np.float32)
    leaf_logits = baseline + lineage @ effects  # state programmes: owner -1, never in lineage
    dispersion = DISPERSION * np.exp(rng.normal(0.0, DISPERSION_SD, n_genes))
    dataset_shift = rng.normal(0.0, spec.batch_effect, (spec.n_datasets, n_genes))
    donor_shift = np.repeat(dataset_shift, per, axis=0) + rng.normal(
        0.0, spec.batch_effect * DONOR_SHIFT, (n_donors, n_genes)
    )
    donor_shift = donor_shift.astype(np.float32)
    library_scale = rng.lognormal(0.0, DATASET_LIBRARY_SD, spec.n_datasets)
    dataset_library = _library_for_zeros(leaf_logits, dispersion) * library_scale
    donor, leaf = _assign_cells(spec, rng)
    dataset = donor // per

    chunks, chunk_cells = [], max(1, CHUNK_ENTRIES // n_genes)
    for c, start in enumerate(range(0, spec.n_cells, chunk_cells)):
        cells = slice(start, start + chunk_cells)
        chunks.append(
            _sample_counts(
                np.random.default_rng([spec.seed, c + 1]),
                leaf_logits[leaf[cells]] + donor_shift[donor[cells]],
                dataset_library[dataset[cells]],
                effects[owner < 0],
                dispersion,
            )
        )
    x = sp.vstack(chunks, format="csr")

    dataset_names = [f"dataset_{k}" for k in range(spec.n_datasets)]
    donor_names = [f"D{d // per:02d}_donor{d % per}" for d in range(n_donors)]
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical.from_codes(leaf, [CELL_TYPES[i].name for i in _LEAVES]),
            "cell_type_ontology_term_id": pd.Categorical.from_codes(
                leaf, [CELL_TYPES[i].ontology_id for i in _LEAVES]
            ),
            "donor_id": pd.Categorical.from_codes(donor, donor_names),
            "dataset_id": pd.Categorical.from_codes(dataset, dataset_names),
            "assay": pd.Categorical(np.array(ASSAYS)[dataset % len(ASSAYS)]),
            "tissue": pd.Categorical(np.array(TISSUES)[dataset % len(TISSUES)]),
        },
        index=[f"cell_{i:06d}" for i in range(spec.n_cells)],
    )
    gene_ids = np.array([f"ENSG{i + 1:011d}" for i in range(n_genes)])
    width = max(4, len(str(n_genes)))
    symbols = [f"GENE{i + 1:0{width}d}" for i in range(n_genes)]
    var = pd.DataFrame({"feature_name": symbols}, index=gene_ids)
    programmes = {name: gene_ids[genes].tolist() for name, genes in zip(names, members)}
    return anndata.AnnData(X=x, obs=obs, var=var, uns={"gene_programmes": programmes})


def write_atlas(spec: AtlasSpec, path: str | os.PathLike) -> anndata.AnnData:
    """Generate the atlas and write it to `path` (.h5ad) atomically; returns the atlas."""
    path = Path(path)
    if not path.parent.is_dir():
        raise SscellError(f"Cannot write {path}: folder {path.parent} does not exist; create it.")
    adata = generate_atlas(spec)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # same folder, so os.replace is atomic
    try:
        adata.write_h5ad(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return adata


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: write a synthetic atlas and print a one-line summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True, help="path of the .h5ad file to write")
    parser.add_argument("--cells", type=int, default=AtlasSpec.n_cells)
    parser.add_argument("--genes", type=int, default=AtlasSpec.n_genes)
    parser.add_argument("--seed", type=int, default=AtlasSpec.seed)
    args = parser.parse_args(argv)
    with exit_on_error():
        spec = AtlasSpec(n_cells=args.cells, n_genes=args.genes, seed=args.seed)
        adata = write_atlas(spec, args.output)
    zeros = 1 - adata.X.nnz / (adata.n_obs * adata.n_vars)
    print(
        f"wrote {args.output}: {adata.n_obs} cells x {adata.n_vars} genes, "
        f"{adata.obs['cell_type'].nunique()} cell types, {spec.n_datasets} datasets, "
        f"{adata.obs['donor_id'].nunique()} donors, {zeros:.1%} zeros"
    )


if __name__ == "__main__":
    main()

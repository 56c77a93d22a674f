"""A synthetic single-cell atlas shaped like a CELLxGENE download, so quickstarts need no data.

Cells come from a small Cell Ontology hierarchy (CELL_TYPES, real CL ids and ancestors). Every
cell type switches on its own gene programmes plus its ancestors', so siblings (CD4 vs CD8 T
cells) are harder to tell apart than lineages; a few cell-state programmes switch on in random
cells of any type. Each programme has a transcription factor (var['is_tf']) whose expression
follows the programme's activity in every cell, so a TF's expression can be predicted from its
targets and back. Datasets and donors shift genes on the log scale (batch effects), cells vary
in library size, and counts are negative binomial (Gamma-Poisson, per-gene dispersion). Cells
are grouped by dataset then donor (types mixed within a donor), as in a concatenated atlas.

    python -m sscell.data.synthetic --output=atlas.h5ad --cells=1000000 --genes=19331 --seed=0 \
        [--target-cells=20000 --target-cell-type="B cell" --target-cell-type="classical monocyte" ...]

writes, each atomically, the atlas's siblings first so a present atlas means all are there:
- `atlas.programmes.gmt`: gene programmes (also uns['gene_programmes']);
- `atlas.tf_targets.gmt`: each TF's gene id -> its programme's genes (also uns['tf_targets']);
- `atlas.target.h5ad` with --target-cells: a transfer "target" dataset (one dataset, its own
  donors, a stronger batch effect, only the chosen leaf types; same genes and programmes);
- `atlas.h5ad`: counts streamed to disk chunk by chunk, so memory stays bounded at any size.
The same arguments always give the same files; adding a target or proteins leaves the RNA unchanged.

With --proteins=N (CITE-seq-like) every cell also gets a panel of N surface proteins,
obsm['protein_counts'] (raw counts, cells x N) with their names in uns['protein_counts_names']
(the layout `sscell.data.modality` reads): each protein is coded by a gene of a cell-type
programme and follows that programme's activity in the cell (so its cell type and lineage), on
its own scale, with its own per-dataset batch shifts, log-normal noise and Poisson counts.

With --peaks=N (multiome-like) every cell gets N ATAC peaks instead, obsm['atac_counts'] (CSR
fragment counts, cells x N, mostly 0 and 1) with their names (chrK-START-END) in
uns['atac_counts_names']: PEAK_LINKED of the peaks are each linked to one gene programme
(cell-type or cell-state) and open with log-odds rising with that programme's activity in the
cell; the others are background peaks. Each peak has its own baseline, gain and per-dataset
shifts, and each cell its own fragment depth (a log-odds shift), so accessibility is sparse and
binary-ish, driven by the same programmes as the RNA.

With --realism=calibrated (AtlasSpec.realism) dispersion, depth and effect sizes are fitted to
real PBMCs and cells gain non-linear structure: differentiation trajectories between types
(obs['pseudotime']), a cell cycle (obs['cell_cycle_phase']) and donor x programme scaling; see
`_chunk_activity` and docs/realism.md. The default draws exactly what it always drew.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import anndata
import h5py
import numpy as np
import pandas as pd
import scipy.optimize
import scipy.sparse as sp

from sscell.atomic import atomic_file
from sscell.data.gmt import write_gmt
from sscell.data.modality import ATAC_KEY, PROTEIN_KEY
from sscell.data.store import names_key
from sscell.errors import SscellError, exit_on_error


class CellType(NamedTuple):
    """One row of the hierarchy; only leaves (types that are nobody's parent) get cells.

    `parent` is an ancestor in the Cell Ontology, not always the direct one (CD4 T cells sit
    under "alpha-beta T cell" under "T cell"); tests check this against the ontology itself.
    """

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
LEAF_NAMES = tuple(CELL_TYPES[i].name for i in _LEAVES)
# leaf -> its parent's index, for leaves whose parent is not a root (AtlasSpec.coarse_labels)
_COARSE = {leaf: _INDEX[t.parent] for leaf, t in enumerate(CELL_TYPES[i] for i in _LEAVES)
           if t.parent is not None and CELL_TYPES[_INDEX[t.parent]].parent is not None}
_LABELS = (*_LEAVES, *dict.fromkeys(_COARSE.values()))  # what cells are labelled: leaves, then coarse parents

ASSAYS = ("10x 3' v3", "10x 3' v2", "10x 5' v2")  # dataset k uses ASSAYS[k % 3]
TISSUES = ("blood", "lung")  # dataset k uses TISSUES[k % 2]
TARGET_ASSAY, TARGET_TISSUE = "10x 5' v1", "blood"  # an assay no atlas dataset uses

CHUNK_ENTRIES = 2**23  # cells x genes sampled at once (4,096 x 2,048): bounds memory
H5_CHUNK = 2**16  # HDF5 chunk (elements) of the streamed X.data and X.indices
ZEROS = 0.89  # the mean library size is set so an average cell has this share of zeros
LIBRARY_SD = 0.5  # per-cell log library size sd (CV ~0.5), before the dataset scale
DATASET_LIBRARY_SD = 0.3  # per-dataset log library scale sd
DONOR_SHIFT = 1 / 3  # donor shift sd as a fraction of the batch effect
BASELINE_SD = 1.5  # sd of per-gene log baseline: a few genes dominate, most are low
DISPERSION = 0.3  # median per-gene negative-binomial dispersion (var = mu + disp * mu^2)
DISPERSION_SD = 0.5  # sd of log dispersion across genes
ROOT_EFFECT = 2.0  # mean log fold change of a root type's programme genes...
DEPTH_DECAY = 0.75  # ...shrunk per level, so finer types differ by less
ACTIVITY_SD = 0.3  # cell-to-cell log sd of a switched-on cell-type programme's activity
STATE_EFFECT = 1.0  # mean log fold change of a cell-state programme
STATE_RATE = 0.2  # share of cells with a given cell-state programme switched on
TF_BASELINE = 2.5  # log baseline of a TF (top ~5% of genes), so it is detected in ~1 cell in 3
TF_EFFECT = 2.0  # a TF's log fold change per unit of its programme's activity
PROTEIN_BASELINE = 3.0  # mean log abundance of a protein (sd PROTEIN_BASELINE_SD across proteins)
PROTEIN_BASELINE_SD = 1.0
PROTEIN_EFFECT = 2.0  # mean log fold change of a protein per unit of its programme's activity
PROTEIN_NOISE_SD = 0.3  # cell-to-cell log noise of a protein beyond its gene's programmes
PROTEIN_BATCH_SD = 0.3  # sd of per-dataset per-protein log shifts
PROTEIN_CAPTURE_SD = 0.3  # per-cell log sd of antibody capture (a protein library size)
PEAK_LINKED = 0.8  # share of peaks linked to a gene programme (the rest: background peaks)
PEAK_BASELINE = -3.5  # mean log-odds of a peak being open with its programme off (sd PEAK_BASELINE_SD)
PEAK_BASELINE_SD = 0.7
PEAK_EFFECT = 3.5  # mean log-odds gain of a linked peak per unit of its programme's activity
PEAK_BATCH_SD = 0.3  # sd of per-dataset per-peak log-odds shifts
PEAK_DEPTH_SD = 0.4  # per-cell sd of a log-odds shift of all peaks (fragment depth)
PEAK_EXTRA = 0.2  # mean extra fragments of an open peak (Poisson), so counts are mostly 1
REALISMS = ("default", "calibrated")  # AtlasSpec.realism; "calibrated": docs/realism.md
# realism="calibrated", fitted to scanpy's 700 PBMCs with `python -m sscell.data.realism` (docs/realism.md):
CALIBRATED_ZEROS = 0.6  # ZEROS: deeper cells (the real cells are at least as deep once matched)
CALIBRATED_LIBRARY_SD = 0.15  # LIBRARY_SD: with type composition, a library CV of ~0.3 as the real cells
CALIBRATED_DISPERSION = 0.3  # DISPERSION: the real median within-type phi is 0.29-0.39
CALIBRATED_EFFECT_SCALE = 0.5  # programme log fold changes x this: median phi (types pooled) ~1, real 0.7
TRAJECTORIES = (  # (from, to) leaf types joined by a continuum of cells along a pseudotime
    ("classical monocyte", "non-classical monocyte"),
    ("CD8-positive, alpha-beta T cell", "natural killer cell"),
)
TRAJECTORY_SPREAD = 2.0  # a cell's distance from its type's end is 0.5 * Beta(1, this): most near the end
SWITCH_WIDTH = 0.08  # pseudotime scale of a programme's sigmoid switch (each at its own time in 0.25-0.75)
TRANSIENT_EFFECT = 1.5  # log fold change of a trajectory's transient genes at its mid-point...
TRANSIENT_WIDTH = 0.15  # ...falling off as a Gaussian of this pseudotime width
CYCLING_RATE = 0.2  # share of cells in the cell cycle (any type), at a uniform position along it
CYCLE_EFFECT = 1.5  # log fold change of the S and G2/M programmes at their phase's peak...
CYCLE_WIDTH = 0.12  # ...a Gaussian bump of this width (cycle length 1) centred at S_PEAK / G2M_PEAK
S_PEAK, G2M_PEAK = 0.35, 0.7
DONOR_SCALE_SD = 0.3  # log sd of a donor's per-programme activity scale (a donor x cell type interaction)


@dataclasses.dataclass(frozen=True)
class AtlasSpec:
    """Size and randomness of a synthetic atlas; the same spec always gives the same atlas.

    With target_cells > 0 a separate target dataset is made too (see `generate_target`):
    `target_cell_types` are leaf names of CELL_TYPES (empty: all leaves), and its batch effect
    has sd `target_batch_effect` instead of `batch_effect`.
    """

    n_cells: int = 20_000
    n_genes: int = 2_000
    n_datasets: int = 4
    donors_per_dataset: int = 4
    n_programmes: int = 40  # gene programmes (sets of co-regulated genes), one TF each
    genes_per_programme: int = 40
    batch_effect: float = 0.3  # sd of per-dataset per-gene log-scale shifts
    seed: int = 0
    target_cells: int = 0
    target_cell_types: tuple[str, ...] = ()
    target_batch_effect: float = 0.9
    n_proteins: int = 0  # > 0: a CITE-seq-like protein panel per cell (obsm['protein_counts'])
    n_peaks: int = 0  # > 0: multiome-like ATAC peaks per cell (obsm['atac_counts']); not with n_proteins
    realism: str = "default"  # one of REALISMS: "calibrated" adds `_Realism` (slower); "default": linear, fast
    # share of the cells of leaves with a non-root parent (T cells, monocytes) labelled by that
    # parent ("T cell", "monocyte"), as coarser annotations do: the Cell Ontology correction then
    # changes scores (a fine prediction of a coarse label counts as right)
    coarse_labels: float = 0.0


def _check(spec: AtlasSpec) -> None:
    for field in ("n_cells", "n_genes", "n_datasets", "donors_per_dataset", "genes_per_programme"):
        if getattr(spec, field) < 1:
            raise SscellError(f"AtlasSpec.{field}={getattr(spec, field)}: must be at least 1.")
    if spec.seed < 0 or spec.batch_effect < 0 or spec.target_batch_effect < 0 or spec.target_cells < 0:
        raise SscellError("AtlasSpec.seed, target_cells and the batch effects must be non-negative.")
    if spec.n_programmes < len(CELL_TYPES) + 1:
        raise SscellError(
            f"AtlasSpec.n_programmes={spec.n_programmes}: need at least {len(CELL_TYPES) + 1} "
            "(one per entry of CELL_TYPES plus one cell-state programme)."
        )
    if spec.n_genes < spec.genes_per_programme + spec.n_programmes:
        raise SscellError(
            f"AtlasSpec.n_genes={spec.n_genes} is too small for programmes of "
            f"{spec.genes_per_programme} genes plus {spec.n_programmes} transcription factors: "
            "lower genes_per_programme or n_programmes, or add genes."
        )
    per_dataset = max(len(_LEAVES), spec.donors_per_dataset)
    if spec.n_cells < spec.n_datasets * per_dataset:
        raise SscellError(
            f"AtlasSpec.n_cells={spec.n_cells} is too small: every dataset needs at least "
            f"{per_dataset} cells (one per leaf cell type and per donor); use at least "
            f"{spec.n_datasets * per_dataset}."
        )
    if spec.n_proteins < 0 or spec.n_peaks < 0:
        raise SscellError(f"AtlasSpec.n_proteins={spec.n_proteins}, n_peaks={spec.n_peaks}: must be non-negative "
                          "(0: none).")
    if spec.n_proteins and spec.n_peaks:
        raise SscellError("AtlasSpec: give n_proteins or n_peaks, not both (one second modality per atlas).")
    if not 0.0 <= spec.coarse_labels <= 1.0:  # also refuses NaN
        raise SscellError(f"AtlasSpec.coarse_labels={spec.coarse_labels}: a share in [0, 1].")
    if spec.realism not in REALISMS:
        raise SscellError(f"AtlasSpec.realism={spec.realism!r}: choose one of {', '.join(REALISMS)}.")
    unknown = sorted(set(spec.target_cell_types) - set(LEAF_NAMES))
    if unknown or len(set(spec.target_cell_types)) < len(spec.target_cell_types):
        raise SscellError(
            f"AtlasSpec.target_cell_types: {unknown or 'duplicated names'} - give distinct leaf "
            f"types from: {'; '.join(LEAF_NAMES)}."
        )
    needed = max(len(spec.target_cell_types) or len(_LEAVES), spec.donors_per_dataset)
    if 0 < spec.target_cells < needed:
        raise SscellError(
            f"AtlasSpec.target_cells={spec.target_cells} is too small: use at least {needed} "
            "(one per target cell type and per donor)."
        )


def _ancestors(index: int) -> list[int]:
    """The type itself and all its ancestors, as indices into CELL_TYPES."""
    chain = [index]
    while CELL_TYPES[chain[-1]].parent is not None:
        chain.append(_INDEX[CELL_TYPES[chain[-1]].parent])
    return chain


class _Biology(NamedTuple):
    """What every cell shares, atlas and target alike."""

    names: list[str]  # programme names
    members: list[np.ndarray]  # each programme's genes
    owner: np.ndarray  # the CELL_TYPES index owning each programme; -1: a cell-state programme
    tfs: np.ndarray  # each programme's transcription factor (a gene index)
    effects: np.ndarray  # programmes x genes log fold changes at activity 1, TFs included
    baseline: np.ndarray  # per-gene log expression
    dispersion: np.ndarray  # per-gene negative-binomial dispersion
    lineage: np.ndarray  # leaves x programmes: 1 where a leaf type (or its ancestor) owns it
    realism: _Realism | None = None  # realism="calibrated" only


class _Realism(NamedTuple):
    """realism="calibrated": the non-linear programmes beyond the cell types' linear ones."""

    names: list[str]  # S phase, G2/M, then one transient programme per trajectory
    members: list[np.ndarray]
    effects: np.ndarray  # programmes x genes log fold changes at activity 1
    switch: np.ndarray  # trajectories x programmes: pseudotime at which each programme switches


class _CellStates(NamedTuple):
    """realism="calibrated": each cell's place on a trajectory and in the cell cycle, and each
    donor's programme scales."""

    trajectory: np.ndarray  # index into TRAJECTORIES, -1: none
    pseudotime: np.ndarray  # 0 at the trajectory's first type, 1 at its second; NaN: none
    cycle: np.ndarray  # position along the cell cycle in [0, 1); NaN: not cycling
    donor_scale: np.ndarray  # donors x programmes multiplying programme activity


class _Cohort(NamedTuple):
    """A group of datasets: its cells (leaf position in _LEAVES, donor), batch effects, names."""

    leaf: np.ndarray
    donor: np.ndarray
    donors_per_dataset: int
    donor_shift: np.ndarray  # donors x genes: dataset shift + donor shift, log scale
    library: np.ndarray  # mean library size per dataset
    dataset_names: list[str]
    donor_names: list[str]
    assays: list[str]  # per dataset
    tissues: list[str]  # per dataset
    cell_prefix: str
    stream: int  # tags the random streams of its count chunks
    states: _CellStates | None = None  # realism="calibrated" only


def _programmes(spec: AtlasSpec, rng: np.random.Generator) -> _Biology:
    """Programmes, their TFs and per-gene parameters.

    Each entry of CELL_TYPES owns n_programmes // (len(CELL_TYPES) + 1) programmes; the rest
    are cell-state programmes. A programme's TF is a gene outside it, preferably outside every
    programme; its log fold change is TF_EFFECT per unit of the programme's activity.
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
    # Free genes first, then the rest, in random order; greedily skip a programme's own genes.
    in_any = np.zeros(spec.n_genes, bool)
    in_any[np.concatenate(members)] = True
    candidates = rng.permutation(spec.n_genes)
    candidates = np.concatenate([candidates[~in_any[candidates]], candidates[in_any[candidates]]])
    tfs: list[int] = []
    for genes in members:
        own = set(genes.tolist()) | set(tfs)
        tfs.append(next(int(g) for g in candidates if g not in own))
    tfs_array = np.array(tfs)
    effects[np.arange(spec.n_programmes), tfs_array] = TF_EFFECT
    baseline = rng.normal(0.0, BASELINE_SD, spec.n_genes).astype(np.float32)
    baseline[tfs_array] = TF_BASELINE
    dispersion = DISPERSION * np.exp(rng.normal(0.0, DISPERSION_SD, spec.n_genes))
    lineage = np.array([np.isin(owner, _ancestors(i)) for i in _LEAVES], np.float32)
    return _Biology(names, members, owner, tfs_array, effects, baseline, dispersion, lineage)


class _Panel(NamedTuple):
    """A protein panel: each protein's coding gene, name, scale, baseline and batch shifts."""

    programmes: np.ndarray  # the cell-type programme driving each protein
    genes: np.ndarray  # the coding gene of each protein (a member of that programme)
    names: list[str]
    scale: np.ndarray  # log fold change per unit of that programme's activity
    baseline: np.ndarray  # log abundance
    shift: dict[int, np.ndarray]  # by cohort stream: its datasets x proteins log shifts (the target's as
                                  # much stronger than the atlas's as its RNA batch effect)


def _protein_panel(spec: AtlasSpec, bio: _Biology) -> _Panel | None:
    """The spec's protein panel (random stream [seed, 4]), or None without proteins."""
    if spec.n_proteins == 0:
        return None
    rng = np.random.default_rng([spec.seed, 4])
    pairs = [(p, g) for p in np.flatnonzero(bio.owner >= 0) for g in bio.members[p]]  # (programme, member gene)
    chosen: dict[int, int] = {}  # coding gene -> its programme, each gene coding one protein
    for p, g in (pairs[i] for i in rng.permutation(len(pairs))):
        chosen.setdefault(int(g), int(p))
    if spec.n_proteins > len(chosen):
        raise SscellError(f"AtlasSpec.n_proteins={spec.n_proteins}: at most {len(chosen)} fit (one cell-type programme "
                          "gene per protein); lower it or add programme genes.")
    genes = np.array(list(chosen)[: spec.n_proteins])
    target_sd = PROTEIN_BATCH_SD * (spec.target_batch_effect / spec.batch_effect if spec.batch_effect > 0 else 1.0)
    return _Panel(programmes=np.array([chosen[g] for g in genes]), genes=genes,
                  names=[f"{s}-protein" for s in np.asarray(_symbols(spec.n_genes))[genes]],
                  scale=rng.gamma(4.0, PROTEIN_EFFECT / 4, spec.n_proteins),  # CV 0.5
                  baseline=rng.normal(PROTEIN_BASELINE, PROTEIN_BASELINE_SD, spec.n_proteins),
                  shift={2: rng.normal(0.0, PROTEIN_BATCH_SD, (spec.n_datasets, spec.n_proteins)),
                         3: rng.normal(0.0, target_sd, (1, spec.n_proteins))})


class _Peaks(NamedTuple):
    """ATAC peaks: each peak's programme (-1: background), name, log-odds baseline, gain and batch shifts."""

    programmes: np.ndarray
    names: list[str]
    baseline: np.ndarray
    gain: np.ndarray
    shift: dict[int, np.ndarray]  # by cohort stream, as _Panel.shift


def _peak_panel(spec: AtlasSpec, bio: _Biology) -> _Peaks | None:
    """The spec's ATAC peaks (random stream [seed, 5]), or None without peaks."""
    if spec.n_peaks == 0:
        return None
    rng = np.random.default_rng([spec.seed, 5])
    n = spec.n_peaks
    linked = rng.random(n) < PEAK_LINKED
    programmes = np.where(linked, rng.integers(0, len(bio.names), n), -1)
    chromosome = np.sort(rng.integers(1, 23, n))
    start = rng.integers(10_000, 200_000_000, n)
    target_sd = PEAK_BATCH_SD * (spec.target_batch_effect / spec.batch_effect if spec.batch_effect > 0 else 1.0)
    return _Peaks(programmes=programmes, names=[f"chr{c}-{a}-{a + 500}" for c, a in zip(chromosome, start)],
                  baseline=rng.normal(PEAK_BASELINE, PEAK_BASELINE_SD, n),
                  gain=np.where(linked, rng.gamma(4.0, PEAK_EFFECT / 4, n), 0.0),
                  shift={2: rng.normal(0.0, PEAK_BATCH_SD, (spec.n_datasets, n)),
                         3: rng.normal(0.0, target_sd, (1, n))})


def _split(total: int, weights: np.ndarray, minimum: int) -> np.ndarray:
    """Integer sizes summing to `total`, each >= `minimum`, the rest shared by `weights`."""
    extra = total - minimum * len(weights)
    raw = extra * weights / weights.sum()
    sizes = np.floor(raw).astype(np.int64)
    sizes[np.argsort(sizes - raw, kind="stable")[: extra - sizes.sum()]] += 1  # largest remainders
    return sizes + minimum


def _cover_all_types(counts: np.ndarray) -> None:
    """Move single cells (in place) so every type appears in a dataset's donors x types."""
    totals = counts.sum(axis=0)
    for missing in np.flatnonzero(totals == 0):
        source = int(np.argmax(totals))  # holds >= 2 cells, since the dataset has >= n_types
        donor = int(np.argmax(counts[:, source]))
        counts[donor, source] -= 1
        counts[donor, missing] += 1
        totals[source] -= 1
        totals[missing] += 1


def _assign_cells(
    rng: np.random.Generator, n_cells: int, n_datasets: int, per: int, n_types: int
) -> tuple[np.ndarray, np.ndarray]:
    """Donor and type (0..n_types-1) of every cell: unequal type shares varying per donor."""
    overall = rng.permutation(0.5 ** np.linspace(0.0, 3.0, n_types))  # rarest 8x below commonest
    overall /= overall.sum()
    dataset_sizes = _split(n_cells, rng.dirichlet(np.full(n_datasets, 20.0)), max(n_types, per))
    counts = np.zeros((n_datasets * per, n_types), np.int64)
    for k, size in enumerate(dataset_sizes):
        rows = counts[k * per : (k + 1) * per]
        donor_sizes = _split(size, rng.dirichlet(np.full(per, 20.0)), 1)
        for row, n in zip(rows, donor_sizes):
            share = 0.9 * rng.dirichlet(20.0 * overall) + 0.1 / n_types  # every type >= 1%
            row[:] = rng.multinomial(n, share)
        _cover_all_types(rows)
    donor = np.repeat(np.arange(len(counts)), counts.sum(axis=1))
    kind = np.concatenate([rng.permutation(np.repeat(np.arange(n_types), row)) for row in counts])
    return donor, kind


def _library_for_zeros(bio: _Biology, zeros: float = ZEROS) -> float:
    """Library size at which cells at their type's mean expression have `zeros` zero counts.

    Scales with gene count and adapts to the programme layout, so every spec is ~90% sparse
    (library spread and batch shifts add a couple of points to ZEROS).
    """
    leaf_logits = bio.baseline + bio.lineage @ bio.effects
    share = np.exp(leaf_logits - leaf_logits.max(axis=1, keepdims=True))
    share /= share.sum(axis=1, keepdims=True)

    def excess_zeros(log_size: float) -> float:
        mean = np.exp(log_size) * share
        return float(np.mean((1 + bio.dispersion * mean) ** (-1 / bio.dispersion))) - zeros

    return float(np.exp(scipy.optimize.brentq(excess_zeros, -5.0, 30.0)))


def _cohort(
    rng: np.random.Generator, spec: AtlasSpec, library: float, *, n_cells: int, n_datasets: int,
    types: Sequence[int], batch_effect: float, target: bool,
) -> _Cohort:
    """Cells and batch effects of the atlas (target=False) or of the target dataset."""
    per, n_genes = spec.donors_per_dataset, spec.n_genes
    dataset_shift = rng.normal(0.0, batch_effect, (n_datasets, n_genes))
    donor_shift = np.repeat(dataset_shift, per, axis=0) + rng.normal(
        0.0, batch_effect * DONOR_SHIFT, (n_datasets * per, n_genes)
    )
    library_scale = rng.lognormal(0.0, DATASET_LIBRARY_SD, n_datasets)
    donor, kind = _assign_cells(rng, n_cells, n_datasets, per, len(types))
    datasets, letter = range(n_datasets), "T" if target else "D"
    return _Cohort(
        leaf=np.asarray(types)[kind],
        donor=donor,
        donors_per_dataset=per,
        donor_shift=donor_shift.astype(np.float32),
        library=library * library_scale,
        dataset_names=[f"target_dataset_{k}" if target else f"dataset_{k}" for k in datasets],
        donor_names=[f"{letter}{d // per:02d}_donor{d % per}" for d in range(n_datasets * per)],
        assays=[TARGET_ASSAY if target else ASSAYS[k % len(ASSAYS)] for k in datasets],
        tissues=[TARGET_TISSUE if target else TISSUES[k % len(TISSUES)] for k in datasets],
        cell_prefix="target_cell" if target else "cell",
        stream=3 if target else 2,
    )


def _model(spec: AtlasSpec) -> tuple[_Biology, _Cohort, _Cohort | None]:
    """Everything but the counts: shared biology, the atlas's cells and the target's (or None).

    Random streams (numpy SeedSequence entropy): [seed, 0] biology and atlas cells, [seed, 1]
    target cells, [seed, 2, c] / [seed, 3, c] count chunk c of the atlas / target; with
    realism="calibrated" also [seed, 6] its programmes and [seed, 7, 2] / [seed, 7, 3] the cell
    states of the atlas / target, and with coarse_labels [seed, 8, 2] / [seed, 8, 3] which of their
    cells are labelled coarsely, so the default atlas draws exactly what it always drew.
    """
    _check(spec)
    rng = np.random.default_rng([spec.seed, 0])
    bio = _programmes(spec, rng)
    calibrated = spec.realism == "calibrated"
    if calibrated:
        bio = bio._replace(dispersion=bio.dispersion * (CALIBRATED_DISPERSION / DISPERSION),
                           effects=bio.effects * np.float32(CALIBRATED_EFFECT_SCALE),
                           realism=_realism_programmes(spec, bio))
    library = _library_for_zeros(bio, CALIBRATED_ZEROS if calibrated else ZEROS)
    atlas = _cohort(rng, spec, library, n_cells=spec.n_cells, n_datasets=spec.n_datasets,
                    types=range(len(_LEAVES)), batch_effect=spec.batch_effect, target=False)
    if calibrated:
        atlas = _with_states(spec, bio, atlas, library)
    if spec.target_cells == 0:
        return bio, atlas, None
    types = [LEAF_NAMES.index(n) for n in spec.target_cell_types] or range(len(_LEAVES))
    target = _cohort(np.random.default_rng([spec.seed, 1]), spec, library, n_cells=spec.target_cells,
                     n_datasets=1, types=types, batch_effect=spec.target_batch_effect, target=True)
    return bio, atlas, _with_states(spec, bio, target, library) if calibrated else target


def _realism_programmes(spec: AtlasSpec, bio: _Biology) -> _Realism:
    """The S-phase, G2/M and per-trajectory transient programmes (genes_per_programme random
    genes each, effects gamma-spread around their strength) and the trajectories' switch times."""
    rng = np.random.default_rng([spec.seed, 6])
    names = ["cell_cycle_S", "cell_cycle_G2M"] + [
        f"transient_{a}_to_{b}".replace(",", "").replace(" ", "_") for a, b in TRAJECTORIES]
    strength = np.array([CYCLE_EFFECT, CYCLE_EFFECT] + [TRANSIENT_EFFECT] * len(TRAJECTORIES))
    members = [np.sort(rng.choice(spec.n_genes, spec.genes_per_programme, replace=False)) for _ in names]
    effects = np.zeros((len(names), spec.n_genes), np.float32)
    for p, genes in enumerate(members):
        effects[p, genes] = strength[p] * rng.gamma(4.0, 0.25, genes.size)
    switch = rng.uniform(0.25, 0.75, (len(TRAJECTORIES), len(bio.names)))
    return _Realism(names, members, effects, switch)


def _with_states(spec: AtlasSpec, bio: _Biology, cohort: _Cohort, library: float) -> _Cohort:
    """The cohort with its cell states and its datasets' depths centred on `library`: cells of a trajectory's types lie along it (pseudotime
    near their own type's end), CYCLING_RATE of all cells cycle, and every donor scales every
    programme (lognormal, DONOR_SCALE_SD), which touches only the types using that programme."""
    rng = np.random.default_rng([spec.seed, 7, cohort.stream])
    n = len(cohort.leaf)
    trajectory, pseudotime = np.full(n, -1), np.full(n, np.nan)
    distance = 0.5 * rng.beta(1.0, TRAJECTORY_SPREAD, n)
    for k, (first, second) in enumerate(TRAJECTORIES):
        for end, name in ((0.0, first), (1.0, second)):
            cells = cohort.leaf == LEAF_NAMES.index(name)
            trajectory[cells], pseudotime[cells] = k, np.abs(end - distance[cells])
    cycling = rng.random(n) < CYCLING_RATE
    cycle = np.where(cycling, rng.random(n), np.nan)
    donor_scale = rng.lognormal(0.0, DONOR_SCALE_SD, (len(cohort.donor_names), len(bio.names)))
    # the datasets' depths vary around `library` (their geometric mean), whatever their number
    scaled = cohort.library * (library / np.exp(np.mean(np.log(cohort.library))))
    return cohort._replace(library=scaled, states=_CellStates(trajectory, pseudotime.astype(np.float32), cycle.astype(np.float32),
                                              donor_scale.astype(np.float32)))


def _cycle_bump(position: np.ndarray, peak: float) -> np.ndarray:
    """A Gaussian bump of width CYCLE_WIDTH around `peak` on the circle [0, 1); 0 where NaN."""
    distance = np.abs(position - peak)
    distance = np.minimum(distance, 1 - distance)
    return np.nan_to_num(np.exp(-((distance / CYCLE_WIDTH) ** 2)))


def _chunk_activity(spec: AtlasSpec, bio: _Biology, cohort: _Cohort, c: int,
                    rows: slice) -> tuple[np.random.Generator, np.ndarray, np.ndarray | None]:
    """Chunk c's random stream (after its activity draw), its cells x programmes activity, and,
    with realism="calibrated", the log fold changes its non-linear programmes add (else None).

    The one place programme activity is drawn, so RNA, proteins and peaks share it. Calibrated:
    a trajectory cell's programmes of either end switch on or off along its pseudotime, each at
    its own time (a sigmoid), its trajectory's transient genes peak mid-way, cycling cells express
    the S and G2/M programmes by their place in the cycle, and donors scale programmes.
    """
    rng = np.random.default_rng([spec.seed, cohort.stream, c])
    leaf = cohort.leaf[rows]
    states = cohort.states
    if states is None:
        return rng, _activity(rng, bio.lineage[leaf], bio.owner < 0), None
    on = bio.lineage[leaf]
    trajectory, pseudotime = states.trajectory[rows], states.pseudotime[rows]
    extra = np.zeros((len(leaf), len(bio.realism.names)), np.float32)
    for k, (first, second) in enumerate(TRAJECTORIES):
        cells = trajectory == k
        t = pseudotime[cells][:, None]
        later = 1 / (1 + np.exp(-(t - bio.realism.switch[k]) / SWITCH_WIDTH))
        on[cells] = (bio.lineage[_LEAVES.index(_INDEX[first])] * (1 - later)
                     + bio.lineage[_LEAVES.index(_INDEX[second])] * later)
        extra[cells, 2 + k] = np.exp(-(((t[:, 0] - 0.5) / TRANSIENT_WIDTH) ** 2))
    activity = _activity(rng, on, bio.owner < 0) * states.donor_scale[cohort.donor[rows]]
    cycle = states.cycle[rows]
    extra[:, 0], extra[:, 1] = _cycle_bump(cycle, S_PEAK), _cycle_bump(cycle, G2M_PEAK)
    return rng, activity, extra @ bio.realism.effects


def _activity(rng: np.random.Generator, on: np.ndarray, state: np.ndarray) -> np.ndarray:
    """Cells x programmes activity: a cell type's programmes near 1 (lognormal spread), each
    cell-state programme on (0.5-1.5) in STATE_RATE of cells; `on` is the cells' lineage rows."""
    spread = rng.lognormal(-(ACTIVITY_SD**2) / 2, ACTIVITY_SD, on.shape)  # keeps the mean at 1
    switched = (rng.random(on.shape) < STATE_RATE) * rng.uniform(0.5, 1.5, on.shape)
    return np.where(state, switched, on * spread).astype(np.float32)


def _sample_counts(
    rng: np.random.Generator, logits: np.ndarray, library: np.ndarray, dispersion: np.ndarray,
    library_sd: float = LIBRARY_SD,
) -> sp.csr_matrix:
    """Negative-binomial counts for cells with log expression `logits`, mean sizes `library` and a
    per-cell lognormal library spread of log sd `library_sd`."""
    n_cells, n_genes = logits.shape
    share = np.exp(logits - logits.max(axis=1, keepdims=True))
    share /= share.sum(axis=1, keepdims=True)
    size = library * rng.lognormal(-(library_sd**2) / 2, library_sd, n_cells)  # keeps the mean
    share *= size.astype(np.float32)[:, None]  # now the mean count, then the Gamma scale:
    share *= dispersion.astype(np.float32)
    shape = np.broadcast_to((1 / dispersion).astype(np.float32), (n_cells, n_genes))
    rate = rng.standard_gamma(shape, dtype=np.float32)
    rate *= share
    counts = rng.poisson(rate).astype(np.float32)
    empty = np.flatnonzero(counts.sum(axis=1) == 0)  # real atlases drop such cells in QC
    counts[empty, rate[empty].argmax(axis=1)] = 1
    return sp.csr_matrix(counts)


def _count_chunks(spec: AtlasSpec, bio: _Biology, cohort: _Cohort) -> Iterator[sp.csr_matrix]:
    """The cohort's counts, CHUNK_ENTRIES cells x genes at a time: the one cell generator."""
    chunk_cells = max(1, CHUNK_ENTRIES // spec.n_genes)
    library_sd = LIBRARY_SD if cohort.states is None else CALIBRATED_LIBRARY_SD
    for c, start in enumerate(range(0, len(cohort.leaf), chunk_cells)):
        rows = slice(start, start + chunk_cells)
        rng, activity, extra = _chunk_activity(spec, bio, cohort, c, rows)
        donor = cohort.donor[rows]
        logits = activity @ bio.effects
        logits += bio.baseline
        logits += cohort.donor_shift[donor]
        if extra is not None:
            logits += extra
        yield _sample_counts(rng, logits, cohort.library[donor // cohort.donors_per_dataset], bio.dispersion,
                             library_sd)


def _protein_chunks(spec: AtlasSpec, bio: _Biology, cohort: _Cohort, panel: _Panel) -> Iterator[np.ndarray]:
    """The cohort's protein counts (float32, cells x proteins) in `_count_chunks`' chunks.

    Chunk c replays the programme activity its RNA drew (the first draw of stream
    [seed, stream, c]) and draws its own noise from [seed, stream + 4, c], so the RNA is the
    same with or without proteins.
    """
    chunk_cells = max(1, CHUNK_ENTRIES // spec.n_genes)
    shift = panel.shift[cohort.stream]
    for c, start in enumerate(range(0, len(cohort.leaf), chunk_cells)):
        leaf = cohort.leaf[start : start + chunk_cells]
        dataset = cohort.donor[start : start + chunk_cells] // cohort.donors_per_dataset
        _, activity, _ = _chunk_activity(spec, bio, cohort, c, slice(start, start + chunk_cells))
        rng = np.random.default_rng([spec.seed, cohort.stream + 4, c])
        log_mean = panel.baseline + panel.scale * activity[:, panel.programmes] + shift[dataset]
        log_mean += rng.normal(0.0, PROTEIN_NOISE_SD, log_mean.shape)
        log_mean += rng.normal(0.0, PROTEIN_CAPTURE_SD, (len(leaf), 1))
        yield rng.poisson(np.exp(log_mean)).astype(np.float32)


def _peak_chunks(spec: AtlasSpec, bio: _Biology, cohort: _Cohort, peaks: _Peaks) -> Iterator[sp.csr_matrix]:
    """The cohort's peak counts (CSR float32, cells x peaks) in `_count_chunks`' chunks; like
    `_protein_chunks`, chunk c replays its RNA's programme activity and draws its own noise,
    from [seed, stream + 8, c]."""
    chunk_cells = max(1, CHUNK_ENTRIES // spec.n_genes)
    shift = peaks.shift[cohort.stream]
    linked = peaks.programmes >= 0
    for c, start in enumerate(range(0, len(cohort.leaf), chunk_cells)):
        leaf = cohort.leaf[start : start + chunk_cells]
        dataset = cohort.donor[start : start + chunk_cells] // cohort.donors_per_dataset
        _, activity, _ = _chunk_activity(spec, bio, cohort, c, slice(start, start + chunk_cells))
        rng = np.random.default_rng([spec.seed, cohort.stream + 8, c])
        drive = np.where(linked, activity[:, np.maximum(peaks.programmes, 0)], 0.0)
        logit = peaks.baseline + peaks.gain * drive + shift[dataset] + rng.normal(0.0, PEAK_DEPTH_SD, (len(leaf), 1))
        is_open = rng.random(logit.shape) < 1 / (1 + np.exp(-logit))
        counts = is_open * (1 + rng.poisson(PEAK_EXTRA, logit.shape))
        yield sp.csr_matrix(counts.astype(np.float32))


def _modality_chunks(spec: AtlasSpec, bio: _Biology, cohort: _Cohort) -> Iterator | None:
    """The cohort's second modality in `_count_chunks`' chunks (dense proteins or CSR peaks), or None."""
    panel, peaks = _protein_panel(spec, bio), _peak_panel(spec, bio)
    if panel is not None:
        return _protein_chunks(spec, bio, cohort, panel)
    return _peak_chunks(spec, bio, cohort, peaks) if peaks is not None else None


def _symbols(n_genes: int) -> list[str]:
    """Gene symbols GENE0001, ... (var['feature_name'])."""
    width = max(4, len(str(n_genes)))
    return [f"GENE{i + 1:0{width}d}" for i in range(n_genes)]


def _annotations(spec: AtlasSpec, bio: _Biology, cohort: _Cohort) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """obs, var and uns of a cohort's AnnData (uns names the protein panel, if any)."""
    leaf, dataset = cohort.leaf, cohort.donor // cohort.donors_per_dataset
    label = _coarse_labels(spec, cohort)

    def categorical(codes: np.ndarray, values: Sequence[str]) -> pd.Categorical:
        return pd.Categorical.from_codes(codes, list(values)).remove_unused_categories()

    obs = pd.DataFrame(
        {
            "cell_type": categorical(label, [CELL_TYPES[i].name for i in _LABELS]),
            "cell_type_ontology_term_id": categorical(label, [CELL_TYPES[i].ontology_id for i in _LABELS]),
            "donor_id": categorical(cohort.donor, cohort.donor_names),
            "dataset_id": categorical(dataset, cohort.dataset_names),
            "assay": pd.Categorical(np.array(cohort.assays)[dataset]),
            "tissue": pd.Categorical(np.array(cohort.tissues)[dataset]),
        },
        index=[f"{cohort.cell_prefix}_{i:06d}" for i in range(len(leaf))],
    )
    if cohort.states is not None:
        obs["pseudotime"] = cohort.states.pseudotime
        s_phase, g2m = _cycle_bump(cohort.states.cycle, S_PEAK), _cycle_bump(cohort.states.cycle, G2M_PEAK)
        phase = np.where(np.maximum(s_phase, g2m) < 0.5, 0, np.where(s_phase >= g2m, 1, 2))
        obs["cell_cycle_phase"] = pd.Categorical.from_codes(phase, ["G1", "S", "G2M"])
    gene_ids = np.array([f"ENSG{i + 1:011d}" for i in range(spec.n_genes)])
    var = pd.DataFrame({"feature_name": _symbols(spec.n_genes), "is_tf": np.isin(np.arange(spec.n_genes), bio.tfs)},
                       index=gene_ids)
    uns = {
        "gene_programmes": {n: gene_ids[g].tolist() for n, g in zip(bio.names, bio.members)},
        "tf_targets": {gene_ids[tf]: gene_ids[g].tolist() for tf, g in zip(bio.tfs, bio.members)},
    }
    if bio.realism is not None:
        uns["realism_programmes"] = {n: gene_ids[g].tolist() for n, g in zip(bio.realism.names, bio.realism.members)}
    panel = _protein_panel(spec, bio)
    if panel is not None:
        uns[names_key(PROTEIN_KEY)] = np.asarray(panel.names, dtype=object)
    peaks = _peak_panel(spec, bio)
    if peaks is not None:
        uns[names_key(ATAC_KEY)] = np.asarray(peaks.names, dtype=object)
    return obs, var, uns


def _coarse_labels(spec: AtlasSpec, cohort: _Cohort) -> np.ndarray:
    """Each cell's label as a position in _LABELS: its leaf, or (a seeded `spec.coarse_labels`
    share of the leaves in _COARSE) the leaf's parent."""
    if not spec.coarse_labels:
        return cohort.leaf
    rng = np.random.default_rng([spec.seed, 8, cohort.stream])
    coarse = rng.random(len(cohort.leaf)) < spec.coarse_labels
    parent = np.array([_LABELS.index(_COARSE[leaf]) if leaf in _COARSE else leaf for leaf in range(len(_LEAVES))])
    return np.where(coarse, parent[cohort.leaf], cohort.leaf)


def _in_memory(spec: AtlasSpec, bio: _Biology, cohort: _Cohort) -> anndata.AnnData:
    obs, var, uns = _annotations(spec, bio, cohort)
    x = sp.vstack(list(_count_chunks(spec, bio, cohort)), format="csr")
    chunks = _modality_chunks(spec, bio, cohort)
    obsm = None
    if spec.n_proteins:
        obsm = {PROTEIN_KEY: np.concatenate(list(chunks))}
    elif spec.n_peaks:
        obsm = {ATAC_KEY: sp.vstack(list(chunks), format="csr")}
    return anndata.AnnData(X=x, obs=obs, var=var, uns=uns, obsm=obsm)


def generate_atlas(spec: AtlasSpec) -> anndata.AnnData:
    """The atlas in memory (small specs; `write_atlas` streams any size to disk).

    X: raw counts (CSR float32). obs: cell_type, cell_type_ontology_term_id, donor_id,
    dataset_id, assay, tissue. var: Ensembl-style ids as index, symbols in `feature_name`,
    `is_tf`. uns['gene_programmes']: {programme: [gene ids]}; uns['tf_targets']: {TF gene id:
    [its programme's gene ids]}, in programme order. With spec.n_proteins: obsm['protein_counts']
    and uns['protein_counts_names'] (module docstring).
    """
    bio, atlas, _ = _model(spec)
    return _in_memory(spec, bio, atlas)


def generate_target(spec: AtlasSpec) -> anndata.AnnData:
    """The target dataset in memory: spec.target_cells cells of spec.target_cell_types from one
    new dataset (`target_dataset_0`, donors `T00_donor*`, cells `target_cell_*`, assay
    TARGET_ASSAY) with batch-effect sd spec.target_batch_effect; genes and programmes as the atlas."""
    bio, _, target = _model(spec)
    if target is None:
        raise SscellError("AtlasSpec.target_cells is 0: set it to make a target dataset.")
    return _in_memory(spec, bio, target)


def _sibling(h5ad_path: str | os.PathLike, suffix: str) -> Path:
    path = Path(h5ad_path)
    return path.with_name(path.name.removesuffix(".h5ad") + suffix)


def programmes_path(h5ad_path: str | os.PathLike) -> Path:
    """The gene programmes .gmt written beside an atlas: `X.h5ad` -> `X.programmes.gmt`."""
    return _sibling(h5ad_path, ".programmes.gmt")


def tf_targets_path(h5ad_path: str | os.PathLike) -> Path:
    """The TF -> targets .gmt written beside an atlas: `X.h5ad` -> `X.tf_targets.gmt`."""
    return _sibling(h5ad_path, ".tf_targets.gmt")


def target_path(h5ad_path: str | os.PathLike) -> Path:
    """The target dataset written beside an atlas: `X.h5ad` -> `X.target.h5ad`."""
    return _sibling(h5ad_path, ".target.h5ad")


class _H5CsrAppender:
    """An AnnData CSR group (data, indices, indptr) of an open .h5ad grown chunk by chunk with
    h5py, indptr int64 so more than 2**31 nonzeros fit."""

    def __init__(self, group: h5py.Group, n_rows: int, n_columns: int):
        group.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0",
                            "shape": np.array([n_rows, n_columns])})
        self.data = group.create_dataset("data", (0,), np.float32, maxshape=(None,), chunks=(H5_CHUNK,))
        self.indices = group.create_dataset("indices", (0,), np.int32, maxshape=(None,), chunks=(H5_CHUNK,))
        self.indptr = group.create_dataset("indptr", (n_rows + 1,), np.int64)
        self.indptr[0] = self.row = self.nnz = 0

    def append(self, chunk: sp.csr_matrix) -> None:
        end = self.nnz + chunk.nnz
        self.data.resize((end,))
        self.indices.resize((end,))
        self.data[self.nnz:end] = chunk.data
        self.indices[self.nnz:end] = chunk.indices
        self.indptr[self.row + 1 : self.row + 1 + chunk.shape[0]] = self.nnz + chunk.indptr[1:].astype(np.int64)
        self.row, self.nnz = self.row + chunk.shape[0], end


def _write_h5ad(path: Path, obs: pd.DataFrame, var: pd.DataFrame, uns: dict,
                chunks: Iterable[sp.csr_matrix], modality: Iterable[np.ndarray | sp.csr_matrix] | None = None) -> int:
    """Write an .h5ad atomically with X streamed from CSR row chunks; returns X's nonzeros.

    anndata writes everything but X; X is grown chunk by chunk (`_H5CsrAppender`). `modality`
    (chunks of the same rows) becomes obsm['protein_counts'] (dense chunks) or
    obsm['atac_counts'] (CSR chunks), also written chunk by chunk.
    """
    with atomic_file(path) as tmp:
        anndata.AnnData(obs=obs, var=var, uns=uns).write_h5ad(tmp)
        with h5py.File(tmp, "a") as f:
            x = _H5CsrAppender(f.create_group("X"), len(obs), len(var))
            panel = None
            for chunk, values in zip(chunks, modality if modality is not None else itertools.repeat(None)):
                if sp.issparse(values):
                    if panel is None:
                        panel = _H5CsrAppender(f["obsm"].create_group(ATAC_KEY), len(obs), values.shape[1])
                    panel.append(values)
                elif values is not None:
                    if panel is None:
                        panel = f["obsm"].create_dataset(PROTEIN_KEY, (len(obs), values.shape[1]), np.float32,
                                                          chunks=(min(len(obs), 4096), values.shape[1]))
                        panel.attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
                    panel[x.row : x.row + len(values)] = values
                x.append(chunk)
    return x.nnz


def write_atlas(spec: AtlasSpec, path: str | os.PathLike) -> dict[str, object]:
    """Write the atlas to `path` (.h5ad) in bounded memory, with its .gmt files and, when
    spec.target_cells > 0, its target dataset (see the module docstring; an older target file
    at `target_path(path)` is removed when there is none). Every file is written atomically,
    the atlas last; the atlas equals `generate_atlas(spec)`, the target `generate_target(spec)`.

    Returns a summary: the paths written (atlas, programmes, tf_targets, target or None) and
    cells, genes, nonzeros, cell_types, datasets, donors (target_* for the target).
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise SscellError(f"Cannot write {path}: folder {path.parent} does not exist; create it.")
    bio, atlas, target = _model(spec)
    obs, var, uns = _annotations(spec, bio, atlas)
    summary: dict[str, object] = {"atlas": path, "programmes": programmes_path(path),
                                  "tf_targets": tf_targets_path(path), "target": None}
    write_gmt(summary["programmes"], uns["gene_programmes"], description="synthetic gene programme")
    write_gmt(summary["tf_targets"], uns["tf_targets"], description="synthetic TF targets")
    if target is None:
        target_path(path).unlink(missing_ok=True)
    else:
        summary["target"] = target_path(path)
        t_obs, t_var, t_uns = _annotations(spec, bio, target)
        t_nnz = _write_h5ad(summary["target"], t_obs, t_var, t_uns, _count_chunks(spec, bio, target),
                            _modality_chunks(spec, bio, target))
        summary.update(target_cells=len(t_obs), target_nonzeros=t_nnz,
                       target_donors=t_obs["donor_id"].nunique(),
                       target_cell_types=t_obs["cell_type"].nunique())
    nnz = _write_h5ad(path, obs, var, uns, _count_chunks(spec, bio, atlas), _modality_chunks(spec, bio, atlas))
    summary.update(cells=len(obs), genes=len(var), nonzeros=nnz, cell_types=obs["cell_type"].nunique(),
                   datasets=obs["dataset_id"].nunique(), donors=obs["donor_id"].nunique())
    return summary


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: write a synthetic atlas (and its .gmt files, and a target) and summarise it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True, help="path of the .h5ad file to write")
    parser.add_argument("--cells", type=int, default=AtlasSpec.n_cells)
    parser.add_argument("--genes", type=int, default=AtlasSpec.n_genes)
    parser.add_argument("--datasets", type=int, default=AtlasSpec.n_datasets)
    parser.add_argument("--donors-per-dataset", type=int, default=AtlasSpec.donors_per_dataset)
    parser.add_argument("--seed", type=int, default=AtlasSpec.seed)
    parser.add_argument("--target-cells", type=int, default=0, help="cells of a target dataset (0: none)")
    parser.add_argument("--target-cell-type", action="append", default=[], metavar="NAME",
                        help=f"a leaf type of the target (repeat; default all): {'; '.join(LEAF_NAMES)}")
    parser.add_argument("--target-batch-effect", type=float, default=AtlasSpec.target_batch_effect)
    parser.add_argument("--proteins", type=int, default=0, help="surface proteins per cell (CITE-seq-like; 0: none)")
    parser.add_argument("--peaks", type=int, default=0, help="ATAC peaks per cell (multiome-like; 0: none)")
    parser.add_argument("--coarse-labels", type=float, default=AtlasSpec.coarse_labels,
                        help="share of T cells and monocytes labelled 'T cell' / 'monocyte' (several ontology levels)")
    parser.add_argument("--realism", choices=REALISMS, default=AtlasSpec.realism,
                        help="calibrated: dispersion and depth fitted to real PBMCs, differentiation trajectories, "
                             "a cell cycle and donor x programme scaling (docs/realism.md); default: linear, fast")
    args = parser.parse_args(argv)
    with exit_on_error():
        spec = AtlasSpec(n_cells=args.cells, n_genes=args.genes, n_datasets=args.datasets,
                         donors_per_dataset=args.donors_per_dataset, seed=args.seed,
                         target_cells=args.target_cells, target_cell_types=tuple(args.target_cell_type),
                         target_batch_effect=args.target_batch_effect, n_proteins=args.proteins,
                         n_peaks=args.peaks, realism=args.realism, coarse_labels=args.coarse_labels)
        s = write_atlas(spec, args.output)
    zeros = 1 - s["nonzeros"] / (s["cells"] * s["genes"])
    proteins = f", {spec.n_proteins} proteins per cell" if spec.n_proteins else ""
    proteins += f", {spec.n_peaks} ATAC peaks per cell" if spec.n_peaks else ""
    print(f"wrote {s['atlas']}: {s['cells']} cells x {s['genes']} genes, {s['cell_types']} cell types, "
          f"{s['datasets']} datasets, {s['donors']} donors, {zeros:.1%} zeros{proteins}")
    print(f"wrote {s['programmes']}: {spec.n_programmes} gene programmes; "
          f"{s['tf_targets']}: their {spec.n_programmes} transcription factors' targets")
    if s["target"] is not None:
        zeros = 1 - s["target_nonzeros"] / (s["target_cells"] * s["genes"])
        print(f"wrote {s['target']}: {s['target_cells']} cells, {s['target_cell_types']} cell types, "
              f"1 dataset, {s['target_donors']} donors, batch effect sd {spec.target_batch_effect}, "
              f"{zeros:.1%} zeros")


if __name__ == "__main__":
    main()

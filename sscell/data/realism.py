"""How realistic a counts matrix is: the statistics a single-cell simulator must match, measured
side by side on real and synthetic .h5ad files.

    python -m sscell.data.realism --real=pbmc.h5ad --synthetic=atlas.h5ad [--synthetic=other.h5ad ...] \
        --output=docs/realism [--seed=0]

For each file (raw counts in X, cells x genes) it measures
- mean-variance: per-gene negative-binomial overdispersion phi in var = mu + phi mu^2, a method
  of moments that accounts for each cell's size factor (`fit_dispersion`); reported as the
  median over genes with mean >= MIN_MEAN, with the Poisson-like share (phi < 0.05);
- zeros against mean: each gene's zero fraction minus what a Poisson or a negative binomial with
  the median phi expects at its mean and the cells' size factors (`zero_excess`);
- library sizes: quantiles and coefficient of variation of the per-cell totals (`library_sizes`);
- gene-gene correlation: pairwise Pearson correlations of log1p(counts / total * 1e4) among the
  TOP_GENES most expressed genes, and the correlation matrix's leading eigenvalue share
  (`correlation_structure`).
Each synthetic file is first matched to the real one (`match`): the same number of cells
(a seeded sample), its most variable genes as many as the real file has (Seurat's dispersion
ranking, as scanpy picks a highly-variable subset), and binomially thinned to the real file's
median library size when deeper. It writes, each atomically, into the output folder:
`stats.md` (a side-by-side table), `stats.json` and `realism.png` (the four relations).
"""
from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from pathlib import Path

import anndata
import numpy as np
import scipy.sparse as sp

from sscell.atomic import atomic_file
from sscell.data.genes import highly_variable_genes
from sscell.errors import SscellError, exit_on_error

MIN_MEAN = 0.1  # genes below this mean count give too noisy a phi to summarise
POISSON_PHI = 0.05  # a gene with phi below this is called Poisson-like
TOP_GENES = 200  # genes (most expressed) whose pairwise correlations are measured
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def _csr(counts) -> sp.csr_matrix:
    counts = sp.csr_matrix(counts, dtype=np.float64)
    if counts.shape[0] < 2 or counts.shape[1] < 2:
        raise SscellError(f"need at least 2 cells and 2 genes, got {counts.shape[0]} x {counts.shape[1]}")
    if counts.nnz and (counts.data.min() < 0 or np.any(counts.data != np.rint(counts.data))):
        raise SscellError("X holds negative or non-integer values: give raw counts (e.g. layers['counts'] moved to X)")
    return counts


def size_factors(counts: sp.csr_matrix) -> np.ndarray:
    """Each cell's total count over the mean total (mean 1); refuses cells with no counts."""
    totals = np.asarray(counts.sum(axis=1)).ravel()
    if np.any(totals == 0):
        raise SscellError(f"{int(np.sum(totals == 0))} cells have no counts: drop them first (QC)")
    return totals / totals.mean()


def fit_dispersion(counts) -> tuple[np.ndarray, np.ndarray]:
    """Per-gene mean count (at size factor 1) and negative-binomial overdispersion phi.

    With size factors s_c, a gene's mean in cell c is mu s_c, mu = sum x / sum s, and phi solves
    sum_c (x - mu s_c)^2 = sum_c (mu s_c + phi (mu s_c)^2), the moment equation of
    var = mean + phi mean^2; phi is NaN for an all-zero gene and may be negative (underdispersed).
    """
    counts = _csr(counts)
    s = size_factors(counts)
    mu = np.asarray(counts.sum(axis=0)).ravel() / s.sum()
    # sum_c (x - mu s)^2 = sum x^2 - 2 mu sum s x + mu^2 sum s^2, all sparse-friendly
    sum_x2 = np.asarray(counts.multiply(counts).sum(axis=0)).ravel()
    sum_sx = np.asarray(counts.T @ s).ravel()
    squares = sum_x2 - 2 * mu * sum_sx + mu**2 * np.sum(s**2)
    with np.errstate(invalid="ignore", divide="ignore"):
        phi = (squares - mu * s.sum()) / (mu**2 * np.sum(s**2))
    return mu, np.where(mu > 0, phi, np.nan)


def median_dispersion(mu: np.ndarray, phi: np.ndarray) -> float:
    """The median phi over genes with mean >= MIN_MEAN (all expressed genes if none is)."""
    keep = mu >= MIN_MEAN if np.any(mu >= MIN_MEAN) else mu > 0
    return float(np.median(phi[keep]))


def zero_excess(counts, phi: float) -> dict[str, np.ndarray]:
    """Per gene: mean, observed zero fraction, and the zero fractions a Poisson and a negative
    binomial of dispersion `phi` expect at that mean and the cells' size factors."""
    counts = _csr(counts)
    s = size_factors(counts)
    mu = np.asarray(counts.sum(axis=0)).ravel() / s.sum()
    observed = 1 - np.diff(counts.tocsc().indptr) / counts.shape[0]
    cell_means = np.outer(s, mu)
    return {"mean": mu, "observed": observed, "poisson": np.exp(-cell_means).mean(axis=0),
            "negative_binomial": ((1 + max(phi, 1e-8) * cell_means) ** (-1 / max(phi, 1e-8))).mean(axis=0)}


def library_sizes(counts) -> dict[str, float]:
    """Quantiles (q05 ... q95), mean and coefficient of variation of the per-cell totals."""
    totals = np.asarray(_csr(counts).sum(axis=1)).ravel()
    summary = {f"q{round(q * 100):02d}": float(v) for q, v in zip(QUANTILES, np.quantile(totals, QUANTILES))}
    return {**summary, "mean": float(totals.mean()), "cv": float(totals.std() / totals.mean())}


def log1p_normalised(counts, target_sum: float = 1e4) -> np.ndarray:
    """log1p(counts / cell total * target_sum), dense float64 (scanpy's default preprocessing)."""
    counts = _csr(counts)
    totals = np.asarray(counts.sum(axis=1)).ravel()
    return np.log1p(counts.multiply(target_sum / np.maximum(totals, 1)[:, None]).toarray())


def correlation_structure(counts, top_genes: int = TOP_GENES) -> dict[str, object]:
    """Pairwise Pearson correlations (upper triangle) of log1p-normalised expression among the
    `top_genes` genes of highest mean count, with the correlation matrix's eigenvalues (descending)."""
    counts = _csr(counts)
    mean = np.asarray(counts.mean(axis=0)).ravel()
    genes = np.sort(np.argsort(-mean, kind="stable")[: min(top_genes, counts.shape[1])])
    genes = genes[mean[genes] > 0]
    x = log1p_normalised(counts)[:, genes]
    x = x[:, x.std(axis=0) > 0]
    r = np.corrcoef(x, rowvar=False)
    eigenvalues = np.linalg.eigvalsh(r)[::-1]
    return {"pairs": r[np.triu_indices_from(r, k=1)], "eigenvalues": eigenvalues, "genes": r.shape[0]}


def statistics(counts) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """The summary table row of a counts matrix and the per-gene / per-pair arrays behind it."""
    counts = _csr(counts)
    mu, phi = fit_dispersion(counts)
    phi_median = median_dispersion(mu, phi)
    zeros = zero_excess(counts, phi_median)
    correlation = correlation_structure(counts)
    pairs, eigenvalues = correlation["pairs"], correlation["eigenvalues"]
    expressed = mu >= MIN_MEAN
    row = {
        "cells": counts.shape[0], "genes": counts.shape[1],
        "zero_fraction": float(1 - counts.nnz / np.prod(counts.shape)),
        "phi_median": phi_median,
        "phi_q25": float(np.quantile(phi[expressed], 0.25)) if expressed.any() else np.nan,
        "phi_q75": float(np.quantile(phi[expressed], 0.75)) if expressed.any() else np.nan,
        "poisson_like_share": float(np.mean(phi[expressed] < POISSON_PHI)) if expressed.any() else np.nan,
        "zero_excess_poisson": float(np.mean(zeros["observed"] - zeros["poisson"])),
        "zero_excess_nb": float(np.mean(zeros["observed"] - zeros["negative_binomial"])),
        **{f"library_{k}": v for k, v in library_sizes(counts).items()},
        "corr_median": float(np.median(pairs)),
        "corr_q01": float(np.quantile(pairs, 0.01)),
        "corr_q99": float(np.quantile(pairs, 0.99)),
        "corr_abs_over_0.2": float(np.mean(np.abs(pairs) > 0.2)),
        "eigen_share_1": float(eigenvalues[0] / eigenvalues.sum()),
        "eigen_share_5": float(eigenvalues[:5].sum() / eigenvalues.sum()),
    }
    arrays = {"mean": mu, "phi": phi, "observed_zeros": zeros["observed"], "poisson_zeros": zeros["poisson"],
              "nb_zeros": zeros["negative_binomial"], "library": np.asarray(counts.sum(axis=1)).ravel(),
              "pairs": pairs, "eigenvalues": eigenvalues}
    return row, arrays


def thin(counts, fraction: float, rng: np.random.Generator) -> sp.csr_matrix:
    """Binomial thinning: each count kept with probability `fraction` (a shallower sequencing run)."""
    counts = _csr(counts)
    thinned = counts.copy()
    thinned.data = rng.binomial(counts.data.astype(np.int64), min(fraction, 1.0)).astype(np.float64)
    thinned.eliminate_zeros()
    return thinned


def match(counts, n_cells: int, n_genes: int, median_library: float, seed: int = 0) -> tuple[sp.csr_matrix, str]:
    """`counts` made comparable to a reference of `n_cells` x `n_genes` with that median library
    size: a seeded sample of cells, the `n_genes` most variable genes (Seurat's dispersion
    ranking on log1p-normalised counts), binomially thinned when its median library is deeper.
    Returns the matched matrix and one line saying what was done."""
    counts = _csr(counts)
    rng = np.random.default_rng(seed)
    steps = []
    if counts.shape[0] > n_cells:
        counts = counts[np.sort(rng.choice(counts.shape[0], n_cells, replace=False))]
        steps.append(f"{n_cells} cells sampled")
    counts = counts[np.asarray(counts.sum(axis=1)).ravel() > 0]
    if counts.shape[1] > n_genes:
        counts = counts[:, highly_variable_genes(log1p_normalised(counts), n_top=n_genes)]
        steps.append(f"its {n_genes} most variable genes")
    counts = counts[np.asarray(counts.sum(axis=1)).ravel() > 0]
    median = float(np.median(np.asarray(counts.sum(axis=1)).ravel()))
    if median > median_library:
        counts = thin(counts, median_library / median, rng)
        counts = counts[np.asarray(counts.sum(axis=1)).ravel() > 0]
        steps.append(f"thinned x{median_library / median:.3f} to median library {median_library:.0f}")
    return counts, "; ".join(steps) or "as is"


def read_counts(path: str | os.PathLike) -> sp.csr_matrix:
    """X of an .h5ad (raw counts), as CSR."""
    path = Path(path)
    if not path.is_file():
        raise SscellError(f"{path} does not exist: give an .h5ad of raw counts")
    adata = anndata.read_h5ad(path)
    return _csr(adata.X)


ROWS = (  # (key, label, format) of the side-by-side table
    ("cells", "cells", "{:.0f}"), ("genes", "genes", "{:.0f}"),
    ("zero_fraction", "zero fraction", "{:.3f}"),
    ("phi_median", "NB dispersion phi, median (genes with mean >= 0.1)", "{:.3f}"),
    ("phi_q25", "phi, 25th percentile", "{:.3f}"), ("phi_q75", "phi, 75th percentile", "{:.3f}"),
    ("poisson_like_share", "share of genes with phi < 0.05", "{:.3f}"),
    ("zero_excess_poisson", "zero fraction minus Poisson's, mean over genes", "{:+.4f}"),
    ("zero_excess_nb", "zero fraction minus NB(median phi)'s, mean over genes", "{:+.4f}"),
    ("library_q05", "library size, 5th percentile", "{:.0f}"), ("library_q50", "library size, median", "{:.0f}"),
    ("library_q95", "library size, 95th percentile", "{:.0f}"), ("library_cv", "library size CV", "{:.3f}"),
    ("corr_median", "gene-gene Pearson r, median (top 200 genes)", "{:+.4f}"),
    ("corr_q01", "gene-gene r, 1st percentile", "{:+.3f}"), ("corr_q99", "gene-gene r, 99th percentile", "{:+.3f}"),
    ("corr_abs_over_0.2", "share of gene pairs with abs(r) > 0.2", "{:.4f}"),
    ("eigen_share_1", "leading eigenvalue share of the correlation matrix", "{:.3f}"),
    ("eigen_share_5", "top-5 eigenvalue share", "{:.3f}"),
)


def markdown_table(rows: dict[str, dict[str, float]]) -> str:
    """The statistics side by side, one column per dataset."""
    names = list(rows)
    lines = ["| statistic | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for key, label, fmt in ROWS:
        lines.append(f"| {label} | " + " | ".join(fmt.format(rows[n][key]) for n in names) + " |")
    return "\n".join(lines) + "\n"


def figure(arrays: dict[str, dict[str, np.ndarray]]):
    """Four panels, one colour per dataset: mean-variance (phi against mean), zero fraction
    against mean (lines: NB expectation), library sizes (relative to the median) and the
    distribution of gene-gene correlations."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 9.5), layout="constrained")
    (ax_phi, ax_zero), (ax_lib, ax_corr) = fig.subplots(2, 2)
    for (name, a), colour in zip(arrays.items(), ("black", "tab:blue", "tab:orange", "tab:green", "tab:red")):
        keep = a["mean"] > 0
        ax_phi.scatter(a["mean"][keep], np.clip(a["phi"][keep], 1e-3, None), s=3, alpha=0.4, color=colour, label=name)
        ax_zero.scatter(a["mean"][keep], a["observed_zeros"][keep], s=3, alpha=0.4, color=colour, label=name)
        order = np.argsort(a["mean"][keep])
        ax_zero.plot(a["mean"][keep][order], a["nb_zeros"][keep][order], color=colour, lw=1)
        ax_lib.hist(a["library"] / np.median(a["library"]), bins=np.linspace(0, 4, 61), histtype="step",
                    density=True, color=colour, label=f"{name} (median {np.median(a['library']):.0f})")
        ax_corr.hist(a["pairs"], bins=np.linspace(-0.5, 1, 76), histtype="step", density=True, color=colour,
                     label=f"{name} (lead eigenvalue {a['eigenvalues'][0] / a['eigenvalues'].sum():.1%})")
    ax_phi.set(xscale="log", yscale="log", xlabel="gene mean count (size factor 1)",
               ylabel="NB dispersion phi (clipped at 1e-3)", title="mean-variance: var = mu + phi mu^2")
    ax_zero.plot([], [], color="grey", lw=1, label="lines: NB with the median phi")
    ax_zero.set(xscale="log", xlabel="gene mean count", ylabel="zero fraction", title="zeros against mean")
    ax_lib.set(xlabel="library size / median", ylabel="density", title="library sizes")
    ax_corr.set(yscale="log", xlabel="Pearson r, log1p-normalised, top 200 genes", ylabel="density",
                title="gene-gene correlations")
    for ax in (ax_phi, ax_zero, ax_lib, ax_corr):
        ax.legend(fontsize=8, markerscale=3)
    return fig


def compare(real: str | os.PathLike, synthetic: Sequence[str | os.PathLike], output: str | os.PathLike,
            seed: int = 0) -> dict[str, dict[str, float]]:
    """Measure the real file and each synthetic one (matched to it), write stats.md, stats.json
    and realism.png into `output` (created) and return the table rows by dataset name."""
    real_counts = read_counts(real)
    names = [Path(real).name.removesuffix(".h5ad")] + [Path(p).name.removesuffix(".h5ad") for p in synthetic]
    if len(set(names)) < len(names):
        raise SscellError(f"files share a name ({', '.join(names)}): give each a distinct file name")
    median = float(np.median(np.asarray(real_counts.sum(axis=1)).ravel()))
    rows, arrays, notes = {}, {}, {}
    rows[names[0]], arrays[names[0]] = statistics(real_counts)
    notes[names[0]] = "as is (the reference)"
    for name, path in zip(names[1:], synthetic):
        counts, notes[name] = match(read_counts(path), *real_counts.shape, median, seed=seed)
        rows[name], arrays[name] = statistics(counts)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    table = markdown_table(rows) + "\n" + "\n".join(f"- {n}: {notes[n]}" for n in names) + "\n"
    with atomic_file(output / "stats.md") as tmp:
        tmp.write_text(table)
    with atomic_file(output / "stats.json") as tmp:
        tmp.write_text(json.dumps({n: {**rows[n], "matched": notes[n]} for n in names}, indent=1))
    with atomic_file(output / "realism.png") as tmp:
        figure(arrays).savefig(tmp, dpi=110, format="png")
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", required=True, help="the real .h5ad (raw counts in X), the reference")
    parser.add_argument("--synthetic", action="append", required=True, help="a synthetic .h5ad (repeat)")
    parser.add_argument("--output", required=True, help="folder for stats.md, stats.json and realism.png")
    parser.add_argument("--seed", type=int, default=0, help="seeds the cell sample and the thinning")
    args = parser.parse_args(argv)
    with exit_on_error():
        compare(args.real, args.synthetic, args.output, seed=args.seed)
    print(Path(args.output, "stats.md").read_text())
    print(f"wrote {args.output}/stats.md, stats.json, realism.png")


if __name__ == "__main__":
    main()

"""Rewrite a CITE-seq or multiome .h5ad that keeps RNA and a second modality as columns of one
matrix into the converter's layout (RNA in X, proteins or peaks in obsm: `sscell.data.modality`).

CITE-seq (the NeurIPS 2021 bone-marrow data: var['feature_types'] GEX / ADT):

    python -m sscell.data.split_features --input=cite.h5ad --output=cite_rna_protein.h5ad [--hvg=2000]
        [--dataset-column=batch] [--donor-column=DonorID] [--gene-column=gene_id]

which also keeps the RNA's most variable genes and writes them, in order, to
`cite_rna_protein.genes.txt` (a --vocabulary for other stores, e.g. a pretraining corpus).
Multiome (var['feature_types'] GEX / ATAC): the same command with --protein=ATAC [--top-features=N].
"""
from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import scipy.sparse as sp

from sscell.data.genes import highly_variable_genes
from sscell.data.modality import ATAC_KEY, PROTEIN_KEY
from sscell.data.store import names_key
from sscell.errors import SscellError, exit_on_error


def split_feature_types(input_path: str | os.PathLike, output: str | os.PathLike, *, n_hvg: int = 2000,
                        feature_column: str = "feature_types", rna: str = "GEX", protein: str = "ADT",
                        dataset_column: str = "batch", donor_column: str = "DonorID",
                        gene_column: str | None = "gene_id", top_features: int = 0) -> dict[str, object]:
    """Rewrite a CITE-seq (or multiome) .h5ad holding RNA and a second modality as columns of one
    matrix (raw counts in layers['counts'], else X) into the converter's layout: the `n_hvg` most
    variable RNA genes as X (0: all), the `protein` features in obsm['protein_counts'] (dense), or,
    when `protein` is "ATAC", the peaks in obsm['atac_counts'] (CSR; the `top_features` peaks open
    in most cells, 0: all), with their names, obs dataset_id / donor_id from `dataset_column` /
    `donor_column`, gene ids from var[`gene_column`] when present. Also writes the kept genes to
    OUTPUT.genes.txt. Reads the input whole (a CITE-seq or multiome file fits in memory).
    """
    adata = anndata.read_h5ad(input_path)
    for column, frame in ((feature_column, adata.var), (dataset_column, adata.obs), (donor_column, adata.obs)):
        if column not in frame:
            raise SscellError(f"{input_path}: no column {column!r} (var: {list(adata.var.columns)}, obs: "
                              f"{list(adata.obs.columns)}); name the right ones")
    counts = sp.csr_matrix(adata.layers.get("counts", adata.X))
    kinds = adata.var[feature_column].astype(str).to_numpy()
    if not (kinds == rna).any() or not (kinds == protein).any():
        raise SscellError(f"{input_path}: var[{feature_column!r}] must hold {rna!r} and {protein!r} features; it "
                          f"holds {sorted(set(kinds))[:5]}")
    genes = np.flatnonzero(kinds == rna)
    if n_hvg:
        x = counts[:, genes]
        library = np.maximum(np.asarray(x.sum(1)).ravel(), 1)
        genes = genes[highly_variable_genes((sp.diags(1e4 / library) @ x).log1p(), n_hvg)]
    var = adata.var.iloc[genes].copy()
    if gene_column and gene_column in var:
        var.index = pd.Index(var[gene_column].astype(str))
    obs = adata.obs.copy()
    obs["dataset_id"], obs["donor_id"] = obs[dataset_column].astype(str), obs[donor_column].astype(str)
    proteins = np.flatnonzero(kinds == protein)
    key = ATAC_KEY if protein == "ATAC" else PROTEIN_KEY
    values = counts[:, proteins].astype(np.float32)
    if key == ATAC_KEY and top_features:
        kept = np.sort(np.argsort(-values.getnnz(0), kind="stable")[:top_features])
        proteins, values = proteins[kept], values[:, kept]
    out = anndata.AnnData(X=counts[:, genes].astype(np.float32), obs=obs, var=var,
                          obsm={key: sp.csr_matrix(values) if key == ATAC_KEY else values.toarray()},
                          uns={names_key(key): np.asarray(adata.var_names[proteins], dtype=object)})
    out.write_h5ad(output)
    vocabulary = Path(output).with_suffix(".genes.txt")
    vocabulary.write_text("\n".join(var.index) + "\n")
    return {"output": str(output), "cells": out.n_obs, "genes": len(genes),
            "peaks" if key == ATAC_KEY else "proteins": len(proteins),
            "vocabulary": str(vocabulary), "datasets": sorted(obs["dataset_id"].unique())}


def main(argv: Sequence[str] | None = None) -> None:
    """Command line of `split_feature_types`."""
    parser = argparse.ArgumentParser(prog="python -m sscell.data.split_features", description=split_feature_types.__doc__)
    parser.add_argument("--input", required=True, help="CITE-seq / multiome .h5ad with RNA and protein / ATAC "
                        "features in one matrix")
    parser.add_argument("--output", required=True, help=".h5ad to write (RNA in X, proteins or peaks in obsm)")
    parser.add_argument("--hvg", type=int, default=2000, help="most variable genes kept (0: all)")
    parser.add_argument("--feature-column", default="feature_types")
    parser.add_argument("--rna", default="GEX")
    parser.add_argument("--protein", default="ADT", help="feature type of the second modality: ADT (proteins) "
                        "or ATAC (peaks)")
    parser.add_argument("--top-features", type=int, default=0, help="ATAC: keep the peaks open in most cells (0: all)")
    parser.add_argument("--dataset-column", default="batch", help="obs column giving dataset_id (the batch)")
    parser.add_argument("--donor-column", default="DonorID", help="obs column giving donor_id")
    parser.add_argument("--gene-column", default="gene_id", help="var column of gene ids, when present")
    args = parser.parse_args(argv)
    with exit_on_error():
        report = split_feature_types(args.input, args.output, n_hvg=args.hvg, feature_column=args.feature_column,
                                     rna=args.rna, protein=args.protein, dataset_column=args.dataset_column,
                                     donor_column=args.donor_column, gene_column=args.gene_column,
                                     top_features=args.top_features)
    print(report)


if __name__ == "__main__":
    main()

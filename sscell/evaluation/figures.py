"""Evaluation figures (PNG): 2-D maps of embeddings coloured by a label, and bar charts of results."""
from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from sscell.atomic import atomic_file
from sscell.evaluation.neighbors import nearest_neighbors

MAX_LEGEND = 20  # more categories than this: no legend (colours only)
UMAP_EPOCHS = 200


def umap_2d(embedding: np.ndarray, seed: int = 0, knn_method: str = "auto") -> np.ndarray:
    """UMAP (umap-learn, 15 neighbours, 200 epochs) of `embedding` into 2-D; deterministic for a seed.

    The neighbour graph comes from `sscell.evaluation.neighbors` (exact on small inputs), which
    spares umap-learn's own search (its numba compilation takes longer than the map itself).
    200 layout epochs (umap-learn's choice above 10,000 cells; below, it takes 500): 2.5x less
    layout time, for a figure.
    """
    import umap  # numba-compiled on first use: imported only when a map is drawn

    embedding = np.asarray(embedding, np.float32)
    n_neighbors = min(15, len(embedding) - 1)
    indices, distances = nearest_neighbors(embedding, embedding, n_neighbors, knn_method)
    reducer = umap.UMAP(n_neighbors=n_neighbors, n_epochs=UMAP_EPOCHS, random_state=seed, n_jobs=1,
                        precomputed_knn=(indices, distances.astype(np.float32)))
    with warnings.catch_warnings():  # "no search index: transform unavailable" (not needed)
        warnings.simplefilter("ignore", UserWarning)
        return reducer.fit_transform(embedding)


def plot_maps(coords: Mapping[str, np.ndarray], codes: np.ndarray, names: Sequence[str], title: str,
              path: str | os.PathLike) -> None:
    """One scatter panel per method (`coords`: name -> (cells, 2)), cells coloured by `codes`
    (indices into `names`); the PNG is replaced atomically."""
    n = len(coords)
    columns = min(n, 3)
    rows = math.ceil(n / columns)
    fig = Figure(figsize=(4.2 * columns + 2.5, 4.0 * rows), layout="constrained")
    palette = _palette(len(names))
    for i, (method, xy) in enumerate(coords.items()):
        ax = fig.add_subplot(rows, columns, i + 1)
        ax.scatter(xy[:, 0], xy[:, 1], c=palette[codes], s=3, linewidths=0, rasterized=True)
        ax.set(title=method, xticks=[], yticks=[])
    if len(names) <= MAX_LEGEND:
        present = np.unique(codes)
        handles = [fig.axes[0].scatter([], [], color=palette[c], s=20, label=str(names[c])) for c in present]
        fig.legend(handles=handles, loc="outside right center", fontsize="small", frameon=False)
    fig.suptitle(title)
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)


def plot_bars(rows: Sequence[Mapping], columns: Sequence[str], title: str, path: str | os.PathLike) -> None:
    """Grouped bars: one group per metric in `columns`, one bar per row (its "method"); rows or
    metrics without a finite value are left out. The PNG is replaced atomically."""
    columns = [c for c in columns if any(_finite(r.get(c)) for r in rows)]
    rows = [r for r in rows if any(_finite(r.get(c)) for c in columns)]
    fig = Figure(figsize=(max(5.0, 1.2 * len(columns) * max(len(rows), 1) * 0.45 + 2), 4.2), layout="constrained")
    ax = fig.add_subplot()
    width = 0.8 / max(len(rows), 1)
    palette = _palette(len(rows))
    for i, row in enumerate(rows):
        values = [row.get(c) if _finite(row.get(c)) else 0.0 for c in columns]
        ax.bar(np.arange(len(columns)) + (i - (len(rows) - 1) / 2) * width, values, width,
               label=str(row["method"]), color=palette[i])
    ax.set_xticks(np.arange(len(columns)), columns, rotation=20, ha="right")
    ax.axhline(0, color="black", linewidth=0.5)
    ax.set(title=title, ylabel="score")
    ax.legend(fontsize="small", loc="lower left", bbox_to_anchor=(0, 1.08), ncol=2, frameon=False)
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)


def _finite(value) -> bool:
    return isinstance(value, (int, float, np.floating, np.integer)) and math.isfinite(value)


def _palette(n: int) -> np.ndarray:
    """`n` distinguishable RGBA colours (tab20, then evenly spaced hues)."""
    from matplotlib import colormaps

    cmap = colormaps["tab20" if n <= 20 else "hsv"]
    return np.asarray([cmap(i if n <= 20 else i / n) for i in range(max(n, 1))])

"""k-nearest-neighbour search and the zero-shot kNN classifier, for up to millions of reference cells.

Two searches, the same answer up to approximation:
- exact: blocked in JAX (query blocks x reference blocks, a running top-k merged block by
  block, so memory is bounded by the block sizes), on the default device (a GPU when present);
  on embeddings centred on the reference mean, the float32 search keeps 2k + 8 candidates,
  re-ranked in float64 (ties by reference index), so rounding cannot reorder near-ties as a
  float32-only search would. Each reference block's candidates come from its `_GROUP`-row groups
  with the smallest minima (the c nearest lie in at most c groups), so the top-k runs over
  c x _GROUP distances, not the block's 8,192: 1 M references x 100 k queries on 2 cores in
  minutes instead of about an hour (docs/scale.md).
- approximate: a faiss inverted-file index (up to `IVF_LISTS` k-means lists of >= 64 references;
  a query scans the quarter of them with the nearest centres, at least `IVF_MIN_PROBED`) holding a
  4-bit code per dimension, scanned with SIMD; its IVF_MARGIN x k + 8 best candidates re-ranked in
  float64 as the exact search re-ranks its own. It agreed with the exact kNN labels on >= 99.7% of
  the queries of overlapping cell types at 100 k and 1 M references (neighbour recall >= 0.99;
  HNSW at efSearch 64, the search before, on 90-93%), several times faster (docs/scale.md).
  Fewer than `_MIN_INDEXED` references are searched exactly.
"auto" takes the exact search on an accelerator, or when n_ref x n_query <= `exact_max_pairs`.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from sscell.errors import SscellError

METHODS = ("auto", "exact", "approximate")
EXACT_MAX_PAIRS = 2e10  # n_ref x n_query above which "auto" searches approximately on a CPU: headline scores stay
# exact while that takes about a minute or two; the approximate search is 1.4x (1e9 pairs) to 7.5x (1e11) faster
# and agrees on >= 99.7% of labels (docs/scale.md)
_QUERY_BLOCK, _REF_BLOCK = 1024, 8192
_GROUP = 32  # reference rows per group of a block (a block is padded to whole groups)
IVF_LISTS, IVF_PROBED = 1024, 4  # at most this many inverted lists; 1 / IVF_PROBED of them searched,
IVF_MIN_PROBED = 64  # but at least this many (a few large lists split a small reference too coarsely)
_MIN_LIST = 64  # reference rows a list holds at least (fewer lists for fewer references)
IVF_MARGIN = 4  # candidates re-ranked a query: IVF_MARGIN x k + 8 (the 4-bit codes only rank roughly)
_MIN_INDEXED = 1024  # fewer references are searched exactly (an index would not pay)
_VOTE_BLOCK = 65536  # query cells voted at once (bounds the cells x classes count table)


def _check(ref: np.ndarray, query: np.ndarray, k: int, what: str) -> None:
    if ref.ndim != 2 or query.ndim != 2 or ref.shape[1] != query.shape[1]:
        raise SscellError(f"{what} needs 2-D embeddings of equal width, got {ref.shape} and {query.shape}: "
                          "pass (cells, dims) arrays from the same encoder")
    if not 1 <= k <= len(ref):
        raise SscellError(f"{what} needs 1 <= k <= {len(ref)} reference cells, got k={k}")


def resolve_method(method: str, n_ref: int, n_query: int, exact_max_pairs: float = EXACT_MAX_PAIRS) -> str:
    """"exact" or "approximate" for `method` ("auto" decides by device and size)."""
    if method not in METHODS:
        raise SscellError(f"unknown kNN method {method!r}; choose one of {', '.join(METHODS)} (config.eval.knn_method)")
    if method != "auto":
        return method
    on_accelerator = jax.default_backend() != "cpu"
    return "exact" if on_accelerator or n_ref * n_query <= exact_max_pairs else "approximate"


@functools.partial(jax.jit, static_argnames="k")
def _block_candidates(query: jax.Array, ref_blocks: jax.Array, ref_valid: jax.Array, k: int):
    """(squared distances less the query's squared norm, indices) of the k nearest references of
    each query row (float32).

    `ref_blocks` is (blocks, block, dims), block a multiple of _GROUP; `ref_valid` marks real
    (not padding) rows. A scan over the blocks keeps a running top-k, so only one query x block
    distance matrix exists. Within a block, the k nearest lie in the k groups of _GROUP rows with
    the smallest minima (a group holding one of them has its minimum among the k nearest), so
    only those groups' distances enter the top-k.
    """
    n, block = query.shape[0], ref_blocks.shape[1]
    groups = block // _GROUP
    chosen = min(k, groups)

    def merge(best, inputs):
        i, refs, valid = inputs  # |q|^2 is the same for a query's every reference: left out of the ranking
        norms = jnp.where(valid, jnp.sum(refs * refs, axis=1), jnp.inf)
        dist = (norms[None, :] - 2.0 * query @ refs.T).reshape(n, groups, _GROUP)
        _, group = jax.lax.top_k(-jnp.min(dist, axis=2), chosen)
        near = jnp.take_along_axis(dist, group[:, :, None], axis=1).reshape(n, chosen * _GROUP)
        near_ids = (i * block + group[:, :, None] * _GROUP + jnp.arange(_GROUP)).reshape(n, chosen * _GROUP)
        neg, idx = jax.lax.top_k(-jnp.concatenate([best[0], near], axis=1), k)
        ids = jnp.concatenate([best[1], near_ids], axis=1)
        return (-neg, jnp.take_along_axis(ids, idx, axis=1)), None

    init = (jnp.full((query.shape[0], k), jnp.inf, query.dtype), jnp.zeros((query.shape[0], k), jnp.int32))
    (dist, ids), _ = jax.lax.scan(merge, init, (jnp.arange(ref_blocks.shape[0]), ref_blocks, ref_valid))
    return dist, ids


def _exact(ref: np.ndarray, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    # Distances do not change under a shift: centring both on the reference mean keeps the float32
    # search's rounding (relative to the squared norms) small for embeddings far from the origin.
    ref64, query64 = ref.astype(np.float64), query.astype(np.float64)
    centre = ref64.mean(axis=0)
    ref, query = (ref64 - centre).astype(np.float32), (query64 - centre).astype(np.float32)
    n_ref = len(ref)
    block = -(-min(_REF_BLOCK, n_ref) // _GROUP) * _GROUP
    n_blocks = -(-n_ref // block)
    padded = np.zeros((n_blocks * block, ref.shape[1]), np.float32)
    padded[:n_ref] = ref
    valid = np.arange(n_blocks * block) < n_ref
    ref_blocks = jnp.asarray(padded.reshape(n_blocks, block, -1))
    ref_valid = jnp.asarray(valid.reshape(n_blocks, block))
    candidates = min(n_ref, 2 * k + 8)  # float32 rounding can only swap near-ties: re-rank a margin in float64
    q_block = min(_QUERY_BLOCK, len(query))
    indices = np.empty((len(query), k), np.int64)
    distances = np.empty((len(query), k), np.float64)
    for a in range(0, len(query), q_block):
        b = min(a + q_block, len(query))
        chunk = np.zeros((q_block, query.shape[1]), np.float32)  # one shape for jit
        chunk[:b - a] = query[a:b]
        _, ids = jax.device_get(_block_candidates(jnp.asarray(chunk), ref_blocks, ref_valid, candidates))
        indices[a:b], distances[a:b] = _rerank(ref64, query64[a:b], ids[:b - a], k)
    return indices, distances


def _rerank(ref: np.ndarray, query: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest of each query row's candidate `ids` (-1: none) by float64 distance, ties by
    reference index: (indices, distances), nearest first."""
    diff = ref[ids].astype(np.float64, copy=False) - query[:, None, :].astype(np.float64, copy=False)
    exact = np.where(ids >= 0, np.sqrt(np.sum(diff * diff, axis=-1)), np.inf)
    order = np.lexsort((ids, exact), axis=-1)[:, :k]  # nearest first, ties by reference index
    return np.take_along_axis(ids, order, axis=1), np.take_along_axis(exact, order, axis=1)


def _approximate(ref: np.ndarray, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Candidates from a faiss IVF index of 4-bit codes (one code per dimension, scanned with
    SIMD), re-ranked exactly in float64 as the exact search re-ranks its own."""
    import faiss  # imported only when needed

    if len(ref) < _MIN_INDEXED:
        return _exact(ref, query, k)
    lists = min(IVF_LISTS, len(ref) // _MIN_LIST)
    index = faiss.index_factory(ref.shape[1], f"IVF{lists},PQ{ref.shape[1]}x4fs")
    sample = np.sort(np.random.default_rng(0).choice(len(ref), min(len(ref), max(40 * lists, 8192)), replace=False))
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # training runs thousands of tiny parallel loops (a 1-D k-means per
    try:  # dimension): on a busy machine threads spin at each barrier, 20k references trained 70x slower
        index.train(ref[sample])  # faiss asks for >= 39 training points a list
    finally:
        faiss.omp_set_num_threads(threads)
    index.add(np.ascontiguousarray(ref))
    index.nprobe = max(lists // IVF_PROBED, min(lists, IVF_MIN_PROBED))
    _, ids = index.search(np.ascontiguousarray(query), min(len(ref), IVF_MARGIN * k + 8))
    indices = np.empty((len(query), k), np.int64)
    distances = np.empty((len(query), k), np.float64)
    for a in range(0, len(query), _QUERY_BLOCK):
        b = min(a + _QUERY_BLOCK, len(query))
        indices[a:b], distances[a:b] = _rerank(ref, query[a:b], ids[a:b], k)
    return indices, distances


def nearest_neighbors(ref: np.ndarray, query: np.ndarray, k: int, method: str = "auto",
                      exact_max_pairs: float = EXACT_MAX_PAIRS) -> tuple[np.ndarray, np.ndarray]:
    """(indices into `ref`, Euclidean distances), both (n_query, k), nearest first.

    A query equal to a reference point finds it at distance 0 (no self-neighbour is dropped).
    `method`: "exact", "approximate" or "auto" (see the module docstring).
    """
    ref, query = np.asarray(ref, np.float32), np.asarray(query, np.float32)
    _check(ref, query, k, "nearest_neighbors")
    if resolve_method(method, len(ref), len(query), exact_max_pairs) == "exact":
        return _exact(ref, query, k)
    return _approximate(ref, query, k)


def vote(neighbor_labels: np.ndarray) -> np.ndarray:
    """The most frequent label of each row of (cells, k) integer labels; ties go to the smallest
    label, as in scikit-learn's KNeighborsClassifier."""
    n_classes = int(neighbor_labels.max(initial=0)) + 1
    winners = np.empty(len(neighbor_labels), np.int64)
    for a in range(0, len(neighbor_labels), _VOTE_BLOCK):
        rows = neighbor_labels[a:a + _VOTE_BLOCK]
        counts = np.zeros((len(rows), n_classes), np.int32)
        np.add.at(counts, (np.arange(len(rows))[:, None], rows), 1)
        winners[a:a + len(rows)] = counts.argmax(axis=1)  # first maximum: the smallest label
    return winners


def knn_predict(ref_emb: np.ndarray, ref_labels: np.ndarray, query_emb: np.ndarray, k: int = 5,
                method: str = "auto", exact_max_pairs: float = EXACT_MAX_PAIRS) -> np.ndarray:
    """Label each query cell by majority vote among its `k` nearest reference cells (Euclidean).

    The study's zero-shot protocol: reference = validation cells, query = test cells. The sets
    are disjoint, so no 'self' neighbour is dropped: a query equal to a reference point counts
    that point's label. Ties break as scikit-learn's KNeighborsClassifier breaks them (the
    smallest label among the tied classes).
    """
    ref_labels = np.asarray(ref_labels)
    if len(ref_labels) != len(ref_emb):
        raise SscellError(f"knn_predict got {len(ref_labels)} labels for {len(ref_emb)} reference cells: "
                          "pass one label per reference cell")
    classes, codes = np.unique(ref_labels, return_inverse=True)
    indices, _ = nearest_neighbors(ref_emb, query_emb, k, method, exact_max_pairs)
    return classes[vote(codes[indices])]


def study_knn_predict(ref_emb: np.ndarray, ref_labels: np.ndarray, query_emb: np.ndarray, k: int = 5,
                      second_only: bool = False, method: str = "auto") -> np.ndarray:
    """The study's kNN labels (ssl_in_scg, self_supervision/tester/classifier/): k + 1 neighbours
    are searched and the nearest dropped as if it were the query itself, although reference and
    query never overlap. A model's embeddings: the labels of neighbours 2..k+1 vote (`perform_knn`,
    kNN.py:40-49, ties to the smallest label as np.bincount's argmax); PCA and embeddings read from
    files (`second_only`): the 2nd-nearest neighbour's label alone (`evaluate_knn_from_file`,
    evaluation_utils.py:50-56)."""
    ref_labels = np.asarray(ref_labels)
    if len(ref_labels) != len(ref_emb):
        raise SscellError(f"study_knn_predict got {len(ref_labels)} labels for {len(ref_emb)} reference cells: "
                          "pass one label per reference cell")
    classes, codes = np.unique(ref_labels, return_inverse=True)
    indices, _ = nearest_neighbors(ref_emb, query_emb, k + 1, method)
    return classes[codes[indices[:, 1]] if second_only else vote(codes[indices[:, 1:]])]

"""Ontology-aware cell-type scoring (as in scTab): predicting the true type or any of its
descendants in the Cell Ontology counts as correct.

The hierarchy is a plain mapping `{label: labels that are it or below it}`, so scoring needs no
ontology; `cell_ontology_descendants` builds it from the Cell Ontology shipped offline with
`cellxgene-ontology-guide`.
"""
from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from sscell.errors import SscellError

if TYPE_CHECKING:
    from sscell.data.store import Store


def corrected_predictions(true: np.ndarray, pred: np.ndarray, descendants: Mapping[object, set]) -> np.ndarray:
    """`pred` with every prediction of the true type's descendant replaced by the true type.

    `descendants[t]` holds the labels at or below `t` (t itself need not be listed); a true
    label missing from the mapping only counts exact predictions.
    """
    true, pred = np.asarray(true), np.asarray(pred)
    if true.shape != pred.shape:
        raise SscellError(f"corrected_predictions needs labels of one shape, got {true.shape} and {pred.shape}")
    below = np.fromiter((p in descendants.get(t, ()) for t, p in zip(true.tolist(), pred.tolist())), bool, len(true))
    return np.where(below, true, pred)


@functools.cache
def _ontology():
    from cellxgene_ontology_guide.ontology_parser import OntologyParser

    # loads the ontology (seconds), once per process
    return OntologyParser()


def is_cell_ontology_id(term: str) -> bool:
    """Whether `term` looks like a Cell Ontology id, e.g. 'CL:0000236'."""
    return isinstance(term, str) and term.startswith("CL:") and term[3:].isdigit()


def cell_ontology_descendants(labels: Sequence[str], terms: Sequence[str]) -> dict[str, set[str]]:
    """{label: the labels whose term is that label's term or one of its Cell Ontology descendants}.

    `terms[i]` is the Cell Ontology id of `labels[i]` (e.g. obs cell_type and
    cell_type_ontology_term_id). Only the given labels appear in the result.
    """
    if len(labels) != len(terms):
        raise SscellError(f"cell_ontology_descendants got {len(labels)} labels and {len(terms)} terms")
    bad = [t for t in terms if not is_cell_ontology_id(t)]
    if bad:
        raise SscellError(f"{bad[0]!r} is not a Cell Ontology id (CL:0000000); ontology-aware scoring needs them")
    ontology = _ontology()
    label_of = {}
    for label, term in zip(labels, terms):
        label_of.setdefault(term, set()).add(label)
    result = {}
    for label, term in zip(labels, terms):
        below = set(ontology.get_term_descendants(term, include_self=True))
        result[label] = {other for t in below if t in label_of for other in label_of[t]}
    return result


def store_descendants(store: Store) -> dict[int, set[int]] | None:
    """{cell-type code: codes at or below it in the Cell Ontology}, or None when the store's
    cell types do not map one-to-one onto Cell Ontology ids."""
    labels = store.labels
    if "cell_type_ontology_term_id" not in labels or "cell_type" not in labels:
        return None
    types, terms = labels["cell_type"].cat.codes.to_numpy(), labels["cell_type_ontology_term_id"]
    n_terms = len(terms.cat.categories)
    pairs = np.unique(types.astype(np.int64) * n_terms + terms.cat.codes.to_numpy())  # distinct (type, term)
    codes, term_codes = pairs // n_terms, pairs % n_terms
    if len(codes) != len(np.unique(codes)) or (types < 0).any() or (terms.cat.codes < 0).any():
        return None
    names = [str(terms.cat.categories[t]) for t in term_codes]
    if not all(is_cell_ontology_id(t) for t in names):
        return None
    below = cell_ontology_descendants([int(c) for c in codes], names)
    return {int(k): {int(c) for c in v} for k, v in below.items()}

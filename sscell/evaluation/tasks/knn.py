"""knn: zero-shot cell typing, the k nearest reference cells vote for each test cell.

No self neighbour: the sets are disjoint. The reference (`eval.knn_reference`) is the
validation cells (the study's protocol), the first `eval.knn_reference_cells` training cells (a
random sample: the store keeps each split in a seeded random order), or both; it is recorded in
the results (`knn_reference`, `knn_reference_cells`). Macro F1 (headline, docs/metrics.md),
micro F1, per-class F1 and, when the store holds Cell Ontology ids, ontology-aware F1
(predicting a descendant of the true type counts as correct).

`eval.protocol="study"` scores as the study's code does (`study_knn_predict`): k + 1 neighbours
searched and the nearest dropped; the model's embeddings vote over the other k, the baselines'
take the 2nd-nearest neighbour's label alone; the reference must be the validation cells.
"""
from __future__ import annotations

from sscell.errors import SscellError
from sscell.evaluation.cells import Cells
from sscell.evaluation.neighbors import knn_predict, study_knn_predict
from sscell.evaluation.tasks.registry import Inputs, Outcome, register

KNN_REFERENCES = ("val", "train", "train+val")  # eval.knn_reference: the splits whose cells vote
SPLIT_NAMES = {"train": "training", "val": "validation"}
PROTOCOLS = ("sscell", "study")  # eval.protocol


def knn_reference_splits(reference: str) -> tuple[str, ...]:
    """The splits `reference` (one of KNN_REFERENCES) takes its cells from, training first."""
    if reference not in KNN_REFERENCES:
        raise SscellError(f"unknown kNN reference {reference!r}; choose from {', '.join(KNN_REFERENCES)} "
                          "(eval.knn_reference or --knn_reference)")
    return tuple(reference.split("+"))


def check_protocol(protocol: str, reference: str) -> None:
    """Refuse an unknown `eval.protocol`, and the study's protocol with another reference than its own."""
    if protocol not in PROTOCOLS:
        raise SscellError(f"unknown evaluation protocol {protocol!r}; choose from {', '.join(PROTOCOLS)} "
                          "(eval.protocol or --protocol)")
    if protocol == "study" and reference != "val":
        raise SscellError(f"the study's protocol takes the validation cells as kNN reference, not {reference!r}: "
                          "set eval.knn_reference=val (--knn_reference=val) or eval.protocol=sscell")


def train_cells(settings) -> int | None:
    """The training cells of a train / train+val reference (None: the reference is validation cells)."""
    return settings.knn_reference_cells if "train" in knn_reference_splits(settings.knn_reference) else None


@register("knn", needs=("embeddings", "ontology"), train_cells=train_cells,
          columns=("knn_macro_f1", "knn_micro_f1", "knn_macro_f1_ontology"), headline=("knn_macro_f1",))
def knn(inputs: Inputs, outcome: Outcome) -> None:
    settings, test = inputs.settings, inputs.test
    parts = {s: inputs.train.first(settings.knn_reference_cells) if s == "train" else inputs.val
             for s in knn_reference_splits(settings.knn_reference)}
    reference = Cells.concat(list(parts.values()))
    check_protocol(settings.protocol, settings.knn_reference)

    def predict(method: str):
        ref, labels, query = reference.embeddings[method], reference.labels["cell_type"], test.embeddings[method]
        if settings.protocol == "study":  # the model is the first method; the rest are baselines
            return study_knn_predict(ref, labels, query, settings.knn_k, method != inputs.methods[0],
                                     settings.knn_method)
        return knn_predict(ref, labels, query, settings.knn_k, settings.knn_method)

    predicted = inputs.share({m: predict(m) for m in inputs.distinct()})
    for m in inputs.methods:
        outcome.score("knn", m, test.labels["cell_type"], predicted[m], inputs.type_names, inputs.descendants)
        outcome.rows[m].update(knn_reference=settings.knn_reference, knn_reference_cells=len(reference))
    rule = (" by the study's protocol (k+1 searched, nearest dropped; baselines: 2nd-nearest alone)"
            if settings.protocol == "study" else "")
    outcome.described.append(f"kNN (k={settings.knn_k}){rule}: reference = "
                             + " + ".join(f"{len(c)} {SPLIT_NAMES[s]} cells" for s, c in parts.items())
                             + f" (eval.knn_reference={settings.knn_reference}), query = {len(test)} test cells")

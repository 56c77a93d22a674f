"""linear_probe: logistic regression on frozen embeddings (`sscell.evaluation.probe`), fit on
the first `eval.probe_cells` training cells, its C chosen on the validation cells, scored on the
test cells: macro / micro / per-class F1 (and ontology-aware F1), the chosen C as `probe_C`."""
from __future__ import annotations

from sscell.evaluation.probe import linear_probe
from sscell.evaluation.tasks.registry import Inputs, Outcome, register


@register("linear_probe", needs=("embeddings", "ontology"), train_cells=lambda settings: settings.probe_cells,
          columns=("probe_macro_f1", "probe_micro_f1", "probe_macro_f1_ontology"), headline=("probe_macro_f1",))
def probe(inputs: Inputs, outcome: Outcome) -> None:
    train, val, test = inputs.train.first(inputs.settings.probe_cells), inputs.val, inputs.test
    fitted = inputs.share({m: linear_probe(train.embeddings[m], train.labels["cell_type"], val.embeddings[m],
                                           val.labels["cell_type"], test.embeddings[m], seed=inputs.seed)
                           for m in inputs.distinct()})
    for m, (predicted, c) in fitted.items():
        outcome.score("probe", m, test.labels["cell_type"], predicted, inputs.type_names, inputs.descendants)
        outcome.rows[m]["probe_C"] = c
    outcome.described.append(f"linear probe: fit on {len(train)} training cells, C chosen on {len(val)} "
                             f"validation cells, scored on {len(test)} test cells")

"""finetune, crossmodal, crossmodal_atac: the tables `python -m sscell.evaluation.finetune` and
`python -m sscell.evaluation.crossmodal` wrote into the run's workdir (finetune.csv, ...),
appended to the results as rows of their own. Nothing is computed: they need no embeddings, and
add nothing when their file is absent or another store than the run's is evaluated."""
from __future__ import annotations

from sscell.evaluation.report import read_results
from sscell.evaluation.tasks.registry import Inputs, Outcome, register

TABLES = ("finetune", "crossmodal", "crossmodal_atac")


def _appender(table: str):
    def append(inputs: Inputs, outcome: Outcome) -> None:
        if inputs.own_store:
            rows = read_results(inputs.workdir, table)
            outcome.extra_rows += rows
            if rows:
                outcome.described.append(f"{table}: {len(rows)} rows from {table}.csv")
    return append


for _table in TABLES:
    register(_table, needs=(), bars=False)(_appender(_table))

"""finetune, crossmodal, crossmodal_atac: the tables `python -m sscell.evaluation.finetune` and
`python -m sscell.evaluation.crossmodal` wrote into the run's workdir (finetune.csv, ...),
appended to the results as rows of their own. Nothing is computed: they need no embeddings, and
add nothing when their file is absent, another store than the run's is evaluated, or a bundle."""
from __future__ import annotations

from sscell.bundle import is_bundle
from sscell.evaluation.report import read_results
from sscell.evaluation.tasks.registry import Inputs, Outcome, register

TABLES = ("finetune", "crossmodal", "crossmodal_atac")


def _appender(table: str):
    command = "finetune" if table == "finetune" else "crossmodal"

    def append(inputs: Inputs, outcome: Outcome) -> None:
        rows = read_results(inputs.workdir, table) if inputs.own_store else []
        outcome.extra_rows += rows
        if rows:
            outcome.described.append(f"{table}: {len(rows)} rows from {table}.csv")
        else:
            outcome.not_run[table] = (f"no {table}.csv yet: python -m sscell.evaluation.{command} writes it"
                                      if inputs.own_store else "a bundle holds no run's tables"
                                      if is_bundle(inputs.workdir) else "another store than the run's is evaluated")
    return append


for _table in TABLES:
    register(_table, needs=(), bars=False)(_appender(_table))

"""Cell types of any dataset with a run fine-tuned for them (a `supervised` run) or its bundle.

    python -m sscell.predict --workdir=RUN|BUNDLE --input=data.h5ad|STORE --output=out.h5ad
        [--gene-column=COLUMN] [--round-counts] [--min-gene-overlap=0.5] [--batch-size=N] [--checkpoint=best]
        [--run-store=URL]

e.g. RUN = PRETRAINED/finetune/pretrained_1 from `sscell.evaluation.finetune`. Writes the input's
obs plus obs['sscell_cell_type'] (the training store's cell types, in its code order),
obs['sscell_confidence'] (the softmax maximum) and, when the training labels had Cell Ontology
ids, obs['sscell_cell_type_ontology_term_id'], and the embedding obsm['X_sscell']. Inputs are
read and matched as by `sscell.embed`; a run without a classifier head is refused.
"""
from __future__ import annotations

from collections.abc import Sequence

from sscell.api import LABEL, load
from sscell.embed import describe, parser, write_outputs
from sscell.errors import exit_on_error
from sscell.evaluation.align import MIN_OVERLAP


def predict(workdir: str, input_path: str, output: str, batch_size: int = 0, which: str | None = None, *,
            gene_column: str | None = None, round_counts: bool = False, min_overlap: float = MIN_OVERLAP,
            store: str | None = None) -> dict:
    """Predict the cell types of `input_path` (.h5ad or store) with the classifier run or bundle
    `workdir` into `output` (`store`: the run's store, as `sscell.load` takes it); returns
    `write_outputs`' summary."""
    model = load(workdir, which, store=store)
    summary = write_outputs(model, input_path, output, predict=True, batch_size=batch_size, gene_column=gene_column,
                            round_counts=round_counts, min_overlap=min_overlap)
    return {**summary, "classes": len(model.classes)}


def main(argv: Sequence[str] | None = None) -> None:
    args = parser("python -m sscell.predict", __doc__.splitlines()[0]).parse_args(argv)
    with exit_on_error():
        summary = predict(args.workdir, args.input, args.output, args.batch_size, args.checkpoint,
                          gene_column=args.gene_column, round_counts=args.round_counts,
                          min_overlap=args.min_gene_overlap, store=args.run_store)
        print(f"{describe(summary)}; obs['{LABEL}'] over {summary['classes']} cell types")


if __name__ == "__main__":
    main()

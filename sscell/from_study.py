"""Import one of the study's PyTorch Lightning checkpoints as an sscell bundle.

    python -m sscell.from_study --checkpoint=FILE.ckpt --genes=GENES --output=BUNDLE [--classes=FILE]

GENES: scTab's var.parquet (feature_id, feature_name) or a file of one gene id a line, in the
model's input order. The bundle works with sscell.load, `python -m sscell.embed / predict
--workdir=BUNDLE`. Nothing in the checkpoint is run (`sscell.study.checkpoint`).
"""
from __future__ import annotations

import argparse
import sys
import types
from collections.abc import Sequence

from sscell.errors import exit_on_error
from sscell.study.importer import from_study


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m sscell.from_study", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="the study's .ckpt file (or a saved state dict)")
    p.add_argument("--genes", required=True, help="scTab's var.parquet or a file of one gene id a line")
    p.add_argument("--output", required=True, help="the bundle to write")
    p.add_argument("--classes", help="a classifier's class names: scTab's cell_type.parquet or one name a line "
                                     "(default: cell_type.parquet beside the checkpoint, if there)")
    args = p.parse_args(argv)
    with exit_on_error():
        model = from_study(args.checkpoint, args.genes, classes=args.classes)
        path = model.export(args.output)
        study = model.about["study"]
        skipped = f"; not imported: {', '.join(study['not_imported'])}" if study["not_imported"] else ""
        kind = f"classifier over {len(model.classes)} classes" if model.is_classifier else f"loss {model.config.loss.name}"
        print(f"wrote {path}: the study's {study['module']} as an sscell {kind}, {len(model.genes)} genes, "
              f"embedding of {model.config.model.latent} dims{skipped}")


class _CallableModule(types.ModuleType):
    """`import sscell.from_study` replaces the function sscell.from_study with this module: calling it still imports."""

    def __call__(self, checkpoint, genes, **kwargs):
        return from_study(checkpoint, genes, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    main()

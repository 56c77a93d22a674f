"""`python -m sscell.evaluation --workdir=DIR`: evaluate a trained run from its workdir."""
from __future__ import annotations

import sys

from absl import app, flags, logging

from sscell.errors import SscellError
from sscell.evaluation.evaluate import evaluate

_WORKDIR = flags.DEFINE_string("workdir", None, "Work directory of a run made by python -m sscell.main.")
flags.mark_flags_as_required(["workdir"])


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)
    try:
        evaluate(_WORKDIR.value)
    except SscellError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)

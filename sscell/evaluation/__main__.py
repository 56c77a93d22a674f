"""`python -m sscell.evaluation --workdir=DIR`: evaluate a trained run from its workdir."""
from __future__ import annotations

from absl import app, flags, logging

from sscell.errors import exit_on_error
from sscell.evaluation.evaluate import evaluate

_WORKDIR = flags.DEFINE_string("workdir", None, "Work directory of a run made by python -m sscell.main.")
flags.mark_flags_as_required(["workdir"])


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)
    with exit_on_error():
        evaluate(_WORKDIR.value)


if __name__ == "__main__":
    app.run(main)

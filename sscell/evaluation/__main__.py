"""`python -m sscell.evaluation --workdir=DIR [--tasks=knn,umap] [--baselines=pca,scvi]
[--eval_module=my.tasks] [--loss_module=my.loss] [--knn_reference=train+val] [--protocol=study]
[--store=STORE --outdir=DIR]`: evaluate a trained run (a module its config names is imported only if named),
or a bundle on a store: `--workdir=BUNDLE --store=STORE --outdir=DIR` (both required; nothing written into it)."""
from __future__ import annotations

from absl import app, flags, logging

from sscell.errors import exit_on_error
from sscell.evaluation.baselines import registered as registered_baselines
from sscell.evaluation.evaluate import evaluate
from sscell.evaluation.tasks import registered
from sscell.evaluation.tasks.knn import KNN_REFERENCES, PROTOCOLS

_WORKDIR = flags.DEFINE_string("workdir", None, "Work directory of a run made by python -m sscell.main, or a "
                                "bundle (then --store and --outdir are required).")
_TASKS = flags.DEFINE_list("tasks", None, f"Evaluation tasks among {','.join(registered())} and those of "
                           "--eval_module (default: the run's eval.tasks).")
_BASELINES = flags.DEFINE_list("baselines", None, f"Baselines among {','.join(registered_baselines())} "
                               "(default: the run's eval.baselines).")
_EVAL_MODULE = flags.DEFINE_string("eval_module", None, "A module registering evaluation tasks of your own, imported "
                                   "first; the run's eval.module is imported only when named here ('': none).")
_LOSS_MODULE = flags.DEFINE_string("loss_module", None, "The module registering the run's pretext task of your own; "
                                   "the run's loss.module is imported only when named here ('': none).")
_KNN_REFERENCE = flags.DEFINE_string("knn_reference", None, f"kNN reference cells: {' | '.join(KNN_REFERENCES)} "
                                     "(default: the run's eval.knn_reference).")
_PROTOCOL = flags.DEFINE_string("protocol", None, f"{' | '.join(PROTOCOLS)}: sscell's scoring or the study's own "
                                "(docs/metrics.md; default: the run's eval.protocol).")
_STORE = flags.DEFINE_string("store", None, "Evaluate the cells of this store (the run's genes, e.g. a transfer "
                             "target) instead of the run's own.")
_OUTDIR = flags.DEFINE_string("outdir", None, "Where results and figures go (default: the workdir; a bundle's "
                               "results and baseline cache always go here).")
flags.mark_flags_as_required(["workdir"])


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)
    with exit_on_error():
        evaluate(_WORKDIR.value, _TASKS.value, _STORE.value, _OUTDIR.value, _KNN_REFERENCE.value,
                 _EVAL_MODULE.value, _BASELINES.value, _PROTOCOL.value, loss_module=_LOSS_MODULE.value)


if __name__ == "__main__":
    app.run(main)

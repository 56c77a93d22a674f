"""reconstruction: explained variance and MSE of the test cells' log1p expression, on every
measured gene and on a seeded random `eval.mask_rate` of them hidden from the input (scored on
the hidden genes only); unmeasured genes are never scored. PCA of log1p counts reconstructs by
projecting back to genes; a model without a decoder is skipped, and a bundle (its encoder alone) not run."""
from __future__ import annotations

from sscell.bundle import is_bundle
from sscell.evaluation.tasks.registry import Inputs, Outcome, register


@register("reconstruction", needs=("embeddings", "reconstructions"),
          columns=("recon_ev_weighted", "recon_ev_uniform", "recon_masked_ev_weighted", "recon_masked_ev_uniform"),
          headline=("recon_masked_ev_weighted",))
def reconstruction(inputs: Inputs, outcome: Outcome) -> None:
    if inputs.reconstructions is None and is_bundle(inputs.workdir):
        outcome.not_run["reconstruction"] = "a bundle is evaluated by its encoder alone"
        return
    if inputs.reconstructions is None:
        outcome.notes.append(f"reconstruction: skipped, the {inputs.loss} model has no decoder")
        return
    for m in inputs.methods:
        outcome.rows[m].update(inputs.reconstructions.columns(m))
    outcome.described.append(f"reconstruction: {len(inputs.test)} test cells, masked: "
                             f"{inputs.settings.mask_rate:.0%} of measured genes hidden")

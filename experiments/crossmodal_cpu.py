"""Cross-modality prediction at CPU scale: RNA -> 50 surface proteins of a generated CITE-seq-like atlas.

    python -m sscell.main --config=experiments/crossmodal_cpu.py:pretrain --workdir=runs/crossmodal
    python -m sscell.evaluation.crossmodal --config=experiments/crossmodal_cpu.py --workdir=runs/crossmodal \
        --fractions=0.05,1

The first command generates a 20,000-cell x 2,000-gene atlas whose cells also carry 50 protein
counts (obsm['protein_counts']; each protein follows a cell-type programme, with its own noise
and per-dataset batch shifts), converts it with its proteins, and pretrains the masked
autoencoder (quickstart settings) on the RNA of datasets 0-2 only: dataset_3 is the held-out,
out-of-distribution batch. The second trains, at 5% and 100% of the train cells of datasets
0-2, the pretrained architecture + a regression head (batch one-hot; MSE on log1p protein
counts) from the pretrained encoder and from scratch, 1,000 steps each with the study's
fine-tuning optimiser, fits ridge regression on the same cells, and scores all three on the
test cells of datasets 0-2 (id_*) and on every cell of dataset_3 (ood_*) into
runs/crossmodal/crossmodal.{md,csv}. See docs/transfer.md for the measured time and scores.
"""
from sscell.data.modality import PROTEIN_KEY
from sscell.evaluation.crossmodal import cpu_study_config


def get_config(mode: str = ""):
    """The regression settings; `:pretrain` gives the pretraining run instead."""
    return cpu_study_config(mode, PROTEIN_KEY, n_proteins=50)

"""Cross-modality prediction at CPU scale: RNA -> 1,000 ATAC peaks of a generated multiome-like atlas.

    python -m sscell.main --config=experiments/crossmodal_atac_cpu.py:pretrain --workdir=runs/crossmodal_atac
    python -m sscell.evaluation.crossmodal --config=experiments/crossmodal_atac_cpu.py \
        --workdir=runs/crossmodal_atac --fractions=0.05,1

The first command generates a 20,000-cell x 2,000-gene atlas whose cells also carry 1,000 ATAC
peaks (obsm['atac_counts'], CSR fragment counts, ~10% nonzero and mostly 1; 80% of the peaks
open with the activity of one gene programme, with per-dataset shifts and per-cell depth),
converts it with its peaks, and pretrains the masked autoencoder (quickstart settings) on the
RNA of datasets 0-2 only: dataset_3 is the held-out, out-of-distribution batch. The second
trains, at 5% and 100% of the train cells of datasets 0-2, the pretrained architecture + a
regression head (batch one-hot; MSE on the TF-IDF of the peaks, computed in jit with the IDF of
the train split) from the pretrained encoder and from scratch, 1,000 steps each with the
study's fine-tuning optimiser, fits ridge regression on the same cells, and scores all three on
the test cells of datasets 0-2 (id_*) and on every cell of dataset_3 (ood_*) into
runs/crossmodal_atac/crossmodal_atac.{md,csv}. See docs/transfer.md for the measured time and scores.
"""
from sscell.data.modality import ATAC_KEY
from sscell.evaluation.crossmodal import cpu_study_config


def get_config(mode: str = ""):
    """The regression settings; `:pretrain` gives the pretraining run instead."""
    return cpu_study_config(mode, ATAC_KEY, n_peaks=1_000)

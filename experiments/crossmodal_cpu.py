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
runs/crossmodal/crossmodal.{md,csv}. See the README for the measured time and scores.
"""
from sscell.config import default_config
from sscell.evaluation.crossmodal import crossmodal_config

IN_DISTRIBUTION = ("dataset_0", "dataset_1", "dataset_2")


def get_config(mode: str = ""):
    """The regression settings; `:pretrain` gives the pretraining run instead."""
    if mode == "pretrain":
        config = default_config()
        config.data.synthetic.update(n_cells=20_000, n_proteins=50)
        config.data.train_datasets = IN_DISTRIBUTION
        config.model.hidden = (256, 256, 128, 128)  # the quickstart's
        config.train.update(steps=4_000, batch_size=256, log_every=25, val_every=250, checkpoint_every=250,
                            lr_decay_epochs=10)
        config.eval.tasks = ("knn",)
        return config
    config = crossmodal_config()
    config.data.train_datasets = IN_DISTRIBUTION
    config.train.update(steps=1_000, batch_size=256, log_every=50, val_every=100, checkpoint_every=100,
                        val_batches=4)
    config.eval.batch_size = 1024
    return config

"""The study's cross-modality setting for chromatin: multiome bone marrow (NeurIPS 2021), 2,000 HVGs -> ATAC peaks.

Data: GEO GSE194122, `GSE194122_openproblems_neurips2021_multiome_BMMC_processed.h5ad` (~69 k
cells from 13 batches = site x donor; RNA (GEX) and ~116 k peaks (ATAC) as columns of one
matrix, raw counts in layers['counts']). Rewrite it into sscell's layout, keeping the 2,000 most
variable genes and the 10,000 peaks open in most cells, and convert it with its peaks:

    python -m sscell.data.split_features --input=GSE194122_..._multiome_BMMC_processed.h5ad \
        --output=data/multiome_bmmc.h5ad --protein=ATAC --top-features=10000 --hvg=2000 \
        --dataset-column=batch --donor-column=DonorID
    python -m sscell.data.convert --output=data/multiome_store data/multiome_bmmc.h5ad

Pretrain on a corpus with the same genes (e.g. scTab converted with
`--vocabulary=data/multiome_bmmc.genes.txt`, or the multiome RNA itself), then fine-tune vs
from scratch vs ridge:

    python -m sscell.main --config=experiments/multiome_neurips2021.py:pretrain \
        --config.data.store=CORPUS_STORE --workdir=runs/multiome_masked
    python -m sscell.evaluation.crossmodal --config=experiments/multiome_neurips2021.py \
        --workdir=runs/multiome_masked --store=data/multiome_store --fractions=1

In distribution: the batches of sites 1-3 (their test donors scored as `id_*`; the split
command prints the batch names: pass others with --config.data.train_datasets); site 4's
batches are never trained on and are scored as the out-of-distribution batch (`ood_*`). The
regression head sees the batch one-hot; targets are the TF-IDF of the peak counts (IDF of the
sites 1-3 train cells), MSE; the study's fine-tuning optimiser (as for CITE-seq), best
validation checkpoint. Scores are computed on dense cells x peaks targets (~0.4 GB for 10 k test
cells). Meant for a GPU; not yet run here (the data cannot be downloaded on the development
machine).
"""
from sscell.config import default_config
from sscell.data.modality import ATAC_KEY
from sscell.evaluation.crossmodal import crossmodal_config

SITES_1_TO_3 = ("s1d1", "s1d2", "s1d3", "s2d1", "s2d4", "s2d5", "s3d3", "s3d6", "s3d7", "s3d10")  # dataset_id = batch


def get_config(mode: str = ""):
    """The regression settings; `:pretrain` gives the masked-autoencoder pretraining at study settings."""
    if mode == "pretrain":
        config = default_config()  # the study's MLP 512-512-256-256-64, masking rate 0.5, batch 8,192
        config.eval.tasks = ("knn", "crossmodal_atac")  # and the regression arms' table, once written
        return config
    config = crossmodal_config(ATAC_KEY)
    config.data.train_datasets = SITES_1_TO_3
    config.train.update(steps=1_000, val_every=100, checkpoint_every=100)
    return config

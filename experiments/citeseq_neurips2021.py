"""The study's cross-modality setting: CITE-seq bone marrow (NeurIPS 2021), 2,000 HVGs -> 134 proteins.

Data: GEO GSE194122, `GSE194122_openproblems_neurips2021_cite_BMMC_processed.h5ad` (~90 k cells
from 12 batches = site x donor; RNA (GEX) and 134 antibodies (ADT) as columns of one matrix, raw
counts in layers['counts']). Rewrite it into sscell's layout, keeping the 2,000 most variable
genes (Seurat dispersion), and convert it with its proteins:

    python -m sscell.data.split_features --input=GSE194122_..._cite_BMMC_processed.h5ad \
        --output=data/cite_bmmc.h5ad --hvg=2000 --dataset-column=batch --donor-column=DonorID
    python -m sscell.data.convert --output=data/cite_store data/cite_bmmc.h5ad

Pretrain on a corpus with the same genes (e.g. scTab converted with
`--vocabulary=data/cite_bmmc.genes.txt`, or the CITE-seq RNA itself), then fine-tune vs from
scratch vs ridge:

    python -m sscell.main --config=experiments/citeseq_neurips2021.py:pretrain \
        --config.data.store=CORPUS_STORE --workdir=runs/cite_masked
    python -m sscell.evaluation.crossmodal --config=experiments/citeseq_neurips2021.py \
        --workdir=runs/cite_masked --store=data/cite_store --fractions=1

In distribution: the batches of sites 1-3 (their test donors scored as `id_*`); site 4's
batches are never trained on and are scored as the out-of-distribution batch (`ood_*`), as in
the competition. The regression head sees the batch one-hot; targets are log1p protein counts;
the study's fine-tuning optimiser (AdamW lr 9e-4, weight decay 0.05, batch 16,384 capped at the
train cells, x0.9 every 2 epochs), best validation checkpoint. Meant for a GPU; not yet run
here (the data cannot be downloaded on the development machine). The study reports the per-cell
Pearson correlation, higher for SSL-pretrained than for supervised training and linear regression.
"""
from sscell.config import default_config
from sscell.evaluation.crossmodal import crossmodal_config

SITES_1_TO_3 = ("s1d1", "s1d2", "s1d3", "s2d1", "s2d4", "s2d5", "s3d1", "s3d6", "s3d7")  # dataset_id = batch


def get_config(mode: str = ""):
    """The regression settings; `:pretrain` gives the masked-autoencoder pretraining at study settings."""
    if mode == "pretrain":
        config = default_config()  # the study's MLP 512-512-256-256-64, masking rate 0.5, batch 8,192
        config.eval.tasks = ("knn", "crossmodal")  # and the regression arms' table, once written
        return config
    config = crossmodal_config()
    config.data.train_datasets = SITES_1_TO_3
    config.train.update(steps=1_000, val_every=100, checkpoint_every=100)  # ~270 epochs of ~60 k train cells
    return config

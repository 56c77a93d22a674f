"""The study's transfer setting: a classifier fine-tuned from a pretrained 20 M-cell encoder vs from scratch.

    python -m sscell.main --config=experiments/masked_20m.py --config.data.store=STORE --workdir=runs/masked_20m
    python -m sscell.evaluation.finetune --config=experiments/finetune_20m.py --workdir=runs/masked_20m \
        --store=STORE --dataset=TARGET_DATASET_ID --fractions=0.01,0.1,1

For each label fraction of the target dataset's train cells (a nested seed-drawn sample; no
other cells are read for training), trains the whole classifier (encoder + linear head,
'balanced' class-weighted cross-entropy) from the pretrained encoder and from scratch, each
for train.steps steps in runs/masked_20m/finetune/<arm>_<fraction>/ (rerunning resumes), and
scores both on the dataset's test cells into runs/masked_20m/finetune.{md,csv}: by the classifier
head (finetune_macro_f1, finetune_micro_f1) and, as the study did, by kNN on the fine-tuned
embeddings with the target's validation cells as the reference (finetune_knn_*). The target may also be another store with the pretraining
store's genes (convert it with --vocabulary). The study's fine-tuning settings: AdamW lr 9e-4,
weight decay 0.05, batch 16,384 (capped at a small fraction's cells), x0.9 every 2 epochs (of
the full target, so every fraction follows the same per-step schedule), the checkpoint with
the best validation loss.

Meant for one or more GPUs, 19,331 genes; sscell's runtime at this scale is not yet measured
(the study: 1-2 days of pretraining, 12-24 h of fine-tuning on one V100). The study
(supervised vs masked pretraining then fine-tuning), compare with the column
finetune_knn_macro_f1_ontology (the study's quantity: ontology-corrected kNN macro F1, averaged
over true and predicted types): Tabula Sapiens 0.272 vs 0.309, PBMC 0.701 vs 0.747, HLCA 0.935
vs 0.936 (no gain on a target the corpus covers well).
One arm alone: python -m sscell.main --config=experiments/finetune_20m.py --config.data.store=STORE
--config.train.init_from=runs/masked_20m --config.data.train_datasets='("TARGET_DATASET_ID",)'.
"""
from sscell.evaluation.finetune import finetune_config


def get_config():
    config = finetune_config()  # the study's fine-tuning settings (see the docstring)
    config.train.steps = 1_000  # ~70 epochs of a PBMC-sized target (223 k train cells) at batch 16,384
    return config

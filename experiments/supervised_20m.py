"""The supervised baseline: encoder + linear head, class-weighted ('balanced') cross-entropy.

    python -m sscell.data.convert --output=STORE CELLXGENE_FILES...
    python -m sscell.main --config=experiments/supervised_20m.py --config.data.store=STORE

Meant for one or more GPUs (batch 8,192, the 19,331 genes of the store); the study pretrained
for 1-2 days on one V100 (sscell runtime at this scale not yet measured). The study: kNN macro F1 Tabula Sapiens 0.272, PBMC 0.701, HLCA per-class F1 0.935 (vs 0.309 / 0.747 / 0.936 with masked pretraining then fine-tuning).
At quickstart scale (a generated 20,000-cell atlas on CPU; runtime not yet measured):
--workdir=runs/supervised_20m_small --config.data.synthetic.n_cells=20000 --config.data.synthetic.n_genes=2000 --config.model.hidden='(256,256,128,128)' --config.train.batch_size=256 --config.train.steps=500
"""
from sscell.config import default_config


def get_config():
    config = default_config()
    config.train.steps = 40_000  # ~21 epochs of the 15.2 M training cells
    config.loss.name = "supervised"
    config.train.batch_size = 16_384  # the study's fine-tuning settings
    config.train.lr = 9e-4
    config.train.weight_decay = 0.05
    return config

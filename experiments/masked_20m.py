"""The study's random-masking pretraining (rate 0.5) on the ~20 M-cell scTab corpus.

    python -m sscell.data.convert --output=STORE CELLXGENE_FILES...
    python -m sscell.main --config=experiments/masked_20m.py --config.data.store=STORE

Meant for one or more GPUs (batch 8,192, 19,331 genes). The study: 1-2 days on one V100;
kNN macro F1 gains in transfer (PBMC 0.701 -> 0.747), reconstruction weighted EV ~0.37.
At quickstart scale: add --config.data.synthetic.n_cells=20000 --config.data.synthetic.n_genes=2000
--config.train.batch_size=256 --config.train.steps=500.
"""
from sscell.config import default_config


def get_config():
    config = default_config()
    config.train.steps = 40_000  # ~21 epochs of the 15.2 M training cells
    return config

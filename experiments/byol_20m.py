"""BYOL: projector and predictor 4096 -> 256 with batch norm, EMA target (decay 0.99), symmetric 2 - 2 cos.

    python -m sscell.data.convert --output=STORE CELLXGENE_FILES...
    python -m sscell.main --config=experiments/byol_20m.py --config.data.store=STORE

Meant for one or more GPUs (batch 8,192, the 19,331 genes of the store); the study pretrained
for 1-2 days on one V100 (sscell runtime at this scale not yet measured). The study found BYOL behind masked autoencoding (its target was never updated; here it is).
At quickstart scale (a generated 20,000-cell atlas on CPU; runtime not yet measured):
--workdir=runs/byol_20m_small --config.data.synthetic.n_cells=20000 --config.data.synthetic.n_genes=2000 --config.model.hidden='(256,256,128,128)' --config.train.batch_size=256 --config.train.steps=500
"""
from sscell.config import default_config


def get_config():
    config = default_config()
    config.train.steps = 40_000  # ~21 epochs of the 15.2 M training cells
    config.loss.name = "byol"
    config.loss.projector = (4096, 256)
    config.loss.predictor = (4096, 256)
    config.loss.ema_decay = 0.99  # or ema_schedule="cosine", ema_steps=train.steps: 0.99 -> 1
    return config

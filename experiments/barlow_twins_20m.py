"""Barlow Twins: projector to 512 with batch norm, lambda 0.0051, LARS with warm-up and cosine decay.

    python -m sscell.data.convert --output=STORE CELLXGENE_FILES...
    python -m sscell.main --config=experiments/barlow_twins_20m.py --config.data.store=STORE

Meant for one or more GPUs (batch 8,192, the 19,331 genes of the store); the study pretrained
for 1-2 days on one V100 (sscell runtime at this scale not yet measured). The study found Barlow Twins behind masked autoencoding.
At quickstart scale (a generated 20,000-cell atlas on CPU; runtime not yet measured):
--workdir=runs/barlow_twins_20m_small --config.data.synthetic.n_cells=20000 --config.data.synthetic.n_genes=2000 --config.model.hidden='(256,256,128,128)' --config.train.batch_size=256 --config.train.steps=500
"""
from sscell.config import default_config


def get_config():
    config = default_config()
    config.train.steps = 40_000  # ~21 epochs of the 15.2 M training cells
    config.loss.name = "barlow_twins"
    config.loss.projector = (512, 512)
    config.loss.lambd = 0.0051
    # the published Barlow Twins recipe: LARS (biases and norm parameters excluded from weight decay and
    # the trust ratio), lr 0.2 per 256 cells (x 32 at batch 8,192), linear warm-up then cosine decay
    config.train.update(optimizer="lars", lr=0.2, lr_reference_batch=256, lars_exclude_bias_and_norm=True,
                        weight_decay=1.5e-6, schedule="warmup_cosine", warmup_steps=2_000)
    return config

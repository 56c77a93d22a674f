"""Gene-programme masking: hide whole programmes (50% of them, per cell) and reconstruct them.

    python -m sscell.data.convert --output=STORE CELLXGENE_FILES...
    python -m sscell.main --config=experiments/gp_masked_20m.py --config.data.store=STORE --config.loss.gmt=c8.all.v2023.1.Hs.symbols.gmt

Meant for one or more GPUs (batch 8,192, the 19,331 genes of the store); the study pretrained
for 1-2 days on one V100 (sscell runtime at this scale not yet measured). The study (MSigDB C8 cell-type signatures, 25% or 50% of programmes, one mask per batch) found it behind random masking in transfer.
At quickstart scale (a generated 20,000-cell atlas on CPU; runtime not yet measured):
--workdir=runs/gp_masked_20m_small --config.data.synthetic.n_cells=20000 --config.data.synthetic.n_genes=2000 --config.model.hidden='(256,256,128,128)' --config.train.batch_size=256 --config.train.steps=500
"""
from sscell.config import default_config


def get_config():
    config = default_config()
    config.train.steps = 40_000  # ~21 epochs of the 15.2 M training cells
    config.loss.name = "gp_masked"
    config.loss.mask_rate = 0.5
    return config

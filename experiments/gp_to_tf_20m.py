"""GP -> TF: show only a transcription factor's target programme, predict that TF's expression.

    python -m sscell.data.convert --output=STORE CELLXGENE_FILES...
    python -m sscell.main --config=experiments/gp_to_tf_20m.py --config.data.store=STORE --config.loss.gmt=c3.tft.v2023.1.Hs.symbols.gmt

Meant for one or more GPUs (batch 8,192, the 19,331 genes of the store); the study pretrained
for 1-2 days on one V100 (sscell runtime at this scale not yet measured). The study described it (MSigDB C3 TFT) but its released scripts never ran it; no figure to compare.
At quickstart scale (a generated 20,000-cell atlas on CPU; runtime not yet measured):
--workdir=runs/gp_to_tf_20m_small --config.data.synthetic.n_cells=20000 --config.data.synthetic.n_genes=2000 --config.model.hidden='(256,256,128,128)' --config.train.batch_size=256 --config.train.steps=500
"""
from sscell.config import default_config


def get_config():
    config = default_config()
    config.train.steps = 40_000  # ~21 epochs of the 15.2 M training cells
    config.loss.name = "gp_to_tf"
    return config

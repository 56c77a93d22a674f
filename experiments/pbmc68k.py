"""The masked autoencoder on real cells: scanpy's 700 PBMCs (765 genes, 10 cell types), on a laptop CPU.

    python -m sscell.data.examples pbmc68k --output=runs/pbmc68k/pbmc68k.h5ad
    python -m sscell.data.convert --output=runs/pbmc68k/store --split=cells runs/pbmc68k/pbmc68k.h5ad
    python -m sscell.main --config=experiments/pbmc68k.py --workdir=runs/pbmc68k

One donor and gene symbols (see docs/real_data.md); cells split 70/15/15 at random. 490 training
cells are few, so the model is small, batches are small and the kNN reference is the training
and validation cells (eval.knn_reference). Expected figures: docs/real_data.md.
"""
from sscell.config import default_config


def get_config():
    config = default_config()
    config.data.store = "runs/pbmc68k/store"
    config.model.hidden = (256, 128)
    config.model.latent = 32
    config.train.steps = 1_000
    config.train.batch_size = 64
    config.train.log_every = 25
    config.train.val_every = 100
    config.train.val_batches = 2
    config.train.checkpoint_every = 250
    config.train.lr_decay_epochs = 1_000  # no decay over this short run
    config.eval.update(knn_reference="train+val", pca_components=32)  # PCA as wide as the embedding
    return config

"""Fine-tuning vs from scratch at quickstart scale on CPU: the quickstart run's encoder, a generated target.

    python -m sscell.main --config=experiments/quickstart.py
    python -m sscell.data.synthetic --output=runs/transfer/atlas.h5ad --target-cells=10000
    python -m sscell.data.convert --output=runs/transfer/target_store runs/transfer/atlas.target.h5ad
    python -m sscell.evaluation.finetune --config=experiments/finetune_cpu.py --workdir=runs/quickstart \
        --store=runs/transfer/target_store --fractions=0.01,0.1,1

The synthetic command with the quickstart's defaults regenerates its atlas (same genes and
programmes) plus `atlas.target.h5ad`: one new dataset, its own 4 donors, a 3x stronger batch
effect. Each label fraction trains two classifiers (from the quickstart encoder and from
scratch) for 1,000 steps of at most 256 cells, with the study's fine-tuning optimiser
(AdamW lr 9e-4, weight decay 0.05) and x0.9 every 42 steps (the study's 2 epochs of this
target's 5,469 train cells, in steps so that any target, of 500 cells or millions, gets the
same schedule), and scores both on the target's test cells into runs/quickstart/finetune.{md,csv}.
Runs on 2 CPU cores; see the README for the measured time and scores. Any field can be
overridden on the command line, e.g. --config.train.batch_size=64.
"""
from sscell.evaluation.finetune import finetune_config


def get_config():
    config = finetune_config()
    config.train.update(steps=1_000, batch_size=256, log_every=50, val_every=100, checkpoint_every=100,
                        val_batches=4, lr_decay_steps=42)
    config.eval.batch_size = 1024
    return config

"""The README's example pretext task (sscell/losses/example.py, denoising) on the quickstart atlas.

    python -m sscell.main --config=experiments/example_task.py

The quickstart's generated 20,000-cell atlas and model; only the task differs.
"""
from sscell.config import default_config


def get_config():
    config = default_config()
    config.data.synthetic.n_cells = 20_000
    config.model.hidden = (256, 256, 128, 128)
    config.train.update(steps=1_000, batch_size=256, lr_decay_steps=580)  # the quickstart's schedule
    config.loss.name = "denoise"
    config.loss.module = "sscell.losses.example"  # imported before the run (and its evaluation)
    config.loss.noise_std = 0.5  # a new task may add its own fields
    return config

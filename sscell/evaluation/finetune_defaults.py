"""The study's fine-tuning settings as a config file: what `python -m sscell.evaluation.finetune`
uses when no --config is given, so `--config.train.batch_size=64` and the like work without one."""
from sscell.evaluation.finetune import finetune_config as get_config  # noqa: F401 (config_flags calls it)

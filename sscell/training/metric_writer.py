"""Metrics of a run: one JSON object per line in `metrics.jsonl`, plus TensorBoard events.

`train/wall_s` (TRAIN_SECONDS) is the run's training wall time so far, summed over the sessions
that trained it (a resumed session continues from the last kept record's)."""
from __future__ import annotations

import json
import os

import jax
import numpy as np

from sscell.atomic import atomic_file

TRAIN_SECONDS = "train/wall_s"


def last_value(path: str | os.PathLike, key: str) -> float | None:
    """`key`'s value in the last record of the metrics.jsonl at `path` that has it (None: none has)."""
    if not os.path.exists(path):
        return None
    value = None
    with open(path) as f:
        for line in f:
            if line.strip():
                value = json.loads(line).get(key, value)
    return value


class MetricWriter:
    """Appends `{"step": s, name: value, ...}` records; on resume drops records past `resume_step`.

    In a multi-host run only process 0 writes; the others' writer does nothing.
    `earlier_seconds`: the training wall time the kept records counted (TRAIN_SECONDS; 0 for a new run).
    """

    def __init__(self, workdir: str | os.PathLike, resume_step: int = 0):
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.earlier_seconds = 0.0
        if not self.enabled:
            return
        self._truncate_after(resume_step)
        self.earlier_seconds = last_value(self.path, TRAIN_SECONDS) or 0.0
        from tensorboardX import SummaryWriter  # here: it imports torch where torch is installed (~3 s)

        self._file = open(self.path, "a")
        self._tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def _truncate_after(self, step: int) -> None:
        """A crashed run may have logged steps beyond its last checkpoint: they will be redone."""
        if not os.path.exists(self.path):
            return
        with open(self.path) as f:
            kept = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
        with atomic_file(self.path) as tmp, open(tmp, "w") as f:
            f.writelines(kept)

    def write(self, step: int, metrics: dict[str, float]) -> None:
        """Record scalar metrics at `step`."""
        if not self.enabled:
            return
        record = {"step": int(step), **{k: float(np.asarray(v)) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        for name, value in record.items():
            if name != "step":
                self._tensorboard.add_scalar(name, value, step)

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        self._tensorboard.close()

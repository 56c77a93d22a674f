"""Write evaluation results (CSV + markdown table) and plot loss curves from metrics.jsonl."""
from __future__ import annotations

import json
import math
import numbers
import os
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from sscell.atomic import atomic_file
from sscell.errors import SscellError

LOSS_KEYS = ("train/loss", "val/loss")


def read_results(workdir: str | os.PathLike, name: str) -> list[dict]:
    """The rows `write_results` wrote to workdir/name.csv ([] if there is none)."""
    path = Path(workdir) / f"{name}.csv"
    return pd.read_csv(path).to_dict("records") if path.exists() else []


def write_results(rows: list[dict], workdir: str | os.PathLike, name: str = "results", footer: str = "") -> str:
    """Write `rows` to workdir/name.csv and workdir/name.md (`footer` under the table); return the markdown.

    Columns appear in first-seen order across rows; in the markdown, floats have 3 decimals
    and missing values show as "-". Both files are replaced atomically.
    """
    if not rows:
        raise SscellError("write_results got no rows: evaluate at least one method first")
    table = pd.DataFrame(rows)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    markdown = markdown_table(rows, list(table.columns)) + (f"\n{footer}\n" if footer else "")
    with atomic_file(workdir / f"{name}.csv") as tmp:
        table.to_csv(tmp, index=False)
    with atomic_file(workdir / f"{name}.md") as tmp:
        tmp.write_text(markdown)
    return markdown


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    """A GitHub-style markdown table (pandas' to_markdown would need the tabulate package).

    Cells come from the rows themselves, so integers stay integers where pandas would have
    turned a column with gaps into floats.
    """

    def cell(value: object) -> str:
        if isinstance(value, numbers.Integral):
            return str(value)
        if isinstance(value, numbers.Real):
            return "-" if math.isnan(value) else f"{value:.3f}"
        return "-" if value is None else str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(map(cell, columns)) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def plot_loss_curves(metrics_jsonl: str | os.PathLike, out_png: str | os.PathLike) -> None:
    """Plot train/loss and val/loss against step from a metrics.jsonl file into a PNG.

    A step logged twice (a resumed run repeats steps) keeps its last value, per key, so train
    and eval lines that share a step both count. The y axis is logarithmic when the losses span
    more than a factor of 10. The PNG is replaced atomically.
    """
    curves = read_losses(Path(metrics_jsonl))
    values = [v for curve in curves.values() for v in curve.values()]
    if not values:
        raise SscellError(f"{metrics_jsonl} has no {' or '.join(LOSS_KEYS)} values to plot")
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.add_subplot()
    for key, curve in curves.items():
        if not curve:
            continue
        steps = sorted(curve)
        # Markers keep a curve with a single evaluation visible.
        marker = "." if len(steps) <= 100 else None
        ax.plot(steps, [curve[s] for s in steps], label=key, marker=marker)
    if min(values) > 0 and max(values) > 10 * min(values):
        ax.set_yscale("log")
    ax.set(title=f"Loss curves: {Path(metrics_jsonl).parent.name}", xlabel="step", ylabel="loss")
    ax.legend()
    with atomic_file(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=120)


def read_losses(path: Path) -> dict[str, dict[int, float]]:
    """{key: {step: last finite value}} for each key in LOSS_KEYS."""
    curves: dict[str, dict[int, float]] = {key: {} for key in LOSS_KEYS}
    with path.open() as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise SscellError(f"{path} line {line_no} is not JSON: fix or delete it") from e
            for key in LOSS_KEYS:
                value = record.get(key)
                if value is None or not math.isfinite(value):
                    continue
                if "step" not in record:
                    raise SscellError(f"{path} line {line_no} has {key} but no step")
                curves[key][int(record["step"])] = float(value)
    return curves

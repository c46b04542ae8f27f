"""``fdcr-mpi compare DIR DIR ...``: several runs' final figures side by side, and their rounds.

The table has one column per run and one row per config key that differs between the runs,
then the rounds done and the final figures: A, R_paper and V_paper (the paper's metric), R and V
(ours), each the mean of the run's last ``eval.final_rounds`` rounds, and the mean TPR / FPR
over its rounds. ``--plot FILE`` draws A and R_paper per round (counted from 1), a line per run.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fdcr_mpi.analysis.frames import summary_row, sweep_axes
from fdcr_mpi.analysis.report import RunRecord, read_records

FIGURES = (("A", "A"), ("R_paper", "R_paper"), ("V_paper", "V_paper"), ("R", "R (ours)"), ("V", "V (ours)"),
           ("tpr", "TPR"), ("fpr", "FPR"))


def run_names(records: Sequence[RunRecord]) -> list[str]:
    """Each run's directory name, with its parent's where two names are the same."""
    names = [r.path.parent.name for r in records]
    return [f"{r.path.parent.parent.name}/{name}" if names.count(name) > 1 else name
            for r, name in zip(records, names)]


def _cell(value: object) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.2f}"
    return str(value)


def compare_table(records: Sequence[RunRecord]) -> str:
    """The runs side by side as aligned text: a column per run, a row per axis and figure."""
    axes = sweep_axes(records)
    rows = [summary_row(r, axes, Path("/")) for r in records]
    lines = [("", run_names(records))]
    lines += [(key, [row[key] for row in rows]) for key in axes]
    lines.append(("rounds", [f"{row['rounds_done']}/{r.config.get('rounds')}" for row, r in zip(rows, records)]))
    lines += [(label, [row[key] for row in rows]) for key, label in FIGURES]
    cells = [(label, [_cell(v) for v in values]) for label, values in lines]
    first = max(len(label) for label, _ in cells)
    widths = [max(len(values[i]) for _, values in cells) for i in range(len(records))]
    return "\n".join(f"{label:<{first}}  " + "  ".join(f"{v:>{w}}" for v, w in zip(values, widths))
                     for label, values in cells).rstrip() + "\n"


def compare_plot(records: Sequence[RunRecord], path: Path) -> Path:
    """A and R_paper per round, one line per run, into a PNG at ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    for record, name in zip(records, run_names(records)):
        rounds = np.asarray(record.rounds.get("round", np.zeros(0)), np.int64) + 1
        for ax, column in zip(axes, ("A", "R_paper")):
            if column in record.rounds:
                ax.plot(rounds, record.rounds[column], label=name)
    for ax, title in zip(axes, ("main-task accuracy A (%)", "R_paper: every triggered image (%)")):
        ax.set(title=title, xlabel="round", ylim=(0, 100))
        ax.grid(alpha=0.3)
    axes[1].legend(loc="best", fontsize="small")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def compare_dirs(dirs: Sequence[Path], plot: Path | None = None) -> str:
    """The table of the runs in ``dirs`` (and the figure, with ``plot``)."""
    from fdcr_mpi.errors import UserError

    records = read_records(dirs)
    if plot is not None:
        try:
            compare_plot(records, plot)
        except OSError as exc:
            raise UserError(f"cannot write the figure {plot}: {exc.strerror or exc}") from None
    return compare_table(records)

"""``fdcr-mpi plot``: PNG figures of a sweep's run files (matplotlib, Agg, no pyplot state).

- ``fig3_<setting>.png`` (the paper's Figure 3): A, R_paper and R per round, one line per
  method, mean over seeds with a band of one standard deviation. R_paper is the paper's
  backdoor failure rate (every triggered test image, target class included), R ours
  (triggered images of the other classes); the paper's Figure 3 plots R_paper.
- ``fig2_<run>.png`` (the paper's Figure 2): for each FDCR setting (its lowest seed), the
  discrepancy V_k and the aggregation weight alpha_hat_k of every client per round;
  benign clients in blue, attackers in red, removed clients marked with a cross.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fdcr_mpi.analysis.report import (
    METHODS,
    ROW_KEY,
    Cell,
    Layout,
    RunRecord,
    build_layout,
    column_title,
    key_label,
    load_records,
    method_label,
)
from fdcr_mpi.errors import UserError

BENIGN, ATTACKER = "#1f77b4", "#d62728"
DPI = 120


def _figure(width: float, height: float, ncols: int) -> tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, ncols)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", text).strip("_") or "all"


def _setting_slug(layout: Layout, table: tuple, column: tuple) -> str:
    short = {"data.dataset": "", "data.beta": "beta", "attack.malicious_ratio": "ratio"}
    parts = [f"{short.get(k, k.split('.')[-1])}{v}" for k, v in
             (*zip(layout.column_keys, column), *zip(layout.table_keys, table))]
    return _slug("_".join(parts))


def _setting_title(layout: Layout, table: tuple, column: tuple) -> str:
    names = {"attack.malicious_ratio": "attacker ratio"}
    rest = [f"{names.get(k, key_label(k, v).split('=')[0])} {v}" for k, v in zip(layout.table_keys, table)]
    return ", ".join([column_title(layout.column_keys, column), *rest])


def _color(method: Any) -> Any:
    """A fixed color per method: the dark tab20 shades first, then the light ones."""
    from matplotlib import colormaps

    order = list(METHODS)
    index = order.index(method) if method in order else len(order)
    slot = (2 * index) % 20 + (2 * index) // 20 % 2
    return colormaps["tab20"](slot)


def _integer_rounds(ax: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _series(records: Sequence[RunRecord], column: str) -> np.ndarray:
    """(seeds, rounds) of a scalar column, cut to the shortest run."""
    rows = [np.asarray(r.rounds[column], dtype=float) for r in records if column in r.rounds]
    n = min((len(x) for x in rows), default=0)
    return np.stack([x[:n] for x in rows]) if rows and n else np.zeros((0, 0))


def _draw_method(ax: Any, cell: Cell, method: Any, metric: str) -> None:
    data = _series(cell.records, metric)
    if data.size == 0:
        return
    rounds = np.arange(1, data.shape[1] + 1)
    mean = data.mean(axis=0)
    fdcr = method == "fdcr"
    ax.plot(rounds, mean, color="black" if fdcr else _color(method), lw=2.4 if fdcr else 1.4,
            marker="o" if len(rounds) <= 12 else None, ms=3, label=f"{method_label(method)} (n={cell.n})",
            zorder=3 if fdcr else 2)
    if data.shape[0] > 1:
        std = data.std(axis=0, ddof=1)
        ax.fill_between(rounds, np.clip(mean - std, 0, 100), np.clip(mean + std, 0, 100), color="black" if fdcr else _color(method), alpha=0.12, lw=0)


PANELS = (("A", "main-task accuracy A (%)"),
          ("R_paper", "R_paper: paper's metric, every triggered image (%)"),
          ("R", "R: ours, triggered images of other classes (%)"))


def figure3(layout: Layout, table: tuple, column: tuple, path: Path) -> Path:
    """A, R_paper and R per round for every method of one setting."""
    fig, axes = _figure(17, 4.4, len(PANELS))
    methods = [m for m in layout.methods(table) if (table, column, m) in layout.cells]
    for ax, (metric, title) in zip(axes, PANELS):
        for method in methods:
            _draw_method(ax, layout.cells[(table, column, method)], method, metric)
        ax.set(xlabel="round", ylabel=f"{metric} (%)", title=title, ylim=(-3, 103))
        ax.grid(alpha=0.3)
        _integer_rounds(ax)
    axes[-1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8, frameon=False)
    fig.suptitle(f"{_setting_title(layout, table, column)}: A, R_paper and R per round (mean ± std over seeds)")
    fig.savefig(path, dpi=DPI)
    return path


def _per_client(ax: Any, record: RunRecord, column: str, log: bool) -> None:
    values = np.asarray(record.rounds[column], dtype=float)
    rounds = np.arange(1, values.shape[0] + 1)
    removed = np.asarray(record.rounds.get("removed", np.zeros_like(values, bool)), bool)
    malicious = record.malicious if record.malicious.size == values.shape[1] else np.zeros(values.shape[1], bool)
    for k in range(values.shape[1]):
        color, style = (ATTACKER, "--") if malicious[k] else (BENIGN, "-")
        ax.plot(rounds, values[:, k], color=color, ls=style, lw=1.3, alpha=0.85, marker=".", ms=4)
        cut = removed[:, k] if removed.shape == values.shape else np.zeros(len(rounds), bool)
        ax.scatter(rounds[cut], values[cut, k], marker="x", color=color, s=28, zorder=3)
    positive = values[np.isfinite(values)]
    if log and positive.size and (positive > 0).all():
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    _integer_rounds(ax)


def _legend(ax: Any, malicious: np.ndarray) -> None:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=BENIGN, ls="-", label=f"benign clients ({int((~malicious).sum())})"),
               Line2D([], [], color=ATTACKER, ls="--", label=f"attackers ({int(malicious.sum())})"),
               Line2D([], [], color="grey", marker="x", ls="", label="removed that round")]
    ax.legend(handles=handles, fontsize=8, loc="best")


def figure2(record: RunRecord, title: str, path: Path) -> Path:
    """V_k (discrepancy) and alpha_hat_k per client per round of one run."""
    fig, axes = _figure(12, 4.4, 2)
    _per_client(axes[0], record, "discrepancy", log=True)
    axes[0].set(xlabel="round", ylabel="V_k", title="parameter importance discrepancy V_k")
    _per_client(axes[1], record, "alpha_hat", log=False)
    axes[1].set(xlabel="round", ylabel="alpha_hat_k", title="aggregation weight alpha_hat_k")
    _legend(axes[1], record.malicious)
    fig.suptitle(title)
    fig.savefig(path, dpi=DPI)
    return path


def plot_layout(layout: Layout, out: Path) -> list[Path]:
    """Every Figure 3 (per setting) and Figure 2 (per FDCR setting, lowest seed) into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for table in layout.tables():
        for column in layout.columns(table):
            slug = _setting_slug(layout, table, column)
            paths.append(figure3(layout, table, column, out / f"fig3_{slug}.png"))
            for method in layout.methods(table):
                cell = layout.cells.get((table, column, method))
                record = _fig2_record(cell)
                if record is None:
                    continue
                title = (f"{method_label(method)}, {_setting_title(layout, table, column)}, seed {record.seed}: "
                         "V_k and alpha_hat_k per client per round")
                paths.append(figure2(record, title, out / f"fig2_{_slug(str(method))}_{slug}_seed{record.seed}.png"))
    return paths


def _fig2_record(cell: Cell | None) -> RunRecord | None:
    """The cell's run with the lowest seed, if its runs report V_k (FDCR does)."""
    if cell is None:
        return None
    records = [r for r in cell.records if "discrepancy" in r.rounds and "alpha_hat" in r.rounds]
    return min(records, key=lambda r: (str(type(r.seed)), r.seed)) if records else None


def plot_dirs(dirs: Sequence[Path], out: Path, *, partial: bool = False) -> list[Path]:
    """Read the run files below ``dirs`` and write the figures into ``out``; returns their paths."""
    counted, _ = load_records(dirs, partial=partial)
    try:
        return plot_layout(build_layout(counted), out)
    except OSError as exc:
        raise UserError(f"cannot write the figures into {out}: {exc.strerror or exc}") from None


__all__ = ["figure2", "figure3", "plot_dirs", "plot_layout", "ROW_KEY"]

"""The reproduction page: our runs of the paper's setting beside the paper's Table 4.

    python -m benchmarks.reproduction [--runs runs/reproduction] [--out docs/reproduction]

Reads ``<runs>/<name>/run.h5`` for the names ``jobs/reproduce-fmnist.sh`` writes (``vanilla``,
``fdcr``, ``fdcr_noise``, ``<defense>_marsfl``; any other run directory there too) and writes

- ``<out>/README.md``: one row per run with our final A, R_paper, V_paper (the paper's
  metric: R over every triggered test image), the paper's A, R, V for the run's setting (its
  Table 4), our R and V (triggered images of the other classes), and the mean detection rates;
  runs not there are listed as missing, unfinished runs are marked and counted with the rounds
  they have;
- ``<out>/rounds.png``: A, R_paper and the share of attackers removed, per round, one line per
  run, the paper's final A and R as dotted lines.

The table sits between two markers in README.md; text outside them (the reading of the
results) is kept when the page is written again.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fdcr_mpi.analysis.report import RunRecord, load_record
from fdcr_mpi.errors import UserError
from fdcr_mpi.reference import LABELS, paper_figures

RUN_FILE = "run.h5"
BEGIN, END = "<!-- reproduction table: begin (benchmarks/reproduction.py) -->", "<!-- reproduction table: end -->"
MARSFL = ("multi_krum", "foolsgold", "dnc", "trimmed_median", "bulyan", "sageflow", "crfl")  # Table 4 order
EXPECTED = ("vanilla", "fdcr", "fdcr_noise", *(f"{name}_marsfl" for name in MARSFL))
DESCRIPTIONS = {
    "vanilla": "Vanilla (FedAvg), no defense",
    "fdcr": "FDCR, honest Fisher vectors (the method as specified)",
    "fdcr_noise": "FDCR, attackers send N(0, 1) noise as their Fisher (what the released server substitutes)",
    **{f"{name}_marsfl": f"{LABELS[name]}, variant marsfl (the authors' benchmark)" for name in MARSFL},
}
FIGURES = ("A", "R_paper", "V_paper")


@dataclass(frozen=True)
class Row:
    """One run's line of the table."""

    name: str
    record: RunRecord
    paper: dict[str, float] | None

    @property
    def rounds_done(self) -> int:
        return len(self.record.rounds.get("round", []))

    @property
    def rounds_planned(self) -> int:
        return int(self.record.config.get("rounds", self.rounds_done))

    @property
    def complete(self) -> bool:
        return self.record.status == "complete"

    def mean(self, column: str) -> float:
        values = np.asarray(self.record.rounds.get(column, []), dtype=np.float64)
        values = values[np.isfinite(values)]
        return float(values.mean()) if values.size else math.nan


def find_runs(root: Path) -> tuple[list[Row], list[str]]:
    """(rows of the runs found, in the expected order then by name; expected names not found)."""
    found = {p.parent.name: p for p in sorted(root.glob(f"*/{RUN_FILE}"))} if root.is_dir() else {}
    order = [n for n in EXPECTED if n in found] + sorted(n for n in found if n not in EXPECTED)
    rows = []
    for name in order:
        record = load_record(found[name])
        if len(record.rounds.get("round", [])) == 0:
            continue  # created, no round yet: counted as missing
        rows.append(Row(name, record, paper_figures(record.config)))
    present = {r.name for r in rows}
    return rows, [n for n in EXPECTED if n not in present]


def _num(value: float | None) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2f}"


def _setting(row: Row) -> str:
    c = row.record.config
    return f"{c.get('data.dataset')}, β {c.get('data.beta')}, {c.get('attack.malicious_ratio')} attackers"


def table(rows: list[Row], missing: list[str]) -> str:
    """The generated Markdown: the table, its legend, the missing and unfinished runs."""
    lines = [
        BEGIN,
        "",
        "| Run | What | Rounds | A | R_paper | V_paper | *paper A* | *paper R* | *paper V* | R (ours) | V (ours) "
        "| TPR | FPR |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        final, paper = row.record.final, row.paper or {}
        rounds = f"{row.rounds_done}/{row.rounds_planned}" + ("" if row.complete else f" ({row.record.status})")
        lines.append("| " + " | ".join([
            f"`{row.name}`", DESCRIPTIONS.get(row.name, str(row.record.config.get("defense.name"))), rounds,
            *(_num(final.get(m)) for m in FIGURES),
            *(f"*{_num(paper.get(m))}*" if paper else "–" for m in ("A", "R", "V")),
            _num(final.get("R")), _num(final.get("V")), _num(row.mean("tpr")), _num(row.mean("fpr")),
        ]) + " |")
    settings = sorted({_setting(r) for r in rows})
    window = {int(r.record.config.get("eval.final_rounds") or 5) for r in rows} or {5}
    lines += [
        "",
        f"Each figure: the mean of the run's last {'/'.join(map(str, sorted(window)))} rounds (of the rounds it "
        "has, for an unfinished run). **R_paper** = 100 − ASR over every triggered test image, the target class "
        "included: the paper's R, so A, R_paper and V_paper = (A + R_paper) / 2 are measured as the paper's "
        "*italic* figures (its Table 4, the run's setting). **R (ours)** = 100 − ASR over the triggered images "
        "of the other classes, V (ours) = (A + R) / 2. TPR / FPR: the mean per round of the share of attackers "
        "/ benign clients the defense removed.",
        "",
        f"Setting{'s' if len(settings) > 1 else ''}: {'; '.join(settings) if settings else 'none'}.",
    ]
    unfinished = [r.name for r in rows if not r.complete]
    if unfinished:
        lines += ["", "Unfinished: " + ", ".join(f"`{n}`" for n in unfinished) + " (counted with the rounds they have)."]
    if missing:
        lines += ["", "Not run (no run file with a round yet): " + ", ".join(f"`{n}`" for n in missing) + "."]
    lines += ["", "![A, R_paper and the share of attackers removed per round](rounds.png)", "", END]
    return "\n".join(lines)


def plot(rows: list[Row], path: Path) -> Path:
    """A, R_paper and TPR per round, one line per run; the paper's final A and R dotted."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(17, 4.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    panels = (("A", "A", "main-task accuracy A (%)"),
              ("R_paper", "R", "R_paper: paper's metric, every triggered image (%)"),
              ("tpr", None, "attackers removed that round (TPR)"))
    for ax, (column, paper_key, title) in zip(axes, panels):
        for i, row in enumerate(rows):
            values = np.asarray(row.record.rounds.get(column, []), dtype=np.float64)
            if values.size == 0:
                continue
            color = f"C{i % 10}"
            rounds = np.arange(1, values.size + 1)
            ax.plot(rounds, values, color=color, lw=2.2 if row.name.startswith("fdcr") else 1.3,
                    marker="o" if values.size <= 12 else None, ms=3, label=row.name)
            if paper_key and row.paper:
                ax.axhline(row.paper[paper_key], color=color, ls=":", lw=1.2)
        ax.set(xlabel="round", title=title, ylim=(-3, 103) if paper_key else (-0.03, 1.03))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("%")
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        axes[-1].legend(handles, labels, loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8, frameon=False)
    fig.suptitle("Reproduction runs per round (dotted: the paper's final figure for that run's method)")
    fig.savefig(path, dpi=110)
    return path


def write_page(runs: Path, out: Path) -> tuple[Path, list[Row], list[str]]:
    """Write README.md (the generated block, keeping any text around it) and rounds.png into
    ``out``; returns the page, the runs found and the expected runs missing."""
    rows, missing = find_runs(runs)
    out.mkdir(parents=True, exist_ok=True)
    if rows:
        plot(rows, out / "rounds.png")
    block = table(rows, missing)
    page = out / "README.md"
    if page.is_file() and BEGIN in (text := page.read_text()) and END in text:
        head, rest = text.split(BEGIN, 1)
        new = head + block + rest.split(END, 1)[1]
    else:
        new = ("# Reproduction: Fashion-MNIST, β 0.5, 30% attackers\n\n"
               f"Runs: `bash jobs/reproduce-fmnist.sh` (into `{runs}`); this table: "
               "`python -m benchmarks.reproduction`.\n\n" + block + "\n")
    page.write_text(new)
    return page, rows, missing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=Path("runs/reproduction"), help="the runs' root")
    parser.add_argument("--out", type=Path, default=Path("docs/reproduction"), help="where the page goes")
    args = parser.parse_args(argv)
    try:
        page, rows, missing = write_page(args.runs, args.out)
    except UserError as exc:
        print(f"reproduction: error: {exc}", file=sys.stderr)
        return 2
    print(f"{page}: {len(rows)} runs" + (f"; not run: {', '.join(missing)}" if missing else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``fdcr-mpi report``: the paper's Table 4 layout from a sweep's run files.

Each run's figure is the mean of its last ``eval.final_rounds`` (5) rounds (as ``fdcr-mpi
inspect`` shows) of A, of the backdoor failure rate in the paper's metric (``R_paper``: every
triggered test image, target class included) and its ``V_paper``, and of ours (``R``: triggered
images of the other classes) and ``V``; a cell is the mean and the sample standard deviation
(n - 1) of that figure over the seeds. Rows are methods, columns are dataset x beta, one table
per attacker ratio (and per any other setting the sweep varies). Where a row of the paper's
tables matches the run's setting (``fdcr_mpi.reference``, shipped with the package: Table 4,
and Tables 1-3 for FDCR's ablations), the paper's A, R, V are printed beneath ours, in the
A, R_paper, V_paper columns: the metric they were measured in.
"""

from __future__ import annotations

import csv
import functools
import io
import math
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fdcr_mpi.errors import UserError
from fdcr_mpi.reference import LABELS, Table, packaged, paper_figures, read_table
from fdcr_mpi.store.schema import RUN_FILE

METRICS = ("A", "R_paper", "V_paper", "R", "V")
PAPER_METRICS = {"A": "A", "R_paper": "R", "V_paper": "V"}  # our column: the paper's figure measured the same way
ROW_KEY = "defense.name"
COLUMN_KEYS = ("data.dataset", "data.beta")
TABLE_KEY = "attack.malicious_ratio"  # one table per attacker ratio, and per anything else that varies
SEED_KEY = "seed"
IGNORED = ("runtime.", "data.root", "data.download")
DESCENDING = ("data.beta", "attack.malicious_ratio")  # the paper's order: 0.5 before 0.3
REFERENCE_ENV = "FDCR_REFERENCE"
METHODS = LABELS  # the paper's names of the methods, in the order of its Table 4
DATASETS = {"cifar10": "CIFAR-10", "fmnist": "Fashion-MNIST", "usps": "USPS", "mnist": "MNIST",
            "digits": "digits", "synthetic": "synthetic"}


# ----------------------------------------------------------------------------- reading runs


@dataclass(frozen=True)
class RunRecord:
    """What the report needs of one run file."""

    path: Path
    status: str
    config: dict[str, Any]  # flattened, dotted keys
    rounds: dict[str, np.ndarray]
    malicious: np.ndarray
    final: dict[str, float]

    @property
    def seed(self) -> Any:
        return self.config.get(SEED_KEY)

    @property
    def name(self) -> str:
        return self.path.parent.name

    @property
    def complete(self) -> bool:
        """Status ``complete`` with every round of its config present."""
        rows = len(self.rounds["round"]) if "round" in self.rounds else 0
        planned = self.config.get("rounds")
        return self.status == "complete" and not (isinstance(planned, int) and rows < planned)


def flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


@functools.cache
def defaults() -> dict[str, Any]:
    """The default config, flattened (the paper's setting)."""
    from fdcr_mpi.config import load_config

    return flatten(load_config(None).model_dump(mode="json"))


@functools.cache
def defense_names() -> frozenset[str]:
    from fdcr_mpi.defenses import available

    return frozenset(available())


def own_options(config: dict[str, Any]) -> dict[str, Any]:
    """The config without the option sections of the defenses this run does not use."""
    mine = config.get(ROW_KEY)
    return {k: v for k, v in config.items()
            if not ("." in k and k.split(".")[0] in defense_names() and k.split(".")[0] != mine)}


def find_run_files(dirs: Iterable[Path]) -> list[Path]:
    """Every run.h5 in or below each DIR (a run directory or a sweep's out root), sorted."""
    found: list[Path] = []
    for d in dirs:
        d = Path(d)
        if d.is_file() and d.name == RUN_FILE:
            found.append(d)
        elif (d / RUN_FILE).is_file():
            found.append(d / RUN_FILE)
        elif d.is_dir():
            found += sorted(p for p in d.rglob(RUN_FILE) if "checkpoints" not in p.parts)
        else:
            raise UserError(f"{d} is neither a run directory nor a folder of runs")
    unique = sorted(set(p.resolve() for p in found))
    if not unique:
        raise UserError(f"no run files ({RUN_FILE}) in {', '.join(str(d) for d in dirs)}")
    return unique


def final_window(config: Mapping[str, Any]) -> int:
    return int(config.get("eval.final_rounds") or 5)


def _text(value: Any) -> str:
    """An HDF5 string attribute as str (h5py may give bytes)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def load_record(path: Path) -> RunRecord:
    """Read one run file: config, status, every round column, ground truth, final A/R/V.

    A damaged file (unreadable objects, config text or figures) is a UserError.
    """
    from fdcr_mpi.metrics import final_figure, paper_columns
    from fdcr_mpi.store import read_rounds, reading, stored_config

    with reading(path) as f:
        stored = stored_config(f)
        status = f.attrs.get("status", "running")
        malicious = f["clients/malicious"][()] if "clients/malicious" in f else np.zeros(0, bool)
    rounds = read_rounds(path)
    rounds.update(paper_columns(rounds))  # R_paper, V_paper (derived in run files older than them)
    try:
        config = own_options({**defaults(), **flatten(stored)})  # newer keys: defaults
        last = final_window(config)
        final = {m: final_figure(rounds[m], last) if m in rounds else math.nan for m in METRICS}
        return RunRecord(Path(path), _text(status), config, rounds, np.asarray(malicious, bool), final)
    except (ValueError, TypeError, IndexError) as exc:
        raise UserError(f"could not read {path}: it is unreadable or corrupt ({exc})") from None


def read_records(dirs: Iterable[Path]) -> list[RunRecord]:
    """Every run file in or below ``dirs`` that can be read; one that cannot is left out with a
    warning (one damaged run does not stop a report)."""
    from fdcr_mpi.store import RunFileWarning

    dirs = list(dirs)
    try:
        paths = find_run_files(dirs)
    except OSError as exc:  # a folder that cannot be searched
        raise UserError(f"cannot look for run files in {exc.filename}: {exc.strerror or exc}") from None
    records = []
    for path in paths:
        try:
            records.append(load_record(path))
        except UserError as exc:
            warnings.warn(f"left out: {exc}", RunFileWarning, stacklevel=3)
    if not records:
        raise UserError(f"none of the run files in {', '.join(str(d) for d in dirs)} can be read")
    return records


def load_records(dirs: Iterable[Path], partial: bool = False) -> tuple[list[RunRecord], list[RunRecord]]:
    """(runs counted, runs left out because they are unfinished) from the run files in ``dirs``."""
    records = read_records(dirs)
    counted = [r for r in records if r.complete or (partial and r.rounds.get("round") is not None
                                                     and len(r.rounds["round"]) > 0)]
    left = [r for r in records if r not in counted]
    if not counted:
        raise UserError(f"none of the {len(records)} runs found is complete (use --partial to count unfinished runs)")
    return counted, left


# ----------------------------------------------------------------------------- grouping


def _ignored(key: str) -> bool:
    return key == SEED_KEY or key.startswith(IGNORED)


def _values(records: Sequence[RunRecord], key: str) -> set[str]:
    """The distinct values of ``key`` among the runs that have it (a defense's options: its runs)."""
    return {repr(r.config[key]) for r in records if key in r.config}


def varying_keys(records: Sequence[RunRecord]) -> list[str]:
    """Config keys (not seed, runtime or paths) whose value differs between runs, in config order."""
    keys: dict[str, None] = {}
    for r in records:
        keys.update(dict.fromkeys(r.config))
    return [k for k in keys if not _ignored(k) and len(_values(records, k)) > 1]


def shared_setting(records: Sequence[RunRecord]) -> dict[str, Any]:
    """Config values common to every run that differ from the defaults (the paper's setting)."""
    default = defaults()
    shown = {ROW_KEY, TABLE_KEY, *COLUMN_KEYS}  # already in the tables' titles
    first = records[0].config
    return {k: v for k, v in first.items()
            if k not in shown and not _ignored(k) and k in default and default[k] != v
            and all(k in r.config for r in records) and len(_values(records, k)) == 1}


def sort_value(key: str, value: Any) -> tuple:
    """An order for a key's values: the paper's order for datasets, methods, beta and ratios."""
    if key == ROW_KEY:
        order = list(METHODS)
        return (order.index(value) if value in order else len(order), str(value))
    if key == "data.dataset":
        order = list(DATASETS)
        return (order.index(value) if value in order else len(order), str(value))
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, -value if key in DESCENDING else value, "")
    return (1, 0, str(value))


@dataclass
class Cell:
    """The runs of one setting (all seeds) and their statistics."""

    records: list[RunRecord] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.records)

    @property
    def seeds(self) -> list[Any]:
        return sorted(r.seed for r in self.records)

    def mean(self, metric: str) -> float:
        values = np.array([r.final[metric] for r in self.records], dtype=float)
        return float(values.mean()) if values.size else math.nan

    def std(self, metric: str) -> float:
        values = np.array([r.final[metric] for r in self.records], dtype=float)
        return float(values.std(ddof=1)) if values.size > 1 else math.nan


@dataclass
class Layout:
    """Cells indexed by (table key, column key, method); keys are tuples of config values."""

    table_keys: list[str]
    column_keys: list[str]
    cells: dict[tuple[tuple, tuple, Any], Cell]

    def tables(self) -> list[tuple]:
        return self._sorted({t for t, _, _ in self.cells}, self.table_keys)

    def columns(self, table: tuple) -> list[tuple]:
        return self._sorted({c for t, c, _ in self.cells if t == table}, self.column_keys)

    def methods(self, table: tuple) -> list[Any]:
        return sorted({m for t, _, m in self.cells if t == table}, key=lambda m: sort_value(ROW_KEY, m))

    @staticmethod
    def _sorted(values: set[tuple], keys: list[str]) -> list[tuple]:
        return sorted(values, key=lambda v: tuple(sort_value(k, x) for k, x in zip(keys, v)))


def build_layout(records: Sequence[RunRecord]) -> Layout:
    """Group runs: rows by method, columns by dataset x beta, tables by attacker ratio and the rest."""
    varying = varying_keys(records)
    column_keys = list(COLUMN_KEYS)
    table_keys = [TABLE_KEY, *[k for k in varying if k not in (ROW_KEY, TABLE_KEY, *column_keys)]]
    cells: dict[tuple[tuple, tuple, Any], Cell] = {}
    for r in records:
        key = (tuple(r.config.get(k) for k in table_keys), tuple(r.config.get(k) for k in column_keys),
               r.config.get(ROW_KEY))
        cell = cells.setdefault(key, Cell())
        twin = next((other for other in cell.records if other.seed == r.seed), None)
        if twin is not None:  # the same setting and seed again (a copied run directory): one seed, not two
            from fdcr_mpi.store import RunFileWarning

            warnings.warn(f"left out {r.path.parent}: the same setting and seed as {twin.path.parent}",
                          RunFileWarning, stacklevel=2)
            continue
        cell.records.append(r)
    return Layout(table_keys, column_keys, cells)


# ----------------------------------------------------------------------------- the paper's values


def default_reference() -> Path | None:
    """A replacement for the packaged Table 4 named by ``$FDCR_REFERENCE``, else None (the package's)."""
    value = os.environ.get(REFERENCE_ENV)
    return Path(value) if value else None


def read_reference(path: Path | None) -> list[Table]:
    """The paper's tables to compare with: Table 4 (from ``path`` when given, in the package's
    layout or the paper's with a ``method`` column) and the packaged Tables 1-3."""
    table4 = read_table(path) if path is not None else packaged("table4")
    return [table4, *(packaged(name) for name in ("table1", "table2", "table3"))]


def paper_values(reference: Sequence[Table], cell: Cell) -> dict[str, float] | None:
    """The paper's A, R, V for the cell's setting under our column names (A, R_paper, V_paper:
    the paper measured R on every triggered image), or None where the paper has no such setting."""
    figures = paper_figures(cell.records[0].config, reference)
    if figures is None:
        return None
    return {ours: figures[theirs] for ours, theirs in PAPER_METRICS.items()}


# ----------------------------------------------------------------------------- formatting


def method_label(name: Any) -> str:
    return METHODS.get(name, str(name))


def key_label(key: str, value: Any) -> str:
    if key == "data.dataset":
        return DATASETS.get(value, str(value))
    if key == "data.beta":
        return f"β={value}"
    return f"{key.split('.')[-1]}={value}"


def column_title(keys: Sequence[str], column: tuple) -> str:
    return ", ".join(key_label(k, v) for k, v in zip(keys, column))


def table_title(keys: Sequence[str], table: tuple) -> str:
    names = {"attack.malicious_ratio": "attacker ratio"}
    return ", ".join(f"{names.get(k, k)} {v}" for k, v in zip(keys, table)) or "all runs"


def fmt(mean: float, std: float = math.nan) -> str:
    if math.isnan(mean):
        return "–"
    return f"{mean:.2f}" if math.isnan(std) else f"{mean:.2f} ± {std:.2f}"


@dataclass
class Report:
    """Everything the three output formats need."""

    layout: Layout
    reference: list[Table]
    reference_path: Path | None
    counted: list[RunRecord]
    left_out: list[RunRecord]
    setting: dict[str, Any]

    def paper(self, table: tuple, column: tuple, method: Any) -> dict[str, float] | None:
        cell = self.layout.cells.get((table, column, method))
        return paper_values(self.reference, cell) if cell else None


def _seeds_line(report: Report) -> str:
    counts = sorted({c.n for c in report.layout.cells.values()})
    return "/".join(str(n) for n in counts)


def markdown(report: Report) -> str:
    layout = report.layout
    window = final_window(report.counted[0].config)
    source = report.reference_path.name if report.reference_path else "shipped with fdcr_mpi"
    lines = [
        "# Table 4: accuracy A, backdoor failure rate R and V = (A + R) / 2 (%)",
        "",
        f"{len(report.counted)} runs, {_seeds_line(report)} seeds per cell. Each run: the mean of its last "
        f"{window} rounds; each cell: mean ± sample standard deviation over the seeds.",
        "",
        "Two backdoor failure rates: **R_paper** = 100 − ASR over every triggered test image, the target "
        "class included, as the paper measures R (V_paper = (A + R_paper) / 2); **R** = 100 − ASR over the "
        "triggered images of the other classes, ours (V = (A + R) / 2). A well-defended model reads up to "
        "the target class's share of the test set lower in R_paper than in R.",
        "",
        f"*paper* rows: the paper's figures ({source}; Table 4, or Tables 1-3 for FDCR's ablations) where "
        "method, dataset, β and attacker ratio match, in the columns of its metric (A, R_paper, V_paper); "
        "the paper ran its full setting.",
    ]
    if report.setting:
        shared = ", ".join(f"`{k}={v}`" for k, v in report.setting.items())
        lines += ["", f"Setting shared by all runs, where it differs from the defaults (the paper's): {shared}."]
    for table in layout.tables():
        lines += ["", f"## {table_title(layout.table_keys, table)}", ""]
        lines += _markdown_table(report, table)
    lines += _left_out_lines(report)
    return "\n".join(lines) + "\n"


def _markdown_table(report: Report, table: tuple) -> list[str]:
    layout = report.layout
    columns = layout.columns(table)
    head = ["Method"] + [f"{column_title(layout.column_keys, c)} {m}" for c in columns for m in METRICS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" + "---:|" * (len(head) - 1)]
    for method in layout.methods(table):
        ours, paper = [method_label(method)], [f"*{method_label(method)} (paper)*"]
        for c in columns:
            cell = layout.cells.get((table, c, method))
            values = report.paper(table, c, method)
            for m in METRICS:
                ours.append(fmt(cell.mean(m), cell.std(m)) if cell else "")
                paper.append(f"*{values[m]:.2f}*" if values and m in values else "")
        lines.append("| " + " | ".join(ours) + " |")
        if any(paper[1:]):
            lines.append("| " + " | ".join(paper) + " |")
    return lines


def _left_out_lines(report: Report) -> list[str]:
    if not report.left_out:
        return []
    lines = ["", f"Not counted: {len(report.left_out)} unfinished runs."]
    for r in report.left_out:
        lines.append(f"- `{r.path.parent}`: {r.status}, {len(r.rounds.get('round', []))} rounds")
    return lines


CSV_FIELDS = ("method", "method_label", "n_seeds", "seeds", *[f"{m}_{s}" for m in METRICS for s in ("mean", "std")],
              *[f"paper_{m}" for m in PAPER_METRICS.values()])


def csv_text(report: Report) -> str:
    """Long format: one row per cell (setting keys, method, seeds, mean/std of A, R_paper, V_paper,
    R, V; the paper's A, R, V, which are measured as our A, R_paper, V_paper)."""
    layout = report.layout
    keys = [*layout.table_keys, *layout.column_keys]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([*keys, *CSV_FIELDS])
    for table in layout.tables():
        for column in layout.columns(table):
            for method in layout.methods(table):
                cell = layout.cells.get((table, column, method))
                if cell is None:
                    continue
                paper = report.paper(table, column, method) or {}
                stats = [_num(f(m)) for m in METRICS for f in (cell.mean, cell.std)]
                writer.writerow([*table, *column, method, method_label(method), cell.n,
                                 " ".join(str(s) for s in cell.seeds), *stats,
                                 *[_num(paper.get(m, math.nan)) for m in PAPER_METRICS]])
    return out.getvalue()


def _num(value: float) -> str:
    return "" if math.isnan(value) else f"{value:.4f}"


def _tex(text: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("_", r"\_"), ("%", r"\%"), ("&", r"\&"), ("#", r"\#"),
                 ("β", r"$\beta$"), ("±", r"$\pm$")):
        text = text.replace(a, b)
    return text


def latex(report: Report) -> str:
    """One booktabs tabular per table; paper rows in italics."""
    layout = report.layout
    window = final_window(report.counted[0].config)
    parts = [f"% fdcr-mpi report: A, R, V (%), mean of the last {window} rounds, mean $\\pm$ std over seeds.\n"
             "% R_paper: every triggered test image (the paper's R); R: triggered images of the other classes.\n"
             "% Paper rows (italics) sit in the A, R_paper, V_paper columns. Needs \\usepackage{booktabs}."]
    for table in layout.tables():
        parts.append(_latex_table(report, table))
    return "\n\n".join(parts) + "\n"


def _latex_table(report: Report, table: tuple) -> str:
    layout = report.layout
    columns = layout.columns(table)
    n = len(METRICS)
    spec = "l" + (" " + "c" * n) * len(columns)
    groups = " & ".join(f"\\multicolumn{{{n}}}{{c}}{{{_tex(column_title(layout.column_keys, c))}}}" for c in columns)
    rules = " ".join(f"\\cmidrule(lr){{{2 + n * i}-{1 + n * (i + 1)}}}" for i in range(len(columns)))
    lines = [
        "\\begin{table}[t]", "\\centering", "\\small",
        f"\\caption{{{_tex(table_title(layout.table_keys, table))}: A, R, V (\\%); R\\_paper over every "
        "triggered image (the paper's R), R over those of the other classes.}",
        f"\\begin{{tabular}}{{{spec}}}", "\\toprule",
        f" & {groups} \\\\", rules,
        "Method & " + " & ".join([" & ".join(_tex(m) for m in METRICS)] * len(columns)) + " \\\\", "\\midrule",
    ]
    for method in layout.methods(table):
        ours, paper = [_tex(method_label(method))], [f"\\textit{{{_tex(method_label(method))} (paper)}}"]
        for c in columns:
            cell = layout.cells.get((table, c, method))
            values = report.paper(table, c, method)
            for m in METRICS:
                ours.append(_tex(fmt(cell.mean(m), cell.std(m))) if cell else "")
                paper.append(f"\\textit{{{values[m]:.2f}}}" if values and m in values else "")
        lines.append(" & ".join(ours) + " \\\\")
        if any(paper[1:]):
            lines.append(" & ".join(paper) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}", "\\end{table}"]
    return "\n".join(lines)


def build_report(dirs: Sequence[Path], *, reference: Path | None = None, partial: bool = False) -> Report:
    """The report of the runs below ``dirs``; ``reference``: a Table 4 file replacing the packaged one."""
    counted, left = load_records(dirs, partial=partial)
    ref_path = reference or default_reference()
    return Report(build_layout(counted), read_reference(ref_path), ref_path, counted, left,
                  shared_setting(counted))


def write_report(dirs: Sequence[Path], out: Path, *, reference: Path | None = None,
                 partial: bool = False) -> list[Path]:
    """Write table4.md, table4.csv and table4.tex into ``out``; returns their paths."""
    report = build_report(dirs, reference=reference, partial=partial)
    paths = []
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name, text in (("table4.md", markdown(report)), ("table4.csv", csv_text(report)),
                           ("table4.tex", latex(report))):
            path = out / name
            path.write_text(text)
            paths.append(path)
    except OSError as exc:
        raise UserError(f"cannot write the report into {out}: {exc.strerror or exc}") from None
    return paths

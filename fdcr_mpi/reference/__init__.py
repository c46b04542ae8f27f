"""The paper's reported figures (its Tables 1-4), shipped with the package as CSV files.

Each file has one row per setting, keyed by the config keys that select it, then the paper's
A, R and V in %:

- ``table4.csv`` (13 defenses and Vanilla): ``defense.name, data.dataset, data.beta,
  attack.malicious_ratio``;
- ``table1.csv`` (clustering in FCDC): ``fdcr.clustering`` and the setting;
- ``table2.csv`` (I_k in Eq. 8, CIFAR-10): ``fdcr.use_importance`` and the setting;
- ``table3.csv`` (FCDC / FPRA ablation): ``fdcr.fcdc, fdcr.fpra`` and the setting.

The paper's R is measured on every triggered test image, the target class included: it is
our ``R_paper`` (and its V our ``V_paper``), not our ``R`` (docs/SPEC.md section 5). Values are
transcribed from the paper's text as printed; two R values carry three decimals in the paper
(Sageflow, Fashion-MNIST, beta 0.5, 30%: 1.169; FoolsGold, Fashion-MNIST, beta 0.3, 20%:
0.163) and are kept so.

``paper_figures(config)`` finds the row for a run: Table 4 by defense and setting; an FDCR
run that changes one of the ablated options (``ABLATIONS``) is looked up in the table that
varies that option instead, and in none if no table does.
"""

from __future__ import annotations

import csv
import functools
import io
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from fdcr_mpi.errors import UserError

FIGURES = ("A", "R", "V")
TABLES = ("table4", "table1", "table2", "table3")  # lookup order: Table 4 first
ABLATIONS: dict[str, Any] = {"fdcr.clustering": "finch", "fdcr.use_importance": True, "fdcr.fcdc": True,
                             "fdcr.fpra": True}
"""FDCR options the paper's Tables 1-3 vary, with their default (Table 4's) values."""

# The paper's names of the methods (Table 4's row labels), in its order.
LABELS = {
    "fedavg": "Vanilla", "multi_krum": "Multi-Krum", "foolsgold": "FoolsGold", "rlr": "RLR", "dnc": "DnC",
    "mma": "MMA", "trimmed_median": "Trimmed-Median", "bulyan": "Bulyan", "rfa": "RFA", "fltrust": "FLTrust",
    "sageflow": "Sageflow", "finetuning": "Finetuning", "crfl": "CRFL", "fdcr": "FDCR",
}
_ALIASES = {"Multi Krum": "multi_krum", "Trim Median": "trimmed_median", "Trimmed Median": "trimmed_median"}
_SHORT_KEYS = {"method": "defense.name", "dataset": "data.dataset", "beta": "data.beta",
               "malicious_ratio": "attack.malicious_ratio"}  # the paper's layout: method, dataset, beta, ...


@dataclass(frozen=True)
class Table:
    """One table: its key columns (config keys) and rows of (key values, {A, R, V})."""

    name: str
    keys: tuple[str, ...]
    rows: tuple[tuple[tuple[str, ...], dict[str, float]], ...]

    def lookup(self, config: Mapping[str, Any]) -> dict[str, float] | None:
        """The figures of the row whose keys all equal the run's config values, or None."""
        for values, figures in self.rows:
            if all(_same(config.get(k, _default(k)), v) for k, v in zip(self.keys, values)):
                return dict(figures)
        return None


def _default(key: str) -> Any:
    return ABLATIONS.get(key)


def _same(value: Any, text: str) -> bool:
    """A config value equals a CSV cell: booleans as true/false, numbers by value, else as text."""
    if isinstance(value, bool):
        return text.strip().lower() == str(value).lower()
    try:
        return float(value) == float(text)
    except (TypeError, ValueError):
        return str(value) == text.strip()


def parse_table(name: str, text: str, source: str) -> Table:
    """A table from CSV text: key columns, then A, R, V. The paper's layout (``method, dataset,
    beta, malicious_ratio``, methods by their Table 4 labels: Vanilla, Multi-Krum, ...) is read
    as ``defense.name, data.dataset, data.beta, attack.malicious_ratio``."""
    reader = csv.reader(io.StringIO(text))
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        raise UserError(f"the reference table {source} is empty") from None
    if header[-3:] != list(FIGURES) or len(header) < 4:
        raise UserError(f"the reference table {source} must have key columns, then A, R, V; got {header}")
    keys = tuple(_SHORT_KEYS.get(h, h) for h in header[:-3])
    by_label = {**{v: k for k, v in LABELS.items()}, **_ALIASES}
    rows = []
    for line, cells in enumerate(reader, start=2):
        if not cells:
            continue
        if len(cells) != len(header):
            raise UserError(f"the reference table {source}, line {line}, has {len(cells)} cells, not {len(header)}")
        values = [c.strip() for c in cells[:-3]]
        if header[0] == "method":
            values[0] = by_label.get(values[0], values[0])
        try:
            figures = {m: float(c) for m, c in zip(FIGURES, cells[-3:])}
        except ValueError as exc:
            raise UserError(f"the reference table {source}, line {line}: {exc}") from None
        rows.append((tuple(values), figures))
    return Table(name, keys, tuple(rows))


@functools.cache
def packaged(name: str) -> Table:
    """One of the tables shipped in this package (``TABLES``)."""
    if name not in TABLES:
        raise ValueError(f"unknown reference table {name!r}; choose one of: {', '.join(TABLES)}")
    text = resources.files(__name__).joinpath(f"{name}.csv").read_text(encoding="utf-8")
    return parse_table(name, text, f"{name}.csv (package data)")


def read_table(path: Path) -> Table:
    """A reference table from a file (for example another transcription of Table 4)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"the reference table {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"the reference table {path} is not a text CSV file") from None
    except OSError as exc:
        raise UserError(f"cannot read the reference table {path}: {exc.strerror or exc}") from None
    try:
        return parse_table(path.stem, text, str(path))
    except csv.Error as exc:
        raise UserError(f"the reference table {path} is not a CSV file: {str(exc).splitlines()[0]}") from None


def all_tables() -> list[Table]:
    return [packaged(name) for name in TABLES]


def paper_methods() -> list[str]:
    """The defenses the paper compares in Table 4 (``defense.name``), in the table's order."""
    table = packaged("table4")
    index = table.keys.index("defense.name")
    return list(dict.fromkeys(str(values[index]) for values, _ in table.rows))


def paper_figures(config: Mapping[str, Any], tables: Iterable[Table] | None = None) -> dict[str, float] | None:
    """The paper's A, R, V (in its metric) for a run's flattened config, or None.

    Only BadNets runs have counterparts. A run of ``fdcr`` whose ablated options (``ABLATIONS``)
    differ from their defaults is matched in a table whose key columns include every changed
    option; any other run in a table that does not vary those options (Table 4).
    """
    if config.get("attack.kind", "badnets") != "badnets":
        return None
    fdcr = config.get("defense.name") == "fdcr"
    changed = {k for k, default in ABLATIONS.items() if fdcr and not _equal(config.get(k, default), default)}
    for table in (all_tables() if tables is None else tables):
        varied = set(table.keys) & set(ABLATIONS)
        if "defense.name" not in table.keys and not fdcr:
            continue  # Tables 1-3 are ablations of FDCR
        if not changed <= varied:
            continue
        found = table.lookup(config)
        if found is not None:
            return found
    return None


def _equal(a: Any, b: Any) -> bool:
    return a == b or str(a).lower() == str(b).lower()

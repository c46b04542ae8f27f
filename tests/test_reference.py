"""The paper's Tables 1-4 shipped as package data (fdcr_mpi.reference) and the lookup of a run's row."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pytest

from fdcr_mpi.defenses import available
from fdcr_mpi.errors import UserError
from fdcr_mpi.reference import (
    TABLES,
    packaged,
    paper_figures,
    paper_methods,
    parse_table,
    read_table,
)

REPO = Path(__file__).resolve().parents[1]
FMNIST = {"data.dataset": "fmnist", "data.beta": 0.5, "attack.malicious_ratio": 0.3, "attack.kind": "badnets"}


def test_the_tables_ship_with_the_package_and_are_declared_as_package_data() -> None:
    files = {p.name for p in resources.files("fdcr_mpi.reference").iterdir()}
    assert {f"{t}.csv" for t in TABLES} <= files
    pyproject = (REPO / "pyproject.toml").read_text()  # (tomllib is Python 3.11+)
    assert '[tool.setuptools.package-data]\n"fdcr_mpi.reference" = ["*.csv"]' in pyproject


def test_table4_covers_every_method_setting_and_each_v_is_the_mean_of_a_and_r() -> None:
    table = packaged("table4")
    keys = {values for values, _ in table.rows}
    assert len(table.rows) == len(keys) == 14 * 3 * 2 * 2  # methods x datasets x beta x ratio
    assert {values[0] for values in keys} == set(paper_methods()) and len(paper_methods()) == 14
    assert set(paper_methods()) <= set(available())  # the paper's 14 methods are defenses of ours
    for name in TABLES:  # a transcription check: the paper prints V = (A + R) / 2, rounded
        for values, f in packaged(name).rows:
            assert f["V"] == pytest.approx((f["A"] + f["R"]) / 2, abs=0.015), (name, values)


@pytest.mark.parametrize(("config", "expected"), [
    ({"defense.name": "fedavg"}, (87.15, 0.26, 43.70)),
    ({"defense.name": "fdcr"}, (86.92, 88.32, 87.62)),
    ({"defense.name": "fdcr", "attack.malicious_ratio": 0.2}, (85.44, 87.47, 86.46)),
    ({"defense.name": "multi_krum", "multi_krum.variant": "marsfl"}, (77.52, 95.07, 86.29)),
    ({"defense.name": "fdcr", "fdcr.clustering": "kmeans"}, (86.77, 18.30, 52.53)),  # Table 1
    ({"defense.name": "fdcr", "fdcr.clustering": "dbscan", "data.beta": 0.3}, (85.16, 0.54, 42.85)),
    ({"defense.name": "fdcr", "fdcr.use_importance": False, "data.dataset": "cifar10"}, (58.02, 29.02, 43.52)),
    ({"defense.name": "fdcr", "fdcr.fcdc": False}, (87.36, 0.40, 43.88)),  # Table 3, FPRA only
    ({"defense.name": "fdcr", "fdcr.fpra": False}, (86.81, 61.92, 74.36)),  # Table 3, FCDC only
])
def test_a_run_finds_the_papers_row_of_its_setting(config: dict, expected: tuple) -> None:
    figures = paper_figures({**FMNIST, **config})
    assert (figures["A"], figures["R"], figures["V"]) == expected


@pytest.mark.parametrize("config", [
    {"defense.name": "fdcr", "attack.kind": "dba"},  # the paper ran BadNets only
    {"defense.name": "fdcr", "fdcr.use_importance": False},  # Table 2 has CIFAR-10 only
    {"defense.name": "fdcr", "fdcr.clustering": "kmeans", "fdcr.fpra": False},  # no table varies both
    {"defense.name": "fdcr", "fdcr.clustering": "kmeans", "attack.malicious_ratio": 0.2},
    {"defense.name": "fedavg", "data.dataset": "mnist"},
])
def test_settings_the_paper_did_not_run_have_no_row(config: dict) -> None:
    assert paper_figures({**FMNIST, **config}) is None


def test_the_papers_own_csv_layout_reads_as_table4(tmp_path: Path) -> None:
    path = tmp_path / "t4.csv"
    path.write_text("method,dataset,beta,malicious_ratio,A,R,V\nMulti Krum,fmnist,0.5,0.3,1,2,1.5\n")
    table = read_table(path)
    assert table.keys == ("defense.name", "data.dataset", "data.beta", "attack.malicious_ratio")
    assert paper_figures({**FMNIST, "defense.name": "multi_krum"}, [table]) == {"A": 1.0, "R": 2.0, "V": 1.5}


@pytest.mark.parametrize(("text", "message"), [
    ("", "is empty"),
    ("method,A,R\nx,1,2\n", "key columns, then A, R, V"),
    ("method,A,R,V\nVanilla,1,2\n", "has 3 cells, not 4"),
    ("method,A,R,V\nVanilla,1,x,2\n", "line 2"),
])
def test_a_malformed_table_is_one_sentence(text: str, message: str) -> None:
    with pytest.raises(UserError, match=message):
        parse_table("t", text, "t.csv")
    with pytest.raises(UserError, match="does not exist"):
        read_table(Path("/nonexistent/table4.csv"))

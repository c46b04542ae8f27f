"""benchmarks/reproduction.py: the reproduction page from run files (written through the store)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from benchmarks.reproduction import BEGIN, END, main, write_page
from tests.test_sweep import fake_run, is_real_png

FMNIST = ["data.dataset=fmnist", "data.beta=0.5", "attack.malicious_ratio=0.3", "rounds=6"]


def test_the_page_puts_ours_in_the_papers_metric_beside_the_paper_and_keeps_the_reading(tmp_path: Path) -> None:
    runs, out = tmp_path / "runs", tmp_path / "page"
    a, r = [80.0, 82, 84, 86, 88, 90], [10.0, 20, 30, 40, 50, 60]  # fake_run: R_paper = R - 10
    fake_run(runs / "vanilla", [*FMNIST, "defense.name=fedavg"], a=a, r=r)
    fake_run(runs / "fdcr", [*FMNIST, "defense.name=fdcr"], a=a, r=r)
    fake_run(runs / "multi_krum_marsfl", [*FMNIST, "defense.name=multi_krum", "multi_krum.variant=marsfl"],
             a=a[:3], r=r[:3], status="running")
    page, rows, missing = write_page(runs, out)
    text = page.read_text()
    assert [row.name for row in rows] == ["vanilla", "fdcr", "multi_krum_marsfl"]
    finals = (np.mean(a[-5:]), np.mean(r[-5:]) - 10, np.mean(r[-5:]))  # A, R_paper, R (ours)
    vanilla = next(line for line in text.splitlines() if line.startswith("| `vanilla`"))
    cells = [c.strip() for c in vanilla.strip("|").split("|")]
    assert cells[3:6] == [f"{finals[0]:.2f}", f"{finals[1]:.2f}", f"{(finals[0] + finals[1]) / 2:.2f}"]
    assert cells[6:9] == ["*87.15*", "*0.26*", "*43.70*"]  # the paper's Table 4, Fashion-MNIST 0.5 / 30%
    assert cells[9] == f"{finals[2]:.2f}"
    assert "| `fdcr` |" in text and "*86.92* | *88.32* | *87.62*" in text
    assert "3/6 (running)" in text and "Unfinished: `multi_krum_marsfl`" in text
    assert "fdcr_noise" in missing and "`fdcr_noise`" in text and "Not run" in text
    assert is_real_png(out / "rounds.png")

    page.write_text("# Title\n\nOur reading before.\n\n" + text[text.index(BEGIN):] + "\nReading after.\n")
    fake_run(runs / "fdcr_noise", [*FMNIST, "defense.name=fdcr", "attack.fisher=noise"], a=a, r=r)
    assert main(["--runs", str(runs), "--out", str(out)]) == 0
    again = page.read_text()
    assert again.startswith("# Title\n\nOur reading before.") and again.rstrip().endswith("Reading after.")
    assert again.count(BEGIN) == again.count(END) == 1 and "| `fdcr_noise` |" in again


def test_no_runs_yet_is_a_page_that_says_so(tmp_path: Path) -> None:
    page, rows, missing = write_page(tmp_path / "nothing", tmp_path / "page")
    assert rows == [] and len(missing) == 10
    assert "Not run (no run file with a round yet): `vanilla`, `fdcr`, `fdcr_noise`" in page.read_text()

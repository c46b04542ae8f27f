"""TensorBoard event files: every round's figures and per-client columns at the round's step,
written by a real run, purged past the checkpoint on resume, and never a reason to fail a run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fdcr_mpi.cli import main
from fdcr_mpi.store import read_rounds
from fdcr_mpi.store.tensorboard import EVENTS_DIR, TensorBoardLog, TensorBoardWarning

TINY = ["data.dataset=digits", "rounds=2", "train.local_epochs=1", "fisher.max_samples=16"]


def events(out: Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(out / EVENTS_DIR), size_guidance={"scalars": 0, "histograms": 0})
    accumulator.Reload()
    return accumulator


def scalar(acc: EventAccumulator, tag: str) -> tuple[list[int], list[float]]:
    points = acc.Scalars(tag)
    return [p.step for p in points], [p.value for p in points]


def test_a_run_writes_its_rounds_as_tensorboard_events(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(["run", *TINY, "--out", str(out), "--quiet"]) == 0
    rows, acc = read_rounds(out / "run.h5"), events(out)
    tags = acc.Tags()
    for name in ("A", "R", "R_paper", "V"):
        steps, values = scalar(acc, f"metrics/{name}")
        assert steps == [1, 2]  # rounds counted from 1, as on the console
        np.testing.assert_array_equal(values, rows[name].astype(np.float32))
    steps, values = scalar(acc, "seconds/round")
    np.testing.assert_array_equal(values, rows["seconds_round"].astype(np.float32))
    np.testing.assert_array_equal(scalar(acc, "detection/removed")[1], rows["removed"].sum(axis=1))
    for k in range(10):  # one scalar per client (10 clients), and a histogram per column
        np.testing.assert_array_equal(scalar(acc, f"clients/alpha_hat/{k:03d}")[1],
                                      rows["alpha_hat"][:, k].astype(np.float32))
    assert {"clients/alpha_hat", "clients/discrepancy", "clients/train_loss"} <= set(tags["histograms"])


def test_no_events_when_turned_off(tmp_path: Path) -> None:
    assert main(["run", *TINY, "runtime.tensorboard=false", "--out", str(tmp_path / "run"), "--quiet"]) == 0
    assert not (tmp_path / "run" / EVENTS_DIR).exists()


def test_a_resumed_run_shows_each_round_once(tmp_path: Path) -> None:
    first = TensorBoardLog(tmp_path, first_step=1)
    for t, value in enumerate([1.0, 2.0, 3.0]):  # rounds 1-3, then a kill: the checkpoint is after round 2
        first.write({"round": t, "A": value})
    first.close()
    again = TensorBoardLog(tmp_path, first_step=3)  # resume computes round 3 again, then round 4
    for t, value in ((2, 30.0), (3, 40.0)):
        again.write({"round": t, "A": value})
    again.close()
    assert scalar(events(tmp_path), "metrics/A") == ([1, 2, 3, 4], [1.0, 2.0, 30.0, 40.0])


def test_events_that_cannot_be_written_are_a_warning_not_a_failure(tmp_path: Path, capsys) -> None:
    (tmp_path / EVENTS_DIR).write_text("a file where the folder would go")
    with pytest.warns(TensorBoardWarning, match="no TensorBoard events for this run"):
        log = TensorBoardLog(tmp_path, first_step=1)
        log.write({"round": 0, "A": 1.0})
    log.close()
    assert main(["run", *TINY, "--out", str(tmp_path), "--quiet"]) == 0  # the run itself completes
    assert "fdcr-mpi: warning: no TensorBoard events for this run: cannot write" in capsys.readouterr().err
    assert read_rounds(tmp_path / "run.h5")["A"].shape == (2,)

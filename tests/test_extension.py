"""Extending a run to more rounds (``fdcr-mpi resume DIR --rounds N``): it ends as a fresh run of N
rounds would, under that run's config hash, and refuses what could not (issue 17)."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from fdcr_mpi.config import config_hash, load_config
from fdcr_mpi.errors import UserError
from fdcr_mpi.runtime.extension import differs_only_in_rounds, extended_config
from tests.test_mpi import final_sha, launch

TINY = ["data.dataset=digits", "train.local_epochs=1", "fisher.max_samples=32", "runtime.keep_checkpoints=10"]


def test_the_extended_config_is_the_fresh_config_of_more_rounds() -> None:
    short = load_config(None, ["rounds=2", "seed=3"])
    longer = extended_config(short, 5, 2, "runs/x")
    assert longer.rounds == 5 and config_hash(longer) == config_hash(load_config(None, ["rounds=5", "seed=3"]))
    assert extended_config(short, 2, 2, "runs/x") is short
    assert differs_only_in_rounds(short, longer) and not differs_only_in_rounds(short, load_config(None, ["seed=4"]))
    with pytest.raises(UserError, match="shorten"):
        extended_config(short, 1, 1, "runs/x")
    with pytest.raises(UserError, match="rounds"):
        extended_config(short, 10**9, 2, "runs/x")  # beyond the config's bound


def test_a_defense_whose_last_round_differs_extends_only_before_that_round() -> None:
    crfl = load_config(None, ["rounds=3", "defense.name=crfl"])
    with pytest.raises(UserError, match="last round"):
        extended_config(crfl, 6, 3, "runs/x")
    assert extended_config(crfl, 6, 2, "runs/x").rounds == 6  # its last round not yet run: fine


def rows(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path) as f:
        return {name: f[f"rounds/{name}"][()] for name in ("round", "A", "R", "alpha_hat")}


def test_a_finished_run_extended_ends_as_a_fresh_run_of_more_rounds(tmp_path: Path) -> None:
    run, fresh = tmp_path / "run", tmp_path / "fresh"
    short = final_sha(launch(["run", *TINY, "rounds=2", "--quiet", "--out", str(run)], None))
    before = (run / "run.h5").read_bytes()
    refused = launch(["run", *TINY, "rounds=4", "--quiet", "--out", str(run)], None)
    assert refused.returncode == 2 and f"resume {run} --rounds 4" in refused.stderr, refused.stderr
    assert (run / "run.h5").read_bytes() == before

    extended = final_sha(launch(["resume", str(run), "--rounds", "4", "--quiet"], None))
    reference = final_sha(launch(["run", *TINY, "rounds=4", "--quiet", "--out", str(fresh)], None))
    assert extended == reference and extended != short
    for name, values in rows(fresh / "run.h5").items():
        np.testing.assert_array_equal(rows(run / "run.h5")[name], values, err_msg=name)
    with h5py.File(run / "run.h5") as f, h5py.File(fresh / "run.h5") as g:
        assert f.attrs["config_hash"] == g.attrs["config_hash"] and f.attrs["config"] == g.attrs["config"]
        assert f.attrs["status"] == "complete" and f.attrs["final_sha256"] == reference
        assert '"previous_final_sha256": "' + short in f.attrs["extensions"]
    shown = launch(["inspect", str(run)], None)
    assert "extended" in shown.stdout and "2 -> 4 rounds" in shown.stdout

    # Preempted right after the extension, before any checkpoint of the new hash: the checkpoint
    # of round 2, written under the earlier hash, resumes the run to the same end.
    for path in (run / "checkpoints").glob("round_*.h5"):
        if int(path.stem.split("_")[1]) >= 2:
            path.unlink()
    with h5py.File(run / "run.h5", "a") as f:
        f.attrs["status"] = "running"
    assert final_sha(launch(["resume", str(run), "--quiet"], None)) == reference
    assert rows(run / "run.h5")["round"].tolist() == [0, 1, 2, 3]

    shorter = launch(["resume", str(run), "--rounds", "3"], None)
    assert shorter.returncode == 2 and "shorten" in shorter.stderr and "Traceback" not in shorter.stderr


def test_a_finished_crfl_run_is_not_extended_and_its_file_is_untouched(tmp_path: Path) -> None:
    final_sha(launch(["run", *TINY, "rounds=2", "defense.name=crfl", "--quiet", "--out", str(tmp_path)], None))
    before = (tmp_path / "run.h5").read_bytes()
    result = launch(["resume", str(tmp_path), "--rounds", "3"], None)
    assert result.returncode == 2 and "last round" in result.stderr and "Traceback" not in result.stderr
    assert (tmp_path / "run.h5").read_bytes() == before

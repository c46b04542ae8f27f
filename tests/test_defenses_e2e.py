"""Every registered defense runs end to end for 2 rounds under a real mpiexec -n 3, and gives the
same final model as in one process."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from fdcr_mpi.defenses import available
from tests.test_mpi import final_sha, in_process_sha, launch, requires_mpi

SMALL = ["data.dataset=digits", "rounds=2", "train.local_epochs=1",
         "fisher.max_samples=32", "data.proxy_size=64"]


# DeepSight's 3 x 20,000 random inputs through every model each round cost minutes on a CPU: fewer here.
LIGHTER = {"deepsight": ["deepsight.num_samples=500"]}


@requires_mpi
@pytest.mark.slow
@pytest.mark.parametrize("defense", sorted(available()))
def test_defense_runs_two_rounds_under_mpiexec(tmp_path: Path, defense: str, capsys: pytest.CaptureFixture) -> None:
    args = ["run", *SMALL, f"defense.name={defense}", *LIGHTER.get(defense, []), "--quiet"]
    result = launch([*args, "--out", str(tmp_path)], 3, timeout=300)
    digest = final_sha(result)
    alone = in_process_sha([*args, "--out", str(tmp_path / "one")], capsys)
    assert alone == digest, f"{defense}: one process and mpiexec -n 3 differ"
    with h5py.File(tmp_path / "run.h5") as f:
        assert f.attrs["status"] == "complete" and f.attrs["final_sha256"] == digest
        assert f["rounds/round"][:].tolist() == [0, 1]
        alpha_hat = f["rounds/alpha_hat"][:]
        assert alpha_hat.shape == (2, 10) and np.all(np.isfinite(alpha_hat))
        assert np.all(np.isfinite(f["rounds/A"][:]))

"""A user's own defense and attack, registered from the user's module (docs/PLUGINS.md): the
example of the documentation itself, run as a user would."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import h5py
import yaml

from tests.test_mpi import FDCR, env, final_sha, launch, requires_mpi

DOC = Path(__file__).resolve().parents[1] / "docs" / "PLUGINS.md"
TINY = ["data.dataset=digits", "rounds=2", "train.local_epochs=1", "fisher.max_samples=16"]


def example(tmp_path: Path) -> Path:
    """The documentation's example module, written where a user would save it."""
    code = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(code) == 1
    path = tmp_path / "my_plugin.py"
    path.write_text(code[0])
    assert len(code[0].splitlines()) <= 45  # a short example
    return path


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(FDCR), *args], capture_output=True, text=True, timeout=300, env=env())


def test_the_documented_plugin_runs_lists_resumes_and_is_validated(tmp_path: Path) -> None:
    plugin = example(tmp_path)
    listed = run_cli("list", "defenses", "--plugin", str(plugin))
    assert listed.returncode == 0 and re.search(r"^  clipped_mean\s+updates clipped", listed.stdout, re.M)
    attacks = run_cli("list", "attacks", "--plugin", str(plugin))
    assert re.search(r"^flip\s+every label", attacks.stdout, re.M)
    out = tmp_path / "run"
    args = ["run", *TINY, "--plugin", str(plugin), "defense.name=clipped_mean", "clipped_mean.quantile=0.7",
            "attack.kind=flip", "--quiet", "--out", str(out)]
    done = run_cli(*args)
    digest = final_sha(done)
    with h5py.File(out / "run.h5") as f:
        config = yaml.safe_load(f.attrs["config"])
        assert config["plugins"] == [str(plugin)] and config["clipped_mean"] == {"quantile": 0.7}
        assert f["rounds/norm"].shape == (2, 10) and f.attrs["final_sha256"] == digest
        malicious = f["clients/malicious"][:]
    assert malicious.sum() == 3  # the attack has attackers
    resumed = run_cli("resume", str(out))  # imports the plugin again, from the stored config
    assert resumed.returncode == 0 and "already complete" in resumed.stdout
    bad = run_cli("run", *TINY, "--plugin", str(plugin), "defense.name=clipped_mean", "clipped_mean.quantile=2",
                  "--out", str(tmp_path / "bad"))
    assert bad.returncode == 2 and "clipped_mean.quantile" in bad.stderr and "Traceback" not in bad.stderr
    missing = run_cli("run", *TINY, "--plugin", str(tmp_path / "nowhere.py"), "--out", str(tmp_path / "x"))
    assert missing.returncode == 2 and "nowhere.py does not exist" in missing.stderr


@requires_mpi
def test_a_plugin_is_imported_on_every_rank(tmp_path: Path) -> None:
    plugin = example(tmp_path)
    args = ["run", *TINY, "--plugin", str(plugin), "defense.name=clipped_mean", "attack.kind=flip", "--quiet"]
    alone = final_sha(launch([*args, "--out", str(tmp_path / "one")], None))
    assert final_sha(launch([*args, "--out", str(tmp_path / "three")], 3)) == alone

"""The server's lazily imported libraries, imported on a background thread (fdcr_mpi.runtime.preload)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fdcr_mpi.defenses import create
from fdcr_mpi.runtime import preload


def test_nothing_to_import_starts_no_thread() -> None:
    assert preload.start([]) is None


def test_modules_are_imported_on_the_preload_thread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "fdcr_preload_probe.py").write_text(
        "import threading\nTHREAD = threading.current_thread().name\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "fdcr_preload_probe", raising=False)
    thread = preload.start(["fdcr_preload_no_such_module", "fdcr_preload_probe"])
    thread.join(timeout=60)
    assert not thread.is_alive() and thread.daemon
    # a missing module ends the thread quietly (the defense's own import reports it) and stops there
    assert "fdcr_preload_probe" not in sys.modules
    thread = preload.start(["fdcr_preload_probe"])
    thread.join(timeout=60)
    assert sys.modules["fdcr_preload_probe"].THREAD == "fdcr-preload"


@pytest.mark.parametrize(("name", "options", "modules"), [
    ("fdcr", {}, ("finch",)),
    ("fdcr", {"clustering": "kmeans"}, ("sklearn.cluster",)),
    ("fdcr", {"fcdc": False}, ()),
    ("flame", {}, ("sklearn.cluster",)),
    ("deepsight", {}, ("sklearn.cluster",)),
    ("signguard", {}, ("sklearn.cluster",)),
    ("fldetector", {}, ("sklearn.cluster",)),
    ("rflbat", {}, ("sklearn.cluster",)),
    ("fedavg", {}, ()),
    ("krum", {}, ()),
])
def test_each_defense_names_what_its_server_step_imports(name: str, options: dict, modules: tuple) -> None:
    assert create(name, **options).server_imports() == modules


def test_finch_imported_in_the_background_prints_nothing() -> None:
    """finch-clust warns at import when pynndescent is missing; the preload silences it."""
    code = textwrap.dedent("""
        from fdcr_mpi.runtime import preload
        preload.start(["finch"]).join()
        import sys
        assert "finch" in sys.modules
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stderr == "", done.stderr

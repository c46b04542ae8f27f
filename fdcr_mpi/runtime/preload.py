"""The server's lazily imported libraries, imported in the background while the first round trains.

Defenses import scikit-learn or FINCH inside their server step, so that the client ranks never
pay for them (about 1.5 s of CPU each on a 2-core box). The first round's defense step then
imported them on the round's critical path, every client rank waiting. ``start`` imports them
on a daemon thread of the server instead, as soon as the run is set up: under MPI the server
is otherwise idle while the clients train. The defense's own import later finds the module
imported, or waits for the thread to finish it (Python's import lock). Nothing computed changes.
"""

from __future__ import annotations

import importlib
import threading
import warnings
from collections.abc import Iterable

from fdcr_mpi.defenses.clustering import FINCH_IMPORT_WARNING


def _import_quietly(modules: tuple[str, ...]) -> None:
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - the defense's own import reports a missing library
            return


def start(modules: Iterable[str]) -> threading.Thread | None:
    """Import ``modules`` on a daemon thread (None when there is nothing to import). The warning
    finch-clust gives at import is silenced first, in the calling thread: warning filters are
    process-wide and ``warnings.catch_warnings`` is not thread-safe."""
    modules = tuple(modules)
    if not modules:
        return None
    warnings.filterwarnings("ignore", message=FINCH_IMPORT_WARNING, category=UserWarning)
    thread = threading.Thread(target=_import_quietly, args=(modules,), name="fdcr-preload", daemon=True)
    thread.start()
    return thread

"""Defenses: the registry, every defense module of this package, and ``aggregate``.

Importing this package imports ``base`` and then every module of the package (in sorted
order, modules whose name starts with ``_`` excepted), so a defense registers itself with
``@register("name")`` by merely existing as a file here: adding one needs no edit of this
file. A module that fails to import raises here, with its own traceback.
"""

from __future__ import annotations

import importlib
import pkgutil

from fdcr_mpi.defenses.api import AggregateResult, aggregate
from fdcr_mpi.defenses.base import Defense, RoundInputs, RoundResult, available, create, register


def import_submodules(package: str) -> list[str]:
    """Import every module of ``package`` (sorted, private ``_*`` skipped); return their names."""
    pkg = importlib.import_module(package)
    names = sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_"))
    for name in names:
        importlib.import_module(f"{package}.{name}")
    return names


import_submodules(__name__)

__all__ = [
    "AggregateResult",
    "Defense",
    "RoundInputs",
    "RoundResult",
    "aggregate",
    "available",
    "create",
    "import_submodules",
    "register",
]

"""A user's own defenses and attacks, in the user's own module (docs/PLUGINS.md).

A plugin is a module that registers classes with ``fdcr_mpi.defenses.register`` or
``fdcr_mpi.attacks.register`` when imported. A run names its plugins in the config's ``plugins``
list (or ``--plugin MODULE`` on the command line, which adds to it): each is an importable module
name or the path of a ``.py`` file, imported on every rank before the config is checked, so its
defense's options form a config section like any other. The list is stored with the run's
config, so ``resume`` imports the same modules; it is not part of the config hash.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from fdcr_mpi.errors import UserError


def import_plugins(names: list[str]) -> list[ModuleType]:
    """Import every plugin of ``names`` once (a module name, or a ``.py`` file); one sentence on failure."""
    return [_import(str(name)) for name in names]


def _import(name: str) -> ModuleType:
    path = Path(name).expanduser()
    try:
        if name.endswith(".py") or "/" in name:
            module_name = f"fdcr_plugin_{path.stem}"
            if module_name in sys.modules:
                return sys.modules[module_name]
            if not path.is_file():
                raise UserError(f"plugin file {path} does not exist")
            spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module
            spec.loader.exec_module(module)
            return module
        return importlib.import_module(name)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - a plugin's own error, named in one sentence
        sys.modules.pop(f"fdcr_plugin_{path.stem}", None)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"plugin {name!r} could not be imported ({type(exc).__name__}: {reason})") from None

"""Attacks: the protocol and registry (``base``), the Fisher forgeries (``forgery``) and one
module per attack; every module of this package registers itself by being imported here."""

from __future__ import annotations

from fdcr_mpi.attacks.base import Attack, available, create, register
from fdcr_mpi.defenses import import_submodules

import_submodules(__name__)

__all__ = ["Attack", "available", "create", "register"]

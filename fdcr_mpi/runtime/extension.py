"""Extending a run to more rounds (``fdcr-mpi resume DIR --rounds N``).

A run of R rounds extended to N > R rounds must end exactly where a fresh run of N rounds ends:
round t's computation depends on the config, the round index and the state after round t - 1,
never on how many rounds follow, except in a defense that treats the last round differently
(``Defense.uses_total_rounds``: CRFL adds no noise in its last round). Such a run can be
extended only while its last planned round is still to come.

The extended run takes the config hash of the longer config, as a fresh run of N rounds has.
The run file keeps a record of every extension (``extensions``: rounds before and after, the
earlier config hash, the rounds done, the time, the final sha256 it had), and the checkpoints
written under an earlier hash stay valid for this run (``RunFile.earlier_hashes``), so a job
preempted right after the extension resumes from them.
"""

from __future__ import annotations

from fdcr_mpi.config import BaseConfig, config_hash, validate
from fdcr_mpi.defenses import available
from fdcr_mpi.errors import UserError


def extended_config(config: BaseConfig, rounds: int, rounds_done: int, where: str) -> BaseConfig:
    """``config`` (the stored one, with ``rounds_done`` rows in ``where``) with ``rounds`` rounds.

    A UserError when ``rounds`` is not more than the stored rounds, or when the defense's last
    round differs and it is already done (the extended run could not equal a fresh one).
    """
    if rounds < config.rounds:
        raise UserError(f"{where} plans {config.rounds} rounds; --rounds {rounds} would shorten it, and a run "
                        "can only be extended (its first rounds do not depend on the total)")
    if rounds == config.rounds:
        return config
    defense = available().get(config.defense.name)
    if defense is not None and defense.uses_total_rounds and rounds_done >= config.rounds:
        raise UserError(f"{where} used defense {config.defense.name!r}, whose last round differs from the others, "
                        f"and its last round ({config.rounds}) is done: extended, it would not equal a fresh run "
                        f"of {rounds} rounds; start that run in a new --out directory")
    data = config.model_dump(mode="json")
    data["rounds"] = rounds
    return validate(data)  # the bounds of ``rounds`` (a UserError beyond them)


def differs_only_in_rounds(stored: BaseConfig, config: BaseConfig) -> bool:
    """Whether two configs are the same run but for ``rounds`` (their hashes then differ only by it)."""
    return config_hash(stored.model_copy(update={"rounds": config.rounds})) == config_hash(config)

"""The one exception type for user errors: bad config, missing data, wrong checkpoint, bad launch.

The command line turns a ``UserError`` into one sentence on stderr and exit code 2, never a
traceback. Anything else that escapes is a bug and is reported as such.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in what the user asked for, explained in one sentence (exit code 2 by default)."""

    exit_code = 2

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class Preempted(Exception):
    """The run stopped on SIGTERM/SIGUSR1 after leaving a consistent checkpoint."""

    exit_code = 75  # EX_TEMPFAIL: SLURM's --requeue can tell it from a crash


def describe_validation_error(exc: Exception, prefix: str = "") -> str:
    """One sentence for the first problem in a pydantic ``ValidationError``.

    Names the dotted key (with ``prefix``), the bad value and, where the schema lists
    them, the valid choices; an unknown key names the known ones when given in the context.
    """
    errors = exc.errors()  # type: ignore[attr-defined]
    first = errors[0]
    loc = ".".join(str(p) for p in (prefix, *first.get("loc", ())) if p != "")
    kind = first.get("type", "")
    value = first.get("input")
    if kind == "extra_forbidden":
        return f"unknown config key '{loc}'"
    if kind == "missing":
        return f"config key '{loc}' is required"
    if kind in ("literal_error", "enum"):
        expected = first.get("ctx", {}).get("expected", "")
        return f"config key '{loc}' has the invalid value {value!r}; choose one of: {expected}"
    msg = first.get("msg", "invalid value")
    return f"config key '{loc}' has the invalid value {value!r}: {msg[0].lower() + msg[1:]}"

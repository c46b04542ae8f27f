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


def describe_validation_error(exc: Exception, prefix: str = "", schema: type | None = None) -> str:
    """One sentence for the first problem in a pydantic ``ValidationError``.

    Names the dotted key (with ``prefix``), the bad value and, where the schema lists
    them, the valid choices; an unknown key gets the closest known key of ``schema`` (the
    pydantic model that was validated), if one is close.
    """
    errors = exc.errors()  # type: ignore[attr-defined]
    first = errors[0]
    union = union_members(errors)
    if union is not None:  # a key that takes one of several types (a number or 'auto'): one sentence for all
        loc = ".".join(str(p) for p in (prefix, *first["loc"][:-1]) if p != "")
        wanted = " or ".join(e["msg"].split(",")[0].removeprefix("Input should be ") for e in union)
        return f"config key '{loc}' has the invalid value {first.get('input')!r}: it should be {wanted}"
    parts = [str(p) for p in (prefix, *first.get("loc", ())) if p != ""]
    loc = ".".join(parts)
    kind = first.get("type", "")
    value = first.get("input")
    if kind == "extra_forbidden":
        path = [str(p) for p in first.get("loc", ())]
        close = closest_key(schema, path) if schema is not None else None
        hint = f"; did you mean '{'.'.join([*parts[:-1], close])}'?" if close else ""
        return f"unknown config key '{loc}'{hint}"
    if kind == "missing":
        return f"config key '{loc}' is required"
    if kind in ("literal_error", "enum"):
        expected = first.get("ctx", {}).get("expected", "")
        return f"config key '{loc}' has the invalid value {value!r}; choose one of: {expected}"
    msg = first.get("msg", "invalid value")
    return f"config key '{loc}' has the invalid value {value!r}: {msg[0].lower() + msg[1:]}"


def union_members(errors: list[dict]) -> list[dict] | None:
    """The errors of one key whose type is a union (pydantic tags each member's error with the
    member as a last location part: ``int``, ``literal['auto']``), or None when they are not that."""
    locs = [tuple(e.get("loc", ())) for e in errors]
    if len(errors) < 2 or any(len(loc) < 2 or loc[:-1] != locs[0][:-1] for loc in locs):
        return None
    def is_member(part: object) -> bool:
        return part in ("int", "float", "str", "bool") or (isinstance(part, str) and not part.isidentifier())

    return errors if all(is_member(loc[-1]) for loc in locs) else None


def closest_key(schema: type, path: list[str]) -> str | None:
    """The field of ``schema`` at ``path[:-1]`` whose name is closest to ``path[-1]`` (a typo's
    likely meaning), or None when no field is close (difflib's ratio >= 0.6)."""
    import difflib

    model = schema
    for part in path[:-1]:
        field = getattr(model, "model_fields", {}).get(part)
        model = field.annotation if field is not None else None
        if not hasattr(model, "model_fields"):
            return None
    close = difflib.get_close_matches(path[-1], list(getattr(model, "model_fields", ())), n=1)
    return close[0] if close else None

"""A name -> class table filled by a class decorator: the registries of defenses and attacks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Classes of one kind (``defense``, ``attack``) by the name a config uses for them."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.classes: dict[str, type[T]] = {}

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        """Class decorator: make the class available as ``name`` (and set its ``name``)."""

        def wrap(cls: type[T]) -> type[T]:
            if name in self.classes:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            cls.name = name  # type: ignore[attr-defined]
            self.classes[name] = cls
            return cls

        return wrap

    def available(self) -> dict[str, type[T]]:
        """The registered classes by name, sorted."""
        return dict(sorted(self.classes.items()))

    def choices(self) -> str:
        """The registered names, sorted, for an error message."""
        return ", ".join(sorted(self.classes))

"""Registries: one per concept (scorers, policies, objectives, architectures, ...).

Filled by a decorator that works bare or with ``key=``; read by ``get``. Each entry carries a
one-line summary (the docstring's first line unless given) and an optional paper reference,
so the CLI can list and describe them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

from .errors import DfkdError


@dataclass(frozen=True)
class Entry:
    key: str
    obj: Any
    summary: str
    paper: str = ""


class Registry:
    """A named table of callables; ``@REG.register`` or ``@REG.register(key=..., paper=...)``."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def register(self, obj: Any = None, *, key: str | None = None, summary: str | None = None,
                 paper: str = "") -> Any:
        def add(o: Any) -> Any:
            name = key or o.__name__
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            text = summary or next(iter((o.__doc__ or "").strip().splitlines()), "")
            if not text:
                raise ValueError(f"{self.kind} {name!r} needs a summary or a docstring")
            self._entries[name] = Entry(name, o, text, paper)
            return o

        return add(obj) if obj is not None else add

    def entry(self, key: str) -> Entry:
        try:
            return self._entries[key]
        except KeyError:
            known = ", ".join(sorted(self._entries)) or "(none)"
            raise DfkdError(f"unknown {self.kind} {key!r}; known: {known}") from None

    def get(self, key: str) -> Any:
        return self.entry(key).obj

    def keys(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __iter__(self) -> Iterator[Entry]:
        return iter(self._entries[k] for k in self.keys())

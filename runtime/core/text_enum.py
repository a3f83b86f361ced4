"""Enums whose members are their words: they compare equal to, print as and serialise as plain strings
(enum.StrEnum from Python 3.11, written out here because nodes may run Python 3.10)."""

from __future__ import annotations

from enum import Enum


class TextEnum(str, Enum):
    def __str__(self) -> str:
        return str.__str__(self)

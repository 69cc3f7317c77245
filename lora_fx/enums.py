"""Parsing user-facing spellings (CLI flags, JSON, keyword strings) into the enums the code switches on."""

from __future__ import annotations

import enum
from typing import TypeVar

from lora_fx.errors import ConfigError

E = TypeVar("E", bound=enum.Enum)


def parse_enum(cls: type[E], value: object, error: str) -> E:
    """``value`` as a member of ``cls`` (a member, or its value spelled in any case); else ``ConfigError(error)``."""
    if isinstance(value, cls):
        return value
    if isinstance(value, str):
        for member in cls:
            if member.value == value.lower():
                return member
    raise ConfigError(error)

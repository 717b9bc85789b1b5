"""Byte counts as people write them, for flags and for the tenants file."""

from __future__ import annotations

import re

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_bytes(text: str) -> int:
    """A positive byte count, optionally with a binary suffix: ``1048576``, ``512M``, ``8GiB``;
    raises ``ValueError`` otherwise."""
    match = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(?:I?B)?\s*", text, re.IGNORECASE)
    if match is None or int(match[1]) == 0:
        raise ValueError(f"expected a positive byte count like 1048576, 512M or 8G, got "
                         f"{text!r:.40}")
    return int(match[1]) * _UNITS[match[2].upper()]

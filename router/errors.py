"""Errors of the router package.

Hierarchy::

    RouterError
    ├── InvalidExpertTable (also a ValueError)   an expert table that fails validation;
    │                                            ``path`` names the offending field
    │                                            (``"experts[2].keywords[0].pattern"``),
    │                                            ``problem`` says what is wrong with it
    └── EncoderClosed                            ``embed`` after ``Encoder.aclose()``
"""
from __future__ import annotations


class RouterError(Exception):
    """Base class of every error raised by the router package."""


class InvalidExpertTable(RouterError, ValueError):
    """An expert table (or one of its parts) does not validate."""

    def __init__(self, path: str, problem: str) -> None:
        self.path = path
        self.problem = problem
        super().__init__(f"{path}: {problem}" if path else problem)

    def under(self, prefix: str) -> InvalidExpertTable:
        """The same error with ``prefix`` prepended to its path (for nested validation)."""
        return InvalidExpertTable(f"{prefix}.{self.path}" if self.path else prefix, self.problem)


class EncoderClosed(RouterError):
    """The encoder was closed; it encodes nothing more."""

"""Errors raised by the ``adapters`` package.

Hierarchy::

    AdaptersError                 base of everything below
    ├── InvalidPackage            any failure to open or inspect a TSSP package. Deliberately
    │                             opaque: ``str(err)`` is always "invalid package" so that no
    │                             caller can leak which check failed (an oracle for forgers).
    │                             ``.check`` names the stage that failed (one of ``CHECKS``,
    │                             usable as an internal metrics label) and ``.reason`` says why;
    │                             both are for logs only and must never be shown to a client.
    ├── InvalidAdapter            a PEFT adapter or package metadata that we refuse, with a
    │                             specific message a person can act on (``.problem``); raised
    │                             at pack time and by ``validate_adapter``.
    ├── BaseModelConfigError      a base model config (HF ``config.json``) lacks what we need.
    ├── KeyFileError              a key file or key bytes cannot be read, written or trusted
    │                             (``.path`` when a file is involved).
    └── UsageError                a command-line file or argument problem (CLI exit code 2).
"""
from __future__ import annotations

import logging
from pathlib import Path

_log = logging.getLogger("adapters.package")

__all__ = [
    "AdaptersError",
    "InvalidPackage",
    "InvalidAdapter",
    "BaseModelConfigError",
    "KeyFileError",
    "UsageError",
]


class AdaptersError(Exception):
    """Base class of every error raised by ``adapters``."""


class InvalidPackage(AdaptersError):
    """A package failed a check. The message is the same for every failure."""

    MESSAGE = "invalid package"
    CHECKS = ("bounds", "signature", "manifest", "adapter", "recipient", "unwrap", "decrypt",
              "digest", "payload")

    def __init__(self, check: str, reason: str) -> None:
        super().__init__(self.MESSAGE)
        self.check = check
        self.reason = reason
        _log.info("TSSP package rejected at %s check: %s", check, reason)

    def __str__(self) -> str:
        return self.MESSAGE


class InvalidAdapter(AdaptersError):
    """An adapter (config, tensors or metadata) we refuse; the message names the problem."""

    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem


class BaseModelConfigError(AdaptersError):
    """A base model configuration lacks a field we need or holds an impossible value."""

    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem


class KeyFileError(AdaptersError):
    """A key (file or bytes) cannot be read, parsed, written or matched."""

    def __init__(self, problem: str, path: Path | None = None) -> None:
        super().__init__(f"{path}: {problem}" if path is not None else problem)
        self.problem = problem
        self.path = path


class UsageError(AdaptersError):
    """A file or argument given on the command line cannot be used."""

"""Errors of the worker's own HTTP edge (what the backend refuses travels as
:mod:`gateway.backends.errors`, see ``wire``).

Hierarchy::

    WorkerError
    └── BodyTooLarge     a request body past its limit (413)
"""
from __future__ import annotations


class WorkerError(Exception):
    pass


class BodyTooLarge(WorkerError):
    def __init__(self, limit: int, size: int | None = None) -> None:
        self.limit = limit
        self.size = size
        said = f"of {size} bytes " if size is not None else ""
        super().__init__(f"request body {said}exceeds the limit of {limit} bytes")

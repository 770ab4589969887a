"""How much each adapter is asked for lately: a count per adapter that halves every
``half_life_s``. The device tier evicts the coldest idle adapter rather than the least recent
one (on a Zipf stream over more adapters than slots this keeps the popular ones resident and
rotates the rare ones through the remaining slots), and the gateway's dispatch reads it to
prefer evicting a cold adapter on one backend over a warm one on another."""
from __future__ import annotations

import math
import time
from collections.abc import Callable


class Heat:
    """Decayed request counts, kept lazily: an entry decays when it is read or added to."""

    def __init__(self, half_life_s: float = 10.0, clock: Callable[[], float] = time.monotonic,
                 max_entries: int = 100_000) -> None:
        self.half_life_s = half_life_s
        self._clock = clock
        self.max_entries = max_entries
        self._heat: dict[str, tuple[float, float]] = {}  # adapter -> (value, as of)

    def of(self, adapter: str) -> float:
        entry = self._heat.get(adapter)
        if entry is None:
            return 0.0
        value, at = entry
        return value * 0.5 ** ((self._clock() - at) / self.half_life_s)

    def rate(self, adapter: str) -> float:
        """Requests per second lately (a decayed count over its mean age, ``half_life_s / ln 2``)."""
        return self.of(adapter) * math.log(2) / self.half_life_s

    def add(self, adapter: str) -> None:
        if len(self._heat) >= self.max_entries and adapter not in self._heat:
            self._heat = {a: (self.of(a), self._clock()) for a in self._heat if self.of(a) > 0.01}
        self._heat[adapter] = (self.of(adapter) + 1.0, self._clock())



"""A circuit breaker per backend: closed while it answers; open after ``failures`` failures in a
row (no request is sent to it); half-open after ``cooldown_s``, when one probe at a time may go
through, and the first success closes it again (a failure reopens it for another cool-down).
Time is injected, so tests need not sleep."""
from __future__ import annotations

import time
from collections.abc import Callable

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


class Breaker:
    def __init__(self, failures: int = 3, cooldown_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.threshold = failures
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._failures = 0
        self._opened_at: float | None = None
        self._probing = False

    @property
    def state(self) -> str:
        if self._opened_at is None:
            return CLOSED
        return HALF_OPEN if self._clock() - self._opened_at >= self.cooldown_s else OPEN

    def allows(self) -> bool:
        """Whether a request may be sent now (half-open: only while no probe is out)."""
        state = self.state
        return state == CLOSED or (state == HALF_OPEN and not self._probing)

    def sent(self) -> None:
        """A request goes out; in the half-open state it is the probe."""
        if self.state == HALF_OPEN:
            self._probing = True

    def success(self) -> None:
        self._failures = 0
        self._opened_at = None
        self._probing = False

    def failure(self) -> None:
        self._probing = False
        self._failures += 1
        if self._opened_at is not None or self._failures >= self.threshold:
            self._opened_at = self._clock()

    def cancelled(self) -> None:
        """A probe that ended without telling either way (the client left): another may go."""
        self._probing = False

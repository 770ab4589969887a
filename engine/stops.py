"""Stop strings over streamed text: text that could still become a stop string is held back,
so a client never sees a partial stop sequence."""
from __future__ import annotations

from collections.abc import Sequence


class StopMatcher:
    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self._pending = ""

    def feed(self, text: str, active: bool = True) -> tuple[str, bool]:
        """Add generated text; return (text safe to emit now, whether a stop string was hit).
        On a hit, the emitted text ends right before the stop string. While not ``active``
        (before a request's ``min_tokens``), stop strings are not looked for."""
        if not self.stops:
            return text, False
        if not active:
            out, self._pending = self._pending + text, ""
            return out, False
        buf = self._pending + text
        cut = min((i for i in (buf.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self._pending = ""
            return buf[:cut], True
        keep = self._held(buf)
        self._pending = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep], False

    def _held(self, buf: str) -> int:
        """Length of the longest suffix of buf that is a proper prefix of some stop string."""
        for n in range(min(self.hold, len(buf)), 0, -1):
            tail = buf[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0

    def flush(self) -> str:
        """Text held back when generation ends for another reason."""
        out, self._pending = self._pending, ""
        return out

"""The gateway's queue in front of one backend: at most ``capacity`` requests hold one of its
sequence slots at a time, the rest wait here, first come first served, so the backend's own
queue stays empty and the order of service is the gateway's to decide. A waiter that is
cancelled (its client left, its deadline passed) leaves the queue at once; a slot given up
goes straight to the next waiter."""
from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator


class QueueFull(Exception):
    """The queue already holds ``limit`` waiters."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        super().__init__(f"{limit} requests already waiting")


class SlotQueue:
    def __init__(self, capacity: int, limit: int) -> None:
        self.capacity = capacity  # sequence slots this gateway may fill
        self.limit = limit  # waiters beyond which a request is refused at once
        self.holders = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def free(self) -> int:
        return max(0, self.capacity - self.holders)

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        await self.acquire()
        try:
            yield
        finally:
            self.release()

    def try_acquire(self) -> bool:
        """Take a slot at once if one is free and nobody waits for it."""
        if self.holders < self.capacity and not self._waiters:
            self.holders += 1
            return True
        return False

    async def acquire(self) -> None:
        if self.try_acquire():
            return
        if len(self._waiters) >= self.limit:
            raise QueueFull(self.limit)
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self.release()  # the slot came just as the waiter gave up: pass it on
            else:
                self._waiters.remove(waiter)
            raise

    def release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot changes hands: holders stays the same
                return
        self.holders -= 1

    def resize(self, capacity: int) -> None:
        """The backend reported another number of slots; waiters move up if there is room."""
        self.capacity = capacity
        while self._waiters and self.holders < self.capacity:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.holders += 1
                waiter.set_result(None)

"""The gateway's queue in front of one backend: at most ``capacity`` requests hold one of its
sequence slots at a time, the rest wait here, so the backend's own queue stays empty and the
order of service is the gateway's to decide.

``fair`` (the default) is a work-conserving fair queue over tenants after the Virtual Token
Counter (Sheng et al., "Fairness in Serving Large Language Models", OSDI '24): each tenant has
a counter charged the service it receives here, its input tokens when a request takes a slot
and its output tokens (times ``output_weight``) as they are generated, divided by its weight;
a freed slot goes to the oldest request of the waiting tenant with the smallest counter. A
tenant that starts waiting again is lifted to the smallest counter among those waiting (to
the last served one's when none waits), so time spent idle earns no credit. A tenant's own
requests keep their order, and a free slot is taken at once by anyone. ``fcfs`` serves in
arrival order. A waiter that is cancelled (its client left, its deadline passed) leaves the
queue at once; a slot given up goes straight to the next waiter.
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools


class QueueFull(Exception):
    """The queue already holds ``limit`` waiters."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        super().__init__(f"{limit} requests already waiting")


@dataclasses.dataclass(eq=False)
class _Waiter:
    future: asyncio.Future[None]
    tenant: str
    weight: float
    seq: int


class SlotQueue:
    def __init__(self, capacity: int, limit: int, *, fair: bool = True, output_weight: float = 2.0) -> None:
        self.capacity = capacity  # sequence slots this gateway may fill
        self.limit = limit  # waiters beyond which a request is refused at once
        self.fair = fair
        self.output_weight = output_weight
        self.holders = 0
        self.counters: dict[str, float] = {}  # tenant -> weighted service received here
        self._queues: dict[str, collections.deque[_Waiter]] = {}  # backlogged tenant -> its waiters, oldest first
        self._waiting = 0
        self._last_served = 0.0
        self._seq = itertools.count()

    @property
    def waiting(self) -> int:
        return self._waiting

    def free(self) -> int:
        return max(0, self.capacity - self.holders)

    # ---- charging ---------------------------------------------------------------------------------
    def charge(self, tenant: str, weight: float, input_tokens: int = 0, output_tokens: int = 0) -> None:
        """Service ``tenant`` received: tokens read and tokens generated."""
        self.counters[tenant] = self.counters.get(tenant, 0.0) + (
            input_tokens + self.output_weight * output_tokens) / weight

    # ---- slots ------------------------------------------------------------------------------------
    def try_acquire(self) -> bool:
        """Take a slot at once if one is free and nobody waits for it."""
        if self.holders < self.capacity and not self._waiting:
            self.holders += 1
            return True
        return False

    async def acquire(self, tenant: str = "", weight: float = 1.0) -> None:
        if self.try_acquire():
            return
        if self._waiting >= self.limit:
            raise QueueFull(self.limit)
        key = tenant if self.fair else ""
        waiter = _Waiter(asyncio.get_running_loop().create_future(), key, weight, next(self._seq))
        queue = self._queues.get(key)
        if queue is None:
            if self.fair:
                self._lift(key)
            queue = self._queues[key] = collections.deque()
        queue.append(waiter)
        self._waiting += 1
        try:
            await waiter.future
        except BaseException:
            if waiter.future.done() and not waiter.future.cancelled():
                self.release()  # the slot came just as the waiter gave up: pass it on
            else:
                self._leave(waiter)
            raise

    def _lift(self, tenant: str) -> None:
        """No credit for time spent idle: start at the smallest counter among those waiting."""
        floor = min((self.counters.get(t, 0.0) for t in self._queues), default=self._last_served)
        self.counters[tenant] = max(self.counters.get(tenant, 0.0), floor)

    def _leave(self, waiter: _Waiter) -> None:
        queue = self._queues.get(waiter.tenant)
        if queue is not None and waiter in queue:
            queue.remove(waiter)
            self._waiting -= 1
            if not queue:
                del self._queues[waiter.tenant]

    def _next(self) -> _Waiter | None:
        if not self._queues:
            return None
        tenant = min(self._queues, key=lambda t: (self.counters.get(t, 0.0), self._queues[t][0].seq))
        queue = self._queues[tenant]
        waiter = queue.popleft()
        self._waiting -= 1
        if not queue:
            del self._queues[tenant]
        self._last_served = self.counters.get(tenant, 0.0)
        return waiter

    def release(self) -> None:
        while (waiter := self._next()) is not None:
            if not waiter.future.done():
                waiter.future.set_result(None)  # the slot changes hands: holders stays the same
                return
        self.holders -= 1

    def resize(self, capacity: int) -> None:
        """The backend reported another number of slots; waiters move up if there is room."""
        self.capacity = capacity
        while self.holders < self.capacity and (waiter := self._next()) is not None:
            if not waiter.future.done():
                self.holders += 1
                waiter.future.set_result(None)

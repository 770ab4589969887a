"""Which backend of a pool serves a request: three policies over one snapshot of the fleet.

Every policy sees the same ``BackendView`` per candidate: what the backends report, refreshed
on the same interval, and what this gateway holds and queues on each, as it is now (so a
burst between two refreshes does not all land on one backend). It returns a ``Choice``: the
backend and why it was chosen (the ``reason`` label of ``tensafe_dispatch_total``).

``affinity`` (the default) estimates the milliseconds before the request's first token on
each backend and takes the smallest::

    cost(b) = wait(b) + load(b) + harm(b) + evict(b)
    wait(b) = max(0, running_b + waiting_b + 1 - seqs_b) / seqs_b * service_ms_b
    load(b) = 0                                   the adapter is resident on b
            = load_ms(tier) / 2                   it is loading there (half done, on average)
            = load_ms(tier) + slot_wait(b)        otherwise: a load from the tier it is in
    slot_wait(b) = 0 while fewer adapters than b has slots are held by requests there (an idle
                   resident adapter is evicted if need be), else the wait until the first held
                   adapter is let go: for one held by k requests and asked for r times a
                   second, service_ms_b * k / (k + 1) * (1 + r * service_s_b) (its last request
                   ends after k/(k+1) of a service, on average, unless another arrives first: a
                   hot adapter is hardly ever let go); a request dispatched for a cold adapter
                   holds its slot before its load shows in any snapshot
    harm(b) = load(b) * running_b / seqs_b        a load stalls the sequences running on b
    evict(b) = 2 * load_ms(cpu) * h / (h + 1)     when the load evicts (no slot is free of
                   resident, loading and held adapters): h is the heat (recent requests,
                   fleet-wide, halving every 10 s) of the idle adapter b would evict, its
                   coldest; a warm one is likely wanted again soon (a reload), a cold one is
                   not, so the fleet's slots keep the popular adapters across backends

``running``/``waiting`` are the backend's sequences running and waiting (the gateway's own
queue for it included; what this gateway holds there counts as it is now, not as of the
snapshot), ``seqs`` its
sequence slots, ``service_ms`` how long a request holds a slot there (measured), and
``load_ms(tier)`` the measured time to bring an adapter from the CPU tier (``cpu``) or from
disk (``disk``) into a slot. Ties go to the backend with fewer of this gateway's dispatches
since the snapshot (``own``: a burst between two snapshots spreads), then at random.
What the backends report (capacity, residency) is as of the last snapshot; what this gateway
itself holds or queues on each backend (requests per adapter, the idle adapters' last use) is
current.

``gie`` is the choice of the Gateway API Inference Extension (kubernetes-sigs/
gateway-api-inference-extension, ``pkg/epp/scheduling/framework/plugins/scorer/
lora_affinity.go`` and ``queue.go``): LoRA affinity 1.0 when the adapter has running
requests on the backend, else 0.8 when the backend's active plus waiting adapters are fewer
than its adapter slots, else 0.6 when the adapter has waiting requests there, else 0; plus
the queue score ``(max_q - q) / (max_q - min_q)`` over the candidates (1.0 when all queues
are equal); equal weights, the highest sum wins, ties at random. ``round_robin`` takes the
candidates in turn.
"""
from __future__ import annotations

import dataclasses
import itertools
import random
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

EVICT_WEIGHT = 2.0
REASONS = ("resident", "free_slot", "loading", "replica", "failover", "only_choice")


@dataclasses.dataclass(frozen=True, slots=True)
class BackendView:
    """One backend as a policy sees it: the last snapshot plus this gateway's dispatches since."""

    name: str
    sequence_slots: int
    running: int  # sequences generating
    waiting: int  # sequences waiting for a slot, in the gateway's queue for it or its own
    adapter_slots: int
    free_adapter_slots: int
    resident: frozenset[str] = frozenset()  # adapters in its slots
    loading: frozenset[str] = frozenset()  # adapters being loaded into its slots
    running_adapters: frozenset[str] = frozenset()  # adapters with running requests
    waiting_adapters: frozenset[str] = frozenset()  # adapters with waiting requests
    holders: Mapping[str, int] = dataclasses.field(default_factory=dict)  # adapter -> requests running or waiting
    own: int = 0  # this gateway's dispatches since the snapshot
    service_ms: float = 1000.0  # how long a request holds a sequence slot here
    victim_heat: float = 0.0  # recent requests for the idle adapter a load would evict (fleet-wide)
    rates: Mapping[str, float] = dataclasses.field(default_factory=dict)  # held adapter -> requests per second

    @property
    def held(self) -> frozenset[str]:
        """Adapters that requests here hold (running or waiting for a slot)."""
        return frozenset(a for a, n in self.holders.items() if n > 0 and a)

    @property
    def idle_resident(self) -> int:
        """Resident adapters no request holds (a load may evict one)."""
        return len(self.resident - self.held)

    @property
    def free_slots(self) -> int:
        """Adapter slots neither taken (resident, loading) nor claimed by a held request."""
        return max(0, self.adapter_slots - len(self.resident | self.loading | self.held))

    @property
    def queue(self) -> int:
        return self.waiting


@dataclasses.dataclass(frozen=True, slots=True)
class Ask:
    """What is dispatched: the adapter (None: the base model) and where it is now."""

    adapter: str | None
    tier: str = "disk"  # "device" (in some backend's slot), "cpu" or "disk"


@dataclasses.dataclass(frozen=True, slots=True)
class LoadCosts:
    """Measured milliseconds to bring an adapter into a slot from the CPU tier or from disk."""

    cpu_ms: float = 2.0
    disk_ms: float = 20.0

    def of(self, tier: str) -> float:
        return self.disk_ms if tier == "disk" else self.cpu_ms  # "device": another backend's; from CPU here


@dataclasses.dataclass(frozen=True, slots=True)
class Choice:
    backend: str
    reason: str


class Policy(Protocol):
    name: str

    def choose(self, ask: Ask, candidates: Sequence[BackendView], costs: LoadCosts) -> Choice:
        """``candidates`` is never empty."""


def reason_for(ask: Ask, chosen: BackendView, candidates: Sequence[BackendView]) -> str:
    """Why ``chosen`` serves ``ask``, for the metrics."""
    if len(candidates) == 1:
        return "only_choice"
    if ask.adapter is None or ask.adapter in chosen.resident:
        return "resident"
    if ask.adapter in chosen.loading:
        return "loading"
    if any(ask.adapter in c.resident or ask.adapter in c.loading for c in candidates):
        return "replica"  # an extra copy: its backend(s) cost more than a load here
    return "free_slot"


class AffinityPolicy:
    """The cost model in the module docstring."""

    name = "affinity"

    def __init__(self, rng: random.Random | None = None) -> None:
        self.rng = rng or random.Random()

    @staticmethod
    def wait_ms(b: BackendView) -> float:
        ahead = b.running + b.waiting + 1 - b.sequence_slots
        return max(0, ahead) / b.sequence_slots * b.service_ms

    @staticmethod
    def load_ms(ask: Ask, b: BackendView, costs: LoadCosts) -> float:
        if ask.adapter is None or ask.adapter in b.resident:
            return 0.0
        if ask.adapter in b.loading:
            return costs.of(ask.tier) / 2
        return costs.of(ask.tier) + AffinityPolicy.slot_wait_ms(b)

    @staticmethod
    def slot_wait_ms(b: BackendView) -> float:
        held = b.held
        if len(held) < b.adapter_slots:
            return 0.0
        service_s = b.service_ms / 1000
        return min(b.service_ms * b.holders[a] / (b.holders[a] + 1) * (1 + b.rates.get(a, 0.0) * service_s)
                   for a in held)

    @staticmethod
    def evict_ms(ask: Ask, b: BackendView, costs: LoadCosts) -> float:
        if ask.adapter is None or ask.adapter in b.resident or ask.adapter in b.loading or b.free_slots > 0:
            return 0.0
        return costs.cpu_ms * EVICT_WEIGHT * b.victim_heat / (b.victim_heat + 1)

    def cost(self, ask: Ask, b: BackendView, costs: LoadCosts) -> float:
        load = self.load_ms(ask, b, costs)
        return self.wait_ms(b) + load + load * b.running / b.sequence_slots + self.evict_ms(ask, b, costs)

    def choose(self, ask: Ask, candidates: Sequence[BackendView], costs: LoadCosts) -> Choice:
        scored = [(self.cost(ask, b, costs), b.own, self.rng.random(), b) for b in candidates]
        chosen = min(scored, key=lambda s: s[:3])[3]
        return Choice(chosen.name, reason_for(ask, chosen, candidates))


class GiePolicy:
    """The Gateway API Inference Extension's LoRA-affinity and queue scorers, summed."""

    name = "gie"

    def __init__(self, rng: random.Random | None = None) -> None:
        self.rng = rng or random.Random()

    @staticmethod
    def lora_score(ask: Ask, b: BackendView) -> float:
        if ask.adapter is None:
            return 1.0  # the base model is active everywhere
        if ask.adapter in b.running_adapters:
            return 1.0
        if len(b.running_adapters) + len(b.waiting_adapters) < b.adapter_slots:
            return 0.8
        if ask.adapter in b.waiting_adapters:
            return 0.6
        return 0.0

    @staticmethod
    def queue_scores(candidates: Sequence[BackendView]) -> list[float]:
        queues = [b.queue for b in candidates]
        low, high = min(queues), max(queues)
        if high == low:
            return [1.0] * len(candidates)
        return [(high - q) / (high - low) for q in queues]

    def choose(self, ask: Ask, candidates: Sequence[BackendView], costs: LoadCosts) -> Choice:
        totals = [self.lora_score(ask, b) + q for b, q in zip(candidates, self.queue_scores(candidates))]
        best = max(totals)
        chosen = self.rng.choice([b for b, t in zip(candidates, totals) if t == best])
        return Choice(chosen.name, reason_for(ask, chosen, candidates))


class RoundRobinPolicy:
    name = "round_robin"

    def __init__(self, rng: random.Random | None = None) -> None:
        self._turn = itertools.count()

    def choose(self, ask: Ask, candidates: Sequence[BackendView], costs: LoadCosts) -> Choice:
        ordered = sorted(candidates, key=lambda b: b.name)
        chosen = ordered[next(self._turn) % len(ordered)]
        return Choice(chosen.name, reason_for(ask, chosen, candidates))


POLICIES: dict[str, Callable[..., Policy]] = {p.name: p for p in (AffinityPolicy, GiePolicy, RoundRobinPolicy)}

"""The worker's Prometheus metrics under vLLM's names, so whatever reads a vLLM server's
metrics (autoscalers, routers that follow adapter residency, dashboards) reads a worker's.

The gauges are read at scrape time from their owners: slots and queue from the backend's
capacity, which adapters the requests in flight use from the ``Requests`` book the generate
route keeps. Our KV cache gives each sequence slot a whole context, so its usage is the share
of slots in use.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from ..backends.base import Backend

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclasses.dataclass(slots=True)
class _Entry:
    adapter_id: str | None
    running: bool = False


class Requests:
    """The generations in flight here: each waits until its first chunk, then runs. Owned by the
    event loop (only its coroutines touch it)."""

    def __init__(self) -> None:
        self._entries: dict[int, _Entry] = {}
        self._next = 0

    def enter(self, adapter_id: str | None) -> int:
        self._next += 1
        self._entries[self._next] = _Entry(adapter_id)
        return self._next

    def running(self, handle: int) -> None:
        self._entries[handle].running = True

    def leave(self, handle: int) -> None:
        self._entries.pop(handle, None)

    def adapters(self, running: bool) -> list[str]:
        return sorted({e.adapter_id for e in self._entries.values() if e.running is running and e.adapter_id})


class VllmCollector(Collector):
    def __init__(self, backend: Backend, requests: Requests, model: Callable[[], str],
                 clock: Callable[[], float] = time.time) -> None:
        self.backend = backend
        self.requests = requests
        self.model = model
        self.clock = clock

    def collect(self) -> Iterator[Any]:
        c = self.backend.capacity()
        running = c.max_sequence_slots - c.free_sequence_slots
        labels = [self.model()]
        for name, value, help_text in (
            ("num_requests_running", running, "Number of requests in model execution batches."),
            ("num_requests_waiting", c.queue_depth, "Number of requests waiting to be processed."),
            ("kv_cache_usage_perc", running / c.max_sequence_slots if c.max_sequence_slots else 0.0,
             "KV-cache usage. 1 means 100 percent usage."),
        ):
            family = GaugeMetricFamily(f"vllm:{name}", help_text, labels=("model_name",))
            family.add_metric(labels, value)
            yield family
        info = GaugeMetricFamily("vllm:lora_requests_info", "Running stats on lora requests.",
                                 labels=("running_lora_adapters", "waiting_lora_adapters", "max_lora"))
        info.add_metric([",".join(self.requests.adapters(running=True)),
                         ",".join(self.requests.adapters(running=False)), str(c.max_adapter_slots)], self.clock())
        yield info


class WorkerMetrics:
    def __init__(self, collector: Collector) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(collector)

    def render(self) -> bytes:
        return generate_latest(self.registry)

"""Run the app on uvicorn with our logging and a graceful drain on SIGTERM: uvicorn stops
accepting, lets in-flight streams finish for up to ``drain_timeout_s``, then the lifespan
shuts the backend down. The gateway's app is imported only by ``run``: ``tensafe worker``
serves its own app through the same ``serve_app``."""
from __future__ import annotations

import gc
import logging
import queue
import sys
from collections.abc import Callable
from logging.handlers import QueueHandler, QueueListener
from typing import TYPE_CHECKING, Any

import uvicorn

from .http_protocol import GatewayHttpProtocol
from .settings import Settings

if TYPE_CHECKING:
    from .app import Gateway

GC_YOUNG_THRESHOLD = 5000


def settle_gc() -> None:
    """Once serving starts. Everything alive now (modules, model, tables) lives as long as the
    process: moved out of the collector's reach, a full collection no longer walks it (such
    passes showed as tail-latency spikes). And in-flight requests keep thousands of young
    objects alive, which CPython's default of a young collection per 700 net allocations walks
    over and over: a higher threshold halves the time spent collecting without longer pauses
    (README, "Benchmarks", has the figures)."""
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])


def configure_logging(level: str) -> QueueListener:
    """Our loggers hand records to a queue; a listener thread writes them to stderr, so the
    event loop never blocks on a slow log reader. Start the returned listener; stopping it
    writes what is still queued."""
    gateway = logging.StreamHandler(sys.stderr)
    gateway.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    access = logging.StreamHandler(sys.stderr)
    access.setFormatter(logging.Formatter("%(message)s"))  # records are JSON already
    access.addFilter(lambda record: record.name == "tensafe.access")
    gateway.addFilter(lambda record: record.name != "tensafe.access")
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    listener = QueueListener(records, gateway, access, respect_handler_level=True)
    to_queue = QueueHandler(records)
    root = logging.getLogger("tensafe")
    root.handlers[:] = [to_queue]
    root.setLevel(level.upper())
    for name in ("engine", "cache", "adapters"):
        logging.getLogger(name).handlers[:] = [to_queue]
        logging.getLogger(name).setLevel(level.upper())
    acc = logging.getLogger("tensafe.access")
    acc.handlers[:] = [to_queue]
    acc.propagate = False
    return listener


def uvicorn_config(app: Any, settings: Settings, **overrides: Any) -> uvicorn.Config:
    """uvicorn's configuration for the gateway: our HTTP protocol with the settings' connection
    limits (gateway/http_protocol.py), uvicorn's own access log off (the gateway writes its own)
    and the lifespan on (it starts and stops the backend). ``overrides`` are further
    ``uvicorn.Config`` arguments, replacing these."""
    protocol = GatewayHttpProtocol.configured(header_timeout_s=settings.header_timeout_s,
                                              max_header_bytes=settings.max_header_bytes,
                                              retry_after_s=settings.retry_after_s)
    options: dict[str, Any] = {
        "host": settings.host, "port": settings.port, "log_level": settings.log_level, "access_log": False,
        "timeout_graceful_shutdown": int(settings.drain_timeout_s), "lifespan": "on", "http": protocol,
        "limit_concurrency": settings.max_connections, "timeout_keep_alive": settings.keep_alive_timeout_s,
        # for anyone passing http="h11": its bound on an incomplete request's headers
        "h11_max_incomplete_event_size": settings.max_header_bytes,
    }
    if settings.tls_certfile:
        options.update(ssl_certfile=settings.tls_certfile, ssl_keyfile=settings.tls_keyfile or None)
    return uvicorn.Config(app, **{**options, **overrides})


def serve_app(settings: Settings, build: Callable[[Callable[[], None]], Any]) -> None:
    """Run the ASGI app ``build(on_stopped)`` returns on uvicorn with our logging, until SIGTERM
    and its drain. The app calls ``on_stopped`` once its lifespan has shut everything down: the
    log records still queued are written then, before uvicorn re-raises the caught SIGTERM (which
    ends the process on the spot). The gateway and ``tensafe worker`` both run this way."""
    listener = configure_logging(settings.log_level)
    listener.start()
    running = [True]

    def flush_logs() -> None:
        if running[0]:
            running[0] = False
            listener.stop()

    app = build(flush_logs)
    try:
        uvicorn.Server(uvicorn_config(app, settings)).run()
    finally:
        flush_logs()


def run(settings: Settings, on_ready: Callable[[Gateway], None] | None = None) -> None:
    from .app import create_app

    def ready(gateway: Gateway) -> None:
        settle_gc()
        if on_ready is not None:
            on_ready(gateway)

    serve_app(settings, lambda on_stopped: create_app(settings, on_ready=ready, on_stopped=on_stopped))

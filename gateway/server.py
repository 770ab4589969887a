"""Run the app on uvicorn with our logging and a graceful drain on SIGTERM: uvicorn stops
accepting, lets in-flight streams finish for up to ``drain_timeout_s``, then the lifespan
shuts the backend down."""
from __future__ import annotations

import gc
import logging
import sys
from collections.abc import Callable

import uvicorn

from .app import Gateway, create_app
from .settings import Settings


def configure_logging(level: str) -> None:
    gateway = logging.StreamHandler(sys.stderr)
    gateway.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    access = logging.StreamHandler(sys.stderr)
    access.setFormatter(logging.Formatter("%(message)s"))  # records are JSON already
    root = logging.getLogger("tensafe")
    root.handlers[:] = [gateway]
    root.setLevel(level.upper())
    for name in ("engine", "cache", "adapters"):
        logging.getLogger(name).handlers[:] = [gateway]
        logging.getLogger(name).setLevel(level.upper())
    acc = logging.getLogger("tensafe.access")
    acc.handlers[:] = [access]
    acc.propagate = False


def run(settings: Settings, on_ready: Callable[[Gateway], None] | None = None) -> None:
    configure_logging(settings.log_level)

    def ready(gateway: Gateway) -> None:
        # Everything alive now (modules, model, tables) lives as long as the process: moved out
        # of the collector's reach, a full collection no longer walks it (90 ms pauses here).
        gc.freeze()
        if on_ready is not None:
            on_ready(gateway)

    app = create_app(settings, on_ready=ready)
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=settings.log_level, access_log=False,
        timeout_graceful_shutdown=int(settings.drain_timeout_s), lifespan="on",
    )
    uvicorn.Server(config).run()

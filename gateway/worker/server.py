"""The ``tensafe worker`` process: the embedded engine, configured from the same settings as
the gateway's own engine, served by ``worker.app`` on uvicorn the way the gateway is served
(``gateway.server``: our HTTP protocol's connection limits, queued logging, the SIGTERM drain
of in-flight streams, then the engine shuts down)."""
from __future__ import annotations

from ..backends.embedded import EmbeddedBackend, engine_config
from ..bearer import parse_tokens
from ..server import serve_app, settle_gc
from ..settings import Settings
from .app import WorkerLimits, create_worker_app


def limits_of(settings: Settings) -> WorkerLimits:
    return WorkerLimits(max_body_bytes=settings.max_body_bytes, max_adapter_bytes=settings.worker_max_adapter_bytes,
                        max_queue=settings.max_queue, max_lora_rank=settings.max_lora_rank)


def run(settings: Settings) -> None:
    tokens = parse_tokens(settings.worker_tokens)
    backend = EmbeddedBackend(engine_config(settings), name="worker")
    serve_app(settings, lambda on_stopped: create_worker_app(backend, limits_of(settings), tokens, on_ready=settle_gc,
                                                             on_stopped=on_stopped))

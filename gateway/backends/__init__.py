"""Backends behind one interface, chosen by name from a registry (no if/elif on kinds)."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..settings import Settings
from .base import Backend, BackendChunk, BackendRequest, Capacity, Health, LoraConfig, Message, Sampling


def _embedded(settings: Settings) -> Backend:
    from .embedded import EmbeddedBackend

    return EmbeddedBackend(settings.engine_config())


def _null(settings: Settings) -> Backend:
    import json

    from .null import NullBackend

    # the served model's config, when its checkpoint is already prepared, so uploads validate
    config_file = Path(settings.model).expanduser() / "config.json"
    if not config_file.is_file():
        config_file = settings.model_cache / settings.model / "config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else None
    return NullBackend(model_config=config, model=settings.model_name, tokens=settings.null_tokens,
                       token_delay_s=settings.null_token_delay_s, max_num_seqs=settings.max_num_seqs,
                       max_queue=settings.max_queue, max_model_len=settings.max_model_len,
                       max_loras=settings.max_loras, max_lora_rank=settings.max_lora_rank)


BACKENDS: dict[str, Callable[[Settings], Backend]] = {"embedded": _embedded, "null": _null}


def create_backend(settings: Settings) -> Backend:
    try:
        factory = BACKENDS[settings.backend]
    except KeyError:
        raise ValueError(f"unknown backend {settings.backend!r}; choose one of {', '.join(BACKENDS)}") from None
    return factory(settings)


__all__ = ["BACKENDS", "Backend", "BackendChunk", "BackendRequest", "Capacity", "Health", "LoraConfig", "Message",
           "Sampling", "create_backend"]

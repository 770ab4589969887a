"""Backends behind one interface, chosen by name from a registry (no if/elif on kinds)."""
from __future__ import annotations

from collections.abc import Callable

from adapters.lora import LoraConfig

from ..settings import Settings, SettingsError
from .base import Backend, BackendChunk, BackendRequest, Capacity, Health, Message, Sampling


def _embedded(settings: Settings) -> Backend:
    from .embedded import EmbeddedBackend, engine_config

    return EmbeddedBackend(engine_config(settings))


def _null(settings: Settings) -> Backend:
    from .null import NullBackend, model_config_of

    return NullBackend(model_config=model_config_of(settings.model), model=settings.model_name,
                       tokens=settings.null_tokens,
                       token_delay_s=settings.null_token_delay_s, max_num_seqs=settings.max_num_seqs,
                       token_delay_per_seq_s=settings.null_token_delay_per_seq_s,
                       load_delay_s=settings.null_load_delay_s,
                       max_queue=settings.max_queue, max_model_len=settings.max_model_len,
                       max_loras=settings.max_loras, max_lora_rank=settings.max_lora_rank)


def _tensafe(settings: Settings) -> Backend:
    from .remote import RemoteBackend

    if not settings.remote_url:
        raise SettingsError("remote_url", "backend tensafe needs the worker's URL (--remote-url http://host:port)")
    return RemoteBackend(settings.remote_url, settings.remote_token, name="tensafe",
                         stream_timeout_s=settings.request_timeout_s)


BACKENDS: dict[str, Callable[[Settings], Backend]] = {"embedded": _embedded, "null": _null, "tensafe": _tensafe}


def create_backend(settings: Settings) -> Backend:
    try:
        factory = BACKENDS[settings.backend]
    except KeyError:
        raise ValueError(f"unknown backend {settings.backend!r}; choose one of {', '.join(BACKENDS)}") from None
    return factory(settings)


__all__ = ["BACKENDS", "Backend", "BackendChunk", "BackendRequest", "Capacity", "Health", "LoraConfig", "Message",
           "Sampling", "create_backend"]

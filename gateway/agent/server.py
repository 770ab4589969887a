"""The ``tensafe agent`` process: the adapter writer beside one vLLM or LoRAX server, on uvicorn the way
the gateway and the worker run (``gateway.server``). It refuses to start unless its directory
is memory-backed."""
from __future__ import annotations

from ..bearer import parse_tokens
from ..server import serve_app
from ..settings import Settings, SettingsError
from .admin import LoraxAdmin, ServerAdmin
from .app import Agent, create_agent_app
from .holdings import Holdings
from .memfs import filesystem_type, is_memory_backed
from .vllm import VllmAdmin


def vllm_url(settings: Settings) -> str:
    v = settings.vllm
    return settings.agent_vllm_url or f"http://{v.host}:{v.port}"


def server_admin(settings: Settings) -> ServerAdmin:
    if settings.agent_server == "lorax":
        return LoraxAdmin(settings.agent_lorax_url)
    if settings.agent_server == "vllm":
        return VllmAdmin(vllm_url(settings), settings.vllm.api_key)
    raise SettingsError("agent_server", f"{settings.agent_server!r} is not vllm or lorax")


def check(settings: Settings) -> tuple[str, ...]:
    """The agent's tokens, once its settings are fit to run (SettingsError otherwise)."""
    if settings.agent_server not in ("vllm", "lorax"):
        raise SettingsError("agent_server", f"{settings.agent_server!r} is not vllm or lorax")
    tokens = parse_tokens(settings.agent_tokens)
    if not tokens:
        raise SettingsError("agent_tokens", "the agent needs at least one token (TENSAFE_AGENT_TOKENS; "
                            "comma-separated, two while rotating)")
    root = settings.agent_dir
    try:
        root.mkdir(mode=0o750, parents=True, exist_ok=True)
    except OSError as exc:
        raise SettingsError("agent_dir", f"cannot create {root}: {exc}") from None
    if not is_memory_backed(root):
        raise SettingsError("agent_dir", f"{root} is on {filesystem_type(root) or 'an unknown file system'}, not "
                            "tmpfs or ramfs: decrypted adapters must never reach a persistent disk (use /dev/shm "
                            "or an emptyDir with medium: Memory)")
    return tokens


def build_agent(settings: Settings) -> Agent:
    holdings = Holdings(settings.agent_dir, server_admin(settings), max_adapters=settings.agent_max_adapters,
                        max_bytes=settings.agent_max_bytes, max_lease_s=settings.agent_max_lease_s)
    return Agent(holdings, max_body_bytes=settings.agent_max_bytes)


def run(settings: Settings) -> None:
    tokens = check(settings)
    serve_app(settings, lambda on_stopped: create_agent_app(build_agent(settings), tokens, on_stopped=on_stopped))

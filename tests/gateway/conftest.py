"""Gateway fixtures: the real app in-process (httpx ASGI transport) and on a real uvicorn bound
to 127.0.0.1 for the official openai client; the null backend for API behaviour and the real
embedded engine for end-to-end runs."""
from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import uvicorn

from gateway.app import create_app
from gateway.server import uvicorn_config
from gateway.settings import Settings
from tests.adapters.builders import SMOLLM2, lora_tensors, peft_config, write_peft_dir

API_KEY = "tsk-test-key"
BASE = "smollm2-135m-instruct"
#: the test vLLM server's settings: 2 adapters per batch and in its CPU cache, so a third one
#: already makes vLLM drop one and reread its files; float32, so greedy outputs compare exactly
VLLM_OPTIONS = {"max_loras": 2, "max_cpu_loras": 2, "max_lora_rank": 16, "max_num_seqs": 4, "max_model_len": 1024,
                "dtype": "float32"}
SCHEMAS = json.loads((Path(__file__).parent / "data" / "response-schemas.json").read_text())["schemas"]


def validate(payload: Any, schema: str) -> None:
    """Validate against OpenAI's published schema ``schema`` (refs resolved within the file)."""
    root = {"components": {"schemas": SCHEMAS}, **SCHEMAS[schema]}
    jsonschema.validate(payload, root)


def settings(tmp: Path, **overrides: Any) -> Settings:
    values = {"backend": "null", "api_key": API_KEY, "data_dir": str(tmp / "data"), "access_log": True}
    values.update(overrides)
    return Settings.load(values, env={})


@contextlib.asynccontextmanager
async def asgi_client(app) -> AsyncIterator[httpx.AsyncClient]:
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway",
                                     headers={"authorization": f"Bearer {API_KEY}"}) as client:
            yield client


class Server:
    """A real uvicorn serving ``app`` on 127.0.0.1 in a background thread, configured as
    ``tensafe serve`` configures it, from the gateway's settings (defaults for an app that is
    not the gateway)."""

    def __init__(self, app) -> None:
        self.app = app
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        gateway = getattr(app.state, "gateway", None)
        config = uvicorn_config(app, gateway.settings if gateway is not None else Settings(), log_level="warning",
                                timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.run(self.server.serve(sockets=[self.sock]))

    def __enter__(self) -> "Server":
        self.thread.start()
        deadline = 120.0
        import time

        t0 = time.monotonic()
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() - t0 > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()

    @property
    def gateway(self):
        return self.app.state.gateway


@pytest.fixture()
def null_settings(tmp_path: Path) -> Settings:
    return settings(tmp_path)


@pytest.fixture()
async def client(null_settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with asgi_client(create_app(null_settings)) as c:
        yield c


@pytest.fixture(scope="session")
def adapter_dirs(tmp_path_factory) -> dict[str, Path]:
    """Two small real PEFT adapters (random weights) for the base model."""
    root = tmp_path_factory.mktemp("gw-adapters")
    return {
        name: write_peft_dir(root / name, peft_config(rank, targets, alpha=2 * rank),
                             lora_tensors(SMOLLM2, rank, targets, seed=seed))
        for name, rank, targets, seed in (("support", 4, ("q_proj", "v_proj"), 1), ("legal", 8, ("o_proj",), 2))
    }


@pytest.fixture(scope="session")
def embedded_server(tmp_path_factory, adapter_dirs, checkpoint) -> Iterator[Server]:
    """The gateway on the real model (SmolLM2-135M), shared by the end-to-end tests."""
    tmp = tmp_path_factory.mktemp("gw-embedded")
    adapters = ",".join(f"{name}={path}" for name, path in adapter_dirs.items())
    s = settings(tmp, backend="embedded", max_num_seqs=32, max_model_len=512, max_queue=64, adapters=adapters,
                 max_loras=4)
    with Server(create_app(s)) as server:
        yield server


@pytest.fixture(scope="session")
def vllm_server(tmp_path_factory, checkpoint):
    """One real vLLM CPU server for the whole run (LoRA on, 2 adapters per batch and in its CPU
    cache, float32), started as ``tensafe vllm-command`` says."""
    from loadtests.vllm_procs import VllmServer

    server = VllmServer(tmp_path_factory.mktemp("vllm"), checkpoint, VLLM_OPTIONS)
    server.start()
    yield server
    server.kill()


@pytest.fixture()
def shm_dir():
    """A fresh directory on tmpfs (/dev/shm), removed afterwards."""
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="tensafe-test-", dir="/dev/shm"))
    yield path
    shutil.rmtree(path, ignore_errors=True)

